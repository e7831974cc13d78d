"""Scheduled retraining on a real Prefect server: a cron deployment on a process work pool, runs created
through the server's API and executed by a real process worker, and the deployment's concurrency limit
serialising two runs (the second waits for the first instead of failing)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from typer.testing import CliRunner

from tests.conftest import TINY_SETTINGS, deep_update, make_project
from tests.service_helpers import services, wait_for

pytestmark = pytest.mark.e2e

# What is trained does not matter here, only how the runs are scheduled: one epoch, one overlay.
SETTINGS = deep_update(TINY_SETTINGS, {"train": {"epochs": 1}, "evaluate": {"overlays": 1}})


@pytest.fixture(scope="module")
def served_project(tmp_path_factory):
    """A tiny project with its services up, a cron deployment and a process worker (polling every second;
    a run that waits for the concurrency slot is retried after 3 s instead of 30)."""
    from flows.services import start_worker

    root = make_project(tmp_path_factory.mktemp("schedule") / "project", SETTINGS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
        mp.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "3")
        with services(root) as (state, config):
            result = CliRunner().invoke(_app(), ["schedule", "--cron", "0 3 * * 1", "-C", str(root)])
            assert result.exit_code == 0, result.output
            start_worker(root, config, echo=lambda _: None)
            yield root, state


def _app():
    from flows.cli import app

    return app


def test_cron_deployment_is_listed_with_its_next_run(served_project):
    root, state = served_project
    result = CliRunner().invoke(_app(), ["schedule", "--list", "--json", "-C", str(root)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["deployment"] for r in rows] == ["retrain/nerveseg"]
    row = rows[0]
    assert row["schedules"] == ["0 3 * * 1"] and row["paused"] is False and row["work_pool"] == "nerveseg"
    assert row["concurrency_limit"] == 1 and row["collision_strategy"] == "ENQUEUE"
    assert row["parameters"]["project_dir"] == str(root)
    next_run = datetime.fromisoformat(row["next_run"]).astimezone(timezone.utc)
    assert next_run > datetime.now(timezone.utc) and next_run.weekday() == 0 and (next_run.hour, next_run.minute) == (3, 0)
    text = CliRunner().invoke(_app(), ["schedule", "--list", "-C", str(root)]).stdout
    assert "retrain/nerveseg" in text and "0 3 * * 1" in text and "next run" in text


def test_runs_triggered_through_the_api_run_on_the_worker_one_at_a_time(served_project):
    """Two runs created through the API at once: the worker runs both to completion, never together; the
    second waits for the concurrency slot, then finds nothing changed and trains nothing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.deployment import deployment_exists, on_server, trigger_run
    from pipeline import registry

    root, state = served_project
    assert deployment_exists(root)
    first = trigger_run(root, "test: new data")
    second = trigger_run(root, "test: second at once")
    with on_server(state["prefect"]["api_url"]), get_client(sync_client=True) as client:
        def finished():
            runs = [client.read_flow_run(i) for i in (first, second)]
            return runs if all(r.state.is_final() for r in runs) else None

        runs = wait_for(finished, timeout=420, interval=1, what="both deployment runs to finish")
        assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"], [r.state for r in runs]
        assert all(r.work_pool_name == "nerveseg" for r in runs)
        assert "reason:test: new data" in runs[0].tags
        early, late = sorted(runs, key=lambda r: r.start_time)
        assert late.start_time >= early.end_time, "the two runs overlapped"
        history = [s.name for s in client.read_flow_run_states(late.id)]
        assert "AwaitingConcurrencySlot" in history, history
        skipped = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[late.id])))
        assert any(a.key == "retrain-skipped" for a in skipped)

    registry.configure(root / "mlflow", "nerve-segmentation")
    versions = registry.list_versions("nerve-segmentation")
    assert [v.version for v in versions] == ["1"] and versions[0].aliases == ["champion"]
    assert versions[0].tags[registry.TAG_FLOW_RUN] == str(early.id)


def test_trigger_run_says_clearly_when_there_is_no_server(tmp_path):
    from flows.deployment import DeploymentUnavailable, deployment_exists, trigger_run

    assert deployment_exists(tmp_path) is False
    with pytest.raises(DeploymentUnavailable, match="nerveseg services up"):
        trigger_run(tmp_path, "new data")
