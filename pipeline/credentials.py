"""Credentials: where they come from, and how they are kept out of everything the project writes or shows.

A credential (a database URL with its password, a chat webhook URL with its token, an auth string, a
password) comes from an environment variable, or from the file that ``<VARIABLE>_FILE`` names, which
must be readable by its owner only (``chmod 600``). Never from ``params.yaml`` or ``services.yaml``:
both are committed to git and copied into run records.

``redact`` replaces every credential known to the process, and the password of any URL, with ``***``.
The project calls it on what it logs, prints, records in MLflow or Prefect, and writes to state files;
``install_log_redaction`` applies it to every log record of the process (Prefect's and MLflow's too).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

# The variables that hold credentials. The project reads its own (NERVESEG_*); the others are read by
# MLflow, Prefect and libpq themselves, and are listed so that their values are redacted too.
SECRET_VARIABLES = (
    "NERVESEG_DATABASE_URL",            # PostgreSQL server of the postgres profile (may carry a password)
    "NERVESEG_WEBHOOK_URL",             # chat webhook: the token is part of the URL
    "PGPASSWORD",                       # libpq's and asyncpg's password for the database
    "MLFLOW_TRACKING_USERNAME",         # not secret, but read from files like the password beside it
    "MLFLOW_TRACKING_PASSWORD",         # a client's login on an MLflow server with basic auth
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",       # MLflow basic auth: the admin's password at first start
    "MLFLOW_FLASK_SERVER_SECRET_KEY",   # MLflow basic auth: CSRF secret of the server
    "PREFECT_API_AUTH_STRING",          # a client's "user:password" for a Prefect server with auth
    "PREFECT_SERVER_API_AUTH_STRING",   # the Prefect server's own "user:password"
    "PREFECT_API_KEY",
)
NOT_SECRET = frozenset({"MLFLOW_TRACKING_USERNAME"})
# Where a child process receives a store URL: redacted like the others.
STORE_URL_VARIABLES = ("MLFLOW_BACKEND_STORE_URI", "PREFECT_API_DATABASE_CONNECTION_URL",
                       "PREFECT_SERVER_DATABASE_CONNECTION_URL")
FILE_SUFFIX = "_FILE"
MASK = "***"
_MIN_SECRET = 4  # shorter values would redact ordinary words

# scheme://user:password@ (the password may be empty-free and percent-encoded)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]+):(?P<password>[^\s@/'\"]+)@")


class CredentialError(RuntimeError):
    """A credential file is unreadable or readable by others."""


def read_secret_file(path: str | Path, variable: str = "") -> str:
    """The content of a credential file (trailing newline removed), which only its owner may read."""
    path = Path(path).expanduser()
    what = f"{variable}{FILE_SUFFIX} names {path}" if variable else str(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise CredentialError(f"{what}, which cannot be read ({exc.strerror}); create it with the "
                              f"credential on one line and `chmod 600 {path}`") from exc
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid() or mode & 0o077:
        raise CredentialError(f"{what}, which other users can read (mode {mode:o}, owner uid {info.st_uid}): "
                              f"a credential file must be readable only by its owner; `chmod 600 {path}`")
    return path.read_text().strip()


def load_secret_files(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """For each credential given as ``<VARIABLE>_FILE`` (and not directly), put the file's content in
    ``<VARIABLE>`` of this process: MLflow, Prefect and libpq read only the plain variables, and child
    processes inherit them (never through their command line). Returns the variables loaded."""
    environ = os.environ if environ is None else environ
    loaded = []
    for name in SECRET_VARIABLES:
        file = environ.get(name + FILE_SUFFIX)
        if file and not environ.get(name):
            environ[name] = read_secret_file(file, name)
            loaded.append(name)
    return loaded


def secret(name: str, environ: Mapping[str, str] | None = None) -> str:
    """A credential from ``name`` or the file ``name_FILE`` names; empty when neither is set."""
    environ = os.environ if environ is None else environ
    if environ.get(name):
        return environ[name].strip()
    file = environ.get(name + FILE_SUFFIX)
    return read_secret_file(file, name) if file else ""


def _url_secrets(value: str) -> set[str]:
    """The parts of a URL that are secret: its password, and for a webhook-like URL its path and query
    (chat webhooks carry their token there)."""
    out: set[str] = set()
    try:
        parts = urlsplit(value)
    except ValueError:
        return out
    if not parts.scheme or not parts.netloc:
        return out
    if parts.password:
        out |= {parts.password, unquote(parts.password), quote(unquote(parts.password), safe="")}
    if parts.scheme in ("http", "https") and (parts.path.strip("/") or parts.query):
        out.add(value)
        tail = parts.path + (f"?{parts.query}" if parts.query else "")
        if len(tail.strip("/")) >= 8:
            out.add(tail.rstrip("/"))
    return out


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Every credential value this process knows of, and the secret parts of those that are URLs."""
    environ = os.environ if environ is None else environ
    values: set[str] = set()
    for name in (*SECRET_VARIABLES, *STORE_URL_VARIABLES):
        value = (environ.get(name) or "").strip()
        if not value or name in NOT_SECRET:
            continue
        if name in STORE_URL_VARIABLES:
            values |= _url_secrets(value)
            continue
        values.add(value)
        values |= _url_secrets(value)
        if name.endswith("AUTH_STRING") and ":" in value:
            values.add(value.split(":", 1)[1])  # user:password -> the password alone
    return {v for v in values if len(v) >= _MIN_SECRET}


def redact(text: object, environ: Mapping[str, str] | None = None, extra: tuple[str, ...] = ()) -> str:
    """``text`` with every known credential, ``extra`` value and URL password replaced by ``***``."""
    text = "" if text is None else str(text)
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    known = secret_values(environ) | {e for e in extra if e and len(e) >= _MIN_SECRET}
    for value in sorted(known, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_url(url: str) -> str:
    """A URL safe to show: no password; a webhook-like URL keeps only its scheme and host."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:{MASK}@{netloc}" if parts.password else f"{parts.username}@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    if parts.scheme in ("http", "https") and (parts.path.strip("/") or parts.query):
        return urlunsplit((parts.scheme, netloc, f"/{MASK}", "", ""))
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def strip_password(url: str) -> tuple[str, str]:
    """``(url without its password, the password)``: the URL can then travel where others can read it
    (a command line, a log), the password in ``PGPASSWORD``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, ""
    netloc = (parts.username or "") + "@" + (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), unquote(parts.password)


_FACTORY_MARK = "_nerveseg_redacting"


def install_log_redaction() -> None:
    """Redact every log record this process creates, whichever library logs it (idempotent).

    A record factory rather than a handler filter: Prefect and MLflow add their handlers late and on
    their own loggers, while every record of the process passes through the factory."""
    current = logging.getLogRecordFactory()
    if getattr(current, _FACTORY_MARK, False):
        return

    def factory(*args, **kwargs):
        record = current(*args, **kwargs)
        if not secret_values():
            return record
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: leave it to the handler to report
            return record
        record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    setattr(factory, _FACTORY_MARK, True)
    logging.setLogRecordFactory(factory)
