"""Validate any folder ``nerveseg data add`` accepts, as it would import it.

A folder in the canonical layout (``train/{subject}_{n}.tif`` + ``_mask.tif``, nothing to convert)
is validated where it is. Any other (a folder holding the pairs itself, ``images/`` + ``masks/``,
PNG or JPEG, the competition's ``train_masks.csv``) is first imported exactly as ``data add`` would
(:func:`pipeline.importers.stage_import`) into a temporary folder, which is validated and removed;
failing files are then named by their source names, and files the import cannot take at all are
listed too. The folder itself is never written to.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline import failure_list
from pipeline.config import ValidationParams
from pipeline.atomic import atomic_write_text
from pipeline.importers import IMAGE_EXTENSIONS, ImportProblem, stage_import
from pipeline.validation import ValidationReport, validate_data_dir

CANONICAL = "canonical"
SUMMARY, FAILURES_CSV, FAILURES_JSON = "validate_summary.md", "validate_failures.csv", "validate_failures.json"


@dataclass
class FolderValidation:
    data_dir: Path
    layout: str  # "canonical", or the import format it was staged with (competition, folders, unlabeled)
    manifest: pd.DataFrame
    report: ValidationReport
    problems: list[ImportProblem] = field(default_factory=list)  # files the import could not take
    source_names: dict[str, str] = field(default_factory=dict)  # staged path -> source path

    @property
    def success(self) -> bool:
        return self.report.success and not self.problems

    def entries(self) -> list[dict]:
        """Every failing file (import problems first), named as in the folder, with check and reason."""
        return (failure_list.import_entries(self.problems, self.data_dir)
                + failure_list.report_entries(self.report, self.source_names))

    def summary(self) -> dict:
        r = self.report
        return {"data_dir": str(self.data_dir), "layout": self.layout, "success": self.success,
                "frames": r.n_frames, "subjects": r.n_subjects, "empty_share": round(r.empty_share, 4),
                "not_imported": len(self.problems), "expectations": r.evaluated,
                "blocking_checks": sorted({f.check for f in r.blocking} | {p.check for p in self.problems}),
                "warning_checks": sorted({f.check for f in r.warnings}),
                "data_docs": r.data_docs_page or r.data_docs}


def is_canonical(data_dir: Path) -> bool:
    """``train/`` holds only ``.tif`` files (no PNG, JPEG or ``.tiff`` to convert) and no
    ``train_masks.csv`` supplies masks: the folder is validated as it is."""
    data_dir = Path(data_dir)
    train = data_dir / "train"
    if not train.is_dir() or (data_dir / "train_masks.csv").is_file():
        return False
    return not any(p.suffix.lower() in IMAGE_EXTENSIONS - {".tif"} for p in train.iterdir() if p.is_file())


def validate_folder(data_dir: Path, rules: ValidationParams, gx_dir: Path, fmt: str = "auto",
                    letterbox: str = "auto", build_docs: bool = True, as_is: bool = False) -> FolderValidation:
    """Validate ``data_dir`` as it is when canonical (and ``fmt`` is ``auto``) or ``as_is`` (the
    project's own ``data/raw``), else as ``data add`` would import it.

    Raises :class:`pipeline.importers.DataImportError` only for a source that cannot be imported as a
    whole (no frames, an unknown format, a broken ``train_masks.csv``)."""
    data_dir = Path(data_dir)
    if as_is or (fmt == "auto" and is_canonical(data_dir)):
        manifest, report = validate_data_dir(data_dir, rules, gx_dir, build_docs=build_docs)
        return FolderValidation(data_dir, CANONICAL, manifest, report)
    work = Path(tempfile.mkdtemp(prefix="nerveseg-validate-"))
    try:
        staged, result = stage_import(data_dir, work / "raw", fmt=fmt, letterbox=letterbox, keep_going=True)
        staged.finish()
        # No manifest cache: the folder is new each time and removed below.
        manifest, report = validate_data_dir(work / "raw", rules, gx_dir, build_docs=build_docs, use_cache=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return FolderValidation(data_dir, result.format, manifest, report, result.problems, result.source_names())


def write_reports(checked: FolderValidation, reports_dir: Path, root: Path | None = None) -> dict:
    """``validate_summary.md`` (the report, then every failing file), ``validate_failures.csv`` and
    ``.json`` in ``reports_dir``, each written atomically; returns the JSON document. ``root``: paths
    in the Markdown are given relative to it."""
    reports_dir = Path(reports_dir)
    summary, csv_path = reports_dir / SUMMARY, reports_dir / FAILURES_CSV
    entries = checked.entries()
    doc = failure_list.write(entries, csv_path, reports_dir / FAILURES_JSON, **checked.summary(),
                             report=str(summary), failure_list=str(csv_path))
    label = csv_path.resolve().relative_to(Path(root).resolve()).as_posix() if root else str(csv_path)
    atomic_write_text(summary, checked.report.to_markdown(entries, label))
    return doc
