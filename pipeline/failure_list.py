"""The complete list of failing files: one entry per (file, check), with the reason in words.

The terminal and the Markdown table abbreviate a long list; this list never does. Entries come from
a :class:`~pipeline.validation.ValidationReport` (GX's failures, all rows of each) and from an
import's :class:`~pipeline.importers.ImportProblem` s (files ``data add`` could not take). They are
written as CSV (:data:`COLUMNS`) and JSON (:func:`document`); docs/validation.md describes both.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_write_text

COLUMNS = ["file", "frame_id", "check", "severity", "reason", "imported_as"]
# Manifest columns that say more about an offending file than the checked flag does.
_DETAIL = {
    "frame_decodes": ("image_path", "image_error"),
    "mask_decodes": ("mask_path", "mask_error"),
    "mask_binary": ("mask_path", "mask_values"),
}
_FIXED = {
    "names": "the name does not follow {subject}_{n}.tif or {subject}_{n}_mask.tif",
    "unique_ids": "its frame id comes from more than one file",
    "mask_for_frame": "the frame has no mask file ({frame_id}_mask.tif)",
    "frame_for_mask": "the mask has no frame file ({frame_id}.tif)",
    "frame_decodes": "cannot be read or decoded as an image",
    "mask_decodes": "cannot be read or decoded as an image",
}


def attach_details(failures: list, manifest: pd.DataFrame) -> None:
    """Give each row of a decode or binary-mask failure the manifest's detail for its file (the
    decoder's reason, the mask's values)."""
    for failure in failures:
        path_col, detail_col = _DETAIL.get(failure.check, (None, None))
        if detail_col is None or detail_col not in manifest or path_col not in manifest:
            continue
        detail = dict(zip(manifest[path_col].astype(str), manifest[detail_col].fillna("").astype(str)))
        for row in failure.rows:
            if detail.get(row["file"]):
                row["detail"] = detail[row["file"]]


def _reason(failure, row: dict) -> str:
    check, detail = failure.check, row.get("detail")
    if check in ("frame_decodes", "mask_decodes") and detail:
        return detail
    if check == "mask_binary":
        return f"the mask holds the values {detail}, not only 0 and 255 (or 0 and 1)" if detail else \
            "the mask holds values other than 0 and 255 (or 0 and 1)"
    if check in _FIXED:
        return _FIXED[check].replace("{frame_id}", row.get("frame_id", ""))
    value = row.get("value")
    if value is None or (isinstance(value, float) and value != value):
        return failure.description
    shown = f"{value:.4g}" if isinstance(value, float) else value
    return f"{failure.column} is {shown}; expected: {failure.description}"


def _pair_reasons(failure, names: dict[str, str]) -> dict[str, str]:
    """For near-duplicates with contradicting masks: each frame's partner, distance and why."""
    out: dict[str, list[str]] = {}
    for p in failure.details.get("pairs") or []:
        why = "one mask empty, the other not" if p.get("dice") is None else f"mask Dice {p['dice']:.2f}"
        for a, b in ((p["image_a"], p["image_b"]), (p["image_b"], p["image_a"])):
            out.setdefault(a, []).append(f"near-duplicate of {names.get(b, b)} ({p['distance']} bits apart), {why}")
    return {k: "; ".join(v) for k, v in out.items()}


def _frame_id(path: str) -> str:
    return Path(path).stem.removesuffix("_mask")


def report_entries(report, source_names: dict[str, str] | None = None, unmapped_prefix: str = "") -> list[dict]:
    """One entry per (file, check) of every failure and warning of ``report``; a failure that names no
    file (too few frames, drift) gets one entry with an empty ``file``.

    ``source_names`` maps the validated folder's paths to the files they were imported from: those
    entries name the source file (``imported_as``: the validated path); the others get
    ``unmapped_prefix`` before their path (e.g. ``data/raw/`` for frames already in the data)."""
    names = source_names or {}
    entries: list[dict] = []
    for failure in report.failures:
        pairs = _pair_reasons(failure, names) if failure.details.get("pairs") else {}
        rows = failure.rows or [{"file": f, "frame_id": _frame_id(f)} for f in failure.files]
        if pairs:
            rows = [{"file": f, "frame_id": _frame_id(f), "reason": r} for f, r in pairs.items()]
        if not rows:
            entries.append(_entry("", "", failure.check, failure.severity, failure.summary()))
            continue
        for row in rows:
            path = row["file"]
            mapped = names.get(path)
            file = mapped if mapped else (unmapped_prefix + path if names else path)
            entries.append(_entry(file, row.get("frame_id", ""), failure.check, failure.severity,
                                  row.get("reason") or _reason(failure, row), path if mapped else ""))
    return _unique(entries)


def import_entries(problems: list, src: Path | str) -> list[dict]:
    """One entry per file an import could not take (always blocking: it cannot be imported)."""
    src = Path(src).resolve()
    entries = []
    for p in problems:
        path = Path(p.path).resolve()
        file = path.relative_to(src).as_posix() if src in path.parents else str(p.path)
        entries.append(_entry(file, p.frame_id, p.check, "blocking", p.reason))
    return _unique(entries)


def _entry(file: str, frame_id: str, check: str, severity: str, reason: str, imported_as: str = "") -> dict:
    return {"file": file, "frame_id": frame_id, "check": check, "severity": severity, "reason": reason,
            "imported_as": imported_as}


def _unique(entries: list[dict]) -> list[dict]:
    return list({(e["file"], e["check"]): e for e in entries}.values())


def failing_files(entries: list[dict], severity: str = "blocking") -> list[str]:
    """The distinct files with at least one entry of ``severity``, in order."""
    return list(dict.fromkeys(e["file"] for e in entries if e["file"] and e["severity"] == severity))


def to_csv(entries: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(entries)
    return out.getvalue()


def document(entries: list[dict], **summary) -> dict:
    """The JSON form: ``summary`` fields, the counts, then ``failures`` (every entry)."""
    return {**summary, "failing_files": len(failing_files(entries)),
            "warning_files": len(failing_files(entries, "warning")), "entries": len(entries),
            "failures": entries}


def write(entries: list[dict], csv_path: Path, json_path: Path | None = None, **summary) -> dict:
    """Write the CSV (and the JSON document) atomically; returns the document."""
    doc = document(entries, **summary)
    atomic_write_text(csv_path, to_csv(entries))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def write_refusal(failed, src: Path | str, reports_dir: Path, source_names: dict[str, str] | None = None,
                  raw_prefix: str = "data/raw/") -> tuple[Path, Path, int]:
    """``data add`` refused ``src``: write ``data_add_failures.csv`` and ``.json`` in ``reports_dir``
    from ``failed``, a :class:`~pipeline.importers.DataImportError` (its ``problems``) or a failed
    validation report (files imported from ``src`` by their names there, ``source_names``: the
    import's mapping; frames already in the data with ``raw_prefix``). Returns both paths and the
    number of files that break a blocking check."""
    from pipeline.importers import DataImportError  # noqa: PLC0415

    if isinstance(failed, DataImportError):
        entries = import_entries(failed.problems, src)
    else:
        entries = report_entries(failed, source_names or {}, unmapped_prefix=raw_prefix)
    csv_path = Path(reports_dir) / "data_add_failures.csv"
    json_path = csv_path.with_suffix(".json")
    write(entries, csv_path, json_path, source=str(src), files_relative_to=str(src), success=False)
    return csv_path, json_path, len(failing_files(entries))


def markdown(entries: list[dict], csv_label: str | None = None) -> str:
    """A Markdown section naming every failing file, its check and reason (and where the CSV is)."""
    blocking, warned = failing_files(entries), failing_files(entries, "warning")
    where = f"; the same list as CSV: `{csv_label}`" if csv_label else ""
    lines = ["", "### Every failing file", "",
             f"{len(blocking)} files break a blocking check, {len(warned)} only warn{where}.", ""]
    listed = [e for e in entries if e["file"]]
    if listed:
        lines += ["| file | check | severity | reason |", "| --- | --- | --- | --- |"]
        lines += [f"| `{e['file']}` | {e['check']} | {e['severity']} | {_md(e['reason'])} |" for e in listed]
    return "\n".join(lines) + "\n"


def terminal_lines(entries: list[dict], limit: int) -> list[str]:
    """The first ``limit`` entries as ``file: [check] reason`` lines, then how many more."""
    listed = [e for e in entries if e["file"]]
    lines = [f"{e['file']}: [{e['check']}] {e['reason']}" for e in listed[:limit]]
    if len(listed) > limit:
        lines.append(f"... and {len(listed) - limit} more")
    return lines


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
