"""A bad batch is fixable from the report: `validate` and `data add` list every failing file with its
check and reason (JSON, CSV, Markdown), the decoders' own messages stay off the terminal, and
`validate` reads any folder `data add` accepts, agreeing with it on the frame count."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import yaml
from typer.testing import CliRunner

from flows.cli import app
from pipeline.decode_errors import why_undecodable
from tests.conftest import REPO, write_simple_dataset

runner = CliRunner()
# Each kind of broken file and the words its reason must hold.
KINDS = {
    "empty": "empty file (0 bytes)",
    "cut_short": "past the end of the file",
    "bad_magic": "not a TIFF (starts with bytes 00 11 22 33",
    "ifd_past_end": "past the end of the file",
    "random": "not a TIFF (starts with bytes",
    "png_cut": "damaged PNG (named .tif)",  # libpng writes its complaint to fd 2 itself
    "strips_cut": "truncated TIFF: its pixel data runs to byte",
}
DECODER_NOISE = ("TIFF_Error", "TIFFFetch", "TIFFRead", "libpng", "[ERROR", "[ WARN")


def _broken(kind: str, good_tif: bytes, seed: int) -> bytes:
    frame = np.random.default_rng(seed).integers(0, 255, (420, 580), dtype=np.uint8)
    if kind == "empty":
        return b""
    if kind == "cut_short":
        return good_tif[: len(good_tif) // 3]
    if kind == "bad_magic":
        return b"\x00\x11\x22\x33" + good_tif[4:]
    if kind == "ifd_past_end":
        return good_tif[:4] + (len(good_tif) + 1000).to_bytes(4, "little") + good_tif[8:]
    if kind == "random":
        return np.random.default_rng(seed).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    if kind == "png_cut":
        png = cv2.imencode(".png", frame)[1].tobytes()
        return png[: len(png) // 2]
    buffer = io.BytesIO()  # strips_cut: directory first, pixel data cut off
    tifffile.imwrite(buffer, frame)
    return buffer.getvalue()[:-1000]


def add_broken_files(folder: Path, ids: int = 15, subject: int = 90) -> dict[str, str]:
    """``ids`` frame ids of ``subject``, frame and mask both broken, kinds in turn: file -> kind."""
    good = next(folder.glob("*_mask.tif")).with_name("1_1.tif").read_bytes()
    kinds, written = list(KINDS), {}
    for i in range(ids):
        kind = kinds[i % len(kinds)]
        for name in (f"{subject}_{i + 1}.tif", f"{subject}_{i + 1}_mask.tif"):
            (folder / name).write_bytes(_broken(kind, good, i))
            written[name] = kind
    return written


def _project(tmp_path: Path) -> Path:
    """A project folder for `validate` (params.yaml only; GX project made on first use)."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return root


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_broken_file_gets_its_reason(kind):
    good = cv2.imencode(".tif", np.full((420, 580), 90, np.uint8))[1].tobytes()
    assert KINDS[kind] in why_undecodable(_broken(kind, good, 0), "1_1.tif")


def test_validate_lists_every_broken_file_with_a_reason_and_keeps_decoders_quiet(tmp_path, capfd):
    data = write_simple_dataset(tmp_path / "batch", subjects=3, frames=4)
    broken = add_broken_files(data / "train")
    assert len(broken) == 30
    root = _project(tmp_path)
    capfd.readouterr()

    result = runner.invoke(app, ["validate", str(data), "-C", str(root), "--json"])
    err = capfd.readouterr().err + result.stderr
    assert result.exit_code == 1, result.output
    assert not [n for n in DECODER_NOISE if n in err], err  # the reasons are in the report instead

    doc = json.loads(result.stdout)
    assert doc["success"] is False and doc["layout"] == "canonical" and doc["failing_files"] == 30
    failures = {f["file"]: f for f in doc["failures"] if f["severity"] == "blocking"}
    assert set(failures) == {f"train/{name}" for name in broken}
    for name, kind in broken.items():
        entry = failures[f"train/{name}"]
        assert entry["check"] == ("mask_decodes" if name.endswith("_mask.tif") else "frame_decodes")
        assert KINDS[kind] in entry["reason"], (name, entry)
        assert entry["frame_id"] == name.removesuffix(".tif").removesuffix("_mask")

    rows = _csv_rows(root / "reports" / "validate_failures.csv")
    assert {"file", "frame_id", "check", "severity", "reason"} <= set(rows[0])
    assert {r["file"]: r["reason"] for r in rows if r["severity"] == "blocking"} == {
        f: e["reason"] for f, e in failures.items()}
    summary = (root / "reports" / "validate_summary.md").read_text()
    assert all(f"`train/{name}`" in summary for name in broken) and "reports/validate_failures.csv" in summary
    # Data Docs: every distinct offending value gets its table row, not GX's default 20
    checkpoint = json.loads((root / "gx" / "checkpoints" / "raw_frames.json").read_text())
    assert checkpoint["result_format"]["partial_unexpected_count"] >= 1000

    # Without --json the terminal abbreviates but says where the whole list is.
    text = runner.invoke(app, ["validate", str(data), "-C", str(root)])
    assert text.exit_code == 1
    assert "30 files fail a blocking check" in text.output and "validate_failures.csv" in text.output
    assert "train/90_1.tif: [frame_decodes] empty file (0 bytes)" in text.output  # the first ones, with reasons
    assert not [n for n in DECODER_NOISE if n in capfd.readouterr().err]


def test_the_report_markdown_names_every_failing_file_with_its_reason(tmp_path):
    """What the flow logs (MLflow validation/summary.md, the Prefect artifact) lists them all too."""
    from pipeline.config import ValidationParams
    from pipeline.validation import validate_data_dir

    data = write_simple_dataset(tmp_path / "batch", subjects=3, frames=4)
    broken = add_broken_files(data / "train")
    _, report = validate_data_dir(data, ValidationParams(), tmp_path / "gx", build_docs=False)
    markdown = report.to_markdown()
    assert "30 files break a blocking check" in markdown
    assert all(f"| `train/{name}` |" in markdown for name in broken)
    assert "| `train/90_1.tif` | frame_decodes | blocking | empty file (0 bytes) |" in markdown


def test_data_add_refuses_a_broken_batch_and_writes_the_whole_list(tmp_path, capfd, project_copy):
    project = project_copy(tmp_path / "project", with_data=False)
    data = write_simple_dataset(tmp_path / "batch", subjects=3, frames=4)
    broken = add_broken_files(data / "train")
    capfd.readouterr()

    result = runner.invoke(app, ["data", "add", str(data), "-C", str(project), "--no-push", "--no-trigger"])
    err = capfd.readouterr().err + result.stderr
    assert result.exit_code == 1
    assert not [n for n in DECODER_NOISE if n in err], err
    assert "reports/data_add_failures.csv" in result.output and "every failing file (30)" in result.output
    assert not (project / "data" / "raw").exists() and not (project / "data" / "raw.dvc").exists()

    rows = _csv_rows(project / "reports" / "data_add_failures.csv")
    assert {r["file"] for r in rows} == {f"train/{name}" for name in broken}
    for r in rows:
        assert KINDS[broken[r["file"].removeprefix("train/")]] in r["reason"], r
        assert r["check"] in ("frame_decodes", "mask_decodes") and r["severity"] == "blocking"
    doc = json.loads((project / "reports" / "data_add_failures.json").read_text())
    assert doc["failing_files"] == 30 and len(doc["failures"]) == 30


def _flat(data: Path, dest: Path) -> Path:
    """The pairs straight in ``dest`` (no train/), as PNG."""
    dest.mkdir(parents=True)
    for path in (data / "train").glob("*.tif"):
        cv2.imwrite(str(dest / f"{path.stem}.png"), cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
    return dest


def _images_masks(data: Path, dest: Path) -> Path:
    """``images/{id}.jpg`` + ``masks/{id}.png`` (masks named like their frames)."""
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for path in (data / "train").glob("*.tif"):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if path.stem.endswith("_mask"):
            cv2.imwrite(str(dest / "masks" / f"{path.stem.removesuffix('_mask')}.png"), image)
        else:
            cv2.imwrite(str(dest / "images" / f"{path.stem}.jpg"), image)
    return dest


def _versioned_frames(project: Path) -> int:
    return yaml.safe_load((project / "data" / "raw.dvc").read_text())["meta"]["nerveseg"]["frames"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("shape", [_flat, _images_masks])
def test_validate_reads_what_data_add_reads_and_agrees_on_the_count(tmp_path, shape, project_copy, monkeypatch):
    data = write_simple_dataset(tmp_path / "made", subjects=3, frames=4)
    src = shape(data, tmp_path / "src")
    before = _snapshot(src)
    # A temporary folder of this test's own: a `validate` run by another test process at the same time
    # stages its copy elsewhere, and what is left here is this run's.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    root = _project(tmp_path)

    result = runner.invoke(app, ["validate", str(src), "-C", str(root), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["layout"] == "folders" and doc["frames"] == 12 and doc["failures"] == []
    assert _snapshot(src) == before  # read-only
    assert not list(temp.glob("nerveseg-validate-*"))  # its staging is gone

    project = project_copy(tmp_path / "versioned", with_data=False)
    added = runner.invoke(app, ["data", "add", str(src), "-C", str(project), "--no-push", "--no-trigger"])
    assert added.exit_code == 0, added.output
    assert _versioned_frames(project) == doc["frames"]


def test_validate_of_a_folder_to_import_names_failing_files_by_their_source_names(tmp_path):
    data = write_simple_dataset(tmp_path / "made", subjects=3, frames=4)
    src = _images_masks(data, tmp_path / "src")
    (src / "images" / "3_9.jpg").write_bytes(b"")                               # cannot be imported
    (src / "masks" / "3_9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    cv2.imwrite(str(src / "images" / "2_2.jpg"), np.full((420, 580), 80, np.uint8))  # imports, but blank
    root = _project(tmp_path)

    result = runner.invoke(app, ["validate", str(src), "-C", str(root), "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    by_file = {(f["file"], f["check"]): f for f in doc["failures"]}
    assert by_file[("images/3_9.jpg", "frame_decodes")]["reason"] == "empty file (0 bytes)"
    assert "damaged PNG" in by_file[("masks/3_9.png", "mask_decodes")]["reason"]
    blank = by_file[("images/2_2.jpg", "not_blank")]
    assert blank["imported_as"] == "train/2_2.tif" and blank["frame_id"] == "2_2"
    assert doc["frames"] == 12 and doc["not_imported"] == 2 and doc["failing_files"] == 3


@pytest.mark.realdata
def test_real_frames_with_a_broken_batch(shared_data, tmp_path, capfd, project_copy):
    """The 56 real pairs plus 30 broken files, laid out flat: `validate` and `data add` both name all
    30 with a reason; on the real pairs alone they agree on 56 frames."""
    flat = tmp_path / "flat"
    shutil.copytree(shared_data / "train", flat)
    broken = add_broken_files(flat)
    root = _project(tmp_path)
    capfd.readouterr()

    result = runner.invoke(app, ["validate", str(flat), "-C", str(root), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["frames"] == 56 and doc["failing_files"] == 30
    assert {f["file"] for f in doc["failures"] if f["severity"] == "blocking"} == set(broken)
    assert all(f["reason"] for f in doc["failures"])

    project = project_copy(tmp_path / "versioned", with_data=False)
    refused = runner.invoke(app, ["data", "add", str(flat), "-C", str(project), "--no-push", "--no-trigger"])
    assert refused.exit_code == 1
    assert {r["file"] for r in _csv_rows(project / "reports" / "data_add_failures.csv")} == set(broken)
    assert not [n for n in DECODER_NOISE if n in capfd.readouterr().err]

    for name in broken:
        (flat / name).unlink()
    good = runner.invoke(app, ["validate", str(flat), "-C", str(root), "--json"])
    assert good.exit_code == 0 and json.loads(good.stdout)["frames"] == 56
    added = runner.invoke(app, ["data", "add", str(flat), "-C", str(project), "--no-push", "--no-trigger"])
    assert added.exit_code == 0, added.output
    assert _versioned_frames(project) == 56


def test_quiet_decoders_drops_decoder_lines_and_passes_the_rest_on(capfd):
    import os

    from pipeline.decode_errors import quiet_decoders

    with quiet_decoders(), quiet_decoders():  # nested, as the importer's threads may be
        os.write(2, b"libpng error: IDAT: CRC error\nTIFF_Error x\nsomething else went wrong\n")
    err = capfd.readouterr().err
    assert "something else went wrong" in err and "libpng" not in err and "TIFF_Error" not in err
    os.write(2, b"libpng warning: after the block\n")  # fd 2 is back
    assert "after the block" in capfd.readouterr().err


def test_data_add_refused_by_validation_names_source_files_and_table_checks(tmp_path, project_copy):
    project = project_copy(tmp_path / "project", with_data=False)
    src = tmp_path / "tiny"
    src.mkdir()
    mask = np.zeros((420, 580), np.uint8)
    mask[200:204, 300:305] = 255  # a 20-pixel nerve
    cv2.imwrite(str(src / "8_1.png"), np.random.default_rng(0).rayleigh(60, (420, 580)).clip(0, 255).astype(np.uint8))
    cv2.imwrite(str(src / "8_1_mask.png"), mask)

    result = runner.invoke(app, ["data", "add", str(src), "-C", str(project), "--no-push", "--no-trigger"])
    assert result.exit_code == 1 and "reports/data_add_failures.csv" in result.output
    rows = {(r["file"], r["check"]): r for r in _csv_rows(project / "reports" / "data_add_failures.csv")}
    area = rows[("8_1_mask.png", "mask_area")]
    assert area["imported_as"] == "train/8_1_mask.tif" and area["reason"].startswith("mask_area is 20; expected")
    assert rows[("", "row_count")]["reason"].endswith("observed 1")  # a check that names no file
