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


def read_state(root: Path | str) -> dict | None:
    """The services' state of the project at ``root``, or None when they are not running."""
    path = state_path(root)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


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
