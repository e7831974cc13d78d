"""Great Expectations (GX Core 1.x) checks of the scan manifest.

The manifest (:func:`pipeline.manifest.build_manifest`) has one row per frame id. This module
keeps a file-backed GX project under ``gx_dir`` (``<gx_dir>/gx/...``, meant to live in git) with
a pandas data source, a dataframe asset, a whole-dataframe batch definition, the expectation
suite ``raw_frames`` built from :class:`~pipeline.config.ValidationParams`, a validation
definition and a checkpoint that updates the Data Docs. Every object is fetched when it already
exists and written only when missing or changed, so running the check leaves the committed
files untouched unless the rules changed.

A failed check does not raise: :func:`validate_manifest` returns a :class:`ValidationReport`;
callers that want to stop raise :class:`DataValidationError` with it.

GX is imported lazily (it takes seconds) with its analytics switched off.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.config import ValidationParams

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
RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": INDEX_COLUMNS}
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

    def summary(self, limit: int = SHOW_FILES) -> str:
        """``description: file, file, ... (and N more)`` or the observed value."""
        if self.files:
            shown = ", ".join(self.files[:limit])
            more = len(self.files) - limit
            return f"{self.description}: {shown}" + (f" (and {more} more)" if more > 0 else "")
        if "observed_value" in self.details:
            return f"{self.description}: observed {self.details['observed_value']}"
        if self.details.get("exception"):
            return f"{self.description}: GX raised {self.details['exception']}"
        return self.description


@dataclass
class ValidationReport:
    success: bool
    evaluated: int
    failures: list[ExpectationFailure]
    n_frames: int
    n_subjects: int
    empty_share: float
    data_docs: str | None  # path of the Data Docs site's index.html
    data_docs_page: str | None = None  # path of this run's page in the Data Docs
    result_path: str | None = None  # the stored GX validation result (JSON) of this run
    seconds: float = 0.0

    @property
    def failed_files(self) -> list[str]:
        """Every file named by any failure, each once, in order of appearance."""
        return list(dict.fromkeys(f for failure in self.failures for f in failure.files))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=_jsonable))

    def to_markdown(self) -> str:
        verdict = "passed" if self.success else "FAILED"
        lines = [
            f"## Data validation {verdict}",
            "",
            f"- frames: {self.n_frames}, subjects: {self.n_subjects}, "
            f"empty masks: {self.empty_share:.1%}",
            f"- expectations: {self.evaluated} evaluated, {len(self.failures)} failed",
        ]
        if self.data_docs:
            lines.append(f"- Data Docs: {self.data_docs_page or self.data_docs}")
        if self.failures:
            lines += ["", "| check | column | files | count |", "| --- | --- | --- | --- |"]
            for f in self.failures:
                files = ", ".join(f"`{x}`" for x in f.files[:SHOW_FILES])
                if len(f.files) > SHOW_FILES:
                    files += f" and {len(f.files) - SHOW_FILES} more"
                if not files and "observed_value" in f.details:
                    files = f"observed {f.details['observed_value']}"
                elif not files and f.details.get("exception"):
                    files = f"GX raised: {f.details['exception']}"
                count = f.details.get("unexpected_count", "")
                lines.append(
                    f"| {_md(f.description)} | {f.column or ''} | {_md(files)} | {count} |"
                )
        return "\n".join(lines) + "\n"

    def format_failures(self) -> str:
        if self.success:
            return (
                f"data validation passed ({self.evaluated} expectations, {self.n_frames} frames)"
            )
        lines = [f"data validation failed: {len(self.failures)} of {self.evaluated} expectations"]
        lines += [f"  - {f.summary()}" for f in self.failures]
        if self.data_docs:
            lines.append(f"  details: {self.data_docs_page or self.data_docs}")
        return "\n".join(lines)


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

    return [
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
    ]


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
def _failure(result) -> ExpectationFailure:
    config = result.expectation_config
    kwargs = dict(config.kwargs)
    column = kwargs.get("column")
    res = dict(result.result or {})
    path_column = (config.meta or {}).get("path_column")

    frame_ids: list[str] = []
    files: list[str] = []
    for row in res.get("unexpected_index_list") or []:
        if not isinstance(row, dict):
            continue
        frame_id = str(row.get("frame_id", ""))
        frame_ids.append(frame_id)
        path = row.get(path_column) if path_column else None
        if not path or pd.isna(path):  # e.g. a frame without mask: name the frame
            path = row.get("image_path") or row.get("mask_path") or frame_id
        files.append(str(path))
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
    return ExpectationFailure(
        expectation=config.type,
        column=column,
        description=description,
        files=files,
        details=json.loads(json.dumps(details, default=_jsonable)),
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
# Entry points
# --------------------------------------------------------------------------------------------
def validate_manifest(
    manifest: pd.DataFrame,
    rules: ValidationParams,
    gx_dir: Path,
    build_docs: bool = True,
) -> ValidationReport:
    """Run the ``raw_frames`` checkpoint of the GX project under ``gx_dir`` on ``manifest``.

    Creates whatever part of the GX project is missing, updates the stored suite when ``rules``
    changed, stores the validation result (``gx/uncommitted/validations``) and, with
    ``build_docs``, updates the Data Docs. Never raises on bad data: read ``report.success``.
    """
    started = time.perf_counter()
    context = _context(Path(gx_dir))
    batch_definition = _batch_definition(context)
    suite = _suite(context, rules)
    validation_definition = _validation_definition(context, batch_definition, suite)
    checkpoint = _checkpoint(context, validation_definition)

    frame = manifest.reset_index(drop=True)
    if build_docs:
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        (result_id, suite_result), = outcome.run_results.items()
    else:
        # The same validation and stored result, without the Data Docs action.
        suite_result = validation_definition.run(
            batch_parameters={"dataframe": frame},
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

    failures = [_failure(r) for r in suite_result.results if not r.success]
    n_frames, n_subjects, empty_share = _summary(frame)
    return ValidationReport(
        success=bool(suite_result.success),
        evaluated=len(suite_result.results),
        failures=failures,
        n_frames=n_frames,
        n_subjects=n_subjects,
        empty_share=empty_share,
        data_docs=data_docs,
        data_docs_page=page,
        result_path=result_path,
        seconds=round(time.perf_counter() - started, 3),
    )


def validate_data_dir(
    data_dir: Path,
    rules: ValidationParams,
    gx_dir: Path,
    build_docs: bool = True,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Build the manifest of ``data_dir`` and validate it; returns both."""
    from pipeline.manifest import build_manifest

    manifest = build_manifest(Path(data_dir))
    return manifest, validate_manifest(manifest, rules, gx_dir, build_docs=build_docs)
