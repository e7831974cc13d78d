"""``nerveseg services up|down|status``: a Prefect server and an MLflow tracking server on loopback.

Both run detached (own process group), with pid and log files under ``.services/`` and their stores in
the project: MLflow's backend is ``mlflow/mlflow.db`` (the same SQLite file the embedded default uses)
and its artifacts ``mlflow/artifacts/``; Prefect's is ``.prefect/prefect.db`` (Prefect home ``.prefect/``).
The ``postgres`` profile puts both backends in PostgreSQL instead (artifacts stay in ``mlflow/artifacts``).

While they run, ``.services/state.json`` tells the project's commands to use them (see
``pipeline/service_state.py``); when they are down every command stays embedded, as without services.

Settings (none of them part of ``params.yaml``, so they never change ``Params.digest()``), lowest
precedence first: defaults, ``services.yaml`` in the project, environment variables ``NERVESEG_PROFILE``,
``NERVESEG_DATABASE_URL``, ``NERVESEG_PREFECT_PORT``, ``NERVESEG_MLFLOW_PORT``, command-line options.

Credentials never travel through a command line or a committed file (``pipeline/credentials.py``): a
database password reaches the servers as ``PGPASSWORD`` and MLflow's store URL as
``MLFLOW_BACKEND_STORE_URI``, both in the environment. With ``auth: true`` (required whenever ``host`` is
not a loopback address) MLflow runs its basic-auth app and Prefect checks ``PREFECT_SERVER_API_AUTH_STRING``.
Before any signal, a recorded server is checked to be the very process that was started (pid, start
time and command line): a pid the system has since given to another program is never signalled.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.credentials import SECRET_VARIABLES, CredentialError, redact, redact_url, secret, strip_password
from pipeline.atomic import atomic_write_text
from pipeline.service_state import (SERVICES_DIR, client_auth_problems, process_identity, read_state,
                                    same_process, state_path)

CONFIG_FILE = "services.yaml"
SERVICES = ("prefect", "mlflow")


class ServicesError(RuntimeError):
    """A service would not start, or the settings are wrong."""


class ServicesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Literal["sqlite", "postgres"] = "sqlite"
    host: str = "127.0.0.1"
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    # postgres profile: the server (no database name) and one database per service, created when missing
    database_url: str = "postgresql://postgres@127.0.0.1:5432"
    mlflow_database: str = "nerveseg_mlflow"
    prefect_database: str = "nerveseg_prefect"
    # where the MLflow server keeps artifacts (model files, reports): empty = the project's mlflow/artifacts;
    # s3://BUCKET/PREFIX for S3-compatible storage (docs/operations.md, "Beyond one machine")
    artifacts_destination: str = ""
    # Logins on both servers (MLflow basic auth, Prefect's auth string); required off loopback.
    auth: bool = False
    # MLflow basic auth: what a user may do on experiments and models no one granted them explicitly,
    # and where its users live (sqlite profile: mlflow/basic_auth.db; postgres: this database).
    auth_default_permission: Literal["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"] = "READ"
    mlflow_auth_database: str = "nerveseg_mlflow_auth"
    # scheduling: the deployment retrain/<deployment> on the process work pool <work_pool>
    work_pool: str = "nerveseg"
    deployment: str = "nerveseg"
    start_timeout: float = Field(180.0, gt=0)
    stop_timeout: float = Field(20.0, gt=0)

    def server_url(self, database: str, driver: str | None = None) -> str:
        """The URL of ``database`` on the configured server, without any password (see ``password``)."""
        url, _ = strip_password(self.database_url)
        parts = urlsplit(url)
        scheme = parts.scheme.split("+")[0]
        if scheme not in ("postgresql", "postgres"):
            raise ServicesError(f"database_url {redact_url(self.database_url)!r}: expected postgresql://USER@HOST:PORT")
        scheme = "postgresql" + (f"+{driver}" if driver else "")
        return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, ""))

    def password(self) -> str:
        """The database password: from ``NERVESEG_DATABASE_URL`` (or its ``_FILE``), else ``PGPASSWORD``
        (libpq's ``~/.pgpass`` also works: the servers' drivers read it themselves)."""
        return strip_password(self.database_url)[1] or secret("PGPASSWORD")

    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """True when ``host`` can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def load_config(root: Path, **overrides) -> ServicesConfig:
    """Settings of the project's services (see the module's docstring for the precedence)."""
    root = Path(root).resolve()
    values: dict = {}
    path = root / CONFIG_FILE
    if path.is_file():
        from pipeline.config import read_yaml_mapping

        values.update(read_yaml_mapping(path, ServicesError))
        _refuse_password(values.get("database_url"), f"{path.name}: database_url",
                         "services.yaml is committed to git")
    _refuse_password(overrides.get("database_url"), "--database-url",
                     "a command line can be read by every user of the machine (ps)")
    for var, key in (("NERVESEG_PROFILE", "profile"), ("NERVESEG_PREFECT_PORT", "prefect_port"),
                     ("NERVESEG_MLFLOW_PORT", "mlflow_port")):
        if os.environ.get(var):
            values[key] = os.environ[var]
    try:
        database_url = secret("NERVESEG_DATABASE_URL")
    except CredentialError as exc:
        raise ServicesError(str(exc)) from exc
    if database_url:
        values["database_url"] = database_url
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServicesConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ServicesError(f"services settings ({path.name}, NERVESEG_* variables, options): {problems}") from exc


def _refuse_password(url: object, where: str, why: str) -> None:
    if isinstance(url, str) and urlsplit(url).password:
        raise ServicesError(f"{where} carries a password, and {why}: give the URL without it and the "
                            "password through NERVESEG_DATABASE_URL, NERVESEG_DATABASE_URL_FILE (a file only you "
                            "can read), PGPASSWORD or ~/.pgpass")


def services_dir(root: Path) -> Path:
    return Path(root).resolve() / SERVICES_DIR


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


# --- PostgreSQL -----------------------------------------------------------------------------------


def ensure_database(config: ServicesConfig, database: str) -> bool:
    """Create ``database`` on the configured PostgreSQL server if it is missing; True when created."""
    import psycopg2
    from psycopg2 import sql

    try:
        conn = psycopg2.connect(config.server_url("postgres"), password=config.password() or None, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise ServicesError(redact(f"cannot connect to PostgreSQL at {redact_url(config.database_url)}: {exc}",
                                   extra=(config.password(),)).strip()) from exc
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone():
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            return True
    finally:
        conn.close()


# --- credentials and logins ----------------------------------------------------------------------

AUTH_INI = "mlflow_auth.ini"
# The admin password older MLflow releases shipped in basic_auth.ini: public, so never accepted.
LEGACY_MLFLOW_ADMIN_PASSWORD = "password1234"
SERVER_CREDENTIALS = ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD", "PREFECT_SERVER_API_AUTH_STRING")


def server_credentials(config: ServicesConfig, first_start: bool) -> dict[str, str]:
    """The servers' own credentials when ``auth`` is on (empty when off); refuses to go on without auth
    off loopback, without a credential that is needed, or with MLflow's old public admin password."""
    if not config.auth:
        if not config.loopback():
            raise ServicesError(
                f"host {config.host} can be reached from other machines and auth is off: anyone who reaches "
                "the ports could move `champion` or delete runs. Set `auth: true` in services.yaml and give the "
                "servers their credentials (docs/operations.md, \"A shared deployment\"), or keep host 127.0.0.1")
        return {}
    try:
        values = {name: secret(name) for name in SERVER_CREDENTIALS}
    except CredentialError as exc:
        raise ServicesError(str(exc)) from exc
    needed = ["MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_SERVER_API_AUTH_STRING"]
    if first_start:
        needed.append("MLFLOW_AUTH_ADMIN_PASSWORD")
    missing = [name for name in needed if not values[name]]
    if missing:
        raise ServicesError(
            f"auth is on, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: give "
            f"{'it' if len(missing) == 1 else 'each'} in the environment or as <VARIABLE>_FILE, a file only you can "
            "read (docs/operations.md, \"A shared deployment\")"
            + ("; MLFLOW_AUTH_ADMIN_PASSWORD is the admin's password, needed when MLflow's user store is new"
               if "MLFLOW_AUTH_ADMIN_PASSWORD" in missing else ""))
    if values["MLFLOW_AUTH_ADMIN_PASSWORD"] == LEGACY_MLFLOW_ADMIN_PASSWORD:
        raise ServicesError("MLFLOW_AUTH_ADMIN_PASSWORD is MLflow's old default admin password, which is public: "
                            "choose another one")
    if ":" not in values["PREFECT_SERVER_API_AUTH_STRING"]:
        raise ServicesError("PREFECT_SERVER_API_AUTH_STRING must read USER:PASSWORD (what Prefect's UI and "
                            "clients send as HTTP basic auth)")
    return {name: value for name, value in values.items() if value}


def _auth_ini(root: Path, config: ServicesConfig, auth_database_uri: str) -> Path:
    """MLflow's basic-auth settings for this project: its user store and the default permission. It
    holds no password: the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD, the database's from PGPASSWORD."""
    path = services_dir(root) / AUTH_INI
    atomic_write_text(path, "\n".join([
        "[mlflow]",
        f"default_permission = {config.auth_default_permission}",
        f"database_uri = {auth_database_uri}",
        f"admin_username = {os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME') or 'admin'}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "",
    ]), mode=0o600)
    return path


# --- the two servers ------------------------------------------------------------------------------


def _backends(root: Path, config: ServicesConfig) -> tuple[dict[str, str], bool]:
    """The stores' URLs (never with a password) and whether MLflow's user store is new."""
    if config.profile == "postgres":
        ensure_database(config, config.mlflow_database)
        ensure_database(config, config.prefect_database)
        new_users = ensure_database(config, config.mlflow_auth_database) if config.auth else False
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; MLflow gets the pinned psycopg2 explicitly.
        return ({"mlflow": config.server_url(config.mlflow_database, "psycopg2"),
                 "prefect": config.server_url(config.prefect_database, "asyncpg"),
                 "mlflow_auth": config.server_url(config.mlflow_auth_database, "psycopg2")}, new_users)
    users = root / "mlflow" / "basic_auth.db"
    return ({"mlflow": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
             "prefect": f"sqlite+aiosqlite:///{root / '.prefect' / 'prefect.db'}",
             "mlflow_auth": f"sqlite:///{users}"}, not users.exists())


def _child_base_env() -> dict[str, str]:
    """This process's environment without client settings and without any credential: each server gets
    back only those it needs."""
    drop = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_AUTH_STRING"}
    drop |= set(SECRET_VARIABLES) | {name + "_FILE" for name in SECRET_VARIABLES}
    base = {k: v for k, v in os.environ.items() if k not in drop}
    base.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    base.setdefault("DO_NOT_TRACK", "1")
    return base


def _commands(root: Path, config: ServicesConfig, backends: dict[str, str],
              credentials: dict[str, str]) -> dict[str, tuple[list[str], dict]]:
    base = _child_base_env()
    password = config.password() if config.profile == "postgres" else ""
    database = {"PGPASSWORD": password} if password else {}
    prefect_env = {**base, **database, "PREFECT_HOME": str(root / ".prefect"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_API_DATABASE_CONNECTION_URL": backends["prefect"],
                   "PREFECT_UI_API_URL": f"http://{config.host}:{config.prefect_port}/api"}
    mlflow_env = {**base, **database, "MLFLOW_BACKEND_STORE_URI": backends["mlflow"],
                  # MLflow's server-side job runner (eight processes) serves nothing nerveseg uses; without it
                  # the server starts lighter and stops in seconds rather than 20-25 s.
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    prefect = [_bin("prefect"), "server", "start", "--host", config.host, "--port", str(config.prefect_port)]
    mlflow = [_bin("mlflow"), "server", "--host", config.host, "--port", str(config.mlflow_port),
              "--artifacts-destination", config.artifacts_destination or (root / "mlflow" / "artifacts").as_uri(),
              "--workers", "1"]
    if config.auth:
        auth_string = credentials["PREFECT_SERVER_API_AUTH_STRING"]
        # the server's own background services call its API too
        prefect_env.update(PREFECT_SERVER_API_AUTH_STRING=auth_string, PREFECT_API_AUTH_STRING=auth_string)
        mlflow += ["--app-name", "basic-auth"]
        mlflow_env["MLFLOW_AUTH_CONFIG_PATH"] = str(_auth_ini(root, config, backends["mlflow_auth"]))
        mlflow_env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = credentials["MLFLOW_FLASK_SERVER_SECRET_KEY"]
        if credentials.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
            mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"] = credentials["MLFLOW_AUTH_ADMIN_PASSWORD"]
    return {"prefect": (prefect, prefect_env), "mlflow": (mlflow, mlflow_env)}


def _health_url(service: str, host: str, port: int) -> str:
    # both answer their health check without a login
    return f"http://{host}:{port}/api/health" if service == "prefect" else f"http://{host}:{port}/health"


def healthy(url: str, timeout: float = 3.0) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return redact("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    except OSError:
        return ""


def _start(root: Path, name: str, command: list[str], env: dict) -> dict:
    """Start ``command`` detached, logging to ``.services/NAME.log``; its record says which process it is."""
    folder = services_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    with open(log, "ab") as out:
        header = redact(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(command)}\n")
        out.write(header.encode())
        out.flush()
        process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    record = _identity_after_exec(process, command)
    atomic_write_text(folder / f"{name}.pid", json.dumps(record), mode=0o600)
    return {**record, "log": str(log), "process": process}


def _identity_after_exec(process: subprocess.Popen, command: list[str], wait_s: float = 5.0) -> dict:
    """The started process's identity once the kernel has set up its new command line: Popen returns
    when exec has begun, and for a moment /proc still shows an empty or the parent's command line."""
    args = command[1:]
    deadline = time.monotonic() + wait_s
    while True:
        record = process_identity(process.pid)
        if record and (not args or record["cmdline"][-len(args):] == args):
            return record
        if process.poll() is not None or time.monotonic() > deadline:
            return record or {"pid": process.pid}
        time.sleep(0.01)


def _wait_healthy(name: str, entry: dict, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    process: subprocess.Popen = entry["process"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServicesError(f"the {name} server exited with code {process.returncode} while starting; "
                                f"log {entry['log']}:\n{_log_tail(Path(entry['log']))}")
        if healthy(url, timeout=2):
            return
        time.sleep(0.5)
    raise ServicesError(f"the {name} server did not answer {url} within {timeout:.0f} s; "
                        f"log {entry['log']}:\n{_log_tail(Path(entry['log']))}")


def _record(entry: dict) -> dict:
    """What the state file keeps of a started process (never the Popen handle)."""
    return {k: entry[k] for k in ("pid", "start_time", "cmdline", "log") if k in entry}


def up(root: Path, config: ServicesConfig | None = None, worker: bool = False, echo=print) -> dict:
    """Start both servers (and a process worker when ``worker``) unless already up; return the state."""
    root = Path(root).resolve()
    config = config or load_config(root)
    server_credentials(config, first_start=False)  # refuses before anything starts
    current = status(root)
    if current["prefect"]["state"] == "up" and current["mlflow"]["state"] == "up":
        if worker and current.get("worker", {}).get("state") != "up":
            start_worker(root, config, echo=echo)
        echo("services already up")
        return read_state(root) or {}
    if any(current[s]["state"] != "down" for s in SERVICES):
        down(root, config, echo=echo)  # half up or unhealthy: start over cleanly
    for service, port in (("prefect", config.prefect_port), ("mlflow", config.mlflow_port)):
        if not _port_free(config.host, port):
            raise ServicesError(f"{config.host}:{port} (for {service}) is already in use; pick another port "
                                f"with --{service}-port or {service}_port in {CONFIG_FILE}")
    (root / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    (root / ".prefect").mkdir(parents=True, exist_ok=True)
    backends, new_users = _backends(root, config)
    credentials = server_credentials(config, first_start=new_users)
    commands = _commands(root, config, backends, credentials)
    ports = {"prefect": config.prefect_port, "mlflow": config.mlflow_port}
    started: dict[str, dict] = {}
    try:
        for service in SERVICES:  # both start at once; Prefect is the slow one
            command, env = commands[service]
            started[service] = _start(root, service, command, env)
        for service in SERVICES:
            _wait_healthy(service, started[service], _health_url(service, config.host, ports[service]),
                          config.start_timeout)
    except BaseException:
        for service, entry in started.items():
            _stop_records({service: _record(entry)}, config.stop_timeout)
            (services_dir(root) / f"{service}.pid").unlink(missing_ok=True)
        raise
    state = {
        "project": str(root),
        "profile": config.profile,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prefect": {"url": f"http://{config.host}:{config.prefect_port}",
                    "api_url": f"http://{config.host}:{config.prefect_port}/api",
                    **_record(started["prefect"]), "backend": redact_url(backends["prefect"]), "auth": config.auth},
        "mlflow": {"url": f"http://{config.host}:{config.mlflow_port}",
                   **_record(started["mlflow"]), "backend": redact_url(backends["mlflow"]), "auth": config.auth,
                   "artifacts": str(root / "mlflow" / "artifacts")},
    }
    _write_state(root, state)
    login = "  login required" if config.auth else ""
    echo(f"Prefect UI: {state['prefect']['url']}  (API {state['prefect']['api_url']}, {state['prefect']['backend']}){login}")
    echo(f"MLflow UI:  {state['mlflow']['url']}  ({state['mlflow']['backend']}){login}")
    if worker:
        start_worker(root, config, echo=echo)
    return read_state(root) or state


def start_service(root: Path, service: str, config: ServicesConfig | None = None) -> int:
    """(Re)start one server (``prefect`` or ``mlflow``) on its configured port, wait until it answers and
    record it in the state file; returns its pid. ``up`` starts both; this restarts one (after a crash)."""
    root = Path(root).resolve()
    config = config or load_config(root)
    port = config.prefect_port if service == "prefect" else config.mlflow_port
    state = read_state(root) or {"project": str(root), "profile": config.profile}
    old = state.get(service) or {}
    if same_process(old):
        _stop_records({service: old}, config.stop_timeout)
    backends, new_users = _backends(root, config)
    credentials = server_credentials(config, first_start=new_users)
    command, env = _commands(root, config, backends, credentials)[service]
    entry = _start(root, service, command, env)
    try:
        _wait_healthy(service, entry, _health_url(service, config.host, port), config.start_timeout)
    except BaseException:
        _stop_records({service: _record(entry)}, config.stop_timeout)
        raise
    url = f"http://{config.host}:{port}"
    state[service] = {"url": url, **_record(entry), "backend": redact_url(backends[service]), "auth": config.auth}
    if service == "prefect":
        state[service]["api_url"] = f"{url}/api"
    _write_state(root, state)
    return entry["pid"]


def stop_service(root: Path, service: str, config: ServicesConfig | None = None) -> str:
    """Stop one server but keep it in the state file: the project's commands keep pointing at it (and
    fail, retrying, until it is back) rather than silently switching to another store."""
    root = Path(root).resolve()
    entry = (read_state(root) or {}).get(service) or {}
    if not entry.get("pid"):
        return "not running"
    return _stop_records({service: entry}, (config or load_config(root)).stop_timeout)[service]


def _write_state(root: Path, state: dict) -> None:
    atomic_write_text(state_path(root), json.dumps(state, indent=2), mode=0o600)


def worker_command(config: ServicesConfig) -> list[str]:
    return [_bin("prefect"), "worker", "start", "--pool", config.work_pool, "--type", "process"]


def worker_env(root: Path, api_url: str, mlflow_uri: str | None = None) -> dict:
    """The environment of a process worker (and so of the flow runs it starts). The operator's client
    credentials (PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_USERNAME/PASSWORD, NERVESEG_WEBHOOK_URL) pass
    through the environment, the only way they reach a child process; the servers' own do not."""
    server_only = {*SERVER_CREDENTIALS, "NERVESEG_DATABASE_URL", "PGPASSWORD"}
    server_only |= {name + "_FILE" for name in server_only}
    env = {k: v for k, v in os.environ.items() if k not in server_only}  # the servers' secrets stay theirs
    env.update(PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.setdefault("PREFECT_HOME", str(Path(root).resolve() / ".prefect"))
    from flows.workspace_step import WORKSPACE_VARIABLE

    env[WORKSPACE_VARIABLE] = str(Path(root).resolve())  # where this worker's flow runs work
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return env


def start_worker(root: Path, config: ServicesConfig | None = None, echo=print) -> dict:
    """A detached process worker for the project's work pool, pointed at its running services."""
    root = Path(root).resolve()
    config = config or load_config(root)
    state = read_state(root)
    if not state or not same_process(state.get("prefect")):
        raise ServicesError("the services are not running; `nerveseg services up` first")
    problems = client_auth_problems(state)
    if problems:
        raise ServicesError(f"the servers ask for a login, and the worker would run without: set "
                            f"{'; '.join(problems)}")
    from flows.deployment import ensure_work_pool, on_server
    from prefect.client.orchestration import get_client

    with on_server(state["prefect"]["api_url"]), get_client(sync_client=True) as client:
        ensure_work_pool(client, config.work_pool)
    entry = _start(root, "worker", worker_command(config), worker_env(root, state["prefect"]["api_url"]))
    state["worker"] = {**_record(entry), "pool": config.work_pool}
    _write_state(root, state)
    echo(f"process worker for pool {config.work_pool}: pid {entry['pid']}, log {entry['log']}")
    return state["worker"]


def _records(root: Path, state: dict) -> dict[str, dict]:
    """Each recorded process, from the state file or else from its pid file."""
    records = {}
    for service in ("worker", *SERVICES):
        record = state.get(service) or _pid_file(root, service)
        if record and record.get("pid"):
            records[service] = record
    return records


def status(root: Path) -> dict:
    """``up`` (process alive and answering), ``unhealthy`` (alive, not answering) or ``down``, per service.
    A recorded pid that now belongs to another process is ``down``."""
    root = Path(root).resolve()
    state = read_state(root) or {}
    out: dict = {"project": str(root), "profile": state.get("profile")}
    records = _records(root, state)
    for service in (*SERVICES, "worker"):
        entry = records.get(service) or {}
        if not same_process(entry):
            if service != "worker":
                out[service] = {"state": "down"}
            continue
        pid = entry["pid"]
        if service == "worker":
            out[service] = {"state": "up", "pid": pid, "pool": entry.get("pool"), "log": entry.get("log")}
            continue
        url = entry.get("url")
        answering = False
        if url:
            host, _, port = urlsplit(url).netloc.rpartition(":")
            answering = healthy(_health_url(service, host, int(port)))
        out[service] = {"state": "up" if answering else "unhealthy", "url": url, "pid": pid,
                        "log": entry.get("log"), "backend": entry.get("backend"), "auth": bool(entry.get("auth"))}
        if service == "prefect":
            out[service]["api_url"] = entry.get("api_url")
    return out


def _pid_file(root: Path, service: str) -> dict | None:
    try:
        record = json.loads((services_dir(root) / f"{service}.pid").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, int):  # an older, bare pid: it cannot be told apart from a reused one
        return {"pid": record}
    return record if isinstance(record, dict) else None


def _signal_group(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _gone(pid: int) -> bool:
    try:  # reap it if it is our child (tests, `up` failing half-way)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    return process_identity(pid) is None


def _stop_records(records: dict[str, dict], timeout: float) -> dict[str, str]:
    """SIGTERM to each recorded process group at once, SIGKILL to those still there after ``timeout``.

    Only processes that are still the recorded ones (``same_process``) are signalled: a pid the system
    has given to another program since is reported and left alone."""
    result: dict[str, str] = {}
    live: dict[str, dict] = {}
    for name, record in records.items():
        pid = int(record["pid"])
        if same_process(record):
            live[name] = record
        elif _gone(pid):
            result[name] = "not running"
        else:
            result[name] = (f"not running (pid {pid} now belongs to another process, which was not signalled)"
                            if "start_time" in record else
                            f"not signalled (pid {pid} was recorded without its start time and command line, "
                            "so it cannot be told apart from another process; stop it yourself if it is the server)")
    for record in live.values():
        _signal_group(int(record["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for name, record in list(live.items()):
            pid = int(record["pid"])
            if _gone(pid):
                _signal_group(pid, signal.SIGKILL)  # children the server left behind in its group, if any
                result[name] = "stopped"
                del live[name]
        time.sleep(0.2)
    for name, record in live.items():
        pid = int(record["pid"])
        if same_process(record):
            _signal_group(pid, signal.SIGKILL)
        for _ in range(50):
            if _gone(pid):
                break
            time.sleep(0.1)
        result[name] = "killed"
    return result


def down(root: Path, config: ServicesConfig | None = None, echo=print) -> dict:
    """Stop the worker and both servers (SIGTERM, SIGKILL after the timeout); remove pid and state files.
    Records that no longer match their process are cleared without any signal."""
    root = Path(root).resolve()
    timeout = (config or load_config(root)).stop_timeout
    records = _records(root, read_state(root) or {})
    result = _stop_records(records, timeout)
    for service in ("worker", *SERVICES):
        if service in result:
            echo(f"{service}: {result[service]}")
        (services_dir(root) / f"{service}.pid").unlink(missing_ok=True)
    state_path(root).unlink(missing_ok=True)
    (services_dir(root) / AUTH_INI).unlink(missing_ok=True)
    if not result:
        echo("services were not running")
    return result
