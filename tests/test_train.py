import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import stages
from pipeline.checkpoints import (CHECKPOINT, WEIGHTS, Progress, finished, identity_key, load_model_config,
                                  load_trained, resume, save_atomic, save_checkpoint)
from pipeline.config import TrainParams
from pipeline.devices import Compute
from pipeline.distributed import Distributed, backend, data_parallel, process_group, shard_sampler
from pipeline.model import build_model
from pipeline.preprocess import load_prepared
from pipeline.train import HISTORY, fit, stop_early
from pipeline.weight_average import WeightAverage

from .conftest import tiny_model_config, with_settings


def test_training_writes_weights_history_and_checkpoint(prepared, tiny_params):
    result = stages.fit(prepared, tiny_params, progress=False)
    assert result.epochs_run == tiny_params.train.epochs
    assert result.device == "cpu"
    history = pd.read_csv(prepared.models_dir / HISTORY)
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    # The best epoch is the one with the best validation Dice in the history, and the files say the same.
    best = int(history["val_dice"].idxmax())
    assert (result.best_epoch, result.best_val_dice) == (history["epoch"][best],
                                                         pytest.approx(history["val_dice"][best], abs=1e-6))
    metrics = json.loads((prepared.models_dir / "train_metrics.json").read_text())
    assert (metrics["best_epoch"], metrics["best_val_dice"], metrics["epochs_run"]) == \
        (result.best_epoch, result.best_val_dice, result.epochs_run)
    # The shipped weights are the best epoch's; the checkpoint holds the last epoch's, marked finished.
    checkpoint = torch.load(prepared.models_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["finished"] and checkpoint["epoch"] == 3 and checkpoint["best_epoch"] == result.best_epoch
    weights = torch.load(prepared.models_dir / WEIGHTS, weights_only=True)
    assert _same_state(weights, checkpoint["model"]) == (result.best_epoch == 3)
    # The network is saved with the working size and the train frames' intensity it was trained on.
    config = load_model_config(prepared.models_dir)
    summary = load_prepared(prepared.prepared_dir).summary
    assert (config.height, config.width, config.depth, config.base_width) == (
        tiny_params.preprocess.height, tiny_params.preprocess.width, tiny_params.model.depth,
        tiny_params.model.base_width)
    assert (config.intensity_mean, config.intensity_std) == (summary.intensity_mean, summary.intensity_std)


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
    assert again.resumed_from_epoch is None and again.epochs_run == tiny_params.train.epochs
    assert list(pd.read_csv(prepared.models_dir / HISTORY)["epoch"]) == [1, 2, 3]  # a new history, not appended


# --- the pieces fit() is made of: checkpoints, best tracking, devices, distributed setup ------------------

HISTORY_COLUMNS = ["loss", "dice_loss", "bce_loss", "presence_loss", "val_dice", "val_presence_accuracy", "lr", "epoch"]


def _training_objects(seed: int):
    torch.manual_seed(seed)
    model = build_model(tiny_model_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    return model, optimizer, scheduler, WeightAverage(model, 0.9)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_restores_weights_optimiser_schedule_average_random_state_and_progress(tmp_path):
    model, optimizer, scheduler, average = _training_objects(0)
    loss = sum(o.float().sum() for o in model(torch.randn(2, 1, 32, 44)))
    loss.backward()
    optimizer.step()
    scheduler.step()
    average.update(model)
    progress = Progress()
    progress.record({"epoch": 1, "val_dice": 0.4})
    progress.record({"epoch": 2, "val_dice": 0.3})
    key = identity_key({"params": "p", "data": {"frames": 3}}, 1)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, key, False, 2, progress, model, optimizer, scheduler, average)
    rng = torch.get_rng_state()
    torch.rand(5)  # moves the stream on: the resume must put it back

    fresh = _training_objects(1)
    assert not _same_state(fresh[0].state_dict(), model.state_dict())
    restored = resume(path, key, *fresh)
    assert restored == Progress(3, 0.4, 1, 1, progress.history, 2)
    assert _same_state(fresh[0].state_dict(), model.state_dict())
    assert _same_state(fresh[3].module.state_dict(), average.module.state_dict()) and fresh[3].updates == 1
    assert fresh[1].state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert fresh[2].state_dict() == scheduler.state_dict()
    assert torch.equal(torch.get_rng_state(), rng)
    assert not finished(path, key)

    # Another identity, or a training that ran to its end, starts afresh and changes nothing.
    other = _training_objects(1)
    assert resume(path, identity_key({"params": "q"}, 1), *other) == Progress()
    assert resume(path, identity_key({"params": "p", "data": {"frames": 3}}, 2), *other) == Progress()
    assert not _same_state(other[0].state_dict(), model.state_dict())
    save_checkpoint(path, key, True, 2, progress, model, optimizer, scheduler, None)
    assert finished(path, key) and not finished(path, "another") and not finished(tmp_path / "none.pt", key)
    assert resume(path, key, *other) == Progress()
    assert resume(tmp_path / "none.pt", key, *other) == Progress()


class _Unwritable:
    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path):
    model = _training_objects(0)[0]
    path = tmp_path / "model.pt"
    save_atomic(model.state_dict(), path)
    with pytest.raises(OSError, match="No space"):
        save_atomic({"model": model.state_dict(), "half": _Unwritable()}, path)
    assert _same_state(torch.load(path, weights_only=True), model.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_the_best_epoch_and_the_stale_count_follow_the_validation_dice():
    progress, tp = Progress(), TrainParams(early_stopping_patience=2, min_epochs=1)
    stops = []
    for epoch, dice in enumerate([0.2, 0.5, 0.5, 0.4, 0.6, 0.1, 0.1], 1):
        improved = progress.record({"epoch": epoch, "val_dice": dice})
        assert improved == (epoch in (1, 2, 5))
        stops.append(stop_early(epoch, progress.stale, tp))
    assert (progress.best, progress.best_epoch, progress.stale) == (0.6, 5, 2)
    assert stops == [False, False, False, True, False, False, True]
    assert [row["epoch"] for row in progress.history] == list(range(1, 8))


def test_outside_torchrun_the_distributed_setup_does_nothing(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist = Distributed.from_env()
    assert dist == Distributed(0, 0, 1) and dist.main
    model = torch.nn.Linear(2, 1)
    assert data_parallel(model, dist, torch.device("cpu")) is model
    assert shard_sampler(list(range(10)), dist, seed=1) is None
    with process_group(dist, torch.device("cpu")):
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    second = Distributed.from_env()
    assert (second.rank, second.local_rank, second.world, second.main) == (1, 0, 2, False)
    sampler = shard_sampler(list(range(10)), second, seed=1)
    assert len(sampler) == 5 and sampler.rank == 1
    assert (backend("cpu"), backend("cuda:1"), backend(torch.device("cuda", 0))) == ("gloo", "nccl", "nccl")


def test_compute_puts_batches_where_and_how_the_network_computes():
    cpu = torch.device("cpu")
    assert Compute.for_training(TrainParams(channels_last="auto", amp=False), cpu, "batch") == Compute(cpu, False, True)
    assert Compute.for_training(TrainParams(channels_last="auto", amp=False), cpu, "instance") == Compute(cpu, False, False)
    x, y = Compute(cpu, False, True).batch(torch.zeros(2, 3, 4, 5), torch.zeros(2, 1, 4, 5))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert Compute(cpu, True, False).precision == "bf16" and Compute(cpu, False, False).precision == "fp32"


def _frames(rng, n: int, height: int = 32, width: int = 44):
    x = rng.integers(0, 255, (n, height, width), dtype=np.uint8)
    y = np.zeros((n, height, width), np.uint8)
    y[1::2, 8:20, 10:30] = 1
    x[y > 0] //= 3
    return x, y


def test_one_process_fit_with_a_fixed_seed_repeats_its_history_and_weights(tmp_path, tiny_params):
    """The seeded training is deterministic in one process: two runs agree on every history value, on
    the callbacks and on the weights; the history keeps its columns in their order."""
    rng = np.random.default_rng(0)
    (train_x, train_y), (val_x, val_y) = _frames(rng, 12), _frames(rng, 6)
    params = with_settings(tiny_params, {"train": {"epochs": 2, "warmup_epochs": 1, "ema_decay": 0.9}})
    runs = []
    for name in ("a", "b"):
        calls = []
        result = fit(train_x, train_y, val_x, val_y, tiny_model_config(), params, tmp_path / name, {"test": 1},
                     on_epoch=lambda epoch, row: calls.append((epoch, dict(row))), progress=False)
        runs.append((result, calls, pd.read_csv(tmp_path / name / HISTORY)))
    (first, calls_a, history_a), (second, calls_b, history_b) = runs
    assert list(history_a.columns) == HISTORY_COLUMNS
    pd.testing.assert_frame_equal(history_a, history_b, check_exact=True)
    assert calls_a == calls_b and [epoch for epoch, _ in calls_a] == [1, 2]
    assert [row for _, row in calls_a] == history_a.to_dict("records")
    assert (first.best_epoch, first.best_val_dice, first.epochs_run) == \
        (second.best_epoch, second.best_val_dice, second.epochs_run)
    assert _same_state(load_trained(tmp_path / "a")[0].state_dict(), load_trained(tmp_path / "b")[0].state_dict())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == \
        sorted([CHECKPOINT, WEIGHTS, HISTORY, "model_config.json", "train_metrics.json"])
