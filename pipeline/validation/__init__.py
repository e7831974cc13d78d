"""Great Expectations (GX Core 1.x) checks of the scan manifest, and the checks GX cannot do.

The manifest (:func:`pipeline.manifest.build_manifest`) has one row per frame id. Each check is
declared once in :mod:`~pipeline.validation.checks`; the package, by job:

- :mod:`~pipeline.validation.checks`: the declarations (name, column, rows, rule, message);
- :mod:`~pipeline.validation.suite`: the GX file project under ``gx_dir`` and its checkpoint;
- :mod:`~pipeline.validation.duplicates`: near-duplicate frames with contradicting masks;
- :mod:`~pipeline.validation.drift`: each data version's profile, compared with the previous one;
- :mod:`~pipeline.validation.report`: the report, its failures and :class:`DataValidationError`;
- this module: running them all (:func:`validate_manifest`, :func:`validate_data_dir`).

Each check is either blocking or a warning (``ValidationParams.warning_checks``); the report's
``success`` means "no blocking failure". A failed check does not raise: callers that want to stop raise
:class:`DataValidationError` with the report. The subject leak check lives in :mod:`pipeline.split`
(re-exported here for older imports). See docs/validation.md.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pandas as pd

from pipeline.config import ValidationParams
from pipeline.failure_list import attach_details
from pipeline.split import SubjectLeakError, assert_no_subject_leak, check_split
from pipeline.validation.checks import BY_NAME, CHECKS, Check
from pipeline.validation.drift import (
    PROFILE_DIR,
    compare_profiles,
    compute_profile,
    drift_failure,
    load_profile,
    previous_data_hash,
    profile_path,
    save_profile,
)
from pipeline.validation.duplicates import PAIR_COLUMN, attach_pairs, find_contradicting_pairs, with_pair_column
from pipeline.validation.report import (
    SHOW_FILES,
    DataValidationError,
    ExpectationFailure,
    ValidationReport,
    counts,
)
from pipeline.validation.suite import (
    ASSET_NAME,
    BATCH_DEFINITION_NAME,
    CHECKPOINT_NAME,
    DATASOURCE_NAME,
    DOCS_ACTION_NAME,
    DOCS_SITE_NAME,
    INDEX_COLUMNS,
    RESULT_FORMAT,
    SUITE_NAME,
    VALIDATION_NAME,
    build_expectations,
    read_failure,
    run_suite,
)

__all__ = [
    "ASSET_NAME", "BATCH_DEFINITION_NAME", "BY_NAME", "CHECKPOINT_NAME", "CHECKS", "DATASOURCE_NAME",
    "DOCS_ACTION_NAME", "DOCS_SITE_NAME", "INDEX_COLUMNS", "PAIR_COLUMN", "PROFILE_DIR", "RESULT_FORMAT",
    "SHOW_FILES", "SUITE_NAME", "VALIDATION_NAME", "Check", "DataValidationError", "ExpectationFailure",
    "SubjectLeakError", "ValidationReport", "assert_no_subject_leak", "build_expectations", "check_split",
    "compare_profiles", "compute_profile", "find_contradicting_pairs", "load_profile", "manifest_cache_file",
    "measure_profile", "previous_data_hash", "profile_path", "save_profile", "validate_data_dir",
    "validate_manifest",
]


def validate_manifest(
    manifest: pd.DataFrame,
    rules: ValidationParams,
    gx_dir: Path,
    build_docs: bool = True,
    previous_profile: dict | None = None,
) -> ValidationReport:
    """Run the ``raw_frames`` checkpoint of the GX project under ``gx_dir`` on ``manifest``.

    Creates whatever part of the GX project is missing, updates the stored suite when ``rules``
    changed, stores the validation result (``gx/uncommitted/validations``) and, with
    ``build_docs``, updates the Data Docs. Near-duplicate pairs with contradicting masks are
    found first and checked by GX as the column ``contradicting_duplicate_of``. With
    ``previous_profile`` (see :func:`compute_profile`), drift is reported too.
    Never raises on bad data: ``report.success`` is False when a *blocking* check failed.
    """
    started = time.perf_counter()
    pairs = find_contradicting_pairs(manifest, rules)
    frame = with_pair_column(manifest, pairs)
    gx_frame = frame.drop(columns=[c for c in ("mask_thumb", "phash") if c in frame])
    run = run_suite(Path(gx_dir), rules, gx_frame, build_docs=build_docs)

    failures = [read_failure(r, rules) for r in run.results if not r.success]
    attach_details(failures, frame)  # e.g. the decoder's reason for each file that does not decode
    attach_pairs(failures, pairs)
    profile = compute_profile(frame)
    drift = None
    if previous_profile:
        drift = compare_profiles(profile, previous_profile, rules)
        drift["previous_hash"] = previous_profile.get("dvc_hash", "")
        moved = drift_failure(drift, rules)
        if moved is not None:
            failures.append(moved)
    n_frames, n_subjects, empty_share = counts(frame)
    return ValidationReport(
        success=not any(f.severity != "warning" for f in failures),
        evaluated=len(run.results) + (1 if previous_profile else 0),
        failures=failures,
        n_frames=n_frames,
        n_subjects=n_subjects,
        empty_share=empty_share,
        data_docs=run.data_docs,
        data_docs_page=run.page,
        result_path=run.result_path,
        seconds=round(time.perf_counter() - started, 3),
        contradicting_pairs=pairs,
        profile=profile,
        drift=drift,
    )


def manifest_cache_file(gx_dir: Path, data_dir: Path) -> Path:
    """Where the manifest cache of ``data_dir`` lives: the GX project's ``uncommitted/`` (git
    ignores it; DVC does not hash it), one file per data folder."""
    key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return Path(gx_dir) / "gx" / "uncommitted" / "manifest_cache" / f"{key}.json"


def validate_data_dir(
    data_dir: Path,
    rules: ValidationParams,
    gx_dir: Path,
    build_docs: bool = True,
    previous_profile: dict | None = None,
    use_cache: bool = True,
    mapper=None,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Build the manifest of ``data_dir`` (reusing cached rows of unchanged files) and
    validate it; returns both. ``mapper``: see :func:`pipeline.manifest.build_manifest`."""
    from pipeline.manifest import build_manifest  # noqa: PLC0415

    cache = manifest_cache_file(gx_dir, data_dir) if use_cache else None
    manifest = build_manifest(Path(data_dir), cache_file=cache, mapper=mapper)
    report = validate_manifest(
        manifest, rules, gx_dir, build_docs=build_docs, previous_profile=previous_profile
    )
    return manifest, report


def measure_profile(data_dir: Path, gx_dir: Path, dvc_hash: str) -> dict:
    """The drift profile of the data in ``data_dir`` (the version ``dvc_hash``), as validation computes
    it, for a version that was made without one; the manifest cache spares rereading unchanged files."""
    from pipeline.manifest import build_manifest  # noqa: PLC0415

    manifest = build_manifest(Path(data_dir), cache_file=manifest_cache_file(gx_dir, data_dir))
    return {"dvc_hash": dvc_hash, **compute_profile(manifest)}
