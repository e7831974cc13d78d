"""Who acts: the identity recorded beside every move in the promotion ledger and every resplit.

On a tracking server that asks for a login (MLflow basic auth), the actor is the MLflow user whose
credentials made the request: the server checked them, or the move would have been refused. Anywhere
else it is the operating-system user running the command. ``--actor`` text is never an identity: it is
kept beside it as ``on_behalf_of``.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

MLFLOW_LOGIN = "mlflow-login"
OS_USER = "os-user"


@dataclass(frozen=True)
class Identity:
    name: str
    source: str  # MLFLOW_LOGIN or OS_USER

    def fields(self, on_behalf_of: str | None = None) -> dict:
        """The ledger's fields for this identity: ``actor``, ``identity`` and, when given, ``on_behalf_of``."""
        out = {"actor": self.name, "identity": self.source}
        if on_behalf_of and on_behalf_of.strip() and on_behalf_of.strip() != self.name:
            out["on_behalf_of"] = on_behalf_of.strip()
        return out


def tracking_server_login(tracking_uri: str | None, environ=None) -> str | None:
    """The MLflow user this process logs in as on ``tracking_uri``, or None (no server, no login)."""
    environ = os.environ if environ is None else environ
    if not tracking_uri or urlsplit(tracking_uri).scheme not in ("http", "https"):
        return None
    user = (environ.get("MLFLOW_TRACKING_USERNAME") or "").strip()
    return user if user and environ.get("MLFLOW_TRACKING_PASSWORD") else None


def acting_identity(tracking_uri: str | None = None) -> Identity:
    """Who is acting in this process: the MLflow login on a tracking server, else the OS user. Without
    ``tracking_uri``, MLflow's current one (``registry.configure`` sets it)."""
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    login = tracking_server_login(tracking_uri)
    return Identity(login, MLFLOW_LOGIN) if login else Identity(getpass.getuser(), OS_USER)


def describe(event: dict) -> str:
    """``alice`` or ``alice (on behalf of Dr Chen)``, for ledgers printed to people."""
    name = str(event.get("actor", ""))
    return f"{name} (on behalf of {event['on_behalf_of']})" if event.get("on_behalf_of") else name
