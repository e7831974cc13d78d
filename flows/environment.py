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
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
