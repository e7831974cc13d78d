"""The scan manifest and its Great Expectations check, on real GX file projects in tmp folders.

Each defect test breaks one thing in an otherwise clean hand-made dataset and checks that exactly
that expectation fails and that the report names the offending file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import ValidationParams
from pipeline.manifest import COLUMNS, build_manifest
from pipeline.validation import (
    DataValidationError,
    ValidationReport,
    validate_data_dir,
    validate_manifest,
)
from pipeline.validation.checks import BY_NAME

H, W = 420, 580
# 3 subjects x 2 frames; min_frames 5 so that removing one frame breaks only the pairing rule.
RULES = ValidationParams(min_frames=5, min_subjects=3)
FLAGS = ["name_ok", "image_exists", "mask_exists", "image_decodes", "mask_decodes"]


def noise_frame(seed: int, shape: tuple[int, ...] = (H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 220, size=shape, dtype=np.uint8)


def blob_mask(h: int = 80, w: int = 90) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[150 : 150 + h, 200 : 200 + w] = 255
    return mask


def write(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def make_dataset(root: Path) -> Path:
    """``root/data/train`` with subjects 1-3, frames 1-2; frame 1 has a nerve, frame 2 none."""
    train = root / "data" / "train"
    train.mkdir(parents=True)
    for subject in (1, 2, 3):
        for n in (1, 2):
            write(train / f"{subject}_{n}.tif", noise_frame(subject * 10 + n))
            mask = blob_mask() if n == 1 else np.zeros((H, W), np.uint8)
            write(train / f"{subject}_{n}_mask.tif", mask)
    return root / "data"


def committed_files(gx_dir: Path) -> dict[str, str]:
    """Hashes of the GX project files that belong in git (everything outside uncommitted/)."""
    root = gx_dir / "gx"
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "uncommitted" not in p.relative_to(root).parts
    }


@pytest.fixture(scope="module")
def gx_dir(tmp_path_factory) -> Path:
    """One GX project shared by the defect tests (they also prove the project is reusable)."""
    return tmp_path_factory.mktemp("gxproject")


# --------------------------------------------------------------------------------------------
# A clean set
# --------------------------------------------------------------------------------------------
def test_clean_set_passes_and_writes_data_docs(tmp_path, gx_dir):
    data = make_dataset(tmp_path)
    manifest, report = validate_data_dir(data, RULES, gx_dir)

    assert report.success, report.format_failures()
    assert report.failures == []
    assert report.evaluated == 20
    assert (report.n_frames, report.n_subjects, report.empty_share) == (6, 3, 0.5)
    assert "passed" in report.format_failures()

    # The manifest: one row per pair, sorted by subject then n, with the figures filled in.
    assert list(manifest.columns) == list(COLUMNS)
    assert manifest["frame_id"].tolist() == ["1_1", "1_2", "2_1", "2_2", "3_1", "3_2"]
    assert manifest["image_path"].tolist()[0] == "train/1_1.tif"
    assert manifest["mask_path"].tolist()[0] == "train/1_1_mask.tif"
    assert manifest["mask_area"].tolist() == [7200, 0] * 3
    assert manifest[FLAGS].all().all()
    assert (manifest["height"] == H).all() and (manifest["width"] == W).all()
    assert manifest["intensity_std"].min() > 40

    # Data Docs: the site index and this run's page exist; the stored result says success.
    assert report.data_docs and Path(report.data_docs).is_file()
    assert Path(report.data_docs).name == "index.html"
    assert report.data_docs_page and Path(report.data_docs_page).is_file()
    stored = json.loads(Path(report.result_path).read_text())
    assert stored["success"] is True

    as_dict = report.to_dict()
    json.dumps(as_dict)  # plain JSON
    assert as_dict["success"] is True and as_dict["n_frames"] == 6
    assert "passed" in report.to_markdown()


# --------------------------------------------------------------------------------------------
# One defect at a time
# --------------------------------------------------------------------------------------------
def _missing_mask(train: Path) -> None:
    (train / "2_1_mask.tif").unlink()


def _mask_without_frame(train: Path) -> None:
    (train / "2_2.tif").unlink()


def _garbage_frame(train: Path) -> None:
    (train / "1_2.tif").write_bytes(b"this is not a TIFF file\x00\xff" * 50)


def _empty_mask_file(train: Path) -> None:
    (train / "3_2_mask.tif").write_bytes(b"")


def _wrong_size(train: Path) -> None:
    write(train / "3_2.tif", noise_frame(7, (400, W)))


def _rgb_frame(train: Path) -> None:
    write(train / "3_1.tif", noise_frame(8, (H, W, 3)))


def _non_binary_mask(train: Path) -> None:
    mask = blob_mask()
    mask[160:170, 210:220] = 128
    write(train / "1_1_mask.tif", mask)


def _blank_frame(train: Path) -> None:
    write(train / "2_1.tif", np.full((H, W), 100, np.uint8))


def _saturated_frame(train: Path) -> None:
    frame = np.full((H, W), 255, np.uint8)
    frame[:10] = noise_frame(9, (10, W))  # a little texture: not blank, but mean about 252
    write(train / "2_2.tif", frame)


def _small_mask(train: Path) -> None:
    write(train / "3_1_mask.tif", blob_mask(10, 10))


def _bad_name(train: Path) -> None:
    shutil.copy(train / "1_1.tif", train / "1_1 copy.tif")


DEFECTS = [
    # (defect, the one column whose expectation fails, the file the report must name)
    (_missing_mask, "mask_exists", "train/2_1.tif"),
    (_mask_without_frame, "image_exists", "train/2_2_mask.tif"),
    (_garbage_frame, "image_decodes", "train/1_2.tif"),
    (_empty_mask_file, "mask_decodes", "train/3_2_mask.tif"),
    (_wrong_size, "height", "train/3_2.tif"),
    (_rgb_frame, "channels", "train/3_1.tif"),
    (_non_binary_mask, "mask_binary", "train/1_1_mask.tif"),
    (_blank_frame, "intensity_std", "train/2_1.tif"),
    (_saturated_frame, "intensity_mean", "train/2_2.tif"),
    (_small_mask, "mask_area", "train/3_1_mask.tif"),
    (_bad_name, "name_ok", "train/1_1 copy.tif"),
]


@pytest.mark.parametrize(
    ("defect", "column", "path"), DEFECTS, ids=[d[0].__name__.strip("_") for d in DEFECTS]
)
def test_defect_fails_and_names_the_file(tmp_path, gx_dir, defect, column, path):
    data = make_dataset(tmp_path)
    defect(data / "train")
    manifest, report = validate_data_dir(data, RULES, gx_dir, build_docs=False)

    assert not report.success
    # Exactly one expectation fails: each defect is reported once, by the rule that describes it.
    assert [f.column for f in report.failures] == [column], report.format_failures()
    failure = report.failures[0]
    assert failure.files == [path]
    assert failure.details["unexpected_count"] == 1
    # plain words from the table of checks, e.g. "every frame has its mask", with these rules' figures
    assert failure.description.startswith(BY_NAME[failure.check].describe(RULES))

    error = DataValidationError(report)
    assert error.report is report
    assert path in str(error) and failure.description in str(error)
    assert path in report.to_markdown()
    assert report.failed_files == [path]


def test_bad_name_row_and_unreadable_files_in_manifest(tmp_path):
    data = make_dataset(tmp_path)
    train = data / "train"
    _bad_name(train)
    _garbage_frame(train)
    (train / "notes.txt").write_text("scanner log")
    (train / "subfolder").mkdir()  # folders are not files: ignored
    manifest = build_manifest(data)

    odd = manifest[~manifest["name_ok"]].set_index("frame_id")
    assert sorted(odd.index) == ["1_1 copy", "notes"]
    assert odd.loc["notes", "image_path"] == "train/notes.txt"
    assert pd.isna(odd.loc["notes", "subject"]) and not odd.loc["notes", "image_decodes"]
    assert manifest["name_ok"].tolist()[-2:] == [False, False]  # odd names sorted last

    garbage = manifest.set_index("frame_id").loc["1_2"]
    assert not garbage["image_decodes"] and garbage["mask_decodes"]
    assert pd.isna(garbage["height"]) and pd.isna(garbage["intensity_std"])
    assert garbage["content_sha1"] == hashlib.sha1((train / "1_2.tif").read_bytes()).hexdigest()


def test_several_defects_are_all_reported(tmp_path, gx_dir):
    data = make_dataset(tmp_path)
    for defect in (_missing_mask, _garbage_frame, _small_mask):
        defect(data / "train")
    _, report = validate_data_dir(data, RULES, gx_dir, build_docs=False)

    assert {f.column for f in report.failures} == {"mask_exists", "image_decodes", "mask_area"}
    assert set(report.failed_files) == {"train/2_1.tif", "train/1_2.tif", "train/3_1_mask.tif"}
    with pytest.raises(DataValidationError, match="train/1_2.tif"):
        raise DataValidationError(report)


def test_too_few_frames_and_subjects_and_a_broken_manifest(tmp_path, gx_dir):
    data = make_dataset(tmp_path)
    manifest = build_manifest(data)
    strict = ValidationParams(min_frames=7, min_subjects=4)
    report = validate_manifest(manifest, strict, gx_dir, build_docs=False)
    observed = {f.expectation: f.details.get("observed_value") for f in report.failures}
    assert observed == {
        "expect_table_row_count_to_be_between": 6,
        "expect_column_unique_value_count_to_be_between": 3,
    }
    assert "at least 7 frames: observed 6" in report.format_failures()

    # A manifest missing a column is reported, not raised.
    no_column = manifest.drop(columns=["mask_binary"])
    broken = validate_manifest(no_column, RULES, gx_dir, build_docs=False)
    assert [f.column for f in broken.failures] == ["mask_binary"]
    assert "mask_binary" in broken.failures[0].details["exception"]


# --------------------------------------------------------------------------------------------
# The GX project on disk
# --------------------------------------------------------------------------------------------
def test_gx_project_is_stable_reusable_and_follows_the_rules(tmp_path):
    data = make_dataset(tmp_path / "set")
    manifest = build_manifest(data)
    gx_dir = tmp_path / "project"

    assert validate_manifest(manifest, RULES, gx_dir, build_docs=False).success
    files = committed_files(gx_dir)
    assert {
        "great_expectations.yml",
        "expectations/raw_frames.json",
        "validation_definitions/raw_frames.json",
        "checkpoints/raw_frames.json",
    } <= set(files)
    checkpoint = json.loads((gx_dir / "gx/checkpoints/raw_frames.json").read_text())
    assert checkpoint["actions"][0]["type"] == "update_data_docs"
    assert checkpoint["result_format"]["result_format"] == "COMPLETE"

    # Running again changes nothing that is committed.
    assert validate_manifest(manifest, RULES, gx_dir, build_docs=False).success
    assert committed_files(gx_dir) == files

    # A fresh clone (no uncommitted/) elsewhere works and changes nothing committed either.
    clone = tmp_path / "clone"
    shutil.copytree(gx_dir, clone, ignore=shutil.ignore_patterns("uncommitted"))
    assert validate_manifest(manifest, RULES, clone, build_docs=True).success
    assert committed_files(clone) == files

    # New rules rewrite the stored suite, and the check follows them.
    before = json.loads((clone / "gx/expectations/raw_frames.json").read_text())["expectations"]
    stricter = RULES.model_copy(update={"mask_area_min": 8000})
    report = validate_manifest(manifest, stricter, clone, build_docs=False)
    assert [f.column for f in report.failures] == ["mask_area"]
    assert len(report.failures[0].files) == 3
    suite = json.loads((clone / "gx/expectations/raw_frames.json").read_text())
    area = [e for e in suite["expectations"] if e["kwargs"].get("column") == "mask_area"]
    assert area[0]["kwargs"]["min_value"] == 8000
    # Only the changed expectation gets a new id: the suite's git diff shows just the change.
    renewed = [
        a["kwargs"].get("column")
        for a, b in zip(before, suite["expectations"], strict=True)
        if a["id"] != b["id"]
    ]
    assert renewed == ["mask_area"]
    changed = committed_files(clone)
    assert {k for k in files if files[k] != changed[k]} == {"expectations/raw_frames.json"}


# --------------------------------------------------------------------------------------------
# Real frames
# --------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_real_frames_manifest_and_validation(shared_data, tmp_path):
    manifest, report = validate_data_dir(shared_data, ValidationParams(), tmp_path, build_docs=False)

    assert len(manifest) == 56
    assert list(manifest.columns) == list(COLUMNS)
    assert str(manifest["subject"].dtype) == "Int64" and str(manifest["height"].dtype) == "Int64"
    assert sorted(manifest["subject"].unique().tolist()) == [1, 5, 7, 8, 9, 11, 13]
    assert manifest["frame_id"].iloc[0] == "1_1" and manifest["frame_id"].iloc[49] == "1_50"
    keys = list(zip(manifest["subject"], manifest["n"]))
    assert keys == sorted(keys)
    assert manifest[FLAGS].all().all()
    assert set(manifest["height"]) == {420} and set(manifest["width"]) == {580}
    assert set(manifest["channels"]) == {1} and set(manifest["dtype"]) == {"uint8"}
    assert manifest["mask_binary"].all()
    nonempty = manifest.loc[manifest["mask_area"] > 0, "mask_area"]
    assert len(nonempty) == 30 and nonempty.min() > 2000 and nonempty.max() < 20000
    assert manifest["intensity_std"].min() > 20 and manifest["intensity_mean"].max() < 200
    first = manifest.iloc[0]
    frame_bytes = (shared_data / first["image_path"]).read_bytes()
    assert first["content_sha1"] == hashlib.sha1(frame_bytes).hexdigest()
    mask = np.asarray(Image.open(shared_data / first["mask_path"]))
    assert first["mask_area"] == int((mask > 0).sum())

    assert isinstance(report, ValidationReport)
    assert report.success, report.format_failures()
    assert (report.n_frames, report.n_subjects) == (56, 7)
    assert report.empty_share == pytest.approx(26 / 56)
    # Structural checks all pass; near-duplicates with contradicting masks are a warning, by pair.
    assert report.blocking == []
    assert [f.check for f in report.warnings] == ["contradicting_duplicates"]
    pairs = [(p["frame_a"], p["frame_b"], p["dice"]) for p in report.contradicting_pairs]
    assert pairs == [("1_9", "1_14", None), ("1_35", "1_36", None)]
    assert "train/1_9.tif ~ train/1_14.tif" in report.format_failures()
