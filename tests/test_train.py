import pandas as pd

from pipeline import stages
from pipeline.train import CHECKPOINT, HISTORY, WEIGHTS


def test_training_writes_weights_history_and_checkpoint(prepared, tiny_params):
    result = stages.fit(prepared, tiny_params, progress=False)
    assert result.epochs_run == tiny_params.train.epochs
    assert result.device == "cpu"
    for name in (WEIGHTS, HISTORY, CHECKPOINT, "model_config.json", "train_metrics.json"):
        assert (prepared.models_dir / name).is_file(), name
    history = pd.read_csv(prepared.models_dir / HISTORY)
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]


def test_interrupted_training_resumes_from_its_checkpoint(prepared, tiny_params):
    first = stages.fit(prepared, tiny_params, progress=False, max_epochs_this_call=1)
    assert first.epochs_run == 1
    second = stages.fit(prepared, tiny_params, progress=False)
    assert second.resumed_from_epoch == 1
    assert second.epochs_run == tiny_params.train.epochs
    assert len(pd.read_csv(prepared.models_dir / HISTORY)) == tiny_params.train.epochs


def test_finished_training_starts_afresh(prepared, tiny_params):
    stages.fit(prepared, tiny_params, progress=False)
    again = stages.fit(prepared, tiny_params, progress=False)
    assert again.resumed_from_epoch is None
