"""``nerveseg services``, ``nerveseg schedule`` and ``nerveseg worker``: servers, schedules and workers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.cli_options import EXIT_FAILED, EXIT_USAGE, JsonOpt, ProjectOpt
from flows.cli_options import fail as _fail
from flows.environment import configure_environment

services_app = typer.Typer(no_args_is_help=True,
                           help="Prefect and MLflow servers on 127.0.0.1 for this project (UI, schedules).")


def _config(project: Path, **overrides):
    from flows.services import ServicesError, load_config

    try:
        return load_config(project, **overrides)
    except ServicesError as exc:
        _fail(str(exc), EXIT_USAGE)


@services_app.command("up")
def services_up(
    project: ProjectOpt = Path("."),
    profile: Annotated[Optional[str], typer.Option(
        "--profile", help="sqlite (stores in the project) or postgres (PostgreSQL backends).")] = None,
    database_url: Annotated[Optional[str], typer.Option(
        "--database-url", help="PostgreSQL server for the postgres profile, e.g. postgresql://postgres@127.0.0.1:5432")] = None,
    prefect_port: Annotated[Optional[int], typer.Option("--prefect-port", help="Default 4200.")] = None,
    mlflow_port: Annotated[Optional[int], typer.Option("--mlflow-port", help="Default 5000.")] = None,
    worker: Annotated[bool, typer.Option("--worker", help="Also start a process worker for the work pool.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start the Prefect server and the MLflow tracking server; wait until both answer; print the UIs."""
    from flows.services import ServicesError, up

    config = _config(project, profile=profile, database_url=database_url, prefect_port=prefect_port,
                     mlflow_port=mlflow_port)
    try:
        state = up(project, config, worker=worker, echo=(lambda _: None) if as_json else typer.echo)
    except ServicesError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(state, indent=2))
    else:
        typer.echo("the project's commands (nerveseg run, models, ...) now use these servers; "
                   "`nerveseg services down` stops them")


@services_app.command("down")
def services_down(project: ProjectOpt = Path(".")) -> None:
    """Stop the worker and both servers (SIGTERM, then SIGKILL after a timeout); back to embedded stores."""
    from flows.services import down

    down(project, _config(project), echo=typer.echo)


@services_app.command("status")
def services_status(project: ProjectOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Up, unhealthy or down, with addresses; exit 1 unless both servers are up."""
    from flows.services import status

    result = status(project)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for service in ("prefect", "mlflow", "worker"):
            entry = result.get(service)
            if entry is None:
                continue
            where = f" {entry['url']}" if entry.get("url") else ""
            extra = f" (pid {entry['pid']}, {entry.get('backend') or entry.get('pool') or ''})" if entry.get("pid") else ""
            typer.echo(f"{service:8} {entry['state']}{where}{extra}")
        if result["prefect"]["state"] == "down" and result["mlflow"]["state"] == "down":
            typer.echo("embedded stores in use (SQLite); `nerveseg services up` starts the servers")
    if not (result["prefect"]["state"] == "up" and result["mlflow"]["state"] == "up"):
        raise typer.Exit(EXIT_FAILED)


def schedule(
    cron: Annotated[Optional[str], typer.Option("--cron", help='Cron expression, e.g. "0 3 * * 1" (Mondays 03:00).')] = None,
    timezone: Annotated[str, typer.Option("--timezone", help="Time zone of the cron expression.")] = "UTC",
    list_: Annotated[bool, typer.Option("--list", help="List the deployments, schedules and next runs.")] = False,
    params_file: Annotated[str, typer.Option("--params", help="Settings file the scheduled runs use.")] = "params.yaml",
    paused: Annotated[bool, typer.Option("--paused", help="Create the schedule paused.")] = False,
    project: ProjectOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Create or update the retraining deployment with a cron schedule on a process work pool, or --list them."""
    configure_environment(project)
    from flows import deployment

    if not list_ and not cron:
        _fail("give --cron EXPRESSION to schedule, or --list", EXIT_USAGE)
    try:
        if cron:
            result = deployment.schedule(project, cron, timezone, params_file=params_file, paused=paused)
            if not as_json:
                typer.echo(f"deployment {result['deployment']} scheduled '{cron}' ({timezone}) on process work pool "
                           f"{result['work_pool']}{' (created)' if result['work_pool_created'] else ''}; "
                           "runs need a worker: `nerveseg worker` (or `nerveseg services up --worker`)")
        rows = deployment.list_deployments(project)
    except deployment.DeploymentUnavailable as exc:
        _fail(str(exc))
    except ValueError as exc:  # a bad cron expression or time zone
        _fail(str(exc), EXIT_USAGE)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        typer.echo("no retraining deployments yet; `nerveseg schedule --cron \"0 3 * * 1\"` creates one")
    for row in rows:
        state = "paused" if row["paused"] else "active"
        typer.echo(f"{row['deployment']}  schedule {', '.join(row['schedules']) or 'none'} ({state})  "
                   f"next run {row['next_run'] or '-'}  pool {row['work_pool']}  "
                   f"concurrency {row['concurrency_limit']} {row['collision_strategy'] or ''}")


def worker(
    project: ProjectOpt = Path("."),
    api_url: Annotated[Optional[str], typer.Option(
        "--api-url", help="Prefect API of a server elsewhere (default: PREFECT_API_URL or this project's services).")] = None,
    mlflow_uri: Annotated[Optional[str], typer.Option(
        "--mlflow-uri", help="Tracking server the runs report to (default: MLFLOW_TRACKING_URI or this project's "
                             "services); required with --api-url.")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Run in the background (pid and log in .services/).")] = False,
) -> None:
    """Start a Prefect process worker for the retraining work pool (e.g. on a GPU machine).

    Its flow runs work in this project folder (-C): on another machine, a clone of the server's workspace,
    brought to each run's revision and data version first (docs/operations.md, "A worker on another machine").
    """
    configure_environment(project)
    from flows import deployment
    from flows.services import ServicesError, start_worker, worker_command, worker_env

    config = _config(project)
    if detach:
        try:
            start_worker(project, config, echo=typer.echo)
        except ServicesError as exc:
            _fail(str(exc))
        return
    url = api_url or deployment.api_url(project)
    if not url:
        _fail("no Prefect server: `nerveseg services up`, or pass --api-url http://HOST:4200/api", EXIT_USAGE)
    from pipeline.service_state import mlflow_tracking_uri

    tracking = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow_tracking_uri(project.resolve())
    if api_url and not tracking:
        # otherwise its runs would register their models in a store of this folder that no one else reads
        _fail("a worker for a Prefect server elsewhere reports to that deployment's tracking server: pass "
              "--mlflow-uri http://HOST:5000 (or set MLFLOW_TRACKING_URI)", EXIT_USAGE)
    from prefect.client.orchestration import get_client

    try:
        with deployment.on_server(url), get_client(sync_client=True) as client:
            deployment.ensure_work_pool(client, config.work_pool)
    except Exception as exc:  # noqa: BLE001 - unreachable server, wrong pool type
        _fail(f"Prefect server at {url}: {exc}")
    command = worker_command(config)
    typer.echo(f"process worker for pool {config.work_pool} on {url} (Ctrl-C stops it)")
    os.execvpe(command[0], command, worker_env(project, url, tracking))


def register(app: typer.Typer) -> None:
    """Add these commands to the ``nerveseg`` app."""
    app.add_typer(services_app, name="services")
    app.command("schedule")(schedule)
    app.command("worker")(worker)
