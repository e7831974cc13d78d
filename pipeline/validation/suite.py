"""The GX Core 1.x file project under ``<gx_dir>/gx`` (meant to live in git) and running it.

A pandas data source, a dataframe asset, a whole-dataframe batch definition, the expectation suite
``raw_frames`` built from the declarations in :mod:`pipeline.validation.checks`, a validation
definition and a checkpoint that updates the Data Docs. Every object is fetched when it already exists
and written only when missing or changed, so a run leaves the committed files untouched unless the
rules changed. GX is imported lazily (it takes seconds) with its analytics switched off.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.config import ValidationParams
from pipeline.validation.checks import BY_NAME, GX_CHECKS, ROWS, Check
from pipeline.validation.report import ExpectationFailure, plain

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
_OPERATORS = {"==": operator.eq, ">": operator.gt}  # a GX row condition is a comparison of a Column


def _import_gx():
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx  # noqa: PLC0415 (slow import, done on first use)

    return gx


def to_expectation(check: Check, rules: ValidationParams):
    """The GX expectation of one declared check under these rules, carrying its name in ``meta.check``."""
    _import_gx()
    import great_expectations.expectations as gxe  # noqa: PLC0415
    from great_expectations.expectations.row_conditions import Column  # noqa: PLC0415

    condition = None
    for column, op, value in ROWS[check.rows] if check.rows else ():
        term = _OPERATORS[op](Column(column), value)
        condition = term if condition is None else condition & term
    extra = {"row_condition": condition} if condition is not None else {}
    return getattr(gxe, check.expectation)(
        **check.arguments(rules),
        **extra,
        description=check.describe(rules),
        meta={"check": check.name, **({"path_column": check.files} if check.files else {})},
        severity="warning" if rules.severity(check.name) == "warning" else "critical",
    )


def build_expectations(rules: ValidationParams) -> list:
    """The suite's expectations for these rules, in report order: one per GX check declared."""
    return [to_expectation(check, rules) for check in GX_CHECKS]


@dataclass
class SuiteRun:
    """What a run of the checkpoint left: GX's results and where it stored them."""

    results: list  # GX ExpectationValidationResult, one per expectation
    data_docs: str | None = None  # the Data Docs site's index.html
    page: str | None = None  # this run's page in the Data Docs
    result_path: str | None = None  # the stored validation result (JSON)


def run_suite(gx_dir: Path, rules: ValidationParams, frame: pd.DataFrame, build_docs: bool = True) -> SuiteRun:
    """Run the ``raw_frames`` checkpoint of the project under ``gx_dir`` on ``frame``, creating whatever
    part of the project is missing and updating the stored suite when ``rules`` changed; with
    ``build_docs``, the Data Docs are updated too."""
    context = _context(Path(gx_dir))
    batch_definition = _batch_definition(context)
    validation_definition = _validation_definition(context, batch_definition, _suite(context, rules))
    checkpoint = _checkpoint(context, validation_definition)
    if not build_docs:
        # The same validation and stored result, without the Data Docs action.
        result = validation_definition.run(
            batch_parameters={"dataframe": frame}, result_format=RESULT_FORMAT, checkpoint_id=checkpoint.id
        )
        return SuiteRun(result.results)
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    (result_id, result), = outcome.run_results.items()
    page = None
    for site in context.get_docs_sites_urls(resource_identifier=result_id, site_name=DOCS_SITE_NAME):
        page = _url_to_path(site["site_url"]) if site.get("site_url") else None
    stored = (Path(context.root_directory) / "uncommitted" / "validations"
              / Path(*result_id.to_tuple()).with_suffix(".json"))
    return SuiteRun(result.results, _docs_index(context), page, str(stored) if stored.is_file() else None)


def _context(gx_dir: Path) -> FileDataContext:
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: PLC0415

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


def _stored(store, name: str):
    """The object ``name`` of a GX store, or None when there is none yet."""
    from great_expectations.exceptions import DataContextError  # noqa: PLC0415

    try:
        return store.get(name)
    except DataContextError:
        return None


def _suite(context: FileDataContext, rules: ValidationParams):
    """The stored suite, rewritten only when the rules (and so the expectations) changed."""
    gx = _import_gx()
    wanted = build_expectations(rules)
    stored = _stored(context.suites, SUITE_NAME)
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
    existing = _stored(context.validation_definitions, VALIDATION_NAME)
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
    from great_expectations.checkpoint import UpdateDataDocsAction  # noqa: PLC0415

    wanted = gx.Checkpoint(
        name=CHECKPOINT_NAME,
        validation_definitions=[validation_definition],
        actions=[UpdateDataDocsAction(name=DOCS_ACTION_NAME, site_names=[DOCS_SITE_NAME])],
        result_format=RESULT_FORMAT,
    )
    existing = _stored(context.checkpoints, CHECKPOINT_NAME)
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


def read_failure(result, rules: ValidationParams) -> ExpectationFailure:
    """A failed GX result in the report's terms. The check is the one named in the expectation's
    ``meta.check``; its declaration gives the words and ``rules`` the severity."""
    config = result.expectation_config
    kwargs = dict(config.kwargs)
    column = kwargs.get("column")
    res = dict(result.result or {})
    check = str((config.meta or {}).get("check") or "")
    declared = BY_NAME.get(check)
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
    description = (declared.describe(rules) if declared else config.description) or config.type.replace("_", " ")
    return ExpectationFailure(
        expectation=config.type,
        column=column,
        description=description,
        files=list(dict.fromkeys(files)),
        details=plain(details),
        check=check,
        severity=rules.severity(check),
        rows=plain(rows),
    )


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


def _exception_messages(info: Any) -> list[str]:
    """GX 1.x keys exception info by metric id (or not, for some expectations): collect both."""
    if not isinstance(info, dict):
        return []
    if "raised_exception" in info:
        message = info.get("exception_message")
        return [str(message)] if info.get("raised_exception") and message else []
    messages = [m for value in info.values() for m in _exception_messages(value)]
    return list(dict.fromkeys(messages))

