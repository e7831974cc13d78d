"""Process settings that must be in place before Prefect, MLflow or GX are imported."""

from __future__ import annotations

import os
from pathlib import Path


def configure_environment(project_dir: Path) -> None:
    """Project-local Prefect home and no telemetry; explicit user settings win."""
    project_dir = Path(project_dir).resolve()
    os.environ.setdefault("PREFECT_HOME", str(project_dir / ".prefect"))
    # Telemetry cannot leave this network and only slows the server start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's first start on a new Prefect home creates and migrates its database:
    # Prefect waits 20 s by default, and a fresh clone's quickstart timed out at exactly that on a
    # 2-core machine. A healthy server answers in seconds, so the wait costs nothing.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    load_credentials()
    use_running_services(project_dir)


def load_credentials() -> None:
    """Credentials given as ``<VARIABLE>_FILE`` into this process's environment (where MLflow, Prefect
    and child processes read them), and every log record of the process redacted from here on."""
    from pipeline.credentials import install_log_redaction, load_secret_files

    load_secret_files()
    install_log_redaction()


def use_running_services(project_dir: Path) -> None:
    """While `nerveseg services up` runs this project's servers, talk to its Prefect server.

    Only for a process whose Prefect home is the project's own (``.prefect/``, the server's): one with
    another home (the test suite's throw-away one, say) keeps its own Prefect, and an explicit
    ``PREFECT_API_URL`` wins. MLflow follows the project's services in ``pipeline/registry.py``.
    """
    from pipeline.credentials import CredentialError
    from pipeline.service_state import client_auth_problems, prefect_api_url, read_state

    project_dir = Path(project_dir).resolve()
    problems = client_auth_problems(read_state(project_dir))
    if problems:
        raise CredentialError(f"this project's servers (`nerveseg services up`) ask for a login: set "
                              f"{'; '.join(problems)}, in the environment or as <VARIABLE>_FILE")
    if os.environ.get("PREFECT_API_URL"):
        return
    if Path(os.environ.get("PREFECT_HOME", "")).resolve() != project_dir / ".prefect":
        return
    url = prefect_api_url(project_dir)
    if url:
        os.environ["PREFECT_API_URL"] = url
