"""Approval before promotion (``promotion.require_approval``), on the real flow, a real Prefect
server and a real MLflow store: the run pauses with typed input, `nerveseg reject` / `approve`
answer it, and no answer in time means no promotion. Every outcome is in the ledger."""

from __future__ import annotations

import getpass

import threading
import time

import pytest
from typer.testing import CliRunner

from tests.conftest import TINY_SETTINGS, deep_update, make_project, seed_mlflow_store, write_settings

pytestmark = pytest.mark.e2e

MODEL = "nerve-segmentation"
# What is trained does not matter here, only the pause and the answers: one epoch, three frames a subject (the
# 6 subjects keep the split's holdout; 18 frames clear validation.min_frames). The flow checks for an answer every
# max(1, min(5, timeout // 20)) s: a timeout under 40 s has it resume within a second of the answer, and 30 s
# is still ample for the tests to answer in.
FAST = deep_update(TINY_SETTINGS, {"data": {"synth": {"frames_per_subject": 3}}, "train": {"epochs": 1},
                                   "evaluate": {"overlays": 1},
                                   "promotion": {"require_approval": True, "approval_timeout_s": 30}})


def _registry(root):
    from pipeline import registry

    registry.configure(root / "mlflow", "nerve-segmentation")
    return registry


def _start(root, **kwargs) -> tuple[threading.Thread, dict]:
    """Run the flow in a thread; its result or exception lands in the returned dict."""
    from flows.retrain import retrain

    out: dict = {}

    def target():
        try:
            out["result"] = retrain(project_dir=str(root), **kwargs)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _wait_paused(thread, out, limit: float = 600.0):  # generous: a loaded CI machine trains slowly
    """The flow run once it is PAUSED on the server."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + limit
    state_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    while time.monotonic() < deadline:
        assert thread.is_alive() or out, "the flow thread ended without a result"
        if out:
            pytest.fail(f"the flow ended instead of pausing: {out}")
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=state_filter)
        if runs:
            assert len(runs) == 1
            return runs[0]
        time.sleep(0.25)
    pytest.fail(f"no paused flow run within {limit} s")


@pytest.fixture(scope="module")
def approval_project(tmp_path_factory, prefect_server, mlflow_store_template):
    root = make_project(tmp_path_factory.mktemp("approval") / "project", FAST)
    seed_mlflow_store(root / "mlflow", mlflow_store_template)  # an empty store: MLflow's migrations done once
    return root


def _events(root):
    from pipeline import release

    _registry(root)
    return release.history(MODEL)


def test_rejected_approval_does_not_promote(approval_project):
    from prefect import get_client

    from flows.cli import app

    root = approval_project
    thread, out = _start(root)
    run = _wait_paused(thread, out)
    registry = _registry(root)
    assert registry.version_by_alias(MODEL, registry.CHAMPION) is None  # nothing moved while waiting
    assert registry.client().get_model_version(MODEL, "1").tags["promotion.decision"] == "awaiting_approval"
    with get_client(sync_client=True) as client:  # what the UI shows: the evidence and the commands
        description = client.read_flow_run_input(run.id, "paused-approval-description")
        artifacts = {a.key for a in client.read_artifacts() if a.flow_run_id == run.id}
    assert "Approval needed" in description and f"nerveseg approve {run.id}" in description
    assert "approval-request" in artifacts

    answered = CliRunner().invoke(app, ["reject", str(run.id), "--reason", "holdout too small", "--actor", "bob",
                                        "-C", str(root)])
    assert answered.exit_code == 0, answered.output
    thread.join(120)
    assert "result" in out, out
    decision = out["result"]["decision"]
    assert decision["promote"] is False and decision["approval"] == {
        "answer": "reject", "actor": getpass.getuser(), "on_behalf_of": "bob", "reason": "holdout too small"}
    assert registry.version_by_alias(MODEL, registry.CHAMPION) is None
    assert str(registry.version_by_alias(MODEL, registry.CHALLENGER).version) == "1"
    last = _events(root)[-1]
    assert (last["version"], last["action"], last["actor"], last["on_behalf_of"], last["reason"]) == (
        "1", "reject", getpass.getuser(), "bob", "holdout too small")
    assert last["identity"] == "os-user" and last["moved_by"] == getpass.getuser()
    from pipeline import versioning

    assert last["approval"]["answer"] == "reject"
    # the ledger keeps the gate's evidence and the data the version was trained on
    assert last["data_hash"] == versioning.current_data_version(root, root / "data" / "raw").dvc_hash
    assert last["interval"] == [None, None]  # the first model: no champion to compare with

    again = CliRunner().invoke(app, ["approve", str(run.id), "--reason", "late", "-C", str(root)])
    assert again.exit_code == 1 and "not waiting for approval" in again.output


def test_unanswered_approval_times_out_without_promotion(approval_project):
    from flows.approval import ApprovalTimeout
    from pipeline import versioning

    root = approval_project
    write_settings(root, deep_update(FAST, {"promotion": {"approval_timeout_s": 1}}))
    versioning.git_commit(root, ["params.yaml"], "params: a short approval timeout")
    thread, out = _start(root, force=True)
    thread.join(240)
    assert isinstance(out.get("error"), ApprovalTimeout), out
    registry = _registry(root)
    assert registry.version_by_alias(MODEL, registry.CHAMPION) is None
    assert str(registry.version_by_alias(MODEL, registry.CHALLENGER).version) == "2"
    last = _events(root)[-1]
    assert (last["version"], last["action"], last["actor"]) == ("2", "reject", "timeout")
    assert "no answer within 1 s" in last["reason"] and last["approval"]["answer"] == "timeout"
    assert registry.client().get_model_version(MODEL, "2").tags["promotion.approval"] == "timeout"


def test_approved_promotion_moves_champion(approval_project):
    from flows.cli import app
    from pipeline import versioning

    root = approval_project
    write_settings(root, FAST)
    versioning.git_commit(root, ["params.yaml"], "params: approval timeout back")
    thread, out = _start(root, force=True)
    run = _wait_paused(thread, out)
    answered = CliRunner().invoke(app, ["approve", str(run.id), "--reason", "reviewed the overlays",
                                        "--actor", "alice", "-C", str(root)])
    assert answered.exit_code == 0, answered.output
    thread.join(120)
    assert "result" in out, out
    version = out["result"]["version"]
    registry = _registry(root)
    assert str(registry.version_by_alias(MODEL, registry.CHAMPION).version) == version == "3"
    last = _events(root)[-1]
    assert (last["version"], last["action"], last["actor"], last["on_behalf_of"], last["reason"]) == (
        "3", "promote", getpass.getuser(), "alice", "reviewed the overlays")
    from pipeline import release

    assert release.unrecorded_alias_move(MODEL) is None  # the ledger agrees with the alias
    ledger = CliRunner().invoke(app, ["ledger", "-C", str(root)])
    assert f"by {getpass.getuser()} (on behalf of alice): reviewed the overlays" in ledger.output
    assert "by timeout" in ledger.output
