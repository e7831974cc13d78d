"""``nerveseg backup`` and ``nerveseg restore``: what a workspace cannot rebuild, saved and put back.

The work is in ``pipeline/backup.py``; this module decides where the stores are (the services' profile:
SQLite files in the project, or PostgreSQL databases) and talks to the operator. Exit codes as for every
command: 0 done; 1 the job failed or was refused (a damaged backup, a store that already holds records, a
missing tool, a DVC or git failure); 2 bad usage (an ``--out`` that is not empty, a folder that is not a
backup, an ``--into`` that is neither empty nor a clone of the project).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_options import EXIT_USAGE, ParamsOpt, ProjectOpt
from flows.cli_options import fail as _fail


def _echo(message: str) -> None:
    """Progress lines on stdout; warnings in yellow on stderr, where a cron job's mail shows them."""
    if message.startswith("WARNING"):
        typer.secho(message, fg=typer.colors.YELLOW, err=True)
    else:
        typer.echo(message)


def _stores_elsewhere(project: Path) -> list[str]:
    """Stores the operator's environment points at instead of the project's: not in the backup. Read
    before the project's defaults are set (``configure_environment`` only fills what is unset)."""
    from pipeline.service_state import mlflow_tracking_uri, prefect_api_url

    root = Path(project).resolve()
    notes = []
    home = os.environ.get("PREFECT_HOME")
    if home and Path(home).resolve() != root / ".prefect":
        notes.append(f"PREFECT_HOME is {home}: flow runs recorded there are not in this backup (it holds "
                     f"{root / '.prefect' / 'prefect.db'}); back that home up where it lives")
    api = os.environ.get("PREFECT_API_URL")
    if api and api != prefect_api_url(root):
        notes.append(f"PREFECT_API_URL is {api}: that server's database is not in this backup")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri != mlflow_tracking_uri(root) and uri != f"sqlite:///{root / 'mlflow' / 'mlflow.db'}":
        notes.append(f"MLFLOW_TRACKING_URI is {uri}: that store is not in this backup (it holds the project's "
                     "mlflow/ store); back it up where it lives")
    return notes


def _services_config(root: Path):
    from flows.services import ServicesError, load_config

    try:
        return load_config(root)
    except ServicesError as exc:
        _fail(str(exc), EXIT_USAGE)


def _postgres(config) -> dict:
    """``Stores`` arguments naming the MLflow and Prefect databases of the services' settings."""
    # The password never goes into a URL: settings that have one give it apart (``password()``); a URL
    # that still carries one has it passed on as PGPASSWORD by pipeline/backup.py.
    password = config.password()
    return {"mlflow_postgres": config.server_url(config.mlflow_database),
            "prefect_postgres": config.server_url(config.prefect_database), "pg_password": password or None,
            "users_postgres": config.server_url(config.mlflow_auth_database) if config.auth else None}


def _postgres_profile(root: Path) -> dict:
    """The databases when the project's services run, or are set to run, the postgres profile (the state
    file says which while they are up; ``services.yaml`` and NERVESEG_* otherwise); else nothing."""
    from pipeline.service_state import read_state

    config = _services_config(root)
    profile = (read_state(root) or {}).get("profile") or config.profile
    return _postgres(config) if profile == "postgres" else {}


def backup(
    out: Annotated[Path, typer.Option("--out", "-o", help="A new or empty folder for the backup.")],
    allow_missing_data: Annotated[bool, typer.Option(
        "--allow-missing-data", help="Write the backup even when objects of an old data version are in neither the "
                                     "DVC cache nor the remote (the gap is recorded in the manifest).")] = False,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Back up what cannot be rebuilt: MLflow store and artifacts, Prefect database, every data version's DVC
    objects, gx/ and the git history, with a manifest of sha256 sums. Written atomically to --out."""
    from flows.cli import _load
    from pipeline.backup import BackupError, BackupUsageError, Stores, create_backup
    from pipeline.versioning import CommandError

    elsewhere = _stores_elsewhere(project)
    params, paths = _load(project, params_file)
    for note in elsewhere:
        _echo(f"WARNING: {note}")
    if Path(os.path.abspath(out)).is_relative_to(paths.root):
        _echo(f"WARNING: {out} is inside the workspace; a backup there is lost with the workspace: keep a copy on "
              "another disk or machine")
    stores = Stores.of(paths, **_postgres_profile(paths.root))
    try:
        manifest = create_backup(stores, out, allow_missing_data, echo=_echo, warnings=tuple(elsewhere))
    except BackupUsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    except (BackupError, CommandError, OSError) as exc:
        _fail(f"backup not written: {exc}")
    size = sum(f["bytes"] for f in manifest["files"].values())
    typer.secho(f"backup written to {Path(out).resolve()}: {len(manifest['files'])} files, {size / 1e6:.1f} MB, "
                f"HEAD {manifest['git_head'][:12]}", fg=typer.colors.GREEN)
    typer.echo(f"  restore: nerveseg restore {Path(out).resolve()} --into NEW_DIR (or from inside a fresh clone)")


def restore(
    backup_dir: Annotated[Path, typer.Argument(help="A folder written by `nerveseg backup --out`.")],
    into: Annotated[Path, typer.Option(
        "--into", help="Where: an empty or new folder (the bundle is cloned there), or a fresh clone of the project "
                       "(default: the current folder).")] = Path("."),
    force: Annotated[bool, typer.Option(
        "--force", help="Replace stores that already hold records (back them up first).")] = False,
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Rebuild a workspace from a backup: every file is checked against the manifest first, then the git
    history, gx/, the DVC objects (cache and default remote), the MLflow store and artifacts (the workspace
    path rewritten) and the Prefect database are put back."""
    from pipeline import backup as bk
    from pipeline.versioning import CommandError

    if not backup_dir.is_dir():
        _fail(f"{backup_dir}: no such folder; give the folder that `nerveseg backup --out` wrote", EXIT_USAGE)
    try:
        manifest = bk.verify_backup(backup_dir)
        typer.echo(f"{backup_dir}: {len(manifest['files'])} files match the manifest (backup of "
                   f"{manifest['project']} at {manifest['created']})")
        for rel in manifest["unlisted"]:
            _echo(f"WARNING: {backup_dir / rel} is not in the manifest and is not restored")
        stores = _prepare(backup_dir, manifest, into, force, params_file)
        bk.restore_stores(backup_dir, manifest, stores, echo=_echo)
    except bk.BackupUsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    except (bk.BackupError, CommandError, OSError) as exc:
        _fail(f"restore failed: {exc}")
    for note in bk.workspace_notes(stores.root, manifest, backup_dir):
        _echo(f"WARNING: {note}")
    typer.secho(f"restored into {stores.root}", fg=typer.colors.GREEN)
    typer.echo(f"  check it: cd {stores.root} && nerveseg models && nerveseg audit && nerveseg ledger")


def _prepare(backup_dir: Path, manifest: dict, into: Path, force: bool, params_file: str):
    """The workspace and its stores, every refusal said before anything is written into an existing clone."""
    from pipeline import backup as bk

    if bk.target_is_empty(into):
        root = bk.clone_bundle(backup_dir, into, echo=_echo)
        stores = _stores_of(root, params_file, manifest)
        bk.check_restorable(stores, manifest, force)
        return stores
    root = bk.check_same_repository(into, manifest)
    stores = _stores_of(root, params_file, manifest)
    bk.check_restorable(stores, manifest, force)
    bk.fetch_bundle(backup_dir, root, echo=_echo)
    return stores


def _stores_of(root: Path, params_file: str, manifest: dict):
    """The restored workspace's stores; PostgreSQL databases (created when missing) only when the backup
    holds dumps, named by this workspace's services settings."""
    from flows.cli import _load
    from pipeline.backup import Stores

    params, paths = _load(root, params_file)
    if not any("postgres" in manifest["parts"][key] for key in ("mlflow_store", "prefect_db")):
        return Stores.of(paths)
    from flows.services import ServicesError, ensure_database

    config = _services_config(root)
    try:
        for database in (config.mlflow_database, config.prefect_database):
            ensure_database(config, database)
    except ServicesError as exc:
        _fail(f"{exc}; the backup holds PostgreSQL dumps, restored into database_url of services.yaml")
    return Stores.of(paths, **_postgres(config))


def register(app: typer.Typer) -> None:
    """Add these commands to the ``nerveseg`` app."""
    app.command("backup")(backup)
    app.command("restore")(restore)
