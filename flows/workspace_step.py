"""The deployment's pull step: where a worker runs the retraining flow, and at which revision.

Prefect runs a deployment's pull steps in the flow-run process before it loads the flow. This one
replaces Prefect's ``set_working_directory``:

- a worker started by ``nerveseg worker -C DIR`` (or ``services up --worker``) names its own workspace
  in ``NERVESEG_WORKSPACE``. When that is the deployment's own folder (the worker runs beside the
  servers), the run works there, as the operator left it;
- when it is another folder (a clone on another machine), that clone is first brought to the run's
  ``revision`` parameter, or to the tip of the deployment's branch on ``origin`` for a scheduled run,
  and its data version pulled (:mod:`pipeline.worker_workspace`, in a child process so that the run then
  imports the code it checked out);
- without ``NERVESEG_WORKSPACE`` (a bare ``prefect worker``), the deployment's folder.

It imports nothing of ``pipeline`` itself, for the same reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKSPACE_VARIABLE = "NERVESEG_WORKSPACE"


class WorkspaceSyncError(RuntimeError):
    """The worker's workspace could not be brought to the run's revision."""


def run_workspace(project_dir: str | os.PathLike) -> Path:
    """Where a flow run works: its worker's own workspace when it has one, else ``project_dir``."""
    return Path(os.environ.get(WORKSPACE_VARIABLE) or project_dir).resolve()


def _run_parameters() -> dict:
    from prefect.runtime import flow_run

    try:
        return dict(flow_run.parameters or {})
    except Exception:  # noqa: BLE001 - no flow run (a manual call): no run parameters
        return {}


def prepare_workspace(directory: str, branch: str | None = None) -> dict:
    """Change into the folder this flow run works in, synced to its revision when it is a worker's clone."""
    deployment_dir = Path(directory).resolve()
    workspace = run_workspace(deployment_dir)
    if workspace != deployment_dir:
        parameters = _run_parameters()
        revision = parameters.get("revision") or (f"origin/{branch}" if branch else "origin/HEAD")
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.worker_workspace", str(workspace), str(revision),
             "--params", str(parameters.get("params_file") or "params.yaml")],
            capture_output=True, text=True, cwd=workspace,
        )
        if done.returncode != 0:
            raise WorkspaceSyncError((done.stderr or done.stdout).strip().removeprefix("error: "))
        synced = json.loads(done.stdout.strip().splitlines()[-1])
        import logging

        from prefect.logging import get_logger

        # no run context yet: Prefect's flow-run logger with the run named, so the line reaches its log
        run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
        logging.LoggerAdapter(get_logger("flow_runs"), {"flow_run_id": run_id}).info("%s", synced["line"])
    os.chdir(workspace)
    return {"directory": str(workspace)}
