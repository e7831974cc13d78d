"""`nerveseg data add` starts a run of the retraining deployment when the project's services are up and
the deployment exists (real Prefect server on loopback); without them, or with --no-trigger, it says
that no run was started and why, and still exits 0. The run it starts is executed to the end by a
process worker."""

from __future__ import annotations

import re
import shutil

import pytest
from typer.testing import CliRunner

from tests.conftest import TINY_SETTINGS, deep_update, make_project, write_simple_dataset
from tests.service_helpers import services, wait_for

pytestmark = pytest.mark.e2e

# What is trained does not matter here, only which run starts and that it ends: one epoch, one overlay.
SETTINGS = deep_update(TINY_SETTINGS, {"train": {"epochs": 1}, "evaluate": {"overlays": 1}})

RUN_ID = re.compile(r"started retraining run ([0-9a-f-]{36})")


def _subjects(tmp_path, first: int, count: int):
    """A small dataset in the competition's layout whose subjects are first..first+count-1."""
    made = write_simple_dataset(tmp_path / f"made{first}", subjects=count, frames=3, seed=first)
    out = tmp_path / f"subjects{first}" / "train"
    out.mkdir(parents=True)
    for path in (made / "train").iterdir():
        subject, rest = path.name.split("_", 1)
        shutil.copy2(path, out / f"{int(subject) + first - 1}_{rest}")
    return out.parent


def _add(root, src, *extra):
    from flows.cli import app

    result = CliRunner().invoke(app, ["data", "add", str(src), "--no-push", *extra, "-C", str(root)])
    assert result.exit_code == 0, result.output
    assert "new data version" in result.output, result.output
    return result.output


def test_data_add_starts_a_deployment_run_only_when_the_services_and_deployment_are_there(tmp_path, monkeypatch,
                                                                                         capsys):
    from flows import deployment
    from flows.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    root = make_project(tmp_path / "project", SETTINGS, with_data=False)

    out = _add(root, _subjects(tmp_path, 1, 3))  # no services for this project
    assert "no retraining run started: no Prefect server runs for this project" in out

    with services(root) as (_, config):
        url = deployment.api_url(root)
        assert url == f"http://127.0.0.1:{config.prefect_port}/api"  # this project's own server
        from flows.data_cli import _trigger_retraining  # server up, but no deployment yet

        assert _trigger_retraining(root, {"dvc_hash": "0" * 32}, "params.yaml") is None
        said = capsys.readouterr().out
        assert "no retraining run started" in said and "schedule --cron" in said

        scheduled = CliRunner().invoke(app, ["schedule", "--cron", "0 3 * * 1", "-C", str(root)])
        assert scheduled.exit_code == 0, scheduled.output
        out = _add(root, _subjects(tmp_path, 4, 1))
        match = RUN_ID.search(out)
        assert match, out
        assert f"/runs/flow-run/{match.group(1)}" in out

        from prefect import get_client

        with deployment.on_server(url), get_client(sync_client=True) as client:
            run = client.read_flow_run(match.group(1))
            held = client.read_deployment_by_name(deployment.deployment_name(root))
        assert run.deployment_id == held.id
        assert run.parameters["params_file"] == "params.yaml" and "nerveseg" in run.tags
        assert run.state is not None and not run.state.is_final()  # waiting for a worker

        # A process worker picks the run up and trains on the new data version to the end.
        from flows.services import start_worker

        monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
        start_worker(root, config, echo=lambda _: None)
        with deployment.on_server(url), get_client(sync_client=True) as client:
            def finished():
                current = client.read_flow_run(match.group(1))
                return current if current.state.is_final() else None

            done = wait_for(finished, timeout=600, interval=1, what="the triggered run to finish")
        assert done.state.type.value == "COMPLETED", done.state

        out = _add(root, _subjects(tmp_path, 5, 1), "--no-trigger")
        assert "no retraining run started (--no-trigger)" in out and not RUN_ID.search(out)
        with deployment.on_server(url), get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[held.id])))
        assert [str(r.id) for r in runs if not r.auto_scheduled] == [match.group(1)]
