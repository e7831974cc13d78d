"""A shared deployment, on the real servers: PostgreSQL with a password-protected role, MLflow's basic-auth
app and Prefect's auth string, a process worker, and the project's commands run as an operator would.

Anonymous requests are refused; `run`, `models`, `promote`, `approve` and the worker work with
credentials; a user with READ permission on the model cannot move an alias; the ledger records the
authenticated MLflow user beside the `--actor` text; and no credential is found in any file of the
workspace, any command's output, the process list, or the two databases."""

from __future__ import annotations

import json
import secrets
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import TINY_SETTINGS, deep_update, make_project, write_settings
from tests.service_helpers import (
    LEAN_SERVER_ENV, cheapen_logins, free_port, nerveseg, postgres_admin, postgres_reachable, wait_for,
)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not postgres_reachable(), reason="needs PostgreSQL on 127.0.0.1:5432")]

MODEL = "nerve-segmentation"
SETTINGS = deep_update(TINY_SETTINGS, {"train": {"epochs": 1}, "evaluate": {"overlays": 1},
                                       "promotion": {"require_approval": True, "approval_timeout_s": 300}})
TIMEOUT = httpx.Timeout(60.0)  # the first login on a 2-core machine hashes the password (PBKDF2): seconds


class Deployment:
    """The project, its credentials and every output its commands printed (searched at the end)."""

    def __init__(self, root: Path, secret_dir: Path, tag: str):
        self.root, self.tag = root, tag
        self.db_password = f"db-{secrets.token_hex(12)}"
        self.admin_password = f"adm-{secrets.token_hex(12)}"
        self.ops_password = f"ops-{secrets.token_hex(12)}"
        self.viewer_password = f"view-{secrets.token_hex(12)}"
        self.prefect_password = f"pf-{secrets.token_hex(12)}"
        self.flask_key = secrets.token_hex(24)
        self.webhook_token = f"T{secrets.token_hex(10)}"
        self.role = f"nerveseg_role_{tag}"
        self.outputs: list[str] = []
        files = {"MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_key,
                 "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
                 "PREFECT_SERVER_API_AUTH_STRING": f"ops:{self.prefect_password}",
                 "NERVESEG_DATABASE_URL": f"postgresql://{self.role}:{self.db_password}@127.0.0.1:5432"}
        self.server_env = {}
        for name, value in files.items():  # as files only their owner can read, outside the workspace
            path = secret_dir / name.lower()
            path.write_text(value + "\n")
            path.chmod(0o600)
            self.server_env[f"{name}_FILE"] = str(path)
        self.server_env["NERVESEG_WEBHOOK_URL"] = f"http://127.0.0.1:9/hooks/{self.webhook_token}"
        self.server_env["PREFECT_API_AUTH_STRING"] = f"ops:{self.prefect_password}"
        self.server_env.update(LEAN_SERVER_ENV)  # `services up` passes it on to the MLflow server
        self.server_env["PREFECT_WORKER_QUERY_SECONDS"] = "1"  # the worker polls for runs every second, not 10
        self.auth_database = ""  # MLflow's user store (set by the fixture)
        self.logins = {"admin": self.admin_password, "ops": self.ops_password, "viewer": self.viewer_password}

    @property
    def secrets(self) -> dict[str, str]:
        return {"database password": self.db_password, "admin password": self.admin_password,
                "ops password": self.ops_password, "viewer password": self.viewer_password,
                "Prefect password": self.prefect_password, "MLflow secret key": self.flask_key,
                "webhook token": self.webhook_token}

    def env(self, user: str | None) -> dict[str, str]:
        env = dict(self.server_env)
        if user:
            env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=self.logins[user])
        return env

    def cli(self, *args: str, user: str | None = "admin", check: bool = True, timeout: float = 600):
        done = nerveseg(self.root, *args, check=check, timeout=timeout, **self.env(user))
        self.outputs += [done.stdout, done.stderr]
        return done

    @property
    def state(self) -> dict:
        return json.loads((self.root / ".services" / "state.json").read_text())

    def prefect(self, method: str, path: str, **kwargs) -> httpx.Response:
        url = self.state["prefect"]["api_url"] + path
        return httpx.request(method, url, auth=("ops", self.prefect_password), timeout=TIMEOUT, **kwargs)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tag = uuid.uuid4().hex[:8]
    base = tmp_path_factory.mktemp("shared")
    secret_dir = base / "secrets"
    secret_dir.mkdir(mode=0o700)
    root = make_project(base / "project", SETTINGS)
    d = Deployment(root, secret_dir, tag)
    databases = {key: f"nerveseg_test_{tag}_{key}" for key in ("mlflow", "prefect", "auth")}
    d.auth_database = databases["auth"]
    (root / "services.yaml").write_text(yaml.safe_dump({
        "profile": "postgres", "auth": True, "prefect_port": free_port(), "mlflow_port": free_port(),
        "mlflow_database": databases["mlflow"], "prefect_database": databases["prefect"],
        "mlflow_auth_database": databases["auth"]}))
    postgres_admin(f"CREATE ROLE {d.role} LOGIN CREATEDB PASSWORD '{d.db_password}'")
    try:
        d.cli("services", "up", "--worker", timeout=300)
        # the admin the server created from MLFLOW_AUTH_ADMIN_PASSWORD_FILE: a cheap hash of the same password
        cheapen_logins(d.auth_database, {"admin": d.admin_password})
        yield d
    finally:
        nerveseg(root, "services", "down", check=False, timeout=120)
        postgres_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in databases.values()),
                       f"DROP ROLE IF EXISTS {d.role}")


def test_anonymous_requests_are_refused_and_commands_without_a_login_stop(deployment):
    d = deployment
    mlflow_url, prefect_api = d.state["mlflow"]["url"], d.state["prefect"]["api_url"]
    anonymous = [httpx.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/search", timeout=TIMEOUT),
                 httpx.post(f"{mlflow_url}/api/2.0/mlflow/experiments/create", json={"name": "x"}, timeout=TIMEOUT),
                 httpx.post(f"{prefect_api}/flow_runs/filter", json={}, timeout=TIMEOUT),
                 httpx.post(f"{prefect_api}/flow_runs/filter", json={}, auth=("ops", "wrong"), timeout=TIMEOUT),
                 httpx.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/search", auth=("admin", "wrong"),
                           timeout=TIMEOUT)]
    assert [r.status_code for r in anonymous] == [401, 401, 401, 401, 401]
    admin = httpx.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/search", auth=("admin", d.admin_password),
                      timeout=TIMEOUT)
    assert admin.status_code == 200
    assert d.prefect("POST", "/flow_runs/filter", json={}).status_code == 200

    refused = d.cli("models", user=None, check=False)
    assert refused.returncode == 2 and "MLFLOW_TRACKING_USERNAME" in refused.stderr
    status = d.cli("services", "status", "--json")
    assert json.loads(status.stdout)["mlflow"]["auth"] is True


def _server_client(d: Deployment):
    """A client of the deployment's server for both tracking and registry: other tests may have left
    MLflow's process-wide registry URI pointing at their own store."""
    import mlflow

    url = d.state["mlflow"]["url"]
    return mlflow.MlflowClient(tracking_uri=url, registry_uri=url)


def _create_users(d: Deployment) -> None:
    from mlflow.server.auth.client import AuthServiceClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", d.admin_password)
        users = AuthServiceClient(d.state["mlflow"]["url"])
        users.create_user("ops", d.ops_password)
        users.create_user("viewer", d.viewer_password)
        users.grant_user_permission("ops", "registered_model", MODEL, "EDIT")
        users.grant_user_permission("viewer", "registered_model", MODEL, "READ")
    cheapen_logins(d.auth_database, {"ops": d.ops_password, "viewer": d.viewer_password})


def test_worker_run_approved_by_a_logged_in_user_then_promote_and_a_reader_who_cannot(deployment):
    d = deployment
    d.cli("schedule", "--cron", "0 3 * * 1", "--paused")
    deployment_id = d.prefect("GET", "/deployments/name/retrain/nerveseg").json()["id"]
    run_id = d.prefect("POST", f"/deployments/{deployment_id}/create_flow_run", json={}).json()["id"]

    def state() -> str:
        return d.prefect("GET", f"/flow_runs/{run_id}").json()["state"]["type"]

    wait_for(lambda: state() == "PAUSED", timeout=420, interval=1, what="the worker's run to wait for approval")
    _create_users(d)  # the model exists now: registered by the worker's run, as admin
    approved = d.cli("approve", run_id, "--reason", "overlays reviewed", "--actor", "Dr Chen", user="ops")
    assert "approved" in approved.stdout
    wait_for(lambda: state() in ("COMPLETED", "FAILED", "CRASHED"), timeout=300, interval=1, what="the run to end")
    assert state() == "COMPLETED"

    ledger = json.loads(d.cli("ledger", "--json", user="viewer").stdout)
    last = ledger["events"][-1]
    assert (last["action"], last["version"], last["actor"], last["identity"], last["on_behalf_of"]) == (
        "promote", "1", "ops", "mlflow-login", "Dr Chen")
    assert last["moved_by"] == "admin"  # the worker's own login moved the alias

    # A second version, trained by `nerveseg run` with credentials (no approval this time).
    write_settings(d.root, deep_update(SETTINGS, {"promotion": {"require_approval": False}}))
    d.cli("run", "--force", "--json")
    models = json.loads(d.cli("models", "--json", user="viewer").stdout)
    versions = {str(m["version"]): m for m in models["versions"]}
    assert set(versions) == {"1", "2"}
    other = next(v for v, m in versions.items() if "champion" not in m["aliases"])
    assert json.loads(d.cli("audit", "--json", user="viewer").stdout)["history"]  # the lineage, read with a login

    # READ on the model: the promotion is refused by the server, and nothing moved or was recorded.
    before = json.loads(d.cli("ledger", "--json", user="viewer").stdout)["events"]
    refused = d.cli("promote", other, "--reason", "I would like it", user="viewer", check=False)
    assert refused.returncode != 0 and ("403" in refused.stderr or "PERMISSION" in refused.stderr.upper())
    assert json.loads(d.cli("ledger", "--json", user="viewer").stdout)["events"] == before
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "viewer")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", d.viewer_password)
        with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED|403"):
            _server_client(d).set_registered_model_alias(MODEL, "champion", other)

    # EDIT on the model: the promotion goes through, recorded under the login, --actor beside it.
    moved = d.cli("promote", other, "--reason", "ward asked for it", "--actor", "Dr Chen", user="ops")
    assert "recorded: ops (on behalf of Dr Chen)" in moved.stdout
    after = json.loads(d.cli("ledger", "--json", user="viewer").stdout)
    event = after["events"][-1]
    assert (event["version"], event["actor"], event["identity"], event["on_behalf_of"]) == (
        other, "ops", "mlflow-login", "Dr Chen")
    assert not after["warnings"]

    # A move made outside the project's commands, with an admin login, is still flagged.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", d.admin_password)
        back = "1" if other == "2" else "2"
        _server_client(d).set_registered_model_alias(MODEL, "champion", back)
    assert "outside nerveseg's commands" in json.loads(d.cli("ledger", "--json", user="viewer").stdout)["warnings"][0]


def test_no_credential_in_any_file_output_process_or_database(deployment):
    d = deployment
    d.cli("services", "status")
    found = []
    for path in d.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{what} in {path.relative_to(d.root)}" for what, value in d.secrets.items()
                      if value.encode() in data]
    for i, text in enumerate(d.outputs):
        found += [f"{what} in command output {i}" for what, value in d.secrets.items() if value in text]
    processes = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    found += [f"{what} in the process list" for what, value in d.secrets.items() if value in processes]
    config = yaml.safe_load((d.root / "services.yaml").read_text())
    for database, table in ((config["mlflow_database"], "runs"), (config["prefect_database"], "flow_run")):
        dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", database],
                              capture_output=True, text=True, timeout=120)
        assert dump.returncode == 0, dump.stderr
        assert f"CREATE TABLE public.{table} (" in dump.stdout  # the dump holds that server's store
        found += [f"{what} in database {database}" for what, value in d.secrets.items() if value in dump.stdout]
    assert not found, found
    # and the stores did record the run: the search looked where the records are
    assert list((d.root / "mlflow" / "artifacts").rglob("MLmodel"))
