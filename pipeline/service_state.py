"""Read the state file that ``nerveseg services up`` writes (``.services/state.json``).

From ``nerveseg services up`` until ``nerveseg services down`` the project's commands talk to its Prefect and
MLflow servers; without the file everything stays embedded (SQLite). Only a
reader lives here (``pipeline/`` imports nothing from Prefect); ``flows/services.py`` writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SERVICES_DIR = ".services"
STATE_FILE = "state.json"


def state_path(root: Path | str) -> Path:
    return Path(root).resolve() / SERVICES_DIR / STATE_FILE


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not a running server
        with open(f"/proc/{int(pid)}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def process_identity(pid: int) -> dict | None:
    """What tells this process apart from a later one given the same pid: its start time (clock ticks
    after boot, ``/proc/PID/stat`` field 22) and its command line. None when it is gone."""
    try:
        with open(f"/proc/{int(pid)}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[-1].split()
        with open(f"/proc/{int(pid)}/cmdline", "rb") as cmdline:
            argv = [part.decode(errors="replace") for part in cmdline.read().split(b"\0") if part]
    except (OSError, ValueError):
        return None
    if fields[0] == "Z":
        return None
    return {"pid": int(pid), "start_time": int(fields[19]), "cmdline": argv}


def same_process(record: dict | None) -> bool:
    """True only when the recorded process still runs: same pid, same start time, same command line.
    A record without start time or command line (an older state file) cannot be trusted with a signal."""
    if not record or not record.get("pid") or "start_time" not in record or "cmdline" not in record:
        return False
    now = process_identity(int(record["pid"]))
    return bool(now) and now["start_time"] == record["start_time"] and now["cmdline"] == list(record["cmdline"])


def read_state(root: Path | str) -> dict | None:
    """The services' state of the project at ``root``, or None when they are not running."""
    path = state_path(root)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def client_auth_problems(state: dict | None, environ=None) -> list[str]:
    """The credentials this process lacks to talk to servers that ask for a login (``auth: true``)."""
    environ = os.environ if environ is None else environ
    state = state or {}
    problems = []
    if (state.get("mlflow") or {}).get("auth") and not (
            environ.get("MLFLOW_TRACKING_USERNAME") and environ.get("MLFLOW_TRACKING_PASSWORD")):
        problems.append("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (your MLflow login)")
    if (state.get("prefect") or {}).get("auth") and not environ.get("PREFECT_API_AUTH_STRING"):
        problems.append("PREFECT_API_AUTH_STRING (USER:PASSWORD of the Prefect server)")
    return problems


def service_url(root: Path | str, service: str, key: str = "url") -> str | None:
    """``key`` of a service (``"prefect"`` or ``"mlflow"``) the project brought up, else None.

    The state file is the switch: from ``services up`` to ``services down`` the project's commands use
    the servers, even while one is briefly unreachable (its calls retry, then fail loudly), and never
    fall back silently to another store behind the operator's back."""
    entry = (read_state(root) or {}).get(service) or {}
    return entry.get(key)


def mlflow_tracking_uri(root: Path | str) -> str | None:
    return service_url(root, "mlflow")


def prefect_api_url(root: Path | str) -> str | None:
    return service_url(root, "prefect", "api_url")


def mlflow_shares_project_store(root: Path | str, uri: str) -> bool:
    """True when ``uri`` is the project's tracking server and it serves the project's own SQLite store."""
    entry = (read_state(root) or {}).get("mlflow") or {}
    return bool(entry) and entry.get("url") == uri and str(entry.get("backend", "")).startswith("sqlite:")
