"""`nerveseg services up|status|down`: a real Prefect server and a real MLflow tracking server on loopback,
with SQLite stores in the project or PostgreSQL backends (the production profile)."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from tests.conftest import TINY_SETTINGS, deep_update, make_project
from tests.service_helpers import (
    LEAN_SERVER_ENV, POSTGRES, free_port, last_json, nerveseg, postgres_reachable, services, temporary_databases,
)

# What is trained does not matter here, only where the run's records go: one epoch, one overlay.
SETTINGS = deep_update(TINY_SETTINGS, {"train": {"epochs": 1}, "evaluate": {"overlays": 1}})


def test_services_settings_precedence_and_never_in_the_training_digest(tmp_path, monkeypatch):
    from flows.services import ServicesError, load_config
    from pipeline.config import Params

    (tmp_path / "services.yaml").write_text(yaml.safe_dump({"profile": "postgres", "mlflow_port": 5100}))
    monkeypatch.setenv("NERVESEG_MLFLOW_PORT", "5200")
    config = load_config(tmp_path, prefect_port=4300)
    assert (config.profile, config.mlflow_port, config.prefect_port) == ("postgres", 5200, 4300)
    assert config.server_url("db1") == "postgresql://postgres@127.0.0.1:5432/db1"
    assert config.server_url("db2", "asyncpg") == "postgresql+asyncpg://postgres@127.0.0.1:5432/db2"
    # The services live outside params.yaml: a `services:` section there is rejected, so they can
    # never change Params.digest() (the "nothing changed" key).
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"services\s+Extra inputs are not permitted"):
        Params.model_validate({"services": {"profile": "postgres"}})
    (tmp_path / "services.yaml").write_text("profile: mysql\n")
    with pytest.raises(ServicesError, match="profile"):
        load_config(tmp_path)


def test_status_says_down_and_commands_stay_embedded(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline import registry

    result = CliRunner().invoke(app, ["services", "status", "--json", "-C", str(tmp_path)])
    assert result.exit_code == 1
    status = json.loads(result.stdout)
    assert status["prefect"]["state"] == status["mlflow"]["state"] == "down"
    assert registry.tracking_uri(tmp_path / "mlflow") == f"sqlite:///{(tmp_path / 'mlflow' / 'mlflow.db').resolve()}"


@pytest.mark.e2e
def test_up_status_down_with_stores_in_the_project(tmp_path):
    """The CLI starts both servers detached (it exits, they stay), status reports them, the project's
    commands use them, down stops them and removes the pid files; the stores stay in the project."""
    from pipeline import registry
    from pipeline.service_state import pid_alive

    root = make_project(tmp_path / "project", with_data=False)
    prefect_port, mlflow_port = free_port(), free_port()
    try:
        up = nerveseg(root, "services", "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port),
                      timeout=240, **LEAN_SERVER_ENV)
        assert f"http://127.0.0.1:{prefect_port}" in up.stdout and f"http://127.0.0.1:{mlflow_port}" in up.stdout
        status = json.loads(nerveseg(root, "services", "status", "--json").stdout)
        assert status["prefect"]["state"] == status["mlflow"]["state"] == "up"
        assert status["prefect"]["url"] == f"http://127.0.0.1:{prefect_port}"
        assert httpx.get(f"http://127.0.0.1:{mlflow_port}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{prefect_port}/api/health").json() is True
        pids = {s: status[s]["pid"] for s in ("prefect", "mlflow")}
        assert all((root / ".services" / f"{s}.pid").is_file() for s in pids)
        # While up, the project's commands talk to the servers (a registry command goes to MLflow's).
        assert registry.tracking_uri(root / "mlflow") == f"http://127.0.0.1:{mlflow_port}"
        models = nerveseg(root, "models", "--json")
        assert json.loads(models.stdout)["versions"] == []
        import mlflow

        experiment = registry.configure(root / "mlflow", "nerve-segmentation")
        run_id = mlflow.MlflowClient().create_run(experiment).info.run_id
        mlflow.MlflowClient().log_text(run_id, "logged through the server", "notes/hello.txt")
        # Stores in the project: MLflow's SQLite file and Prefect's database in the Prefect home.
        assert (root / "mlflow" / "mlflow.db").is_file() and (root / ".prefect" / "prefect.db").is_file()
    finally:
        down = nerveseg(root, "services", "down", check=False)
    assert down.returncode == 0, down.stderr
    assert "prefect: stopped" in down.stdout and "mlflow: stopped" in down.stdout
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not list((root / ".services").glob("*.pid")) and not (root / ".services" / "state.json").exists()
    after = nerveseg(root, "services", "status", check=False)
    assert after.returncode == 1 and "down" in after.stdout
    assert registry.tracking_uri(root / "mlflow").startswith("sqlite:///")
    # What went through the server is in the project's store, readable embedded.
    registry.configure(root / "mlflow", "nerve-segmentation")
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/hello.txt") == "logged through the server"


@pytest.mark.e2e
def test_up_refuses_a_port_in_use_and_leaves_nothing_running(tmp_path):
    import socket

    from flows.services import ServicesError, load_config, status, up

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = load_config(tmp_path, prefect_port=free_port(), mlflow_port=busy.getsockname()[1])
        with pytest.raises(ServicesError, match="already in use"):
            up(tmp_path, config, echo=lambda _: None)
    assert status(tmp_path)["prefect"]["state"] == "down"
    assert not (tmp_path / ".services" / "state.json").exists()


@pytest.mark.e2e
@pytest.mark.skipif(not postgres_reachable(), reason="PostgreSQL is not reachable on 127.0.0.1:5432")
def test_postgres_profile_runs_the_flow_with_both_backends_in_postgres(tmp_path):
    """services.yaml selects the postgres profile (no code change, params digest untouched); the servers
    create their databases; a full retraining run goes through them; the rows are in PostgreSQL."""
    import mlflow
    import psycopg2

    from pipeline.config import load_params

    root = make_project(tmp_path / "project", SETTINGS)
    digest = load_params(root / "params.yaml").digest()
    with temporary_databases("mlflow", "prefect") as db:
        (root / "services.yaml").write_text(yaml.safe_dump({
            "profile": "postgres", "database_url": POSTGRES,
            "mlflow_database": db["mlflow"], "prefect_database": db["prefect"],
        }))
        with services(root) as (state, config):
            assert state["profile"] == "postgres"
            assert state["prefect"]["backend"].startswith("postgresql+asyncpg://")
            assert state["mlflow"]["backend"] == f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db['mlflow']}"
            result = last_json(nerveseg(root, "run", "--json", timeout=400).stdout)
            assert result["skipped"] is False and result["tracking_uri"] == state["mlflow"]["url"]
            assert result["decision"]["promote"] is True
            flow_run_id = mlflow.MlflowClient(state["mlflow"]["url"]).get_run(result["run_id"]).data.tags[
                "prefect.flow_run_id"]
        assert load_params(root / "params.yaml").digest() == digest
        with psycopg2.connect(f"{POSTGRES}/{db['mlflow']}") as conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (result["run_id"],))
            assert cur.fetchone() == ("FINISHED",)
            cur.execute("SELECT alias, version FROM registered_model_aliases")
            assert ("champion", 1) in cur.fetchall()
        with psycopg2.connect(f"{POSTGRES}/{db['prefect']}") as conn, conn.cursor() as cur:
            cur.execute("SELECT state_type FROM flow_run WHERE id = %s", (flow_run_id,))
            assert cur.fetchone() == ("COMPLETED",)
    # Nothing of it went to the project's SQLite files.
    assert not (root / "mlflow" / "mlflow.db").exists()


def test_schedule_and_worker_say_the_services_are_needed(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    scheduled = runner.invoke(app, ["schedule", "--cron", "0 3 * * 1", "-C", str(tmp_path)])
    assert scheduled.exit_code == 1 and "nerveseg services up" in scheduled.output
    assert runner.invoke(app, ["schedule", "-C", str(tmp_path)]).exit_code == 2
    worker = runner.invoke(app, ["worker", "-C", str(tmp_path)])
    assert worker.exit_code == 2 and "--api-url" in worker.output


def test_off_loopback_without_auth_bad_credentials_or_passwords_in_files_are_refused(tmp_path, monkeypatch):
    """Nothing starts: each refusal names the setting to fix."""
    from flows.services import ServicesError, load_config, status, up

    for name in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD", "PREFECT_SERVER_API_AUTH_STRING",
                 "NERVESEG_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    open_host = load_config(tmp_path, host="0.0.0.0", prefect_port=free_port(), mlflow_port=free_port())
    with pytest.raises(ServicesError, match="auth is off"):
        up(tmp_path, open_host, echo=lambda _: None)
    with_auth = load_config(tmp_path, host="0.0.0.0", auth=True, prefect_port=free_port(), mlflow_port=free_port())
    with pytest.raises(ServicesError, match="MLFLOW_FLASK_SERVER_SECRET_KEY, PREFECT_SERVER_API_AUTH_STRING"):
        up(tmp_path, with_auth, echo=lambda _: None)
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "k" * 32)
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "ops:pf-pass-1234")
    with pytest.raises(ServicesError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):  # a new user store needs the admin's
        up(tmp_path, with_auth, echo=lambda _: None)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "password1234")
    with pytest.raises(ServicesError, match="old default admin password"):
        up(tmp_path, with_auth, echo=lambda _: None)
    assert status(tmp_path)["mlflow"]["state"] == "down" and not (tmp_path / ".services" / "state.json").exists()

    # a password in the committed settings file, or on a command line anyone can read with ps
    (tmp_path / "services.yaml").write_text(yaml.safe_dump({"database_url": "postgresql://ops:pw@db:5432"}))
    with pytest.raises(ServicesError, match="services.yaml: database_url carries a password"):
        load_config(tmp_path)
    (tmp_path / "services.yaml").unlink()
    done = nerveseg(tmp_path, "services", "up", "--database-url", "postgresql://ops:pw@db:5432", check=False)
    assert done.returncode == 2 and "--database-url carries a password" in done.stderr and "pw@" not in done.stderr
    monkeypatch.setenv("NERVESEG_DATABASE_URL", "postgresql://ops:pw-from-env@db:5432")
    config = load_config(tmp_path)
    assert config.password() == "pw-from-env" and "pw-from-env" not in config.server_url("x")


def test_down_never_signals_a_process_that_took_over_a_recorded_pid(tmp_path):
    """A state file whose pid now belongs to an unrelated program (here `sleep`): `down` reports it and
    leaves it alive; so does an older pid file that holds a bare pid."""
    import subprocess
    import sys

    from flows.services import down, status
    from pipeline.service_state import process_identity

    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        identity = process_identity(stranger.pid)
        assert identity is not None
        recorded = {"pid": stranger.pid, "start_time": identity["start_time"] - 1,  # started earlier: not it
                    "cmdline": [sys.executable, "prefect", "server", "start"], "url": "http://127.0.0.1:9"}
        folder = tmp_path / ".services"
        folder.mkdir()
        (folder / "state.json").write_text(json.dumps({"prefect": recorded}))
        (folder / "mlflow.pid").write_text(str(stranger.pid))  # the format before start times were kept
        assert status(tmp_path)["prefect"]["state"] == "down"
        result = down(tmp_path, echo=lambda _: None)
        assert "belongs to another process" in result["prefect"] and "not signalled" in result["mlflow"]
        assert stranger.poll() is None and process_identity(stranger.pid) == identity
        assert not (folder / "state.json").exists() and not (folder / "mlflow.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()
