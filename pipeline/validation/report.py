"""What a validation found, in words: the report, its failures and the error that carries it.

A failed check does not raise: :func:`pipeline.validation.validate_manifest` returns a
:class:`ValidationReport`; callers that want to stop raise :class:`DataValidationError` with it. Each
failure names its check (:mod:`pipeline.validation.checks`) and whether it blocks or only warns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

# How many offending files a report prints before "... and N more".
SHOW_FILES = 10


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
        return plain(asdict(self))

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


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON values (numpy scalars as numbers, pandas' NA as None)."""
    return json.loads(json.dumps(obj, default=_jsonable))


def counts(manifest: pd.DataFrame) -> tuple[int, int, float]:
    """Frames (well-named, with their file), subjects and the empty-mask share of a manifest."""
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
