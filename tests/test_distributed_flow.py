"""Training on several processes from the flow itself (``train.processes``): `nerveseg run` launches the
train stage under torchrun (gloo on the CPU), and the model reaches the registry and the gate with its
lineage; its curve follows a one-process run with the same global batch; a failing rank fails the task
with that rank's error, at once."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from tests.conftest import TINY_SETTINGS, deep_update, make_project, seed_mlflow_store, with_settings, write_settings

pytestmark = pytest.mark.e2e

MODEL = "nerve-segmentation"
# Two ranks on two cores: one thread each. The global batch (train.batch_size) is the same for both runs.
SETTINGS = deep_update(TINY_SETTINGS, {"train": {"processes": 2, "device": "cpu", "threads": 1, "epochs": 3,
                                                 "batch_size": 8, "amp_cpu": False}})
# Per-epoch training loss of the 2-process run against the 1-process run, same data, seed and global
# batch: the ranks shuffle their own shards, so the order differs, not the recipe (measured: tests below).
LOSS_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, prefect_server, mlflow_store_template):
    from flows.retrain import retrain

    root = make_project(tmp_path_factory.mktemp("distributed") / "project", SETTINGS)
    seed_mlflow_store(root / "mlflow", mlflow_store_template)  # an empty store: MLflow's migrations done once
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
    # the curves come from rank 0's history: one point per epoch run
    assert len(registry.client().get_metric_history(run.info.run_id, "val_dice")) == result["train"]["epochs_run"]


def test_its_curve_follows_a_one_process_run_with_the_same_global_batch(two_process_run, tmp_path):
    """The one-process reference is the train stage itself (what the flow's train task runs for
    ``train.processes: 1``), on the frames the flow prepared, into a folder of its own."""
    import torch

    from pipeline.config import load_params
    from pipeline.paths import ProjectPaths
    from pipeline.train import HISTORY, train

    root, _, two = two_process_run
    params = with_settings(load_params(root / "params.yaml"), {"train": {"processes": 1}})
    assert params.train.model_dump() == {**load_params(root / "params.yaml").train.model_dump(), "processes": 1}
    threads = torch.get_num_threads()
    try:
        train(ProjectPaths.of(root, params).prepared_dir, tmp_path / "one", params, progress=False)
    finally:
        torch.set_num_threads(threads)  # train.threads: 1 is for this run, not for the rest of this process
    one = pd.read_csv(tmp_path / "one" / HISTORY)
    assert list(one["epoch"]) == list(two["epoch"]) == [1, 2, 3]
    gaps = (one["loss"] - two["loss"]).abs()
    assert gaps.max() <= LOSS_TOLERANCE, f"per-epoch training loss differs by {list(gaps.round(4))}"
    assert two["loss"].iloc[-1] < two["loss"].iloc[0]  # and it learns


def test_a_failing_rank_fails_the_task_with_its_error_at_once(two_process_run, monkeypatch):
    from flows import retrain as flow
    from pipeline.launch import DistributedTrainingError

    root, _, _ = two_process_run
    write_settings(root, deep_update(SETTINGS, {"train": {"epochs": 4, "min_epochs": 4}}))
    (root / "models" / "checkpoint.pt").unlink(missing_ok=True)
    (root / "models" / "checkpoint.pt" / "in-the-way").mkdir(parents=True)  # rank 0 cannot write: a full disk
    # The task's retry runs as in production (it fails the same way); only its 10 s pause before it is left out.
    monkeypatch.setattr(flow, "train_task", flow.train_task.with_options(retry_delay_seconds=0))
    began = time.monotonic()
    # The rank that failed, and its own error whole: not rank 1's lost connection when rank 0's process ended.
    with pytest.raises(DistributedTrainingError,
                       match=r"on rank 0: IsADirectoryError: \[Errno 21\] Is a directory: .*models/checkpoint\.pt'$"):
        flow.retrain(project_dir=str(root), force=True)
    assert time.monotonic() - began < 180


# What torchrun forwards when rank 0 cannot write its checkpoint, as seen under load: rank 1, in its next
# all-reduce, loses its peer and prints its own error last (the launcher once reported that one, cut to
# "RuntimeError:" by rich, which folds each message over 80-column lines). The launcher asks the ranks for
# plain tracebacks; rich's, where an operator's environment asks for them, must be read as well.
def _traceback(rank: int, frame: str, error: list[str], style: str) -> list[str]:
    if style == "rich":
        lines = ["╭───────────────────── Traceback (most recent call last) ──────────────────────╮",
                 f"│ {frame + ':84 in save_checkpoint':<76} │",
                 "│    84 │   save_atomic({                                                      │",
                 "╰──────────────────────────────────────────────────────────────────────────────╯", *error]
    else:
        lines = ["Traceback (most recent call last):", f'  File "{frame}", line 84, in save_checkpoint',
                 "    save_atomic({", *(["".join(error)] if error else [])]
    return [f"[rank{rank}]: {line}" for line in lines]


DISK_FULL = ["IsADirectoryError: [Errno 21] Is a directory: ",
             "'/srv/project/models/.checkpoint.pt.0ddjz4p7.tmp' -> ",
             "'/srv/project/models/checkpoint.pt'"]
PEER_GONE = ["RuntimeError: ", "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] ",
             "Connection closed by peer [127.0.0.1]:55173. This is typically caused by a ",
             "remote worker crashing. Check the logs of the remote worker before reporting an ", "error. GLHF!"]


def _torchrun_output(first: list[str], second: list[str], root_cause: int, style: str = "plain") -> list[str]:
    summary = []
    for title, rank in (("Failures:", 1 - root_cause), ("Root Cause (first observed failure):", root_cause)):
        summary += [title, f"[{rank}]:", "  time      : 2026-12-06_18:32:18", "  host      : localhost",
                    f"  rank      : {rank} (local_rank: {rank})", "  exitcode  : 1 (pid: 32562)",
                    "  error_file: <N/A>", "-" * 60]
    return ["epoch 1/4: 100%|██████████| 1/1 [00:00<00:00,  5.84it/s, loss=2.094]",
            *_traceback(0, "/srv/nerveseg/pipeline/checkpoints.py", first, style),
            *_traceback(1, "/srv/torch/autograd/graph.py", second, style),
            "E1206 18:32:18.410000 32457 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) "
            "local_rank: 0 (pid: 32562) of binary: /srv/venv/bin/nerveseg", "Traceback (most recent call last):",
            '  File "/srv/venv/bin/torchrun", line 8, in <module>',
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "=" * 60,
            "/srv/venv/bin/nerveseg FAILED", "-" * 60, *summary]


@pytest.mark.parametrize("style", ["plain", "rich"])
@pytest.mark.parametrize("root_cause", [0, 1])
def test_the_launcher_names_the_rank_that_failed_and_its_whole_error_not_a_peers_lost_connection(root_cause, style,
                                                                                                  monkeypatch):
    """Whichever rank torchrun saw exit first, and whichever error it printed last, the rank named is the
    one whose error is its own, with that error's whole message."""
    from pipeline.launch import _environment, failure, peer_lost

    disk_full = ("IsADirectoryError: [Errno 21] Is a directory: '/srv/project/models/.checkpoint.pt.0ddjz4p7.tmp' "
                 "-> '/srv/project/models/checkpoint.pt'")
    assert failure(_torchrun_output(DISK_FULL, PEER_GONE, root_cause, style), 1) == \
        f"distributed training failed on rank 0: {disk_full}"
    # the other way round: rank 1 failed, and rank 0 lost its peer
    assert failure(_torchrun_output(PEER_GONE, DISK_FULL, root_cause, style), 1) == \
        f"distributed training failed on rank 1: {disk_full}"
    # only lost connections: torchrun's root cause, with its whole message
    lost = failure(_torchrun_output(PEER_GONE, PEER_GONE, root_cause, style), 1)
    assert lost == (f"distributed training failed on rank {root_cause}: RuntimeError: "
                    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                    "[127.0.0.1]:55173. This is typically caused by a remote worker crashing. Check the logs of the "
                    "remote worker before reporting an error. GLHF!")
    assert peer_lost(lost) and not peer_lost(disk_full)
    monkeypatch.delenv("TYPER_STANDARD_TRACEBACK", raising=False)
    assert _environment(2, cuda=False)["TYPER_STANDARD_TRACEBACK"]  # the ranks print plain tracebacks


def test_the_launcher_reads_an_error_raised_before_the_ranks_joined_their_group():
    """Before the process group exists no "[rankN]: " prefix is printed: the exception lines themselves."""
    from pipeline.launch import failure

    lines = ["Traceback (most recent call last):", '  File "/srv/nerveseg/pipeline/train.py", line 162, in train',
             "ValueError: /srv/project/data/prepared: the train or validation part is empty; add subjects",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "Root Cause (first observed failure):",
             "[1]:", "  rank      : 1 (local_rank: 1)"]
    assert failure(lines, 1) == ("distributed training failed on rank 1: ValueError: /srv/project/data/prepared: "
                                 "the train or validation part is empty; add subjects")
    assert failure(["killed"], -9) == "distributed training failed on a rank: exit code -9"
    # a rank killed (out of memory, say) prints nothing; its peer loses the connection: how torchrun saw it end
    killed = _torchrun_output([], PEER_GONE, root_cause=0)
    exit_line = killed.index("  rank      : 0 (local_rank: 0)") + 1
    killed[exit_line:exit_line + 1] = ["  exitcode  : -9 (pid: 32562)",
                                       "  traceback : Signal 9 (SIGKILL) received by PID 32562"]
    assert failure(killed, 1) == "distributed training failed on rank 0: Signal 9 (SIGKILL) received by PID 32562"
