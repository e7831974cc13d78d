"""``nerveseg data ...``: the datasets (the embedded phantom, imports, versions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.cli_options import ParamsOpt, ProjectOpt

data_app = typer.Typer(no_args_is_help=True, help="Datasets: the embedded phantom, imports and versions.")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder; frames go to OUT/train.")],
    subjects: Annotated[int, typer.Option(min=1)] = 12,
    frames_per_subject: Annotated[int, typer.Option(min=1)] = 30,
    seed: int = 2016,
    hard: Annotated[bool, typer.Option("--hard", help="Add unlabelled nerve look-alikes and fainter nerves.")] = False,
    defects: Annotated[Optional[str], typer.Option(
        "--defects", help="Comma-separated defect kinds to plant for validation tests (see docs/phantom.md).")] = None,
) -> None:
    """Write a synthetic ultrasound phantom in the competition's layout."""
    from pipeline.phantom import DEFECT_KINDS, PhantomSpec, generate_phantom, plant_defects

    kinds = [k.strip() for k in defects.split(",") if k.strip()] if defects else []
    unknown = [k for k in kinds if k not in DEFECT_KINDS]
    if unknown:
        typer.secho(f"error: unknown defect kind(s) {unknown}; known: {', '.join(DEFECT_KINDS)}", err=True,
                    fg=typer.colors.RED)
        raise typer.Exit(2)
    table = generate_phantom(out, PhantomSpec(subjects, frames_per_subject, seed, hard=hard), progress=True)
    typer.echo(f"wrote {len(table)} frames of {table.subject.nunique()} subjects to {out / 'train'} "
               f"({(~table.has_nerve).mean():.1%} without a nerve)")
    for planted in plant_defects(out, kinds, seed=seed) if kinds else []:
        typer.echo(f"  planted {planted['kind']}: {', '.join(planted['files'])}")




@data_app.command("add")
def data_add(
    src: Annotated[Path, typer.Argument(help="Dataset folder: the competition's layout (train/, test/, "
                                             "train_masks.csv), images/ + masks/, or one folder of frames.")],
    fmt: Annotated[str, typer.Option("--format", help="auto, competition, folders or unlabeled.")] = "auto",
    letterbox: Annotated[str, typer.Option(help="auto (detect square letterboxed exports), yes or no.")] = "auto",
    replace: Annotated[bool, typer.Option("--replace", help="The import becomes the whole dataset: frames "
                                                            "not in SRC are removed.")] = False,
    name: Annotated[Optional[str], typer.Option(help="Manifest name (data/raw/manifests/NAME.csv); "
                                                     "default: SRC's folder name.")] = None,
    keep_existing: Annotated[bool, typer.Option("--keep-existing", help="Frames already in data/raw keep their "
                                                                        "files (e.g. native TIFFs over a lossy "
                                                                        "re-export).")] = False,
    push: Annotated[bool, typer.Option("--push/--no-push", help="Push the new version to the DVC remote.")] = True,
    trigger: Annotated[bool, typer.Option("--trigger/--no-trigger", help="Start a run of the retraining "
                                          "deployment for a new data version (when the services are up and "
                                          "the deployment exists).")] = True,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Import SRC into data/raw, validate it, version it with DVC, commit data/raw.dvc and push; then start
    a retraining run of the deployment when the servers are up (--no-trigger to skip)."""
    from flows.cli import EXIT_USAGE, _fail, _load
    from pipeline.data_versions import DataAddError, add_data
    from pipeline.importers import DataImportError
    from pipeline.versioning import CommandError, DataVersionError

    params, paths = _load(project, params_file)
    if not src.is_dir():
        _fail(f"{src}: no such folder", EXIT_USAGE)
    try:
        result = add_data(paths.root, paths.raw_dir, src, params.validation, paths.gx_dir, paths.dvc_remote,
                          fmt=fmt, letterbox=letterbox, replace=replace, name=name,
                          keep_existing=keep_existing, push=push, progress=True,
                          echo=typer.echo, split=params.split)
    except DataImportError as exc:
        where = _write_failure_list(paths, src, exc) if exc.problems else ""
        _fail(f"import failed; {paths.rel(paths.raw_dir)} is unchanged.\n{exc}{where}")
    except (DataAddError, DataVersionError, CommandError) as exc:
        _fail(str(exc))
    if result.validation is not None and not result.validation.success:
        typer.echo(result.validation.format_failures())
        where = _write_failure_list(paths, src, result.validation, result.source_names)
        _fail(f"data validation failed; {paths.rel(paths.raw_dir)} was put back as it was and nothing was "
              f"versioned{where}")
    if not result.changed:
        typer.echo(f"nothing new: {paths.rel(paths.raw_dir)} already holds these frames; no new version")
        return
    v = result.data_version
    typer.secho(f"new data version {v['dvc_hash']} (commit {v['git_revision'][:12]}"
                f"{', pushed' if push else ', not pushed'})", fg=typer.colors.GREEN)
    typer.echo(f"  {result.message}")
    if result.validation is not None:  # warnings do not stop an import, but the operator should see them now
        typer.echo(result.validation.format_failures())
    if not trigger:
        typer.echo("no retraining run started (--no-trigger); `nerveseg run` retrains here and now")
        return
    _trigger_retraining(paths.root, v, params_file)


def _write_failure_list(paths, src: Path, failed, source_names: dict | None = None) -> str:
    """Every failing file of a refused ``data add`` to reports/data_add_failures.csv and .json; the
    line that says where, and how many."""
    from pipeline.failure_list import write_refusal

    csv_path, json_path, count = write_refusal(failed, src, paths.reports_dir, source_names,
                                               raw_prefix=f"{paths.rel(paths.raw_dir)}/")
    return (f"\nevery failing file ({count}) with its check and reason: {paths.rel(csv_path)} "
            f"(JSON: {paths.rel(json_path)})")


def _trigger_retraining(root: Path, version: dict, params_file: str) -> str | None:
    """Start a run of the retraining deployment for a new data version; say which, or why not. Never fails
    the command: the data version is already made."""
    why_not = None
    try:
        from flows.deployment import api_url, deployment_exists, trigger_run
    except ImportError as exc:
        why_not = f"the deployment helpers are not available ({exc})"
    else:
        try:
            if not deployment_exists(root):
                why_not = ("no Prefect server runs for this project, or it holds no retraining deployment "
                           "(`nerveseg services up`, then `nerveseg schedule --cron ...`)")
            else:
                from pipeline.versioning import git

                # the commit that holds this data version: what a worker's own clone checks out
                head = git(root, "rev-parse", "HEAD", check=False).stdout.strip()
                run_id = trigger_run(root, reason=f"data add {version['dvc_hash'][:12]}",
                                     parameters={"params_file": params_file, **({"revision": head} if head else {})})
                ui = (api_url(root) or "").rstrip("/").removesuffix("/api")
                typer.secho(f"started retraining run {run_id} for data version {version['dvc_hash']}",
                            fg=typer.colors.GREEN)
                if ui:
                    typer.echo(f"  watch it: {ui}/runs/flow-run/{run_id}")
                return run_id
        except Exception as exc:  # noqa: BLE001 (server gone meanwhile, refused): the data is versioned anyway
            why_not = f"{type(exc).__name__}: {exc}"
    typer.echo(f"no retraining run started: {why_not}; `nerveseg run` retrains here and now")
    return None


@data_app.command("resplit")
def data_resplit(
    reason: Annotated[str, typer.Option("--reason", help="Why the split changes; recorded in the split file.")],
    actor: Annotated[Optional[str], typer.Option(
        "--actor", help="On whose behalf you act; recorded beside your user name, never in its place.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would move; write nothing.")] = False,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Change the subject split on purpose: every subject is dealt anew by the split.* settings, and the
    change (who, when, why, who moved) is recorded in data/split.yaml and committed."""
    from flows.cli import _fail, _load
    from pipeline.data_versions import DataAddError, resplit_data
    from pipeline.versioning import CommandError

    params, paths = _load(project, params_file)
    try:
        done = resplit_data(paths.root, paths.raw_dir, params.split, reason, actor, dry_run=dry_run)
    except (DataAddError, CommandError) as exc:
        _fail(str(exc))
    counts = ", ".join(f"{n} {part}" for part, n in done["counts"].items())
    verb = "would move" if dry_run else "moved"
    typer.echo(f"{done['file']}: revision {done['revision']} ({counts} subjects); {verb} {len(done['moved'])}:")
    for subject, change in done["moved"].items():
        typer.echo(f"  subject {subject}: {change}")
    if dry_run:
        typer.echo("nothing written (--dry-run)")
        return
    typer.secho(f"resplit recorded and committed ({(done['commit'] or 'no change')[:12]})", fg=typer.colors.GREEN)
    typer.echo("  the next `nerveseg run` retrains on it; the promotion gate scores the champion only on holdout "
               "subjects that neither model trained or validated on")


@data_app.command("versions")
def data_versions(
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Every version of data/raw: git revision, date, DVC hash, counts, empty share, models trained on it."""
    import json

    from flows.cli import _with_registry
    from pipeline import registry
    from pipeline.data_versions import list_data_versions

    params, paths = _with_registry(project, params_file)
    models = registry.list_versions(params.registry.model_name)
    rows = [r.to_dict() for r in list_data_versions(paths.root, paths.raw_dir, models)]
    if as_json:
        typer.echo(json.dumps({"dvc_file": paths.rel(paths.raw_dvc_file) if paths.raw_dvc_file.exists()
                               else str(paths.raw_dvc_file.relative_to(paths.root)),
                               "model": params.registry.model_name, "versions": rows}, indent=2))
        return
    if not rows:
        typer.echo("no versions of data/raw yet; run `nerveseg data add SRC` or `nerveseg quickstart`")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"versions of {paths.rel(paths.raw_dir)} (newest first)")
    for column in ("", "revision", "date", "DVC hash", "frames", "subjects", "test", "empty", "models", "message"):
        table.add_column(column)
    for r in rows:
        models_text = ", ".join(f"v{m['version']}" + (f" ({', '.join(m['aliases'])})" if m["aliases"] else "")
                                for m in r["models"])
        table.add_row("*" if r["current"] else "", r["git_revision"][:10], r["date"][:19].replace("T", " "),
                      r["dvc_hash"][:12], _fmt(r["frames"]), _fmt(r["subjects"]), _fmt(r["test_frames"]),
                      "?" if r["empty_share"] is None else f"{r['empty_share']:.1%}", models_text, r["message"])
    Console(width=200).print(table)


def _fmt(value) -> str:
    return "?" if value is None else str(value)


@data_app.command("checkout")
def data_checkout(
    rev: Annotated[str, typer.Argument(help="Git revision of data/raw.dvc (see `nerveseg data versions`).")],
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Restore data/raw to its version at REV (refuses over unversioned changes)."""
    from flows.cli import _fail, _load
    from pipeline.data_versions import DataAddError, checkout_data_version
    from pipeline.versioning import CommandError

    params, paths = _load(project, params_file)
    try:
        done = checkout_data_version(paths.root, paths.raw_dir, rev)
    except (DataAddError, CommandError) as exc:
        _fail(str(exc))
    typer.secho(f"{paths.rel(paths.raw_dir)} is now version {done['dvc_hash']} from commit {done['revision'][:12]}"
                + (" (pulled from the DVC remote)" if done["pulled"] else ""), fg=typer.colors.GREEN)
    if not done["same_as_head"]:
        typer.echo(f"  {done['dvc_file']} now differs from HEAD (staged in git): commit it to make this the "
                   f"current data version, or `nerveseg data checkout HEAD` to go back")
