"""Great Expectations (GX Core 1.x) checks of the scan manifest.

The manifest (:func:`pipeline.manifest.build_manifest`) has one row per frame id. This module
keeps a file-backed GX project under ``gx_dir`` (``<gx_dir>/gx/...``, meant to live in git) with
a pandas data source, a dataframe asset, a whole-dataframe batch definition, the expectation
suite ``raw_frames`` built from :class:`~pipeline.config.ValidationParams`, a validation
definition and a checkpoint that updates the Data Docs. Every object is fetched when it already
exists and written only when missing or changed, so running the check leaves the committed
files untouched unless the rules changed.

Each check is either blocking or a warning (``ValidationParams.warning_checks``); the report's
``success`` means "no blocking failure". Beyond GX's per-row checks this module finds near-duplicate
frames with contradicting masks (checked by GX through a computed column), compares the data's
profile with the previous data version's (drift, a project-side check: GX Core has no cross-batch
expectations), and checks a subject split for leakage (:func:`check_split`). See docs/validation.md.

A failed check does not raise: :func:`validate_manifest` returns a :class:`ValidationReport`;
callers that want to stop raise :class:`DataValidationError` with it.

GX is imported lazily (it takes seconds) with its analytics switched off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.config import ValidationParams
from pipeline.failure_list import attach_details

if TYPE_CHECKING:  # pragma: no cover
    from great_expectations.data_context import FileDataContext

log = logging.getLogger(__name__)

SUITE_NAME = "raw_frames"
DATASOURCE_NAME = "scan_manifest"
ASSET_NAME = "frames"
BATCH_DEFINITION_NAME = "whole_manifest"
VALIDATION_NAME = "raw_frames"
CHECKPOINT_NAME = "raw_frames"
DOCS_ACTION_NAME = "update_data_docs"
DOCS_SITE_NAME = "local_site"
# Columns GX reports for each offending row, so a failure names the frame and its files.
INDEX_COLUMNS = ["frame_id", "image_path", "mask_path"]
# COMPLETE: every offending row in the result. Data Docs show one table row per distinct offending
# value, up to partial_unexpected_count of them (GX's default 20), each naming at most 10 files (fixed
# in GX 1.x's renderer); the complete list is the CSV of pipeline/failure_list.py.
RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": INDEX_COLUMNS,
                 "partial_unexpected_count": 1000}
# The check name (params.yaml ``validation.warning_checks``) of each GX expectation, in order.
_GX_CHECKS = ('row_count', 'subject_count', 'names', 'unique_ids', 'mask_for_frame', 'frame_for_mask', 'frame_decodes', 'mask_decodes', 'frame_height', 'frame_width', 'frame_channels', 'frame_dtype', 'mask_height', 'mask_width', 'mask_channels', 'mask_binary', 'mask_area', 'not_blank', 'not_saturated')
# How many offending files a report prints before "... and N more".
SHOW_FILES = 10


# --------------------------------------------------------------------------------------------
# Report objects
# --------------------------------------------------------------------------------------------
@dataclass
class ExpectationFailure:
    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_in_set"
    column: str | None
    description: str  # plain words: "every frame has its mask"
    files: list[str]  # offending files (relative to the data folder) or frame ids
    details: dict = field(default_factory=dict)
    check: str = ""  # the check's name in params.yaml (validation.warning_checks)
    severity: str = "blocking"  # "blocking" stops the flow; "warning" is reported only
    rows: list[dict] = field(default_factory=list)  # per offending row: file, frame_id, value (and detail)

    def summary(self, limit: int = SHOW_FILES) -> str:
        """``description: file, file, ... (and N more)`` or the observed value."""
        if self.details.get("pairs"):
            pairs = self.details["pairs"]
            shown = "; ".join(_pair_text(p) for p in pairs[:limit])
            more = len(pairs) - limit
            return f"{self.description}: {len(pairs)} pairs: {shown}" + (
                f" (and {more} more)" if more > 0 else ""
            )
        if self.files:
            shown = ", ".join(self.files[:limit])
            more = len(self.files) - limit
            return f"{self.description}: {shown}" + (f" (and {more} more)" if more > 0 else "")
        if "observed_value" in self.details:
            return f"{self.description}: observed {self.details['observed_value']}"
        if self.details.get("exception"):
            return f"{self.description}: GX raised {self.details['exception']}"
        if self.details.get("figures"):
            return f"{self.description}: {_drift_text(self.details)}"
        return self.description


def _pair_text(pair: dict) -> str:
    dice = pair.get("dice")
    why = "one mask empty" if dice is None else f"Dice {dice:.2f}"
    return f"{pair['image_a']} ~ {pair['image_b']} ({why}, {pair['distance']} bits)"


@dataclass
class ValidationReport:
    success: bool  # True when no BLOCKING check failed (warnings may be present)
    evaluated: int
    failures: list[ExpectationFailure]  # blocking failures and warnings, in suite order
    n_frames: int
    n_subjects: int
    empty_share: float
    data_docs: str | None  # path of the Data Docs site's index.html
    data_docs_page: str | None = None  # path of this run's page in the Data Docs
    result_path: str | None = None  # the stored GX validation result (JSON) of this run
    seconds: float = 0.0
    # Near-duplicate pairs of one subject with contradicting masks (also a failure when any).
    contradicting_pairs: list[dict] = field(default_factory=list)
    profile: dict = field(default_factory=dict)  # this data's figures (see compute_profile)
    drift: dict | None = None  # the comparison with the previous data version, when known
    drift_note: str = ""  # why drift was not judged although there is a previous data version

    @property
    def blocking(self) -> list[ExpectationFailure]:
        return [f for f in self.failures if f.severity != "warning"]

    @property
    def warnings(self) -> list[ExpectationFailure]:
        return [f for f in self.failures if f.severity == "warning"]

    @property
    def failed_files(self) -> list[str]:
        """Every file named by any failure, each once, in order of appearance."""
        return list(dict.fromkeys(f for failure in self.failures for f in failure.files))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=_jsonable))

    def _verdict(self) -> str:
        if not self.success:
            return "FAILED"
        return "passed with warnings" if self.warnings else "passed"

    def to_markdown(self, entries: list[dict] | None = None, csv_label: str | None = None) -> str:
        """The summary, the failures table (first files of each check), then every failing file with
        its check and reason: ``entries`` of :mod:`pipeline.failure_list` (default: this report's own),
        ``csv_label`` where the same list is as CSV."""
        from pipeline import failure_list  # noqa: PLC0415

        lines = [
            f"## Data validation {self._verdict()}",
            "",
            f"- frames: {self.n_frames}, subjects: {self.n_subjects}, "
            f"empty masks: {self.empty_share:.1%}",
            f"- expectations: {self.evaluated} evaluated, {len(self.blocking)} blocking failures, "
            f"{len(self.warnings)} warnings",
            f"- near-duplicate pairs with contradicting masks: {len(self.contradicting_pairs)}",
        ]
        if self.drift_line():
            lines.append(f"- {self.drift_line()}")
        if self.data_docs:
            lines.append(f"- Data Docs: {self.data_docs_page or self.data_docs}")
        if self.failures:
            lines += [
                "",
                "| severity | check | column | files | count |",
                "| --- | --- | --- | --- | --- |",
            ]
            for f in self.failures:
                files = ", ".join(f"`{x}`" for x in f.files[:SHOW_FILES])
                if len(f.files) > SHOW_FILES:
                    files += f" and {len(f.files) - SHOW_FILES} more"
                if not files and "observed_value" in f.details:
                    files = f"observed {f.details['observed_value']}"
                elif not files and f.details.get("exception"):
                    files = f"GX raised: {f.details['exception']}"
                elif not files and f.details.get("figures"):
                    files = _drift_text(f.details)
                count = f.details.get("unexpected_count", "")
                lines.append(
                    f"| {f.severity} | {_md(f.description)} | {f.column or ''} | {_md(files)} "
                    f"| {count} |"
                )
        if self.contradicting_pairs:
            lines += [
                "",
                "### Near-duplicate frames with contradicting masks",
                "",
                "| frame | near-duplicate | bits apart | mask areas | Dice |",
                "| --- | --- | --- | --- | --- |",
            ]
            for p in self.contradicting_pairs[:50]:
                dice = "" if p.get("dice") is None else f"{p['dice']:.2f}"
                lines.append(
                    f"| `{p['image_a']}` | `{p['image_b']}` | {p['distance']} "
                    f"| {p['area_a']} / {p['area_b']} | {dice} |"
                )
            if len(self.contradicting_pairs) > 50:
                lines.append(f"\n... and {len(self.contradicting_pairs) - 50} more pairs")
        entries = failure_list.report_entries(self) if entries is None else entries
        return "\n".join(lines) + "\n" + (failure_list.markdown(entries, csv_label) if entries else "")

    def drift_line(self) -> str | None:
        """One line on drift: the figures against the previous data version, or why it was not judged."""
        if self.drift:
            return (f"drift against data version {self.drift.get('previous_hash', '?')[:12]}: "
                    + _drift_text(self.drift))
        return f"drift not checked: {self.drift_note}" if self.drift_note else None

    def format_failures(self) -> str:
        # Drift is listed with the failures when it moved too far; otherwise its own line says what
        # it was compared with (or why it was not), so a silent report never reads as "no drift".
        drift = None if any(f.check == "drift" for f in self.failures) else self.drift_line()
        if not self.failures:
            head = f"data validation passed ({self.evaluated} expectations, {self.n_frames} frames)"
            return head + (f"\n  {drift}" if drift else "")
        if self.success:
            head = (f"data validation passed with {len(self.warnings)} warning(s) "
                    f"({self.evaluated} expectations, {self.n_frames} frames)")
        else:
            head = (f"data validation failed: {len(self.blocking)} blocking of "
                    f"{self.evaluated} expectations, {len(self.warnings)} warning(s)")
        lines = [head]
        lines += [f"  - [{f.severity}] {f.summary()}" for f in self.blocking + self.warnings]
        if drift:
            lines.append(f"  {drift}")
        if self.data_docs:
            lines.append(f"  details: {self.data_docs_page or self.data_docs}")
        return "\n".join(lines)


def _drift_text(drift: dict) -> str:
    parts = []
    for name, fig in (drift.get("figures") or {}).items():
        flag = " (!)" if fig.get("drifted") else ""
        parts.append(f"{name} {fig['previous']} -> {fig['current']}{flag}")
    return "; ".join(parts)


class DataValidationError(Exception):
    """The data broke the rules; ``.report`` says which and names the files."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(report.format_failures())


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if obj is pd.NA:
        return None
    return str(obj)


# --------------------------------------------------------------------------------------------
# GX plumbing
# --------------------------------------------------------------------------------------------
def _import_gx():
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx  # noqa: PLC0415 (slow import, done on first use)

    return gx


def _context(gx_dir: Path) -> FileDataContext:
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx_dir = Path(gx_dir)
    gx_dir.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(gx_dir))
    # Quiet and offline. Saved once (a committed project keeps them); no write when already so.
    variables = context.variables
    progress = variables.progress_bars
    wanted = {"globally": False, "metric_calculations": False}
    current = {k: getattr(progress, k, None) for k in wanted} if progress is not None else {}
    if variables.analytics_enabled is not False or current != wanted:
        variables.analytics_enabled = False
        variables.progress_bars = ProgressBarsConfig(**wanted)
        variables.save()
    return context


def _batch_definition(context: FileDataContext):
    if DATASOURCE_NAME in context.data_sources.all():
        source = context.data_sources.get(DATASOURCE_NAME)
    else:
        source = context.data_sources.add_pandas(DATASOURCE_NAME)
    if ASSET_NAME in source.get_asset_names():
        asset = source.get_asset(ASSET_NAME)
    else:
        asset = source.add_dataframe_asset(ASSET_NAME)
    for definition in asset.batch_definitions:
        if definition.name == BATCH_DEFINITION_NAME:
            return definition
    return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION_NAME)


def build_expectations(rules: ValidationParams) -> list:
    """The suite's expectations for these rules, in report order.

    Per-file checks run only on rows whose file name follows the pattern, decode checks only
    where the file exists, and figures are null where a file does not decode (GX skips nulls):
    so each defect is reported once, by the check that describes it.
    """
    _import_gx()
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    named = Column("name_ok") == True  # noqa: E712 (a GX condition, not a comparison)
    frames = named & (Column("image_exists") == True)  # noqa: E712
    h, w = rules.frame_height, rules.frame_width

    def meta(path_column: str | None) -> dict:
        return {"path_column": path_column} if path_column else {}

    expectations = [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=rules.min_frames,
            row_condition=frames,
            description=f"at least {rules.min_frames} frames",
        ),
        gxe.ExpectColumnUniqueValueCountToBeBetween(
            column="subject",
            min_value=rules.min_subjects,
            row_condition=frames,
            description=f"at least {rules.min_subjects} subjects",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="name_ok",
            value_set=[True],
            description=(
                "every file in train/ is named {subject}_{n}.tif or {subject}_{n}_mask.tif"
            ),
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeUnique(
            column="frame_id",
            description="each frame id appears once",
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="mask_exists",
            value_set=[True],
            row_condition=named,
            description="every frame has its mask",
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="image_exists",
            value_set=[True],
            row_condition=named,
            description="every mask has its frame",
            meta=meta("mask_path"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="image_decodes",
            value_set=[True],
            row_condition=frames,
            description="every frame file can be read and decoded as an image",
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="mask_decodes",
            value_set=[True],
            row_condition=named & (Column("mask_exists") == True),  # noqa: E712
            description="every mask file can be read and decoded as an image",
            meta=meta("mask_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height",
            min_value=h,
            max_value=h,
            row_condition=named,
            description=f"frames are {h} rows high",
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="width",
            min_value=w,
            max_value=w,
            row_condition=named,
            description=f"frames are {w} columns wide",
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="channels",
            min_value=1,
            max_value=1,
            row_condition=named,
            description="frames are single-channel (grayscale)",
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="dtype",
            value_set=["uint8"],
            row_condition=named,
            description="frames are 8-bit (uint8)",
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="mask_height",
            min_value=h,
            max_value=h,
            row_condition=named,
            description=f"masks are {h} rows high, like the frames",
            meta=meta("mask_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="mask_width",
            min_value=w,
            max_value=w,
            row_condition=named,
            description=f"masks are {w} columns wide, like the frames",
            meta=meta("mask_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="mask_channels",
            min_value=1,
            max_value=1,
            row_condition=named,
            description="masks are single-channel",
            meta=meta("mask_path"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="mask_binary",
            value_set=[True],
            row_condition=named,
            description="masks hold only 0 and 255 (or 0 and 1)",
            meta=meta("mask_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="mask_area",
            min_value=rules.mask_area_min,
            max_value=rules.mask_area_max,
            row_condition=named & (Column("mask_area") > 0),
            description=(
                f"a non-empty mask covers {rules.mask_area_min} to {rules.mask_area_max} pixels"
            ),
            meta=meta("mask_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="intensity_std",
            min_value=rules.blank_std_max,
            strict_min=True,
            row_condition=named,
            description=f"frames are not blank (intensity std above {rules.blank_std_max})",
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="intensity_mean",
            max_value=rules.saturated_mean_min,
            strict_max=True,
            row_condition=named,
            description=(
                f"frames are not saturated (mean intensity below {rules.saturated_mean_min})"
            ),
            meta=meta("image_path"),
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="contradicting_duplicate_of",
            row_condition=named,
            description=(
                "no near-duplicate frames of one subject with contradicting masks (one empty and "
                f"one not, or Dice below {rules.near_duplicate_dice_min}; perceptual hashes at most "
                f"{rules.near_duplicate_max_bits} of 256 bits apart)"
            ),
            meta=meta("image_path"),
        ),
    ]
    names = [*_GX_CHECKS, "contradicting_duplicates"]
    for expectation, check in zip(expectations, names, strict=True):
        expectation.meta = {**(expectation.meta or {}), "check": check}
        expectation.severity = "warning" if rules.severity(check) == "warning" else "critical"
    return expectations


def _suite(context: FileDataContext, rules: ValidationParams):
    """The stored suite, rewritten only when the rules (and so the expectations) changed."""
    gx = _import_gx()
    from great_expectations.exceptions import DataContextError

    wanted = build_expectations(rules)
    try:
        stored = context.suites.get(SUITE_NAME)
    except DataContextError:
        stored = None
    if stored is not None and _same_expectations(stored.expectations, wanted):
        return stored
    suite = gx.ExpectationSuite(name=SUITE_NAME, expectations=wanted)
    if stored is not None:
        log.info("GX suite %s: rules changed, updating the stored suite", SUITE_NAME)
        # Keep the ids of unchanged expectations so the suite's git diff shows only the change.
        # (GX's add_or_update means to, but its comparison includes the id, so it never matches;
        # and a suite refuses expectations that already carry an id, hence after construction.)
        ids = {_key(e): e.id for e in stored.expectations}
        for expectation in suite.expectations:
            expectation.id = ids.get(_key(expectation))
    return context.suites.add_or_update(suite)


def _key(expectation) -> str:
    return json.dumps(_comparable(expectation), sort_keys=True, default=str)


def _comparable(expectation) -> dict:
    d = expectation.configuration.to_json_dict()
    d.pop("id", None)
    d.pop("rendered_content", None)
    d["meta"] = d.get("meta") or None
    d["notes"] = d.get("notes") or None
    return d


def _same_expectations(stored: list, wanted: list) -> bool:
    return len(stored) == len(wanted) and all(
        _comparable(a) == _comparable(b) for a, b in zip(stored, wanted)
    )


def _validation_definition(context: FileDataContext, batch_definition, suite):
    gx = _import_gx()
    from great_expectations.exceptions import DataContextError

    try:
        existing = context.validation_definitions.get(VALIDATION_NAME)
    except DataContextError:
        existing = None
    if (
        existing is not None
        and existing.suite.name == suite.name
        and existing.suite.id == suite.id
        and existing.data.id == batch_definition.id
    ):
        return existing
    return context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=VALIDATION_NAME, data=batch_definition, suite=suite)
    )


def _checkpoint(context: FileDataContext, validation_definition):
    gx = _import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.exceptions import DataContextError

    wanted = gx.Checkpoint(
        name=CHECKPOINT_NAME,
        validation_definitions=[validation_definition],
        actions=[UpdateDataDocsAction(name=DOCS_ACTION_NAME, site_names=[DOCS_SITE_NAME])],
        result_format=RESULT_FORMAT,
    )
    try:
        existing = context.checkpoints.get(CHECKPOINT_NAME)
    except DataContextError:
        existing = None
    if existing is not None and _checkpoint_key(existing) == _checkpoint_key(wanted):
        return existing
    return context.checkpoints.add_or_update(wanted)


def _checkpoint_key(checkpoint) -> str:
    d = json.loads(checkpoint.json())
    d.pop("id", None)
    return json.dumps(d, sort_keys=True)


def _docs_index(context: FileDataContext) -> str | None:
    for site in context.get_docs_sites_urls(site_name=DOCS_SITE_NAME):
        url = site.get("site_url")
        if url:
            return _url_to_path(url)
    return None


def _url_to_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


# --------------------------------------------------------------------------------------------
# Reading the result
# --------------------------------------------------------------------------------------------
def _failure(result, rules: ValidationParams) -> ExpectationFailure:
    config = result.expectation_config
    kwargs = dict(config.kwargs)
    column = kwargs.get("column")
    res = dict(result.result or {})
    path_column = (config.meta or {}).get("path_column")

    frame_ids: list[str] = []
    files: list[str] = []
    rows: list[dict] = []
    for row in res.get("unexpected_index_list") or []:
        if not isinstance(row, dict):
            continue
        frame_id = str(row.get("frame_id", ""))
        frame_ids.append(frame_id)
        path = row.get(path_column) if path_column else None
        if not path or pd.isna(path):  # e.g. a frame without mask: name the frame
            path = row.get("image_path") or row.get("mask_path") or frame_id
        files.append(str(path))
        rows.append({"file": str(path), "frame_id": frame_id, "value": row.get(column) if column else None})
    files = list(dict.fromkeys(files))

    details: dict[str, Any] = {
        k: v for k, v in kwargs.items() if k not in ("column", "batch_id", "row_condition")
    }
    if kwargs.get("row_condition") is not None:
        details["row_condition"] = _condition_text(kwargs["row_condition"])
    for key in ("observed_value", "unexpected_count", "element_count", "missing_count"):
        if key in res:
            details[key] = res[key]
    if frame_ids:
        details["frame_ids"] = list(dict.fromkeys(frame_ids))
        details["unexpected_values"] = [
            row.get(column) for row in res["unexpected_index_list"] if isinstance(row, dict)
        ] if column else []
    errors = _exception_messages(result.exception_info)
    if errors:
        details["exception"] = "; ".join(errors)
    description = config.description or config.type.replace("_", " ")
    check = str((config.meta or {}).get("check") or "")
    return ExpectationFailure(
        expectation=config.type,
        column=column,
        description=description,
        files=files,
        details=json.loads(json.dumps(details, default=_jsonable)),
        check=check,
        severity=rules.severity(check),
        rows=json.loads(json.dumps(rows, default=_jsonable)),
    )


def _exception_messages(info: Any) -> list[str]:
    """GX 1.x keys exception info by metric id (or not, for some expectations): collect both."""
    if not isinstance(info, dict):
        return []
    if "raised_exception" in info:
        message = info.get("exception_message")
        return [str(message)] if info.get("raised_exception") and message else []
    messages = [m for value in info.values() for m in _exception_messages(value)]
    return list(dict.fromkeys(messages))


def _condition_text(condition: Any) -> str:
    """``name_ok == True and mask_area > 0`` from a stored GX row condition."""
    if hasattr(condition, "dict"):
        condition = condition.dict()
    if not isinstance(condition, dict):
        return str(condition)
    if "conditions" in condition:
        joiner = f" {condition.get('type', 'and')} "
        return joiner.join(_condition_text(c) for c in condition["conditions"])
    if "column" in condition and "operator" in condition:
        column = condition["column"]
        name = column.get("name") if isinstance(column, dict) else getattr(column, "name", column)
        return f"{name} {condition['operator']} {condition.get('parameter')!r}"
    return json.dumps(condition, default=str)


def _summary(manifest: pd.DataFrame) -> tuple[int, int, float]:
    if manifest.empty:
        return 0, 0, 0.0
    frames = manifest.get("image_exists", pd.Series(True, index=manifest.index))
    named = manifest.get("name_ok", pd.Series(True, index=manifest.index))
    n_frames = int((frames.astype(bool) & named.astype(bool)).sum())
    n_subjects = int(manifest["subject"].dropna().nunique()) if "subject" in manifest else 0
    empty_share = 0.0
    if "mask_area" in manifest:
        areas = manifest["mask_area"].dropna()
        empty_share = float((areas == 0).mean()) if len(areas) else 0.0
    return n_frames, n_subjects, empty_share


# --------------------------------------------------------------------------------------------
# Near-duplicates, profile and drift, subject split (computed here, reported with GX's results)
# --------------------------------------------------------------------------------------------
PAIR_COLUMN = "contradicting_duplicate_of"


def _hash_bits(hexes: list[str]) -> np.ndarray:
    return np.unpackbits(
        np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(len(hexes), -1), axis=1
    )


def find_contradicting_pairs(manifest: pd.DataFrame, rules: ValidationParams) -> list[dict]:
    """Pairs of frames of one subject whose perceptual hashes are at most
    ``rules.near_duplicate_max_bits`` apart and whose masks contradict: one empty and one not,
    or both non-empty with Dice (on the 1/8 mask thumbnails) below ``near_duplicate_dice_min``.

    Returns dicts ``frame_a, frame_b, image_a, image_b, distance, area_a, area_b, dice`` (dice
    None when one mask is empty), ordered by subject and frame.
    """
    from pipeline.manifest import thumbnail_bits  # noqa: PLC0415

    needed = {"phash", "mask_area", "subject", "frame_id", "image_path"}
    if manifest.empty or not needed <= set(manifest.columns):
        return []
    ok = manifest["phash"].fillna("").str.len().eq(64) & manifest["mask_area"].notna()
    if "name_ok" in manifest:
        ok &= manifest["name_ok"].fillna(False).astype(bool)
    rows = manifest.loc[ok & manifest["subject"].notna()]
    pairs: list[dict] = []
    for _, group in rows.groupby("subject", sort=True):
        if len(group) < 2:
            continue
        bits = _hash_bits(group["phash"].tolist()).astype(np.float32)
        # Hamming distances of all pairs at once: ones(a) + ones(b) - 2 * common ones.
        ones = bits.sum(axis=1)
        dist = ones[:, None] + ones[None, :] - 2 * (bits @ bits.T)
        ia, ib = np.nonzero(np.triu(dist <= rules.near_duplicate_max_bits + 0.5, k=1))
        if not len(ia):
            continue
        areas = group["mask_area"].to_numpy()
        thumbs = group["mask_thumb"].fillna("").tolist() if "mask_thumb" in group else None
        ids, images = group["frame_id"].tolist(), group["image_path"].tolist()
        for i, j in zip(ia.tolist(), ib.tolist()):
            a, b = int(areas[i]), int(areas[j])
            if (a == 0) and (b == 0):
                continue
            dice = None
            if a and b:
                if not thumbs or not thumbs[i] or not thumbs[j]:
                    continue
                x, y = thumbnail_bits(thumbs[i]), thumbnail_bits(thumbs[j])
                total = int(x.sum()) + int(y.sum())
                dice = 2 * int((x & y).sum()) / total if total else 1.0
                if dice >= rules.near_duplicate_dice_min:
                    continue
                dice = round(dice, 3)
            pairs.append({
                "frame_a": ids[i], "frame_b": ids[j], "image_a": images[i], "image_b": images[j],
                "distance": int(round(dist[i, j])), "area_a": a, "area_b": b, "dice": dice,
            })
    return pairs


def _with_pair_column(manifest: pd.DataFrame, pairs: list[dict]) -> pd.DataFrame:
    partner: dict[str, str] = {}
    for p in pairs:
        partner.setdefault(p["frame_a"], p["frame_b"])
        partner.setdefault(p["frame_b"], p["frame_a"])
    frame = manifest.reset_index(drop=True)
    ids = frame["frame_id"] if "frame_id" in frame else pd.Series("", index=frame.index)
    frame[PAIR_COLUMN] = ids.map(partner).astype(object).where(ids.isin(list(partner)), None)
    return frame


def compute_profile(manifest: pd.DataFrame) -> dict:
    """The figures drift is judged on: frame count, mean of frame means and of frame spreads,
    empty-mask share, and the 5th/50th/95th percentiles of the non-empty mask areas."""
    def num(col: str) -> pd.Series:
        if col not in manifest:
            return pd.Series(dtype="float64")
        return pd.to_numeric(manifest[col], errors="coerce").dropna().astype("float64")

    areas = num("mask_area")
    nonempty = areas[areas > 0]
    q = nonempty.quantile([0.05, 0.5, 0.95]).tolist() if len(nonempty) else [0.0, 0.0, 0.0]
    means, stds = num("intensity_mean"), num("intensity_std")
    return {
        "n_frames": int(len(means)),
        "intensity_mean": round(float(means.mean()), 3) if len(means) else 0.0,
        "intensity_std": round(float(stds.mean()), 3) if len(stds) else 0.0,
        "empty_share": round(float((areas == 0).mean()), 4) if len(areas) else 0.0,
        "mask_area_p05": round(q[0], 1),
        "mask_area_p50": round(q[1], 1),
        "mask_area_p95": round(q[2], 1),
    }


def compare_profiles(current: dict, previous: dict, rules: ValidationParams) -> dict:
    """Each figure before and after, and whether it moved more than the rules allow."""
    def fig(name: str, limit: float, relative: bool = False) -> dict:
        before, after = float(previous.get(name, 0.0)), float(current.get(name, 0.0))
        change = (after - before) / before if relative and before else after - before
        return {"previous": before, "current": after, "change": round(change, 4),
                "limit": limit, "drifted": abs(change) > limit}

    figures = {
        "intensity_mean": fig("intensity_mean", rules.drift_intensity_mean),
        "intensity_std": fig("intensity_std", rules.drift_intensity_std),
        "empty_share": fig("empty_share", rules.drift_empty_share),
        "mask_area_p50": fig("mask_area_p50", rules.drift_mask_area, relative=True),
    }
    for name in ("mask_area_p05", "mask_area_p95", "n_frames"):
        figures[name] = {"previous": previous.get(name), "current": current.get(name),
                         "drifted": False}
    return {"figures": figures, "drifted": any(f["drifted"] for f in figures.values())}


def _drift_failure(drift: dict, rules: ValidationParams) -> ExpectationFailure | None:
    if not drift.get("drifted"):
        return None
    moved = [k for k, v in drift["figures"].items() if v.get("drifted")]
    return ExpectationFailure(
        expectation="drift_against_previous_data_version",
        column=", ".join(moved),
        description=(f"figures close to the previous data version "
                     f"{str(drift.get('previous_hash', ''))[:12]}"),
        files=[],
        details=json.loads(json.dumps(drift, default=_jsonable)),
        check="drift",
        severity=rules.severity("drift"),
    )


PROFILE_DIR = "profiles"  # <gx_dir>/gx/profiles/<dvc md5>.json, committed with the data version


def profile_path(gx_dir: Path, dvc_hash: str) -> Path:
    return Path(gx_dir) / "gx" / PROFILE_DIR / f"{dvc_hash.replace('.dir', '')}.json"


def save_profile(gx_dir: Path, dvc_hash: str, profile: dict) -> Path:
    path = profile_path(gx_dir, dvc_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"dvc_hash": dvc_hash, **profile}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def previous_data_hash(root: Path, dvc_file: Path, current_hash: str) -> str | None:
    """The DVC hash of the newest earlier git revision of ``dvc_file`` with another hash."""
    from pipeline import versioning  # noqa: PLC0415

    root = Path(root)
    rel = Path(dvc_file).resolve().relative_to(root.resolve()).as_posix()
    log_ = versioning.git(root, "log", "--format=%H", "--", rel, check=False)
    for rev in log_.stdout.split():
        shown = versioning.git(root, "show", f"{rev}:{rel}", check=False)
        if shown.returncode != 0:
            continue
        try:
            import yaml  # noqa: PLC0415

            md5 = (yaml.safe_load(shown.stdout) or {}).get("outs", [{}])[0].get("md5")
        except Exception:  # noqa: BLE001 (an odd old revision is skipped)
            continue
        if md5 and md5 != current_hash:
            return md5
    return None


def measure_profile(data_dir: Path, gx_dir: Path, dvc_hash: str) -> dict:
    """The drift profile of the data in ``data_dir`` (the version ``dvc_hash``), as validation computes
    it, for a version that was made without one; the manifest cache spares rereading unchanged files."""
    from pipeline.manifest import build_manifest  # noqa: PLC0415

    manifest = build_manifest(Path(data_dir), cache_file=manifest_cache_file(gx_dir, data_dir))
    return {"dvc_hash": dvc_hash, **compute_profile(manifest)}


def load_profile(gx_dir: Path, dvc_hash: str | None) -> dict | None:
    if not dvc_hash:
        return None
    path = profile_path(gx_dir, dvc_hash)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


class SubjectLeakError(ValueError):
    """A subject has frames in more than one of train, validation and holdout."""


def check_split(frames: pd.DataFrame) -> pd.DataFrame:
    """Subjects found in more than one part of a split (``subject``, ``split`` columns).

    Returns one row per leaking subject: ``subject``, ``parts`` ("holdout,train"), ``frames``
    (frame ids or image paths, when present). Empty when the split is clean.
    """
    if frames.empty:
        return pd.DataFrame(columns=["subject", "parts", "frames"])
    name = "frame_id" if "frame_id" in frames else ("image_path" if "image_path" in frames else None)
    rows = []
    for subject, group in frames.groupby("subject", sort=True):
        parts = sorted(set(group["split"].dropna().astype(str)))
        if len(parts) > 1:
            rows.append({
                "subject": subject,
                "parts": ",".join(parts),
                "frames": group[name].astype(str).tolist() if name else [],
            })
    return pd.DataFrame(rows, columns=["subject", "parts", "frames"])


def assert_no_subject_leak(frames: pd.DataFrame) -> None:
    """Raise :class:`SubjectLeakError` naming each subject found in two or more parts."""
    leaks = check_split(frames)
    if len(leaks):
        text = "; ".join(
            f"subject {r.subject} in {r.parts} ({', '.join(r.frames[:5])}"
            f"{' ...' if len(r.frames) > 5 else ''})" for r in leaks.itertuples()
        )
        raise SubjectLeakError(f"subjects in more than one of train, validation, holdout: {text}")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
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
    context = _context(Path(gx_dir))
    batch_definition = _batch_definition(context)
    suite = _suite(context, rules)
    validation_definition = _validation_definition(context, batch_definition, suite)
    checkpoint = _checkpoint(context, validation_definition)

    pairs = find_contradicting_pairs(manifest, rules)
    frame = _with_pair_column(manifest, pairs)
    gx_frame = frame.drop(columns=[c for c in ("mask_thumb", "phash") if c in frame])
    if build_docs:
        outcome = checkpoint.run(batch_parameters={"dataframe": gx_frame})
        (result_id, suite_result), = outcome.run_results.items()
    else:
        # The same validation and stored result, without the Data Docs action.
        suite_result = validation_definition.run(
            batch_parameters={"dataframe": gx_frame},
            result_format=RESULT_FORMAT,
            checkpoint_id=checkpoint.id,
        )
        result_id = None

    data_docs = page = result_path = None
    if result_id is not None:
        data_docs = _docs_index(context)
        for site in context.get_docs_sites_urls(
            resource_identifier=result_id, site_name=DOCS_SITE_NAME
        ):
            page = _url_to_path(site["site_url"]) if site.get("site_url") else None
        stored = (
            Path(context.root_directory)
            / "uncommitted"
            / "validations"
            / Path(*result_id.to_tuple()).with_suffix(".json")
        )
        result_path = str(stored) if stored.is_file() else None

    failures = [_failure(r, rules) for r in suite_result.results if not r.success]
    attach_details(failures, frame)  # e.g. the decoder's reason for each file that does not decode
    for failure in failures:
        if failure.check == "contradicting_duplicates" and pairs:
            failure.details["pairs"] = pairs
            failure.details["pair_count"] = len(pairs)
            failure.files = list(dict.fromkeys(f for p in pairs for f in (p["image_a"], p["image_b"])))
    profile = compute_profile(frame)
    drift = None
    if previous_profile:
        drift = compare_profiles(profile, previous_profile, rules)
        drift["previous_hash"] = previous_profile.get("dvc_hash", "")
        drift_failure = _drift_failure(drift, rules)
        if drift_failure is not None:
            failures.append(drift_failure)
    n_frames, n_subjects, empty_share = _summary(frame)
    return ValidationReport(
        success=not any(f.severity != "warning" for f in failures),
        evaluated=len(suite_result.results) + (1 if previous_profile else 0),
        failures=failures,
        n_frames=n_frames,
        n_subjects=n_subjects,
        empty_share=empty_share,
        data_docs=data_docs,
        data_docs_page=page,
        result_path=result_path,
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
    from pipeline.manifest import build_manifest

    cache = manifest_cache_file(gx_dir, data_dir) if use_cache else None
    manifest = build_manifest(Path(data_dir), cache_file=cache, mapper=mapper)
    report = validate_manifest(
        manifest, rules, gx_dir, build_docs=build_docs, previous_profile=previous_profile
    )
    return manifest, report
