"""Helpers for the tests that start real servers on loopback (services, schedules, faults)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NERVESEG = str(Path(sys.executable).parent / "nerveseg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_env(root: Path, **extra: str) -> dict:
    """The environment of a `nerveseg` command run by an operator in ``root``: the project's own Prefect
    home, no tracking server or Prefect API inherited from the test process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_HOME")}
    env["PREFECT_HOME"] = str(Path(root) / ".prefect")
    env.update(extra)
    return env


def nerveseg(root: Path, *args: str, timeout: float = 300, check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run the `nerveseg` console script as a separate process, as an operator would."""
    done = subprocess.run([NERVESEG, *args], cwd=root, env=project_env(root, **env), capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"nerveseg {' '.join(args)} exited {done.returncode}\n"
                             f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-6000:]}")
    return done


def last_json(text: str) -> dict:
    """The JSON object a command printed last (progress lines may come before it)."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 if start >= 0 else text.index("{"):])


# MLflow 3's server starts a job runner and seven huey consumers beside its web worker, for MLflow's own
# server-side jobs (GenAI scorers and periodic maintenance), which nerveseg never uses: some 10 s of CPU at
# every start on a 2-core machine, polling afterwards, and a server that has run for a minute then takes
# 20-25 s to stop instead of ~5. The servers these tests start go without them (MLflow's documented
# switch); everything the tests check goes through the web worker.
LEAN_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextmanager
def lean_server_env():
    """``LEAN_SERVER_ENV`` in this process's environment for the block (``up`` passes it on to the servers)."""
    saved = {name: os.environ.get(name) for name in LEAN_SERVER_ENV}
    os.environ.update(LEAN_SERVER_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def services(root: Path, profile: str | None = None, worker: bool = False, **settings):
    """Both servers of ``root`` up on free ports for the block; always down afterwards."""
    from flows.services import down, load_config, up

    config = load_config(root, profile=profile, prefect_port=free_port(), mlflow_port=free_port(), **settings)
    try:
        with lean_server_env():
            state = up(root, config, worker=worker, echo=lambda _: None)
        yield state, config
    finally:
        down(root, config, echo=lambda _: None)


# MLflow's basic-auth app checks the password of every request against the user's stored hash
# (werkzeug's default: scrypt, ~0.4 s of CPU per check here), and a retraining run alone makes
# some 500 requests. Once the server has created a user (and its stored hash has been checked to be
# the default kind and to match the password), a test may store a hash of the SAME password made by
# werkzeug's PBKDF2 with 1000 iterations: every request still goes through the server's same
# check_password_hash call, right and wrong passwords get the same answers, at a fraction of the CPU.
CHEAP_HASH_METHOD = "pbkdf2:sha256:1000"


def cheapen_logins(auth_database: str, logins: dict[str, str]) -> None:
    """Store a cheap hash of each user's own password in MLflow's user store ``auth_database`` (PostgreSQL)."""
    import psycopg2
    from werkzeug.security import check_password_hash, generate_password_hash

    conn = psycopg2.connect(f"{POSTGRES}/{auth_database}", connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            for user, password in logins.items():
                cur.execute("SELECT password_hash FROM users WHERE username = %s", (user,))
                row = cur.fetchone()
                assert row, f"MLflow has no user {user}"
                assert not row[0].startswith(CHEAP_HASH_METHOD) and check_password_hash(row[0], password), (
                    f"the server stored no hash of {user}'s password of its own")
                cur.execute("UPDATE users SET password_hash = %s WHERE username = %s",
                            (generate_password_hash(password, method=CHEAP_HASH_METHOD), user))
    finally:
        conn.close()


def postgres_reachable(host: str = "127.0.0.1", port: int = 5432) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


POSTGRES = "postgresql://postgres@127.0.0.1:5432"


@contextmanager
def temporary_databases(*roles: str):
    """Uniquely named PostgreSQL databases (created by the code under test), dropped afterwards."""
    tag = uuid.uuid4().hex[:10]
    names = {role: f"nerveseg_test_{tag}_{role}" for role in roles}
    try:
        yield names
    finally:
        postgres_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names.values()))


def postgres_admin(*statements: str) -> None:
    """Run statements as the server's superuser (loopback, trust auth), outside any transaction."""
    import psycopg2

    conn = psycopg2.connect(f"{POSTGRES}/postgres", connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def invoke_when_up(port: int, body: dict, server: subprocess.Popen, timeout: float = 120) -> dict:
    """POST ``body`` to a starting `mlflow models serve` on ``port`` until it answers (or exits, or ``timeout``)."""
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the model server did not answer within {timeout:.0f} s (exit code {server.poll()})")
