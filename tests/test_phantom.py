"""Tests of the synthetic ultrasound phantom (pipeline/phantom.py)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import phantom
from pipeline.phantom import PhantomSpec, generate_phantom, synth_frame

SMALL = PhantomSpec(subjects=3, frames_per_subject=4)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One small phantom on disk, shared by the read-only tests: (folder, manifest)."""
    out = tmp_path_factory.mktemp("phantom")
    return out, generate_phantom(out, SMALL)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", f"{path.name} is {im.mode}, not 8-bit grayscale"
        return np.array(im)


def _runs(flags) -> int:
    """Number of maximal runs of True in a sequence."""
    flags = [False, *flags]
    return sum(1 for a, b in pairwise(flags) if b and not a)


def test_layout_names_and_manifest(small):
    out, df = small
    expected = {f"{s}_{n}{suffix}.tif" for s in range(1, 4) for n in range(1, 5) for suffix in ("", "_mask")}
    assert {p.name for p in (out / "train").iterdir()} == expected  # no temporary files left behind
    assert list(df.columns) == ["frame_id", "subject", "n", "has_nerve", "mask_area"]
    assert len(df) == 12
    assert df.frame_id.tolist()[:5] == ["1_1", "1_2", "1_3", "1_4", "2_1"]
    assert (df.frame_id == df.subject.astype(str) + "_" + df.n.astype(str)).all()


def test_frames_read_back_as_8bit_grayscale(small):
    out, df = small
    for frame_id in df.frame_id:
        image = _read(out / "train" / f"{frame_id}.tif")
        assert image.shape == (420, 580) and image.dtype == np.uint8
        assert image.std() > 20, f"{frame_id} looks blank"
        # Depth attenuation: the deepest quarter is darker than the tissue under the skin.
        assert image[315:].mean() < image[60:165].mean()
    # Other readers the pipeline may use agree on the shape.
    first = out / "train" / "1_1.tif"
    assert cv2.imread(str(first), cv2.IMREAD_UNCHANGED).shape == (420, 580)


def test_masks_are_binary_and_match_manifest(small):
    out, df = small
    for row in df.itertuples():
        mask = _read(out / "train" / f"{row.frame_id}_mask.tif")
        assert mask.shape == (420, 580)
        assert set(np.unique(mask)) <= {0, 255}
        assert int((mask == 255).sum()) == row.mask_area
        assert row.has_nerve == (row.mask_area > 0)


def test_same_spec_gives_byte_identical_files(small, tmp_path):
    out, df = small
    # Forget the cached subjects so the second run really renders everything again.
    phantom._subject_plan.cache_clear()
    phantom._subject_world.cache_clear()
    df2 = generate_phantom(tmp_path, SMALL)
    assert df2.equals(df)
    for path in sorted((out / "train").iterdir()):
        assert (tmp_path / "train" / path.name).read_bytes() == path.read_bytes(), path.name


def test_subject_does_not_depend_on_subject_count():
    few, many = PhantomSpec(subjects=2, frames_per_subject=5), PhantomSpec(subjects=9, frames_per_subject=5)
    a_img, a_mask = synth_frame(few, 2, 3)
    b_img, b_mask = synth_frame(many, 2, 3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    other_seed, _ = synth_frame(PhantomSpec(subjects=2, frames_per_subject=5, seed=7), 2, 3)
    assert not np.array_equal(a_img, other_seed)


def test_sweep_neighbours_are_near_duplicates_subjects_are_not():
    spec = PhantomSpec(subjects=2, frames_per_subject=6)
    f1, f2 = synth_frame(spec, 1, 3)[0], synth_frame(spec, 1, 4)[0]
    other = synth_frame(spec, 2, 3)[0]
    assert not np.array_equal(f1, f2)  # fresh speckle, moved probe
    assert np.corrcoef(f1.ravel(), f2.ravel())[0, 1] > 0.8
    assert np.corrcoef(f1.ravel(), other.ravel())[0, 1] < 0.6


def test_nerve_is_the_difference_between_a_run_edge_and_its_empty_neighbour():
    """Where the nerve leaves the plane, the frames differ mostly where the nerve was."""
    spec = PhantomSpec(subjects=4, frames_per_subject=30)
    for subject in range(1, 5):
        present = phantom._subject_plan(spec.seed, subject, 420, 580, 30).present
        edges = [n for n in range(1, 30) if present[n - 1] and not present[n]]
        if edges:
            break
    n = edges[0]
    with_nerve, mask = synth_frame(spec, subject, n)
    without, empty = synth_frame(spec, subject, n + 1)
    assert mask.any() and not empty.any()
    diff = np.abs(with_nerve.astype(float) - without.astype(float))
    inside = diff[mask > 0].mean()
    outside = diff[mask == 0].mean()
    assert inside > 1.5 * outside, (inside, outside)


def test_statistics_follow_the_real_data():
    """Empty share, mask areas, runs and single-blob masks on a 20 x 20 spec (masks only: fast)."""
    spec = PhantomSpec(subjects=20, frames_per_subject=20)
    areas = np.zeros((20, 20), int)
    for s in range(1, 21):
        for n in range(1, 21):
            mask = phantom._frame_mask(spec, s, n)
            areas[s - 1, n - 1] = int((mask > 0).sum())
            if areas[s - 1, n - 1]:
                count, _ = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
                assert count == 2, f"mask {s}_{n} is not one blob"  # background + one component
    present = areas > 0
    assert 0.45 <= 1 - present.mean() <= 0.72
    assert 5500 <= np.median(areas[present]) <= 8500
    assert 3000 <= np.percentile(areas[present], 5) and np.percentile(areas[present], 95) <= 14000
    per_subject_empty = 1 - present.mean(axis=1)
    assert per_subject_empty.max() - per_subject_empty.min() > 0.5  # subjects differ strongly
    # The nerve enters and leaves the plane: positives come in at most two runs per subject.
    assert all(_runs(row) <= 2 for row in present)
    # The real helper gives the same masks as the full renderer.
    assert np.array_equal(phantom._frame_mask(spec, 3, 5), synth_frame(spec, 3, 5)[1])


def test_rejects_impossible_specs(tmp_path):
    with pytest.raises(ValueError, match="at least one subject"):
        generate_phantom(tmp_path, PhantomSpec(subjects=0))
    with pytest.raises(ValueError, match="320x440"):
        synth_frame(PhantomSpec(height=100, width=100), 1, 1)
    with pytest.raises(ValueError, match="outside"):
        synth_frame(SMALL, 1, 5)
