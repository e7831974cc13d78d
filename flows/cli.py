"""``nerveseg``: the operator's command line.

Exit codes: 0 done; 1 the job failed (data validation, a flow step, a model that cannot
load); 2 bad usage or settings (a wrong option, ``params.yaml`` breaking a rule, a missing file);
3 some inputs failed and the others were done (``predict``: unreadable frames, listed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.cli_options import EXIT_FAILED, EXIT_PARTIAL, EXIT_USAGE, ParamsOpt, ProjectOpt
from flows.cli_options import fail as _fail
from flows.data_cli import data_app
from flows.environment import configure_environment
from pipeline.identity import describe

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
stage_app = typer.Typer(no_args_is_help=True, help="Run one DVC stage (what dvc.yaml calls).")
app.add_typer(stage_app, name="stage")
app.add_typer(data_app, name="data")


def _load(project: Path, params_file: str):
    from pipeline.config import ParamsError, load_params
    from pipeline.paths import ProjectPaths

    configure_environment(project)
    try:
        params = load_params(project / params_file)
    except ParamsError as exc:
        _fail(str(exc), EXIT_USAGE)
    return params, ProjectPaths.of(project, params)


def _with_registry(project: Path, params_file: str):
    """Settings, paths, and MLflow pointed at the project's store (or MLFLOW_TRACKING_URI)."""
    params, paths = _load(project, params_file)
    from pipeline import registry

    registry.configure(paths.mlflow_dir, params.registry.experiment)
    return params, paths


def _check_split(params, paths) -> None:
    """Settings that no longer match the recorded subject split are a usage error (exit 2), said
    before a flow run starts; the flow checks again for runs started elsewhere (schedules)."""
    from pipeline.split import SplitError, check_recorded

    try:
        check_recorded(paths.split_file, params.split, paths.rel(paths.split_file))
    except SplitError as exc:
        _fail(str(exc), EXIT_USAGE)


def _run_flow(params, paths, params_file: str, force: bool = False) -> dict:
    from flows.approval import ApprovalTimeout
    from flows.retrain import retrain
    from pipeline.validation import DataValidationError
    from pipeline.versioning import CommandError, DataVersionError
    from pipeline.workspace_lock import WorkspaceBusy

    _check_split(params, paths)
    try:
        return retrain(project_dir=str(paths.root), params_file=params_file, force=force)
    except DataValidationError as exc:
        _fail(f"data validation failed; nothing was trained or registered.\n{exc}")
    except (DataVersionError, CommandError, WorkspaceBusy, FileNotFoundError, ValueError, ApprovalTimeout) as exc:
        _fail(str(exc))


def _left_without_champion(result: dict) -> bool:
    """The run's decision left no champion (``PromotionDecision.leaves_no_champion``, from its JSON form)."""
    from pipeline.promotion import PromotionDecision

    return not result.get("skipped") and PromotionDecision.from_dict(result["decision"]).leaves_no_champion


def _print_result(result: dict, paths, model_name: str, elapsed: float | None = None) -> None:
    from pipeline.metrics import presence_caveat

    if result.get("skipped"):
        typer.secho(f"retraining skipped: {result['reason']}", fg=typer.colors.YELLOW)
        typer.echo("  models: nerveseg models   lineage: nerveseg audit")
        return
    decision, holdout = result["decision"], result["holdout"]
    typer.echo("")
    no_champion = _left_without_champion(result)
    if decision["promote"]:
        verdict = "is the new champion"
    else:
        verdict = "is the challenger; " + ("there is no champion yet" if no_champion else "the champion stays")
    typer.secho(f"model {decision['challenger_version']} {verdict}",
                fg=typer.colors.YELLOW if no_champion else typer.colors.GREEN, bold=True)
    typer.echo(f"  reason:        {decision['reason']}")
    if no_champion:
        typer.echo("  next:          look at the evaluation report and overlays below; retrain with another "
                   "train.seed, or promote it by hand (nerveseg promote VERSION --reason ...)")
    trained = result.get("train")
    if trained:
        typer.echo(f"  trained:       {trained['epochs_run']} epochs on {trained['device']} in "
                   f"{trained['precision']}, {trained['train_frames_per_second']:.0f} frames/s; "
                   f"best validation Dice {trained['best_val_dice']:.4f} at epoch {trained['best_epoch']}")
    typer.echo(f"  holdout:       Dice {holdout['dice']:.4f}, IoU {holdout['iou']:.4f}, "
               f"presence accuracy {holdout['presence_accuracy']:.4f} on {holdout['n_frames']} frames")
    if decision.get("comparison_subjects") is not None:
        excluded = "; ".join(f"{s}: {why}" for s, why in (decision.get("excluded_subjects") or {}).items())
        typer.echo(f"  gate compared: {len(decision['comparison_subjects'])} of "
                   f"{len(decision.get('holdout_subjects') or [])} holdout subjects ({decision['n_frames']} frames) "
                   f"unseen by {'both models' if decision['champion_version'] else 'the model'}"
                   + (f"; left out: {excluded}" if excluded else ""))
    if result.get("retrain_reason"):
        typer.echo(f"  retrained:     {result['retrain_reason']}")
    caveat = presence_caveat(holdout.get("empty_baseline_dice"), holdout.get("n_frames"))
    if caveat:
        typer.secho(f"  note:          {caveat}", fg=typer.colors.YELLOW)
    typer.echo(f"  data version:  {result['data']['dvc_hash']} ({result['data']['dvc_file']} "
               f"at {result['data']['git_revision'][:12]})")
    if elapsed is not None:
        typer.echo(f"  took:          {elapsed:.0f} s")
    typer.echo("\nwhere to look next:")
    typer.echo(f"  overlays:        {paths.reports_dir / 'overlays.png'}")
    typer.echo(f"  training curves: {paths.reports_dir / 'training_curves.png'}")
    if result["tracking_uri"].startswith("http"):  # the services are up: their UI is already there
        typer.echo(f"  MLflow UI:       {result['tracking_uri']}")
    else:
        typer.echo(f"  MLflow UI:       mlflow ui --backend-store-uri {result['tracking_uri']} --port 5000"
                   "   then open http://127.0.0.1:5000")
    typer.echo("  models:          nerveseg models --json")
    model = "" if not no_champion else f" --model models:/{model_name}/{decision['challenger_version']}"
    typer.echo(f"  predict:         nerveseg predict {paths.rel(paths.raw_dir)}/train/1_1.tif --out predictions{model}")


@app.command()
def quickstart(project: ProjectOpt = Path("."), params_file: ParamsOpt = "params.yaml") -> None:
    """The main job: generate the phantom, version it with DVC, run the flow to a promoted model."""
    params, paths = _load(project, params_file)
    from flows.quickstart import ensure_versioned_phantom
    from pipeline.versioning import CommandError, DataVersionError

    began = time.perf_counter()
    try:
        ensure_versioned_phantom(paths.root, params_file, echo=typer.echo)
    except (DataVersionError, CommandError) as exc:
        _fail(str(exc))
    result = _run_flow(params, paths, params_file)
    _print_result(result, paths, params.registry.model_name, time.perf_counter() - began)
    if _left_without_champion(result):
        raise typer.Exit(1)  # the quickstart's promise is a champion; a script should not go on without one


@app.command()
def run(project: ProjectOpt = Path("."), params_file: ParamsOpt = "params.yaml",
        as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Retrain even if nothing changed.")] = False) -> None:
    """Run the retraining flow on the current data version (skipped when nothing changed)."""
    params, paths = _load(project, params_file)
    began = time.perf_counter()
    result = _run_flow(params, paths, params_file, force)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        _print_result(result, paths, params.registry.model_name, time.perf_counter() - began)


@app.command()
def validate(
    data_dir: Annotated[Optional[Path], typer.Argument(help="Dataset folder (default: data.raw_dir): any folder "
                                                             "`data add` accepts.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="How to import DATA_DIR when it is not in the canonical "
                                                      "layout, as `data add`: auto, competition, folders or "
                                                      "unlabeled.")] = "auto",
    letterbox: Annotated[str, typer.Option(help="auto, yes or no, as `data add`.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary and every failing file (check, "
                                                         "reason) as JSON.")] = False,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Check a dataset with the Great Expectations suite; exit 1 on a failure. Every failing file, with its
    check and reason, goes to reports/validate_failures.csv (and .json)."""
    params, paths = _load(project, params_file)
    from pipeline.folder_validation import validate_folder, write_reports
    from pipeline.importers import DataImportError

    folder = data_dir or paths.raw_dir
    if not folder.is_dir():
        _fail(f"{folder}: no such folder", EXIT_USAGE)
    try:
        checked = validate_folder(folder, params.validation, paths.gx_dir, fmt=fmt, letterbox=letterbox,
                                  as_is=data_dir is None)
    except DataImportError as exc:
        _fail(f"{folder}: cannot be imported as `data add` would, so it was not validated:\n{exc}")
    doc = write_reports(checked, paths.reports_dir, paths.root)
    if as_json:
        typer.echo(json.dumps(doc, indent=2, default=str))
    else:
        _print_validation(checked, doc, paths.reports_dir)
    if not checked.success:
        _fail("validation failed")


def _print_validation(checked, doc: dict, reports_dir: Path) -> None:
    from pipeline import failure_list
    from pipeline.folder_validation import CANONICAL, FAILURES_JSON
    from pipeline.validation import SHOW_FILES

    report, entries = checked.report, doc["failures"]
    summary, csv_path, json_path = Path(doc["report"]), Path(doc["failure_list"]), reports_dir / FAILURES_JSON
    cannot = f"; {len(checked.problems)} files it cannot import" if checked.problems else ""
    read_as = "" if checked.layout == CANONICAL else f" (read as `data add` imports it: {checked.layout}{cannot})"
    typer.echo(f"{checked.data_dir}: {report.n_frames} frames of {report.n_subjects} subjects, "
               f"{report.empty_share:.1%} without a nerve, {report.evaluated} expectations{read_as}")
    if checked.problems:  # the checks below saw only what could be imported: say so first
        checks = ", ".join(sorted({p.check for p in checked.problems}))
        typer.echo(f"data validation failed: {len(checked.problems)} files cannot be imported ({checks}), so "
                   f"`data add` refuses this folder; the checks of the frames it can import:")
    typer.echo(report.format_failures())  # blocking failures and warnings, each naming its files
    blocking, warned = failure_list.failing_files(entries), failure_list.failing_files(entries, "warning")
    if entries:
        typer.echo(f"{len(blocking)} files fail a blocking check, {len(warned)} only warn; every one with its "
                   f"check and reason: {csv_path} (JSON: {json_path})")
        for line in failure_list.terminal_lines(entries, SHOW_FILES):
            typer.echo(f"  {line}")
    typer.echo(f"report: {summary}")
    if report.data_docs:
        typer.echo(f"Data Docs: {report.data_docs_page or report.data_docs}")
    if checked.success:
        typer.secho("validation passed", fg=typer.colors.GREEN)


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Frames (PNG, JPEG, TIFF) or folders of them (searched "
                                                      "recursively; *_mask.* files are skipped).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for masks, overlays and "
                                                          "predict_failures.csv.")] = Path("predictions"),
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="MLflow model URI (default: models:/NAME@champion, NAME from "
                              "registry.model_name).")] = None,
    submission: Annotated[Optional[Path], typer.Option(
        "--submission", help="Also write the competition's run-length-encoded CSV (img,pixels): one row per "
                             "frame written, img its NAME.")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Frames per model call (frames of one size share a batch).")] = 16,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Segment frames with a registered model: writes OUT/NAME_mask.png and OUT/NAME_overlay.png.

    NAME (also the submission's img) is the frame's path relative to the input folder it was found in,
    without the extension; for a file given by itself, its name without the extension.
    Frames that would share a NAME get their folders prepended until they differ (a/1_1, b/1_1), then the extension.
    Unreadable frames are listed with the reason in OUT/predict_failures.csv, the rest still written: exit code 3.
    """
    params, paths = _load(project, params_file)
    from pipeline import batch_predict, registry

    try:
        frames = batch_predict.collect_frames(inputs, out)
    except batch_predict.PredictInputError as exc:
        _fail(str(exc), EXIT_USAGE)
    uri = model or registry.champion_uri(params.registry.model_name)
    registry.configure(paths.mlflow_dir, params.registry.experiment)
    try:
        loaded = registry.load_model(uri)
    except Exception as exc:  # MLflow raises several types for a missing model or alias
        _fail(f"cannot load model {uri}: {exc}. List the registered versions with `nerveseg models`.")
    result = batch_predict.predict_frames(loaded, frames, out, batch_size=batch_size, submission=submission)
    for line in result.summary():
        typer.echo(line)
    if result.failures:
        _fail(f"{len(result.failures)} of {result.frames} frames could not be read",
              EXIT_PARTIAL if result.written else EXIT_FAILED)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Score every version on the same frames: the current holdout subjects that none of "
                          "them trained or validated on (cached per version and set).")] = False,
    versions_opt: Annotated[Optional[str], typer.Option(
        "--versions", help="With --compare: only these versions (comma-separated), so that fewer subjects are "
                           "left out.")] = None,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Every registered version with its aliases, holdout metrics, data hash and split."""
    params, paths = _with_registry(project, params_file)
    from pipeline import registry

    if compare or versions_opt:
        _compare_models(params, paths, versions_opt, as_json)
        return
    versions = [v.to_dict() for v in registry.list_versions(params.registry.model_name)]
    if as_json:
        typer.echo(json.dumps({"model": params.registry.model_name, "versions": versions}, indent=2))
        return
    if not versions:
        typer.echo(f"no versions of {params.registry.model_name} yet; run `nerveseg quickstart` or `nerveseg run`")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=params.registry.model_name)
    for column in ("version", "aliases", "holdout Dice", "presence acc.", "data hash", "split", "decision"):
        table.add_column(column)
    for v in versions:
        m, sp = v["holdout_metrics"], v["split"]
        split = (f"{sp.get('n_train', '?')}/{sp.get('n_validation', '?')}/{sp.get('n_holdout', '?')} "
                 f"{sp.get('digest', '')[:8]}") if sp else "not recorded"
        table.add_row(v["version"], ", ".join(v["aliases"]), f"{m.get('dice', float('nan')):.4f}",
                      f"{m.get('presence_accuracy', float('nan')):.4f}", (v["data_hash"] or "")[:12], split,
                      v["promotion"].get("decision", ""))
    Console().print(table)
    typer.echo("holdout Dice: each version on its own data version's holdout (--compare scores all on one set); "
               "split: train/validation/holdout subjects and the recorded split's digest")


def _compare_models(params, paths, versions_opt: Optional[str], as_json: bool) -> None:
    from pipeline.comparison import compare_versions

    chosen = [v.strip() for v in versions_opt.split(",") if v.strip()] if versions_opt else None
    try:
        result = compare_versions(paths, params, chosen, progress=not as_json)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    c = result["comparison"]
    typer.echo(f"comparison set {c['digest']}: {len(c['subjects'])} of the {len(c['holdout_subjects'])} current "
               f"holdout subjects ({c['n_frames']} frames) that no version listed trained or validated on")
    for subject, why in c["excluded"].items():
        typer.echo(f"  left out subject {subject}: {why}")
    if not result["versions"]:
        _fail("no subject of the current holdout is unseen by every version listed; compare fewer versions "
              "(--versions 4,5)")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} on one comparison set")
    for column in ("version", "aliases", "Dice [95 % interval over subjects]", "nerve-frame Dice", "presence acc.",
                   "own holdout Dice", "split"):
        table.add_column(column)
    for v in result["versions"]:
        nerve = "-" if v["nerve_dice"] is None else f"{v['nerve_dice']:.4f}"
        own = "-" if v["own_holdout_dice"] is None else f"{v['own_holdout_dice']:.4f}"
        table.add_row(v["version"], ", ".join(v["aliases"]),
                      f"{v['dice']:.4f} [{v['dice_low']:.4f}, {v['dice_high']:.4f}]", nerve,
                      f"{v['presence_accuracy']:.4f}", own, v["split_source"])
    Console(width=160).print(table)


ActorOpt = Annotated[Optional[str], typer.Option(
    "--actor", help="On whose behalf you act; recorded beside your identity (your MLflow login on a server "
                    "with auth, else your user name), never in its place.")]


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The registered version to make champion.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded with the move.")],
    actor: ActorOpt = None,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Make a version champion by hand; it must load and run first, and the move is recorded."""
    params, paths = _with_registry(project, params_file)
    from pipeline import release

    try:
        event = release.manual_promote(params.registry.model_name, version, reason, actor)
    except release.PromotionError as exc:
        _fail(str(exc))
    except Exception as exc:  # MLflow: unknown version
        _fail(f"{params.registry.model_name} version {version}: {exc}")
    if event["overrules_gate"]:
        typer.secho(f"note: the promotion gate had refused version {version}: {event['overrules_gate']}; "
                    f"the override is recorded with your reason", fg=typer.colors.YELLOW)
    typer.echo(f"version {version} is now champion (was {event['previous_champion'] or 'none'}); "
               f"recorded: {describe(event)} at {event['time']}: {event['reason']}")


@app.command()
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded with the move.")] = "rollback",
    actor: ActorOpt = None,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Give champion back to the version the current champion replaced (checked to load and run)."""
    params, paths = _with_registry(project, params_file)
    from pipeline import release

    try:
        event = release.rollback(params.registry.model_name, reason, actor)
    except release.PromotionError as exc:
        _fail(str(exc))
    typer.echo(f"champion rolled back from version {event['replaced']} to the previous champion; "
               f"recorded: {describe(event)} at {event['time']}: {event['reason']}")


def _answer_approval(run_id: str, decision: str, reason: str, actor: Optional[str], project: Path) -> None:
    configure_environment(project)
    from flows.approval import ApprovalError, answer
    from pipeline.identity import tracking_server_login
    from pipeline.registry import tracking_uri

    uri = tracking_uri(Path(project).resolve() / "mlflow")
    if tracking_server_login(uri):  # the answer carries this login as who approved: the server checks it first
        import mlflow

        try:
            mlflow.MlflowClient(tracking_uri=uri).search_registered_models(max_results=1)
        except Exception as exc:  # noqa: BLE001 - refused login, unreachable server
            _fail(f"the MLflow server at {uri} did not accept your login (MLFLOW_TRACKING_USERNAME): {exc}")
    try:
        name = answer(run_id, decision, reason, actor, uri)
    except ApprovalError as exc:
        _fail(str(exc))
    verb = "approved" if decision == "approve" else "rejected"
    typer.echo(f"{verb} the held promotion of flow run {name} ({run_id}); it resumes now and records the "
               f"answer in the ledger (`nerveseg ledger`)")


RunIdArg = Annotated[str, typer.Argument(help="The paused flow run's id (printed by the run, shown in the UI).")]


@app.command()
def approve(
    run_id: RunIdArg,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded in the ledger.")],
    actor: ActorOpt = None,
    project: ProjectOpt = Path("."),
) -> None:
    """Approve a promotion held for approval (promotion.require_approval): champion moves."""
    _answer_approval(run_id, "approve", reason, actor, project)


@app.command()
def reject(
    run_id: RunIdArg,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded in the ledger.")],
    actor: ActorOpt = None,
    project: ProjectOpt = Path("."),
) -> None:
    """Reject a promotion held for approval: the champion stays, the version becomes challenger."""
    _answer_approval(run_id, "reject", reason, actor, project)


ModelUriArg = Annotated[Optional[str], typer.Argument(
    help="models:/NAME@ALIAS, models:/NAME/VERSION or a version (default: models:/NAME@champion, NAME from "
         "registry.model_name).", show_default=False)]


@app.command()
def audit(
    model_uri: ModelUriArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """The lineage of a model: run, code, parameters, data version, validation, metrics, promotions."""
    params, paths = _with_registry(project, params_file)
    from pipeline import audit as audit_lib
    from pipeline.registry import champion_uri

    model_uri = model_uri or champion_uri(params.registry.model_name)
    try:
        record = audit_lib.lineage(model_uri, params.registry.model_name, paths.root)
    except audit_lib.AuditError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(record, indent=2, default=str) if as_json else audit_lib.to_text(record))


@app.command()
def ledger(
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """Every recorded move of the aliases (promote, reject, rollback): when, who, why, evidence."""
    params, paths = _with_registry(project, params_file)
    from pipeline import release

    events = release.history(params.registry.model_name)
    warning = release.unrecorded_alias_move(params.registry.model_name)
    if as_json:
        typer.echo(json.dumps({"model": params.registry.model_name, "events": events,
                               "warnings": [warning] if warning else []}, indent=2, default=str))
        return
    for e in events:
        typer.echo(f"{e['time']}  {e['action']:<9} v{e['version']:<4} by {describe(e)}: {e['reason']}")
    if not events:
        typer.echo("no recorded moves yet")
    if warning:
        typer.secho(f"WARNING: {warning}", fg=typer.colors.YELLOW)


@app.command()
def card(
    model_uri: ModelUriArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("model_card.html"),
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
) -> None:
    """One self-contained HTML page about a model version, for auditors."""
    params, paths = _with_registry(project, params_file)
    from pipeline import audit as audit_lib
    from pipeline.model_card import write_card
    from pipeline.registry import champion_uri

    model_uri = model_uri or champion_uri(params.registry.model_name)
    try:
        write_card(model_uri, params.registry.model_name, out, paths.root)
    except audit_lib.AuditError as exc:
        _fail(str(exc))
    typer.echo(f"wrote the model card of {model_uri} to {out}")


@stage_app.command("validate")
def stage_validate(project: ProjectOpt = Path("."), params_file: ParamsOpt = "params.yaml") -> None:
    """Validate data/raw; writes reports/validation.json; exit 1 on a blocking failure."""
    params, paths = _load(project, params_file)
    from pipeline import stages
    from pipeline.validation import DataValidationError

    try:
        stages.validate(paths, params)
    except DataValidationError as exc:
        _fail(str(exc))


@stage_app.command("preprocess")
def stage_preprocess(project: ProjectOpt = Path("."), params_file: ParamsOpt = "params.yaml") -> None:
    """Resize, normalise and split by subject (the recorded split, data/split.yaml) into data/prepared."""
    params, paths = _load(project, params_file)
    from pipeline import stages
    from pipeline.split import SplitError

    try:
        stages.prepare(paths, params, log=typer.echo)
    except SplitError as exc:
        _fail(str(exc), EXIT_USAGE)


@stage_app.command("train")
def stage_train(project: ProjectOpt = Path("."), params_file: ParamsOpt = "params.yaml") -> None:
    """Train the U-Net into models/ (resumes an interrupted run of the same settings)."""
    params, paths = _load(project, params_file)
    from pipeline import stages

    result = stages.fit(paths, params)
    if result.world_size == 1 or os.environ.get("RANK", "0") == "0":  # one line under torchrun too
        typer.echo(json.dumps(result.__dict__))


@app.command()
def cv(
    project: ProjectOpt = Path("."),
    params_file: ParamsOpt = "params.yaml",
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Subject-grouped k-fold cross-validation (split.folds) on data/prepared; each fold to MLflow."""
    params, paths = _with_registry(project, params_file)
    if params.split.folds < 2:
        _fail(f"{params_file}: split.folds is {params.split.folds}; set it to 2 or more for cross-validation",
              EXIT_USAGE)
    from pipeline.cv_tracking import logged_cross_validation
    from pipeline.preprocess import ARRAYS

    if not (paths.prepared_dir / ARRAYS).is_file():
        _fail(f"{paths.prepared_dir}: not prepared; run `nerveseg stage preprocess` first", EXIT_USAGE)
    outcome = logged_cross_validation(paths.prepared_dir, paths.models_dir / "cv", params, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(outcome.to_dict(), indent=2))
        return
    for f in outcome.folds:
        typer.echo(f"fold {f.fold}: validation subjects {f.validation_subjects}  Dice {f.best_val_dice:.4f}"
                   f"  (epoch {f.best_epoch} of {f.epochs_run})")
    typer.echo(f"mean Dice {outcome.mean_dice:.4f} ± {outcome.std_dice:.4f}; report {paths.models_dir / 'cv'}/cv.json")


@stage_app.command("evaluate")
def stage_evaluate(project: ProjectOpt = Path("."), params_file: ParamsOpt = "params.yaml") -> None:
    """Tune post-processing on validation subjects and score the holdout into reports/."""
    params, paths = _load(project, params_file)
    from pipeline import stages

    result = stages.score(paths, params)
    typer.echo(json.dumps(result.metrics))


from flows.services_cli import register as _register_services  # noqa: E402  services, schedule, worker

_register_services(app)
from flows.backup_cli import register as _register_backup  # noqa: E402  backup, restore

_register_backup(app)


def main() -> None:
    from flows.environment import load_credentials
    from pipeline.credentials import CredentialError, redact

    try:
        load_credentials()
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except CredentialError as exc:
        typer.secho(f"error: {redact(exc)}", fg=typer.colors.RED, err=True)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
