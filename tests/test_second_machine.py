"""A worker on a second machine, rehearsed on one: two workspaces, a shared DVC remote, the servers.

The *server workspace* runs the services (PostgreSQL profile: MLflow proxies the artifacts, so nothing is
written by path on the server's disk) and the deployment. The *worker workspace* is a `git clone` of it
with the shared DVC remote set in `.dvc/config.local`, and a `nerveseg worker` that reaches the servers only
by URL. `nerveseg data add` in the server workspace makes a new data version and a run naming its commit;
the worker checks that commit out, pulls that data version, trains, and everything it produced is found
through the servers: the run, its lineage, the registered version and its champion alias."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import TINY_SETTINGS, deep_update, make_project, subject_batch
from tests.service_helpers import (
    NERVESEG, POSTGRES, nerveseg, postgres_reachable, project_env, services, temporary_databases, wait_for,
)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not postgres_reachable(), reason="PostgreSQL is not reachable on 127.0.0.1:5432")]

SETTINGS = deep_update(TINY_SETTINGS, {"train": {"epochs": 1}, "evaluate": {"overlays": 1}})
RUN_ID = re.compile(r"started retraining run ([0-9a-f-]{36})")
MODEL = "nerve-segmentation"


def _cli(*args: str):
    from flows.cli import app

    return CliRunner().invoke(app, list(args))


def _git(root, *args: str) -> str:
    from pipeline import versioning

    return versioning.git(root, *args).stdout.strip()


def test_a_worker_in_its_own_workspace_trains_the_runs_revision_and_reports_through_the_servers(tmp_path):
    import mlflow
    from prefect.client.orchestration import get_client

    from flows import deployment
    from pipeline import registry, versioning
    from pipeline.phantom import PhantomSpec, generate_phantom

    phantom = tmp_path / "phantom"
    generate_phantom(phantom, PhantomSpec(subjects=9, frames_per_subject=2, seed=5))
    server = make_project(tmp_path / "server", SETTINGS, with_data=False)
    first = _cli("data", "add", str(subject_batch(phantom, tmp_path / "batch1", range(1, 7))), "-C", str(server))
    assert first.exit_code == 0 and "no retraining run started" in first.output, first.output

    with temporary_databases("mlflow", "prefect") as db:
        (server / "services.yaml").write_text(yaml.safe_dump({
            "profile": "postgres", "database_url": POSTGRES,
            "mlflow_database": db["mlflow"], "prefect_database": db["prefect"]}))
        versioning.git_commit(server, ["services.yaml"], "services: postgres profile")
        with services(server) as (state, _):
            scheduled = _cli("schedule", "--cron", "0 3 * * 1", "-C", str(server))
            assert scheduled.exit_code == 0, scheduled.output
            api, tracking = state["prefect"]["api_url"], state["mlflow"]["url"]

            # The second machine: a clone, the shared DVC remote, and a worker that knows the servers by URL.
            worker_dir = tmp_path / "worker"
            subprocess.run(["git", "clone", "-q", str(server), str(worker_dir)], check=True)
            versioning.dvc(worker_dir, "remote", "modify", "--local", "local", "url", str(server / "dvc-remote"))
            assert not (worker_dir / "data" / "raw").exists()  # data reaches it through DVC only
            refused = nerveseg(worker_dir, "worker", "--api-url", api, timeout=120, check=False)
            assert refused.returncode == 2 and "--mlflow-uri" in refused.stderr + refused.stdout  # no store of its own
            log = (tmp_path / "worker.log").open("w")
            worker = subprocess.Popen(
                [NERVESEG, "worker", "-C", str(worker_dir), "--api-url", api, "--mlflow-uri", tracking],
                cwd=worker_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=project_env(worker_dir, PREFECT_WORKER_QUERY_SECONDS="1"))
            try:
                added = _cli("data", "add", str(subject_batch(phantom, tmp_path / "batch2", range(7, 10))),
                             "-C", str(server))
                assert added.exit_code == 0, added.output
                run_id = RUN_ID.search(added.output).group(1)
                head = _git(server, "rev-parse", "HEAD")
                with deployment.on_server(api), get_client(sync_client=True) as client:
                    assert client.read_flow_run(run_id).parameters["revision"] == head

                    def finished():
                        current = client.read_flow_run(run_id)
                        return current if current.state.is_final() else None

                    done = wait_for(finished, timeout=600, interval=1, what="the worker's run to finish")
                    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

                    logs = " ".join(entry.message for entry in client.read_logs(
                        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))
            finally:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=60)
                log.close()
            assert done.state.type.value == "COMPLETED", (done.state, (tmp_path / "worker.log").read_text()[-4000:])

            # The worker's clone is at the run's commit, with that commit's data version pulled.
            assert _git(worker_dir, "rev-parse", "HEAD") == head
            server_data = versioning.current_data_version(server, server / "data" / "raw")
            worker_data = versioning.current_data_version(worker_dir, worker_dir / "data" / "raw")
            assert worker_data.dvc_hash == server_data.dvc_hash and worker_data.n_files == server_data.n_files
            assert f"worker workspace {worker_dir}" in logs and head[:12] in logs

            # What it sent back is in the servers: the run with its lineage, the version, the champion alias.
            client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
            champion = client.get_model_version_by_alias(MODEL, registry.CHAMPION)
            tags = client.get_run(champion.run_id).data.tags
            assert tags[registry.TAG_DATA_HASH] == server_data.dvc_hash
            assert tags[registry.TAG_CODE_REV] == head and tags[registry.TAG_CODE_DIRTY] == "false"
            assert tags[registry.TAG_FLOW_RUN] == run_id
            assert champion.source.startswith(("mlflow-artifacts:", "models:/"))  # proxied, not a path
            artifacts = server / "mlflow" / "artifacts"
            assert any(p.name == "MLmodel" for p in artifacts.rglob("MLmodel")), "no model files on the server"

    # Nothing of it stayed in a store of the worker's own, and the server workspace was never touched.
    assert not (worker_dir / "mlflow" / "mlflow.db").exists()
    assert not list(worker_dir.glob("mlflow/**/MLmodel"))
    assert _git(server, "status", "--porcelain", "--untracked-files=no", "--", "data", "params.yaml") == ""
