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
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.service_state import SERVICES_DIR, pid_alive, read_state, state_path

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
    # scheduling: the deployment retrain/<deployment> on the process work pool <work_pool>
    work_pool: str = "nerveseg"
    deployment: str = "nerveseg"
    start_timeout: float = Field(180.0, gt=0)
    stop_timeout: float = Field(20.0, gt=0)

    def server_url(self, database: str, driver: str | None = None) -> str:
        parts = urlsplit(self.database_url)
        scheme = parts.scheme.split("+")[0]
        if scheme not in ("postgresql", "postgres"):
            raise ServicesError(f"database_url {self.database_url!r}: expected postgresql://USER@HOST:PORT")
        scheme = "postgresql" + (f"+{driver}" if driver else "")
        return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, ""))


def load_config(root: Path, **overrides) -> ServicesConfig:
    """Settings of the project's services (see the module's docstring for the precedence)."""
    root = Path(root).resolve()
    values: dict = {}
    path = root / CONFIG_FILE
    if path.is_file():
        from pipeline.config import read_yaml_mapping

        values.update(read_yaml_mapping(path, ServicesError))
    for var, key in (("NERVESEG_PROFILE", "profile"), ("NERVESEG_DATABASE_URL", "database_url"),
                     ("NERVESEG_PREFECT_PORT", "prefect_port"), ("NERVESEG_MLFLOW_PORT", "mlflow_port")):
        if os.environ.get(var):
            values[key] = os.environ[var]
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServicesConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ServicesError(f"services settings ({path.name}, NERVESEG_* variables, options): {problems}") from exc


def services_dir(root: Path) -> Path:
    return Path(root).resolve() / SERVICES_DIR


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def redact(url: str) -> str:
    """A database URL without its password, for state files and messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# --- PostgreSQL -----------------------------------------------------------------------------------


def ensure_database(config: ServicesConfig, database: str) -> bool:
    """Create ``database`` on the configured PostgreSQL server if it is missing; True when created."""
    import psycopg2
    from psycopg2 import sql

    try:
        conn = psycopg2.connect(config.server_url("postgres"), connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise ServicesError(f"cannot connect to PostgreSQL at {redact(config.database_url)}: {exc}".strip()) from exc
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


# --- the two servers ------------------------------------------------------------------------------


def _backends(root: Path, config: ServicesConfig) -> dict[str, str]:
    if config.profile == "postgres":
        ensure_database(config, config.mlflow_database)
        ensure_database(config, config.prefect_database)
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; MLflow gets the pinned psycopg2 explicitly.
        return {"mlflow": config.server_url(config.mlflow_database, "psycopg2"),
                "prefect": config.server_url(config.prefect_database, "asyncpg")}
    return {"mlflow": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
            "prefect": f"sqlite+aiosqlite:///{root / '.prefect' / 'prefect.db'}"}


def _commands(root: Path, config: ServicesConfig, backends: dict[str, str]) -> dict[str, tuple[list[str], dict]]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    base.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    base.setdefault("DO_NOT_TRACK", "1")
    prefect_env = {**base, "PREFECT_HOME": str(root / ".prefect"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_API_DATABASE_CONNECTION_URL": backends["prefect"],
                   "PREFECT_UI_API_URL": f"http://{config.host}:{config.prefect_port}/api"}
    prefect = [_bin("prefect"), "server", "start", "--host", config.host, "--port", str(config.prefect_port)]
    mlflow = [_bin("mlflow"), "server", "--host", config.host, "--port", str(config.mlflow_port),
              "--backend-store-uri", backends["mlflow"],
              "--artifacts-destination", config.artifacts_destination or (root / "mlflow" / "artifacts").as_uri(),
              "--workers", "1"]
    return {"prefect": (prefect, prefect_env), "mlflow": (mlflow, dict(base))}


def _health_url(service: str, host: str, port: int) -> str:
    return f"http://{host}:{port}/api/health" if service == "prefect" else f"http://{host}:{port}/health"


def healthy(url: str, timeout: float = 3.0) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _start(root: Path, name: str, command: list[str], env: dict) -> dict:
    folder = services_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    (folder / f"{name}.pid").write_text(str(process.pid))
    return {"pid": process.pid, "log": str(log), "process": process}


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


def up(root: Path, config: ServicesConfig | None = None, worker: bool = False, echo=print) -> dict:
    """Start both servers (and a process worker when ``worker``) unless already up; return the state."""
    root = Path(root).resolve()
    config = config or load_config(root)
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
    backends = _backends(root, config)
    commands = _commands(root, config, backends)
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
            _stop_pid(entry["pid"], config.stop_timeout, entry.get("process"))
            (services_dir(root) / f"{service}.pid").unlink(missing_ok=True)
        raise
    state = {
        "project": str(root),
        "profile": config.profile,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prefect": {"url": f"http://{config.host}:{config.prefect_port}",
                    "api_url": f"http://{config.host}:{config.prefect_port}/api",
                    "pid": started["prefect"]["pid"], "log": started["prefect"]["log"],
                    "backend": redact(backends["prefect"])},
        "mlflow": {"url": f"http://{config.host}:{config.mlflow_port}",
                   "pid": started["mlflow"]["pid"], "log": started["mlflow"]["log"],
                   "backend": redact(backends["mlflow"]),
                   "artifacts": str(root / "mlflow" / "artifacts")},
    }
    _write_state(root, state)
    echo(f"Prefect UI: {state['prefect']['url']}  (API {state['prefect']['api_url']}, {state['prefect']['backend']})")
    echo(f"MLflow UI:  {state['mlflow']['url']}  ({state['mlflow']['backend']})")
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
    old = (state.get(service) or {}).get("pid")
    if old and pid_alive(old):
        _stop_pid(int(old), config.stop_timeout)
    backends = _backends(root, config)
    command, env = _commands(root, config, backends)[service]
    entry = _start(root, service, command, env)
    try:
        _wait_healthy(service, entry, _health_url(service, config.host, port), config.start_timeout)
    except BaseException:
        _stop_pid(entry["pid"], config.stop_timeout, entry["process"])
        raise
    url = f"http://{config.host}:{port}"
    state[service] = {"url": url, "pid": entry["pid"], "log": entry["log"], "backend": redact(backends[service])}
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
    return _stop_pid(int(entry["pid"]), (config or load_config(root)).stop_timeout)


def _write_state(root: Path, state: dict) -> None:
    path = state_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def worker_command(config: ServicesConfig) -> list[str]:
    return [_bin("prefect"), "worker", "start", "--pool", config.work_pool, "--type", "process"]


def worker_env(root: Path, api_url: str, mlflow_uri: str | None = None) -> dict:
    """The environment of a process worker (and so of the flow runs it starts)."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    env.setdefault("PREFECT_HOME", str(Path(root).resolve() / ".prefect"))
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return env


def start_worker(root: Path, config: ServicesConfig | None = None, echo=print) -> dict:
    """A detached process worker for the project's work pool, pointed at its running services."""
    root = Path(root).resolve()
    config = config or load_config(root)
    state = read_state(root)
    if not state or not pid_alive(state.get("prefect", {}).get("pid")):
        raise ServicesError("the services are not running; `nerveseg services up` first")
    from flows.deployment import ensure_work_pool, on_server
    from prefect.client.orchestration import get_client

    with on_server(state["prefect"]["api_url"]), get_client(sync_client=True) as client:
        ensure_work_pool(client, config.work_pool)
    entry = _start(root, "worker", worker_command(config), worker_env(root, state["prefect"]["api_url"]))
    entry.pop("process")
    state["worker"] = {**entry, "pool": config.work_pool}
    _write_state(root, state)
    echo(f"process worker for pool {config.work_pool}: pid {entry['pid']}, log {entry['log']}")
    return state["worker"]


def status(root: Path) -> dict:
    """``up`` (process alive and answering), ``unhealthy`` (alive, not answering) or ``down``, per service."""
    root = Path(root).resolve()
    state = read_state(root) or {}
    out: dict = {"project": str(root), "profile": state.get("profile")}
    for service in (*SERVICES, "worker"):
        entry = state.get(service) or {}
        pid = entry.get("pid") or _pid_file(root, service)
        if not pid_alive(pid):
            if service != "worker":
                out[service] = {"state": "down"}
            continue
        if service == "worker":
            out[service] = {"state": "up", "pid": pid, "pool": entry.get("pool"), "log": entry.get("log")}
            continue
        url = entry.get("url")
        answering = False
        if url:
            host, _, port = urlsplit(url).netloc.rpartition(":")
            answering = healthy(_health_url(service, host, int(port)))
        out[service] = {"state": "up" if answering else "unhealthy", "url": url, "pid": pid,
                        "log": entry.get("log"), "backend": entry.get("backend")}
        if service == "prefect":
            out[service]["api_url"] = entry.get("api_url")
    return out


def _pid_file(root: Path, service: str) -> int | None:
    try:
        return int((services_dir(root) / f"{service}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _signal_group(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _gone(pid: int) -> bool:
    try:  # reap it if it is our child (tests, `up` failing half-way)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    return not pid_alive(pid)


def _stop_pids(pids: dict[str, int], timeout: float) -> dict[str, str]:
    """SIGTERM to each process group at once, SIGKILL to those still there after ``timeout``."""
    result = {name: "not running" for name, pid in pids.items() if _gone(pid)}
    live = {name: pid for name, pid in pids.items() if name not in result}
    for pid in live.values():
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for name, pid in list(live.items()):
            if _gone(pid):
                _signal_group(pid, signal.SIGKILL)  # children the server left behind in its group, if any
                result[name] = "stopped"
                del live[name]
        time.sleep(0.2)
    for name, pid in live.items():
        _signal_group(pid, signal.SIGKILL)
        for _ in range(50):
            if _gone(pid):
                break
            time.sleep(0.1)
        result[name] = "killed"
    return result


def _stop_pid(pid: int, timeout: float, process: subprocess.Popen | None = None) -> str:
    """SIGTERM to the process group, SIGKILL after ``timeout``; how it ended."""
    return _stop_pids({"p": pid}, timeout)["p"]


def down(root: Path, config: ServicesConfig | None = None, echo=print) -> dict:
    """Stop the worker and both servers (SIGTERM, SIGKILL after the timeout); remove pid and state files."""
    root = Path(root).resolve()
    timeout = (config or load_config(root)).stop_timeout
    state = read_state(root) or {}
    pids = {}
    for service in ("worker", *SERVICES):
        pid = (state.get(service) or {}).get("pid") or _pid_file(root, service)
        if pid:
            pids[service] = int(pid)
    result = _stop_pids(pids, timeout)
    for service in ("worker", *SERVICES):
        if service in result:
            echo(f"{service}: {result[service]}")
        (services_dir(root) / f"{service}.pid").unlink(missing_ok=True)
    state_path(root).unlink(missing_ok=True)
    if not result:
        echo("services were not running")
    return result
