"""The retraining flow as a Prefect deployment: cron schedule, process work pool, runs through the API.

``schedule`` creates or updates the deployment ``retrain/<deployment>`` (names in ``services.yaml``,
defaults ``nerveseg`` for both the deployment and the work pool) from the project folder on local disk
(no image), on a **process** work pool created when missing, with a deployment concurrency limit of 1 and
collision strategy ENQUEUE: a second run waits for the first instead of colliding with it. Its pull step
(:mod:`flows.workspace_step`) runs each flow run in the worker's own workspace: the project folder itself
for a worker beside the servers, a clone brought to the run's revision for a worker on another machine.

``trigger_run`` and ``deployment_exists`` are the entry points other commands use (``nerveseg data add``
starts a retraining run through them when the services and the deployment are there).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, redirect_stdout
from datetime import datetime, timezone
from pathlib import Path

FLOW_NAME = "retrain"
ENTRYPOINT = "flows/retrain.py:retrain"
PULL_STEP = "flows.workspace_step.prepare_workspace"


class DeploymentUnavailable(RuntimeError):
    """No Prefect server for this project, or no retraining deployment on it."""


def _config(project_dir: Path):
    from flows.services import load_config

    return load_config(Path(project_dir))


def api_url(project_dir: Path) -> str | None:
    """The Prefect API this project uses: ``PREFECT_API_URL`` if set, else its running services."""
    import os

    from pipeline.service_state import prefect_api_url

    return os.environ.get("PREFECT_API_URL") or prefect_api_url(project_dir)


def _require_api(project_dir: Path) -> str:
    url = api_url(project_dir)
    if not url:
        raise DeploymentUnavailable(
            f"{Path(project_dir).resolve()}: no Prefect server is running for this project; "
            "start one with `nerveseg services up` (or set PREFECT_API_URL)"
        )
    import httpx

    try:
        ok = httpx.get(f"{url.rstrip('/')}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        ok = False
    if not ok:
        raise DeploymentUnavailable(f"the Prefect server at {url} does not answer; check `nerveseg services status`")
    return url


@contextmanager
def on_server(url: str):
    """Prefect settings pointing at ``url`` for the calls inside (never an ephemeral server)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}):
        yield


def deployment_name(project_dir: Path) -> str:
    return f"{FLOW_NAME}/{_config(project_dir).deployment}"


def _read_deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def deployment_exists(project_dir: Path) -> bool:
    """True when the project's Prefect server runs and holds the retraining deployment.

    False (never an error) when there is no server or no deployment: callers then run locally.
    """
    try:
        url = _require_api(project_dir)
    except DeploymentUnavailable:
        return False
    from prefect.client.orchestration import get_client

    with on_server(url), get_client(sync_client=True) as client:
        return _read_deployment(client, deployment_name(project_dir)) is not None


def trigger_run(project_dir: Path, reason: str, parameters: dict | None = None) -> str:
    """Create a run of the retraining deployment on the project's Prefect server; return its flow-run id.

    Returns at once (a worker of the deployment's pool picks it up). ``reason`` becomes the run's
    name suffix and a tag; ``parameters`` override the deployment's (``project_dir``, ``params_file``,
    ``force``, ``revision``: the commit a worker elsewhere checks out). Raises :class:`DeploymentUnavailable`
    when the server or the deployment is not there.
    """
    project_dir = Path(project_dir).resolve()
    url = _require_api(project_dir)
    name = deployment_name(project_dir)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with on_server(url):
        with get_client(sync_client=True) as client:
            if _read_deployment(client, name) is None:
                raise DeploymentUnavailable(
                    f"no deployment {name} on the Prefect server at {url}; create it with "
                    "`nerveseg schedule --cron \"0 3 * * 1\"`"
                )
        short = " ".join(str(reason).split())[:80]
        run = run_deployment(
            name,
            parameters=dict(parameters or {}),
            timeout=0,
            as_subflow=False,
            tags=["nerveseg", f"reason:{short}"],
            flow_run_name=f"retrain: {short}" if short else None,
        )
    return str(run.id)


def ensure_work_pool(client, name: str) -> bool:
    """Create the process work pool ``name`` if it is missing; True when created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            return False
        return True
    if pool.type != "process":
        raise DeploymentUnavailable(f"work pool {name} exists with type {pool.type}, not process; "
                                    "choose another `work_pool` in services.yaml")
    return False


def code_source(project_dir: Path) -> Path:
    """The folder the deployment loads ``flows/retrain.py`` from: the project itself when it holds the
    code (this repository), else the installed ``nerveseg`` code (a data-only project folder)."""
    project_dir = Path(project_dir).resolve()
    if (project_dir / ENTRYPOINT.split(":")[0]).is_file():
        return project_dir
    return Path(__file__).resolve().parents[1]


def entrypoint(project_dir: Path) -> str:
    """The flow as the run loads it, from the folder the pull step changed into: the workspace's own
    ``flows/retrain.py`` when it holds the code (this repository and its clones), else the installed one."""
    source = code_source(project_dir)
    if source == Path(project_dir).resolve():
        return ENTRYPOINT
    path, name = ENTRYPOINT.split(":")
    return f"{source / path}:{name}"


def pull_steps(project_dir: Path) -> list[dict]:
    """The deployment's pull step: the folder, and the branch a worker's clone follows for scheduled runs."""
    from pipeline import versioning

    project_dir = Path(project_dir).resolve()
    branch = versioning.git(project_dir, "rev-parse", "--abbrev-ref", "HEAD", check=False).stdout.strip()
    return [{PULL_STEP: {"directory": str(project_dir), "branch": branch if branch not in ("", "HEAD") else None}}]


def schedule(project_dir: Path, cron: str | None, timezone_name: str | None = None,
             params_file: str = "params.yaml", paused: bool = False) -> dict:
    """Create or update the deployment with a cron schedule (None: no schedule, runs on demand only)."""
    project_dir = Path(project_dir).resolve()
    url = _require_api(project_dir)
    config = _config(project_dir)
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule

    with on_server(url):
        with get_client(sync_client=True) as client:
            created_pool = ensure_work_pool(client, config.work_pool)
        loaded = flow.from_source(source=str(code_source(project_dir)), entrypoint=ENTRYPOINT)
        schedules = [CronSchedule(cron=cron, timezone=timezone_name or "UTC")] if cron else []
        with redirect_stdout(sys.stderr):  # Prefect prints a summary table; keep stdout for --json
            deployment_id = _deploy(loaded, config, schedules, paused, project_dir, params_file)
        from prefect.client.schemas.actions import DeploymentUpdate

        with get_client(sync_client=True) as client:  # Prefect's own step would pin the server's folder
            client.update_deployment(deployment_id, DeploymentUpdate(
                entrypoint=entrypoint(project_dir), pull_steps=pull_steps(project_dir)))
    return {"deployment": f"{FLOW_NAME}/{config.deployment}", "id": str(deployment_id), "cron": cron,
            "work_pool": config.work_pool, "work_pool_created": created_pool, "api_url": url}


def _deploy(loaded, config, schedules, paused, project_dir, params_file):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return loaded.deploy(
        name=config.deployment,
        work_pool_name=config.work_pool,
        schedules=schedules,
        paused=paused,
        parameters={"project_dir": str(project_dir), "params_file": params_file},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["nerveseg"],
        description=f"Retrain the segmentation model of {project_dir} (the name in its params.yaml, registry.model_name)",
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )


def list_deployments(project_dir: Path) -> list[dict]:
    """Every deployment of the retraining flow with its schedules and next scheduled run."""
    url = _require_api(project_dir)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    out = []
    with on_server(url), get_client(sync_client=True) as client:
        deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))
        for d in deployments:
            upcoming = [r for r in client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=20,
            ) if r.auto_scheduled]  # runs the schedule made, not ones triggered by hand and waiting
            crons = [getattr(s.schedule, "cron", None) or str(s.schedule) for s in (d.schedules or [])]
            next_run = upcoming[0].expected_start_time if upcoming else None
            if next_run is None and d.schedules and not d.paused:
                next_run = _next_cron(d.schedules[0].schedule)
            gcl = d.global_concurrency_limit
            limit = gcl.limit if gcl is not None else None
            strategy = getattr(getattr(d.concurrency_options, "collision_strategy", None), "value", None)
            out.append({
                "deployment": f"{FLOW_NAME}/{d.name}",
                "id": str(d.id),
                "schedules": crons,
                "active": [bool(s.active) for s in (d.schedules or [])],
                "paused": bool(d.paused),
                "next_run": next_run.isoformat() if next_run else None,
                "work_pool": d.work_pool_name,
                "concurrency_limit": limit,
                "collision_strategy": strategy,
                "parameters": d.parameters,
            })
    return out


def _next_cron(schedule) -> datetime | None:
    """The next time a cron schedule fires (when the server has not scheduled a run yet)."""
    cron = getattr(schedule, "cron", None)
    if not cron:
        return None
    try:
        import asyncio

        from prefect.server.schemas.schedules import CronSchedule

        dates = asyncio.run(CronSchedule(cron=cron, timezone=getattr(schedule, "timezone", None) or "UTC")
                            .get_dates(n=1))
        return dates[0].astimezone(timezone.utc) if dates else None
    except Exception:  # noqa: BLE001 - a display helper only
        return None
