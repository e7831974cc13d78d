"""The retraining flow: data version → validate → preprocess → train → evaluate → register → promote.

Each step is a Prefect task that calls the same ``pipeline`` function as its ``dvc.yaml`` stage
and then records it with ``dvc commit``, so ``dvc status`` agrees with what the flow did.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows.approval import Answer, ApprovalTimeout, evidence_markdown, wait_for_approval
from flows.notices import notify_failure, notify_no_champion
from flows.runner import make_mapper
from flows.workspace_step import run_workspace
from pipeline import distributed, launch, registry, release, stages, versioning
from pipeline.config import Params, load_params
from pipeline.credentials import install_log_redaction, redact
from pipeline.promotion import PromotionDecision
from pipeline.paths import ProjectPaths
from pipeline.validation import DataValidationError
from pipeline.workspace_lock import exclusive_run

# Decide "nothing changed" from DVC and explicit hashes, never from Prefect's task cache
# (see docs/architecture.md): every task here opts out of it.
TASK = dict(cache_policy=NO_CACHE, persist_result=False)
# Tasks that talk to the tracking server retry with exponential backoff (2, 4, 8, 16 s, +-20 %): a server
# restart or a dropped connection costs a retry, not the run (docs/operations.md, "Faults").
MLFLOW_RETRIES = dict(retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.2)


@task(name="data-version", **TASK)
def data_version_task(paths: ProjectPaths) -> versioning.DataVersion:
    version = versioning.current_data_version(paths.root, paths.raw_dir)
    get_run_logger().info(
        "data %s: DVC hash %s, git revision %s%s", version.dvc_file, version.dvc_hash, version.git_revision[:12],
        "" if version.committed else " (the .dvc file has uncommitted changes)",
    )
    return version


@task(name="start-mlflow-run", **MLFLOW_RETRIES, **TASK)
def start_run_task(paths: ProjectPaths, params: Params, tags: dict[str, str]) -> str:
    import mlflow

    experiment_id = registry.configure(paths.mlflow_dir, params.registry.experiment)
    run = mlflow.MlflowClient().create_run(experiment_id, tags=tags, run_name=f"retrain-{flow_run.name or 'local'}")
    client = mlflow.MlflowClient()
    flat = [mlflow.entities.Param(key, redact(value))  # params hold no credential; belt and braces
            for section, values in params.model_dump(mode="json").items()
            for key, value in _flatten(values, section).items()]
    for start in range(0, len(flat), 100):  # one request per 100 (MLflow's batch limit), not one per setting
        client.log_batch(run.info.run_id, params=flat[start:start + 100])
    params_file = paths.root / "params.yaml"
    if params_file.is_file():
        client.log_artifact(run.info.run_id, str(params_file), "config")
    return run.info.run_id


def presence_tags(paths: ProjectPaths) -> dict[str, str]:
    """How many frames, and frames without a nerve, the run trains and is scored on (card, audit)."""
    import pandas as pd

    from pipeline.metrics import presence_counts

    frames = pd.read_csv(paths.prepared_dir / "frames.csv", usecols=["split", "has_nerve"])
    counts = presence_counts(frames["split"].to_numpy(), frames["has_nerve"].astype(bool).to_numpy())
    return {f"{registry.PRESENCE_PREFIX}{k}": str(v) for k, v in counts.items()}


def _flatten(value, prefix: str) -> dict[str, str]:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}"))
        return out
    return {prefix: str(value)}


@task(name="validate", **TASK)
def validate_task(paths: ProjectPaths, params: Params, run_id: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    try:
        manifest, report = stages.validate(paths, params, mapper=make_mapper(params.runner, "validate"))
    except DataValidationError as exc:
        client.set_tag(run_id, registry.TAG_VALIDATION, "false")
        client.log_text(run_id, exc.report.to_markdown(), "validation/summary.md")
        if exc.report.data_docs_page and Path(exc.report.data_docs_page).is_file():
            client.log_artifact(run_id, exc.report.data_docs_page, "validation/data_docs")
        create_markdown_artifact(exc.report.to_markdown(), key="data-validation", description="data validation failed")
        raise
    client.set_tag(run_id, registry.TAG_VALIDATION, "true")
    client.set_tag(run_id, "validation.warnings", str(len(report.warnings)))
    client.set_tag(run_id, "validation.contradicting_pairs", str(len(report.contradicting_pairs)))
    client.log_text(run_id, report.to_markdown(), "validation/summary.md")
    client.log_text(run_id, manifest.drop(columns=["mask_thumb"], errors="ignore").to_csv(index=False),
                    "validation/manifest.csv")
    client.log_dict(run_id, report.profile, "validation/profile.json")
    if report.contradicting_pairs:
        client.log_dict(run_id, {"pairs": report.contradicting_pairs}, "validation/contradicting_pairs.json")
    if report.data_docs_page and Path(report.data_docs_page).is_file():
        client.log_artifact(run_id, report.data_docs_page, "validation/data_docs")
    for warning in report.warnings:
        get_run_logger().warning("data validation warning: %s", warning.summary())
    if report.drift_note:
        get_run_logger().warning("data validation: %s", report.drift_line())
    create_markdown_artifact(report.to_markdown(), key="data-validation", description="data validation passed")
    _commit("validate", paths)
    return report.to_dict()


def _commit(stage: str, paths: ProjectPaths) -> None:
    if not versioning.stage_is_current(paths.root, stage):
        versioning.commit_stage(paths.root, stage)


@task(name="preprocess", **TASK)
def preprocess_task(paths: ProjectPaths, params: Params) -> dict:
    """Preprocess by the recorded subject split (``release.register_model`` records it with the version)."""
    logger = get_run_logger()
    reused = versioning.stage_is_current(paths.root, "preprocess")
    if reused:
        logger.info("preprocess: data, parameters and code unchanged; reusing the DVC-cached output")
    else:
        summary = stages.prepare(paths, params, mapper=make_mapper(params.runner, "preprocess"), log=logger.info)
        logger.info("preprocess: %d frames, subjects %s", summary.n_frames, summary.subjects)
        versioning.commit_stage(paths.root, "preprocess")
    uncommitted = versioning.git(paths.root, "status", "--porcelain", "--", paths.rel(paths.split_file),
                                 check=False).stdout.strip()
    if uncommitted:
        logger.warning("%s has changes that no commit holds: commit it with the data version (`git add %s && git "
                       "commit`), so that every clone keeps these subjects in these parts",
                       paths.rel(paths.split_file), paths.rel(paths.split_file))
    return {**json.loads((paths.prepared_dir / "summary.json").read_text()), "reused": reused}


@task(name="train", retries=1, retry_delay_seconds=10, **TASK)  # a retry resumes from the checkpoint
def train_task(paths: ProjectPaths, params: Params, run_id: str, params_file: str = "params.yaml") -> dict:
    import mlflow

    client = mlflow.MlflowClient()

    def log_epoch(epoch: int, row: dict[str, float]) -> None:
        for key, value in row.items():
            if key != "epoch":
                client.log_metric(run_id, key, float(value), step=epoch)

    processes = params.train.processes
    if processes > 1:
        result = _train_in_processes(paths, params, params_file, log_epoch)
    else:
        result = stages.fit(paths, params, on_epoch=log_epoch)
    client.set_tag(run_id, "train.processes", str(result.world_size))
    client.set_tag(run_id, "train.backend", distributed.backend(result.device) if result.world_size > 1 else "none")
    client.set_tag(run_id, "train.global_batch", str(params.train.batch_size))
    for key, value in result.__dict__.items():
        if isinstance(value, (int, float)) and value is not None:
            client.log_metric(run_id, f"train.{key}", float(value))
    client.set_tag(run_id, "train.device", result.device)
    client.set_tag(run_id, "train.precision", result.precision)
    client.log_artifact(run_id, str(paths.models_dir / "history.csv"), "training")
    versioning.commit_stage(paths.root, "train")
    get_run_logger().info(
        "train: best validation Dice %.4f at epoch %d on %s, %s (%.1f frames/s)",
        result.best_val_dice, result.best_epoch, result.device, result.precision, result.train_frames_per_second,
    )
    return result.__dict__


def _train_in_processes(paths: ProjectPaths, params: Params, params_file: str, log_epoch):
    """``train.processes`` ranks under torchrun on this machine; their output becomes the task's log, a
    failing rank the task's error; the curves are logged from rank 0's history afterwards."""
    import pandas as pd

    from pipeline.train import HISTORY

    logger = get_run_logger()
    logger.info("train: %d processes under torchrun (global batch %d)", params.train.processes,
                params.train.batch_size)
    result = launch.train_processes(paths.root, params_file, params.train.processes, params.train.device,
                                    log=logger.info)
    for row in pd.read_csv(paths.models_dir / HISTORY).to_dict("records"):
        log_epoch(int(row["epoch"]), {k: v for k, v in row.items() if v == v})
    return result


@task(name="evaluate", **TASK)
def evaluate_task(paths: ProjectPaths, params: Params, run_id: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    result = stages.score(paths, params)
    for key, value in result.metrics.items():
        if value == value:  # NaN (e.g. AUROC with one class only) is left out, not logged as a number
            client.log_metric(run_id, f"holdout.{key}", float(value))
    for name in ("evaluation.html", "overlays.png", "training_curves.png", "threshold_curve.png",
                 "holdout_frames.csv", "holdout_subjects.csv", "threshold_curve.csv", "postprocess.json"):
        if (paths.reports_dir / name).is_file():
            client.log_artifact(run_id, str(paths.reports_dir / name), "evaluation")
    versioning.commit_stage(paths.root, "evaluate")
    m = result.metrics
    report_uri = f"{client.get_run(run_id).info.artifact_uri}/evaluation/evaluation.html"
    create_link_artifact(report_uri, link_text="holdout evaluation report (HTML)", key="holdout-report")
    create_markdown_artifact(
        "### Holdout evaluation\n\n| metric | value |\n|---|---|\n"
        + "".join(f"| {k} | {v:.4f} |\n" for k, v in m.items() if isinstance(v, float))
        + f"\nPost-processing frozen into the model: `{json.dumps(result.postprocess.to_dict())}`\n\n"
        f"Report: [{report_uri}]({report_uri}) (MLflow run `{run_id}`, artifacts `evaluation/`)\n",
        key="holdout-evaluation",
    )
    return result.metrics


@task(name="register", **MLFLOW_RETRIES, **TASK)
def register_task(paths: ProjectPaths, params: Params, run_id: str, tags: dict[str, str], metrics: dict) -> str:
    version = release.register_model(paths, params, run_id, tags, metrics)
    get_run_logger().info("registered %s version %s", params.registry.model_name, version)
    return version


@task(name="promote", **TASK)
def promote_task(paths: ProjectPaths, params: Params, version: str) -> dict:
    """The gate, then the ledger entry and the alias; with ``promotion.require_approval`` a version that
    passes the gate is only marked as awaiting approval (the flow then pauses, see ``_retrain``)."""
    name = params.registry.model_name
    decision, evidence = release.gate(paths, params, version)
    if decision.promote and params.promotion.require_approval:
        release.await_approval(name, version, decision)
        get_run_logger().info("promotion: the gate passed (%s); waiting for a person's approval", decision.reason)
        return {**decision.to_dict(), "awaiting_approval": True, "evidence": evidence}
    release.apply_decision(name, version, decision, evidence)
    _log_decision(params, version, decision, paths.root)
    if decision.leaves_no_champion:
        notify_no_champion(name, version, decision.reason, params.notify.timeout_s,
                           flow_run.id, flow_run.name, get_run_logger())
    return decision.to_dict()


def _log_decision(params: Params, version: str, decision: PromotionDecision, root: Path | None = None) -> None:
    from pipeline.model_card import log_card

    get_run_logger().info("promotion: %s", decision.reason)
    if decision.comparison_line():
        get_run_logger().info("promotion: %s", decision.comparison_line())
    create_markdown_artifact(decision.to_markdown(), key="promotion-decision")
    run_id = registry.client().get_model_version(params.registry.model_name, version).run_id
    card = log_card(params.registry.model_name, version, run_id, root)
    get_run_logger().info("model card logged to run %s as %s", run_id, card)


@task(name="apply-approval", **TASK)
def approval_task(params: Params, version: str, gated: dict, answer: Answer) -> dict:
    """Record the approver's answer in the ledger, then move the alias (approve) or not (reject)."""
    final = release.apply_approval(params.registry.model_name, version, PromotionDecision.from_dict(gated),
                                   gated["evidence"], answer.decision, answer.reason, answer.approver(),
                                   answer.on_behalf_of, flow_run=str(flow_run.id or ""))
    _log_decision(params, version, final)
    return {**final.to_dict(), "approval": {"answer": answer.decision, "actor": answer.actor,
                                            "on_behalf_of": answer.on_behalf_of, "reason": answer.reason}}


def _approve(params: Params, version: str, gated: dict) -> dict:
    """Pause the flow run for approve/reject (in the flow body, as Prefect requires) and apply the answer."""
    name, timeout_s = params.registry.model_name, params.promotion.approval_timeout_s
    run_id, decision = str(flow_run.id or ""), PromotionDecision.from_dict(gated)
    description = evidence_markdown(name, version, decision, run_id, timeout_s)
    create_markdown_artifact(description, key="approval-request",
                             description=f"version {version} waits for approval")
    get_run_logger().info("waiting up to %d s for approval of %s version %s: nerveseg approve %s --reason ... "
                          "(or nerveseg reject %s --reason ...)", timeout_s, name, version, run_id, run_id)
    answer = wait_for_approval(description, timeout_s)
    if answer.decision != "timeout":
        return approval_task(params, version, gated, answer)
    # The pause has expired: Prefect runs no more tasks in this flow run, which ends Failed. Record first.
    release.apply_approval(name, version, decision, gated["evidence"], "timeout", answer.reason, flow_run=run_id)
    raise ApprovalTimeout(f"{name} version {version} passed the gate but nobody approved or rejected it within "
                          f"{timeout_s} s: not promoted (recorded in the ledger; it is the challenger). "
                          f"Promote it by hand with `nerveseg promote {version} --reason ...` if wanted.")


# What must equal a registered version's for a run to skip retraining: data, subject split, settings,
# code and the environment (lock file, torch, Python, device and precision).
UNCHANGED_KEYS = {registry.TAG_DATA_HASH: "data", registry.TAG_SPLIT_DIGEST: "subject split",
                  registry.TAG_PARAMS_HASH: "settings", registry.TAG_CODE_DIGEST: "code",
                  registry.TAG_ENV_DIGEST: "environment"}


@task(name="check-unchanged", **MLFLOW_RETRIES, **TASK)
def unchanged_task(paths: ProjectPaths, params: Params, tags: dict[str, str]) -> dict:
    """``{"skip": why this run would repeat a registered version's, or None, "changed": what differs}``.

    A run is skipped when some registered version was trained on exactly this key (data, split,
    settings, code, environment), promoted or not: a change retrains once, not at every scheduled
    run until a model passes the gate. Otherwise the newest version says what changed."""
    from pipeline.environment_key import EnvironmentKey

    registry.configure(paths.mlflow_dir, params.registry.experiment)
    versions = registry.list_versions(params.registry.model_name)  # newest first
    if not versions:
        return {"skip": None, "changed": ["no registered version yet"]}
    same = next((v for v in versions if all(v.tags.get(key) == tags[key] for key in UNCHANGED_KEYS)), None)
    if same is not None:
        role = "champion" if registry.CHAMPION in same.aliases else (
            "challenger" if registry.CHALLENGER in same.aliases else "registered")
        outcome = "" if role == "champion" else (
            f" ({same.tags.get('promotion.decision', 'no decision')}: {same.tags.get('promotion.reason', '-')})")
        reason = (f"nothing changed since {role} version {same.version}{outcome}: same data "
                  f"{tags[registry.TAG_DATA_HASH]}, subject split {tags[registry.TAG_SPLIT_DIGEST]}, settings "
                  f"{tags[registry.TAG_PARAMS_HASH]}, code {tags[registry.TAG_CODE_DIGEST]} and environment "
                  f"{tags[registry.TAG_ENV_DIGEST]}; use --force to retrain anyway")
        get_run_logger().info(reason)
        create_markdown_artifact(f"### Retraining skipped\n\n{reason}\n", key="retrain-skipped")
        return {"skip": reason, "changed": []}
    newest = versions[0]
    changed = []
    for key, what in UNCHANGED_KEYS.items():
        recorded = newest.tags.get(key)
        if recorded == tags[key]:
            continue
        if key == registry.TAG_ENV_DIGEST and recorded:
            current = {k: v for k, v in tags.items() if k.startswith("env.")}
            what += " (" + ", ".join(EnvironmentKey.changes(newest.tags, current)) + ")"
        elif not recorded:
            what += " (not recorded with it)"
        changed.append(what)
    summary = f"{', '.join(changed)} changed since version {newest.version}"
    get_run_logger().info("retraining: %s", summary)
    return {"skip": None, "changed": [summary]}


@task(name="split-and-environment", **TASK)
def key_task(paths: ProjectPaths, params: Params) -> dict[str, str]:
    """The subject split's digest and the environment's tags. The recorded split (``data/split.yaml``)
    is brought up to date first: subjects of a version made without ``data add`` are placed by its
    rule, nobody moves. A split whose recorded rule no longer matches the settings fails here,
    before anything else runs."""
    from pipeline.environment_key import environment_key

    assignment = stages.recorded_split(paths, params, log=get_run_logger().warning)
    return {registry.TAG_SPLIT_DIGEST: assignment.digest(), **environment_key(paths.root, params.train).tags()}


@flow(name="retrain", log_prints=True, on_failure=[notify_failure], on_crashed=[notify_failure])
def retrain(project_dir: str = ".", params_file: str = "params.yaml", force: bool = False,
            revision: str | None = None) -> dict:
    """Validate, preprocess, train, evaluate, register and promote on the current data version.

    Stops early, training nothing, when data, subject split, settings, code and environment are those
    of a registered version (unless ``force``); otherwise the run records what changed. One run per
    workspace at a time: a second one fails at once, saying so.

    A worker started with its own workspace (``nerveseg worker -C DIR`` sets ``NERVESEG_WORKSPACE``) runs
    there instead of ``project_dir``, the deployment's folder; when that is a clone elsewhere, the
    deployment's pull step has brought it to ``revision`` first (the commit ``data add`` made, or for a
    scheduled run the tip of the branch the deployment was made from).
    """
    install_log_redaction()  # a worker's flow run starts here, not in the `nerveseg` command
    root = run_workspace(project_dir)
    if root != Path(project_dir).resolve():
        get_run_logger().info("running in the worker's workspace %s (the deployment's folder is %s)%s", root,
                              project_dir, f", revision {revision}" if revision else "")
    with exclusive_run(root, f"flow run {flow_run.name or 'local'} ({flow_run.id or '-'})"):
        return _retrain(root, params_file, force)


def _retrain(root: Path, params_file: str, force: bool) -> dict:
    import mlflow

    params = load_params(root / params_file)
    paths = ProjectPaths.of(root, params)

    data = data_version_task(paths)
    code_commit, code_dirty = versioning.code_revision(root)
    tags = {
        registry.TAG_DATA_HASH: data.dvc_hash,
        registry.TAG_DATA_REV: data.git_revision,
        registry.TAG_DATA_FILE: data.dvc_file,
        registry.TAG_CODE_REV: code_commit,
        registry.TAG_CODE_DIRTY: str(code_dirty).lower(),
        registry.TAG_CODE_DIGEST: versioning.code_digest(),
        registry.TAG_PARAMS_HASH: params.digest(),
        registry.TAG_FLOW_RUN: str(flow_run.id or ""),
        registry.TAG_PRODUCT_VERSION: registry.product_version(),
        **key_task(paths, params),
    }
    unchanged = {"skip": None, "changed": ["--force"]} if force else unchanged_task(paths, params, tags)
    if unchanged["skip"]:
        return {"skipped": True, "reason": unchanged["skip"], "data": data.to_dict(),
                "tracking_uri": registry.tracking_uri(paths.mlflow_dir)}
    tags["retrain.reason"] = "; ".join(unchanged["changed"])[:4000]
    run_id = start_run_task(paths, params, tags)
    try:
        validation = validate_task(paths, params, run_id)
        data_tags = {
            "data.n_frames": str(validation["n_frames"]),
            "data.n_subjects": str(validation["n_subjects"]),
            "data.empty_share": f"{validation['empty_share']:.4f}",
            "validation.data_docs": str(validation.get("data_docs_page") or ""),
        }
        for key, value in data_tags.items():
            mlflow.MlflowClient().set_tag(run_id, key, value)
        prepared = preprocess_task(paths, params)
        for key, value in presence_tags(paths).items():
            mlflow.MlflowClient().set_tag(run_id, key, value)
            data_tags[key] = value
        trained = train_task(paths, params, run_id, params_file)
        metrics = evaluate_task(paths, params, run_id)
        version = register_task(paths, params, run_id, {**tags, **data_tags, registry.TAG_VALIDATION: "true"},
                                metrics)
        decision = promote_task(paths, params, version)
        if decision.get("awaiting_approval"):
            decision = _approve(params, version, decision)
    except ApprovalTimeout:
        mlflow.MlflowClient().set_terminated(run_id, "FINISHED")  # trained and registered; only not promoted
        raise
    except BaseException:
        mlflow.MlflowClient().set_terminated(run_id, "FAILED")
        raise
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    return {
        "skipped": False,
        "run_id": run_id,
        "version": version,
        "decision": decision,
        "holdout": metrics,
        "train": trained,
        "data": data.to_dict(),
        "validation": {"success": validation["success"], "n_frames": validation["n_frames"]},
        "prepared": {"frames_per_part": prepared["frames_per_part"], "reused": prepared["reused"],
                     "subjects": prepared["subjects"]},
        "retrain_reason": tags["retrain.reason"],
        "tracking_uri": registry.tracking_uri(paths.mlflow_dir),
    }
