"""One definition of each DVC stage. ``dvc.yaml`` runs them through ``nerveseg stage NAME``;
the Prefect flow calls the same functions in-process and then records them with ``dvc commit``."""

from __future__ import annotations

import json

from pipeline.config import Params
from pipeline.evaluate import EvaluationResult, evaluate
from pipeline.atomic import atomic_write_text
from pipeline.paths import ProjectPaths
from pipeline.preprocess import PreparedSummary, preprocess
from pipeline.train import EpochCallback, TrainResult, train

VALIDATION_REPORT = "validation.json"
STAGES = ("validate", "preprocess", "train", "evaluate")


def validate(paths: ProjectPaths, params: Params, build_docs: bool = True, mapper=None):
    """Check ``data/raw`` with the GX suite; write ``reports/validation.json``.

    Drift is judged against the profile of the previous data version (the newest earlier git
    revision of ``data/raw.dvc`` with another DVC hash), kept in ``gx/profiles/<hash>.json``;
    this version's profile is written there too (commit it with the data version).

    Returns ``(manifest, report)``; raises ``DataValidationError`` on a blocking failure,
    after writing the report so the failure is on disk too.
    """
    from pipeline.validation import (
        DataValidationError,
        load_profile,
        previous_data_hash,
        profile_path,
        save_profile,
        validate_data_dir,
    )
    from pipeline.versioning import read_dvc_file

    current_hash = previous_hash = previous = None
    try:
        current_hash = read_dvc_file(paths.raw_dvc_file)["md5"]
        previous_hash = previous_data_hash(paths.root, paths.raw_dvc_file, current_hash)
        previous = load_profile(paths.gx_dir, previous_hash)
    except Exception:  # noqa: BLE001 (not versioned, no git: validate without drift)
        pass
    manifest, report = validate_data_dir(
        paths.raw_dir, params.validation, paths.gx_dir, build_docs=build_docs, previous_profile=previous,
        mapper=mapper,
    )
    if previous_hash and previous is None:  # say so, rather than let silence read as "no drift"
        where = paths.rel(profile_path(paths.gx_dir, previous_hash))
        report.drift_note = (f"no profile of the previous data version {previous_hash[:12]} ({where}); "
                             "`nerveseg data add` records one with each version it makes")
    if current_hash and report.success:
        save_profile(paths.gx_dir, current_hash, report.profile)
    summary = report.to_dict()
    for volatile in ("data_docs", "data_docs_page", "result_path", "seconds"):
        summary.pop(volatile, None)  # per-run values: keep the stage output deterministic
    atomic_write_text(paths.reports_dir / VALIDATION_REPORT, json.dumps(summary, indent=2, default=str))
    if not report.success:
        raise DataValidationError(report)
    return manifest, report


def recorded_split(paths: ProjectPaths, params: Params, log=None):
    """The recorded subject split (``data/split.yaml``) covering every subject in ``data/raw``.

    Subjects it does not hold yet (a version made with a plain ``dvc add``) are placed by its rule
    and the file is written; nobody already placed moves. Without a file, the first assignment is
    made (keeping an earlier preprocess's split where there is one). ``log(message)`` hears of both.
    Raises :class:`pipeline.split.SplitError` when the settings no longer match the recorded rule."""
    from pipeline.layout import list_frame_pairs
    from pipeline.preprocess import FRAMES
    from pipeline.split import record_subjects

    subjects = list_frame_pairs(paths.raw_dir)["subject"].astype(int).unique().tolist()
    assignment, said = record_subjects(paths.split_file, subjects, params.split,
                                       adopt_from=paths.prepared_dir / FRAMES)
    if said and log is not None:
        log(f"{said} ({paths.rel(paths.split_file)})")
    return assignment


def prepare(paths: ProjectPaths, params: Params, progress: bool = True, mapper=None, log=None) -> PreparedSummary:
    """``mapper`` runs the per-frame work elsewhere (the flow's Dask runner); default: threads here.
    The parts come from the recorded subject split (:func:`recorded_split`)."""
    assignment = recorded_split(paths, params, log=log)
    return preprocess(paths.raw_dir, paths.prepared_dir, params, progress=progress, mapper=mapper,
                      assignment=assignment)


def fit(paths: ProjectPaths, params: Params, on_epoch: EpochCallback | None = None, progress: bool = True,
        max_epochs_this_call: int | None = None) -> TrainResult:
    """One U-Net on the prepared split, or with ``train.ensemble_folds`` all fold models as one."""
    if params.train.ensemble_folds:
        if max_epochs_this_call is not None:
            raise ValueError("max_epochs_this_call is for a single model, not train.ensemble_folds")
        from pipeline.ensemble import train_fold_ensemble

        return train_fold_ensemble(paths.prepared_dir, paths.models_dir, params, on_epoch=on_epoch, progress=progress)
    return train(paths.prepared_dir, paths.models_dir, params, on_epoch=on_epoch, progress=progress,
                 max_epochs_this_call=max_epochs_this_call)


def score(paths: ProjectPaths, params: Params) -> EvaluationResult:
    return evaluate(paths.raw_dir, paths.prepared_dir, paths.models_dir, paths.reports_dir, params)
