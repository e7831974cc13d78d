"""Training on several processes from the flow itself (``train.processes``): `nerveseg run` launches the
train stage under torchrun (gloo on the CPU), and the model reaches the registry and the gate with its
lineage; its curve follows a one-process run with the same global batch; a failing rank fails the task
with that rank's error, at once."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from tests.conftest import TINY_SETTINGS, deep_update, make_project, write_settings

pytestmark = pytest.mark.e2e

MODEL = "nerve-segmentation"
# Two ranks on two cores: one thread each. The global batch (train.batch_size) is the same for both runs.
SETTINGS = deep_update(TINY_SETTINGS, {"train": {"processes": 2, "device": "cpu", "threads": 1, "epochs": 3,
                                                 "batch_size": 8, "amp_cpu": False}})
# Per-epoch training loss of the 2-process run against the 1-process run, same data, seed and global
# batch: the ranks shuffle their own shards, so the order differs, not the recipe (measured: tests below).
LOSS_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, prefect_server):
    from flows.retrain import retrain

    root = make_project(tmp_path_factory.mktemp("distributed") / "project", SETTINGS)
    result = retrain(project_dir=str(root))
    return root, result, pd.read_csv(root / "models" / "history.csv")


def test_a_two_process_training_started_by_the_flow_is_registered_and_gated(two_process_run):
    from pipeline import registry, release

    root, result, _ = two_process_run
    registry.configure(root / "mlflow", MODEL)
    version = registry.client().get_model_version(MODEL, result["version"])
    run = registry.client().get_run(version.run_id)
    assert (run.data.tags["train.processes"], run.data.tags["train.backend"], run.data.tags["train.global_batch"]) == (
        "2", "gloo", "8")
    assert version.tags[registry.TAG_DATA_HASH] == result["data"]["dvc_hash"]  # lineage, as for one process
    assert [e["action"] for e in release.history(MODEL)] == ["promote"]  # gated and recorded
    assert str(registry.version_by_alias(MODEL, registry.CHAMPION).version) == str(result["version"])
    assert len(run.data.metrics) and registry.client().get_metric_history(run.info.run_id, "val_dice")


def test_its_curve_follows_a_one_process_run_with_the_same_global_batch(two_process_run):
    from flows.retrain import retrain

    root, _, two = two_process_run
    write_settings(root, deep_update(SETTINGS, {"train": {"processes": 1}}))
    retrain(project_dir=str(root), force=True)
    one = pd.read_csv(root / "models" / "history.csv")
    assert list(one["epoch"]) == list(two["epoch"]) == [1, 2, 3]
    gaps = (one["loss"] - two["loss"]).abs()
    assert gaps.max() <= LOSS_TOLERANCE, f"per-epoch training loss differs by {list(gaps.round(4))}"
    assert two["loss"].iloc[-1] < two["loss"].iloc[0]  # and it learns


def test_a_failing_rank_fails_the_task_with_its_error_at_once(two_process_run):
    from flows.retrain import retrain
    from pipeline.launch import DistributedTrainingError

    root, _, _ = two_process_run
    write_settings(root, deep_update(SETTINGS, {"train": {"epochs": 4, "min_epochs": 4}}))
    (root / "models" / "checkpoint.pt").unlink(missing_ok=True)
    (root / "models" / "checkpoint.pt" / "in-the-way").mkdir(parents=True)  # rank 0 cannot write: a full disk
    began = time.monotonic()
    with pytest.raises(DistributedTrainingError, match=r"rank 0.*IsADirectoryError"):
        retrain(project_dir=str(root), force=True)
    assert time.monotonic() - began < 180
