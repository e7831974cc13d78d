"""The table of checks (each name travels with its rule), and the checks beyond single files:
near-duplicates with contradicting masks, severities chosen in params.yaml, the manifest cache, subject
leakage across the split, and drift between versions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline.config import ValidationParams
from pipeline.manifest import build_manifest
from pipeline.split import SubjectLeakError, assert_no_subject_leak, check_split
from pipeline.validation import (
    compare_profiles,
    compute_profile,
    find_contradicting_pairs,
    validate_data_dir,
    validate_manifest,
)
from pipeline.validation.checks import BY_NAME, CHECKS
from tests.test_validation import RULES, blob_mask, make_dataset, noise_frame, write

H, W = 420, 580


@pytest.fixture(scope="module")
def gx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gxchecks")


def _structured_frame(seed: int) -> np.ndarray:
    """A frame with anatomy-like structure (layers and blobs) under speckle-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = 60 + 40 * np.sin(yy / 37.0 + seed) + 30 * np.cos(xx / 53.0)
    for _ in range(4):
        cy, cx, r = rng.integers(60, H - 60), rng.integers(60, W - 60), rng.integers(20, 60)
        base += 60 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
    return (base + rng.normal(0, 12, (H, W))).clip(0, 255).astype(np.uint8)


def _near_duplicate(train: Path, mask: np.ndarray) -> None:
    """Frame 1_3: frame 1_1 with fresh noise (a near-duplicate), with the given mask."""
    frame = _structured_frame(1)
    write(train / "1_1.tif", frame)
    noisy = frame.astype(np.int16) + np.random.default_rng(5).integers(-4, 5, frame.shape)
    write(train / "1_3.tif", noisy.clip(0, 255).astype(np.uint8))
    write(train / "1_3_mask.tif", mask)


# --------------------------------------------------------------------------------------------
# Near-duplicates
# --------------------------------------------------------------------------------------------
def test_near_duplicate_with_empty_mask_is_a_warning_listing_the_pair(tmp_path, gx_dir):
    data = make_dataset(tmp_path)
    _near_duplicate(data / "train", np.zeros((H, W), np.uint8))  # 1_1 has a nerve, 1_3 none
    manifest, report = validate_data_dir(data, RULES, gx_dir, build_docs=False)

    assert report.success, report.format_failures()  # a warning by default
    assert [(p["frame_a"], p["frame_b"], p["dice"]) for p in report.contradicting_pairs] == [
        ("1_1", "1_3", None)
    ]
    (warning,) = report.warnings
    assert warning.check == "contradicting_duplicates" and warning.severity == "warning"
    assert warning.files == ["train/1_1.tif", "train/1_3.tif"]
    text = report.format_failures()
    assert "passed with 1 warning" in text and "train/1_1.tif ~ train/1_3.tif" in text
    markdown = report.to_markdown()
    assert "passed with warnings" in markdown and "`train/1_3.tif`" in markdown
    # Different frames of one subject have different perceptual hashes.
    assert manifest.set_index("frame_id").loc["1_1", "phash"] != manifest.set_index("frame_id").loc[
        "1_2", "phash"
    ]


def test_near_duplicate_with_non_overlapping_mask_contradicts_by_dice(tmp_path, gx_dir):
    data = make_dataset(tmp_path)
    moved = np.zeros((H, W), np.uint8)
    moved[300:380, 400:490] = 255  # same size as 1_1's nerve, elsewhere: Dice 0
    _near_duplicate(data / "train", moved)
    _, report = validate_data_dir(data, RULES, gx_dir, build_docs=False)
    (pair,) = report.contradicting_pairs
    assert (pair["frame_a"], pair["frame_b"]) == ("1_1", "1_3") and pair["dice"] == 0.0

    # The same nerve in both near-duplicates is consistent: no pair.
    write(data / "train" / "1_3_mask.tif", blob_mask())
    manifest = build_manifest(data)
    assert find_contradicting_pairs(manifest, RULES) == []


def test_severity_is_chosen_in_params(tmp_path, gx_dir):
    data = make_dataset(tmp_path)
    _near_duplicate(data / "train", np.zeros((H, W), np.uint8))
    write(data / "train" / "3_1_mask.tif", blob_mask(10, 10))  # a mask too small
    manifest = build_manifest(data)

    default = validate_manifest(manifest, RULES, gx_dir, build_docs=False)
    assert not default.success
    assert [f.check for f in default.blocking] == ["mask_area"]
    assert [f.check for f in default.warnings] == ["contradicting_duplicates"]
    assert "[blocking]" in default.format_failures() and "[warning]" in default.format_failures()

    swapped = RULES.model_copy(update={"warning_checks": ("mask_area",)})
    report = validate_manifest(manifest, swapped, gx_dir, build_docs=False)
    assert not report.success
    assert [f.check for f in report.blocking] == ["contradicting_duplicates"]
    assert [f.check for f in report.warnings] == ["mask_area"]

    lenient = RULES.model_copy(update={"warning_checks": ("mask_area", "contradicting_duplicates")})
    assert validate_manifest(manifest, lenient, gx_dir, build_docs=False).success

    with pytest.raises(ValidationError, match="unknown check"):
        ValidationParams(warning_checks=("no_such_check",))


# --------------------------------------------------------------------------------------------
# The manifest cache
# --------------------------------------------------------------------------------------------
def test_manifest_cache_reads_only_new_or_changed_files(tmp_path):
    data = make_dataset(tmp_path)
    cache = tmp_path / "cache" / "manifest.json"
    first = build_manifest(data, cache_file=cache)
    assert first.attrs["files_read"] == 12 and cache.is_file()

    again = build_manifest(data, cache_file=cache)
    assert (again.attrs["files_read"], again.attrs["files_cached"]) == (0, 12)
    pd.testing.assert_frame_equal(again, first)

    train = data / "train"
    write(train / "4_1.tif", noise_frame(41))
    write(train / "4_1_mask.tif", blob_mask())
    write(train / "2_2.tif", noise_frame(99))  # changed content
    st = (train / "2_2.tif").stat()
    os.utime(train / "2_2.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    (train / "3_2_mask.tif").unlink()  # a removed file leaves the cache too
    later = build_manifest(data, cache_file=cache)
    assert later.attrs["files_read"] == 3  # 4_1, 4_1_mask and the changed 2_2
    rows = later.set_index("frame_id")
    assert rows.loc["4_1", "mask_area"] == 7200 and not rows.loc["3_2", "mask_exists"]
    fresh = build_manifest(data)
    pd.testing.assert_frame_equal(later, fresh)

    cache.write_text("{not json")  # a broken cache costs time, never correctness
    pd.testing.assert_frame_equal(build_manifest(data, cache_file=cache), fresh)


def test_validate_data_dir_keeps_its_cache_outside_the_data(tmp_path, gx_dir):
    data = make_dataset(tmp_path)
    before = sorted(p.name for p in (data / "train").iterdir())
    first, _ = validate_data_dir(data, RULES, gx_dir, build_docs=False)
    second, _ = validate_data_dir(data, RULES, gx_dir, build_docs=False)
    assert first.attrs["files_read"] == 12 and second.attrs["files_read"] == 0
    assert sorted(p.name for p in (data / "train").iterdir()) == before
    assert list((gx_dir / "gx" / "uncommitted" / "manifest_cache").glob("*.json"))


# --------------------------------------------------------------------------------------------
# The subject split
# --------------------------------------------------------------------------------------------
def test_check_split_names_subjects_in_two_parts():
    from pipeline.config import SplitParams
    from pipeline.split import create_assignment, split_frames

    frames = pd.DataFrame({
        "frame_id": [f"{s}_{n}" for s in range(1, 8) for n in (1, 2)],
        "subject": [s for s in range(1, 8) for _ in (1, 2)],
    })
    clean = split_frames(frames, create_assignment(list(range(1, 8)), SplitParams()))
    assert check_split(clean).empty
    assert_no_subject_leak(clean)

    leaky = clean.copy()
    holdout_subject = int(leaky.loc[leaky["split"] == "holdout", "subject"].iloc[0])
    leaky.loc[leaky["frame_id"] == f"{holdout_subject}_2", "split"] = "train"
    leaks = check_split(leaky)
    assert leaks["subject"].tolist() == [holdout_subject]
    assert leaks["parts"].tolist() == ["holdout,train"]
    with pytest.raises(SubjectLeakError, match=f"subject {holdout_subject} in holdout,train"):
        assert_no_subject_leak(leaky)


# --------------------------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------------------------
def test_drift_against_a_previous_profile_warns_with_the_figures(tmp_path, gx_dir):
    data = make_dataset(tmp_path)
    manifest = build_manifest(data)
    profile = compute_profile(manifest)
    assert profile["empty_share"] == 0.5 and profile["mask_area_p50"] == 7200.0

    same = validate_manifest(manifest, RULES, gx_dir, build_docs=False, previous_profile=profile)
    assert same.success and same.failures == [] and same.drift["drifted"] is False

    darker = {**profile, "intensity_mean": profile["intensity_mean"] + 40, "empty_share": 0.9,
              "dvc_hash": "0123456789abcdef.dir"}
    report = validate_manifest(manifest, RULES, gx_dir, build_docs=False, previous_profile=darker)
    assert report.success  # a warning by default
    (warning,) = report.warnings
    assert warning.check == "drift" and set(warning.column.split(", ")) == {
        "intensity_mean", "empty_share"
    }
    figures = warning.details["figures"]
    assert figures["empty_share"]["previous"] == 0.9 and figures["empty_share"]["current"] == 0.5
    assert "0123456789ab" in report.format_failures()
    assert "empty_share 0.9 -> 0.5 (!)" in report.to_markdown()

    blocking = RULES.model_copy(update={"warning_checks": ()})
    assert not validate_manifest(
        manifest, blocking, gx_dir, build_docs=False, previous_profile=darker
    ).success
    assert compare_profiles(profile, profile, RULES)["drifted"] is False


# --------------------------------------------------------------------------------------------
# The table of checks: a name always reaches the report with its own rule and severity
# --------------------------------------------------------------------------------------------
NAMES = [c.name for c in CHECKS]
# Every second check warns, so a name shifted by one place onto its neighbour's rule would show up
# in the severity as well as in the column.
MIXED = RULES.model_copy(update={"warning_checks": tuple(NAMES[1::2])})



def _of(manifest: pd.DataFrame, frame_id: str, column: str):
    return manifest.loc[manifest["frame_id"] == frame_id, column].iloc[0]


# For each declared check: what to change in row 2_1 (a frame with a nerve; a function of the manifest
# or a value), in the rules, or in the previous version's profile so that this check, and no other, fails.
BREAK = {
    "row_count": ({}, {"min_frames": 7}, {}),
    "subject_count": ({}, {"min_subjects": 4}, {}),
    "names": ({"name_ok": False}, {}, {}),
    "unique_ids": ({"frame_id": "1_1"}, {}, {}),
    "mask_for_frame": ({"mask_exists": False}, {}, {}),
    "frame_for_mask": ({"image_exists": False}, {}, {}),
    "frame_decodes": ({"image_decodes": False}, {}, {}),
    "mask_decodes": ({"mask_decodes": False}, {}, {}),
    "frame_height": ({"height": H - 20}, {}, {}),
    "frame_width": ({"width": W - 20}, {}, {}),
    "frame_channels": ({"channels": 3}, {}, {}),
    "frame_dtype": ({"dtype": "uint16"}, {}, {}),
    "mask_height": ({"mask_height": H - 20}, {}, {}),
    "mask_width": ({"mask_width": W - 20}, {}, {}),
    "mask_channels": ({"mask_channels": 3}, {}, {}),
    "mask_binary": ({"mask_binary": False}, {}, {}),
    "mask_area": ({"mask_area": 100}, {}, {}),
    "not_blank": ({"intensity_std": 0.5}, {}, {}),
    "not_saturated": ({"intensity_mean": 252.0}, {}, {}),
    "contradicting_duplicates": ({"phash": lambda m: _of(m, "2_2", "phash")}, {}, {}),  # 2_2's mask is empty
    "drift": ({}, {}, {"intensity_mean": 40.0}),
}


def test_each_check_is_declared_once_and_params_name_only_declared_checks():
    assert len(NAMES) == len(set(NAMES))
    assert set(ValidationParams().warning_checks) <= set(NAMES)
    # config.py keeps its own list to reject unknown names in params.yaml: it must be this table's.
    assert ValidationParams.CHECKS == tuple(NAMES)
    assert set(BREAK) == set(NAMES)  # a new check gets a case below


def test_suite_expectations_carry_their_own_check():
    from pipeline.validation import build_expectations

    expectations = build_expectations(MIXED)
    gx_checks = [c for c in CHECKS if c.expectation]
    assert [e.meta["check"] for e in expectations] == [c.name for c in gx_checks]
    for expectation, check in zip(expectations, gx_checks, strict=True):
        assert getattr(expectation, "column", None) == check.column
        assert expectation.description == check.describe(MIXED)
        assert expectation.severity.value == ("warning" if check.name in MIXED.warning_checks else "critical")


@pytest.fixture(scope="module")
def clean_manifest(tmp_path_factory) -> pd.DataFrame:
    return build_manifest(make_dataset(tmp_path_factory.mktemp("table")))


@pytest.mark.parametrize("name", NAMES)
def test_breaking_one_rule_fails_that_check_by_name_with_its_severity(name, clean_manifest, tmp_path_factory):
    row_changes, rule_changes, drifted = BREAK[name]
    manifest = clean_manifest.copy()
    row = manifest.index[manifest["frame_id"] == "2_1"][0]
    for column, value in row_changes.items():
        manifest.loc[row, column] = value(manifest) if callable(value) else value
    rules = MIXED.model_copy(update=rule_changes)
    profile = compute_profile(clean_manifest)
    previous = {**profile, **{k: profile[k] + v for k, v in drifted.items()}, "dvc_hash": "feed"} if drifted else None

    gx_dir = tmp_path_factory.getbasetemp() / "gx_table"  # one project: the suite is stored once
    report = validate_manifest(manifest, rules, gx_dir, build_docs=False, previous_profile=previous)

    check = BY_NAME[name]
    expected = "warning" if name in MIXED.warning_checks else "blocking"
    assert [(f.check, f.severity) for f in report.failures] == [(name, expected)], report.format_failures()
    failure = report.failures[0]
    assert failure.description.startswith(check.describe(rules))
    if check.expectation:
        assert failure.column == check.column
    assert report.success is (expected == "warning")
