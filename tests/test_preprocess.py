import numpy as np
import pytest

from pipeline.imageio import read_gray
from pipeline.preprocess import load_prepared
from pipeline.split import load_assignment


def test_prepared_arrays_match_working_size_and_split(prepared, tiny_params):
    data = load_prepared(prepared.prepared_dir)
    h, w = tiny_params.preprocess.height, tiny_params.preprocess.width
    assert data.images.shape == (24, h, w) and data.images.dtype == np.uint8
    assert set(np.unique(data.masks)) <= {0, 1}
    assert set(data.frames["split"]) == {"train", "validation", "holdout"}
    assert data.frames.groupby("subject")["split"].nunique().max() == 1
    # the masks of frames with a nerve survive the resize
    assert (data.masks.reshape(24, -1).sum(1) > 0).tolist() == data.frames["has_nerve"].tolist()
    # The network's normalisation: the train frames' intensity (0-1 scale), not the validation or holdout frames'.
    train, _, _ = data.part("train")
    assert data.summary.intensity_mean == pytest.approx(train.mean() / 255, abs=1e-6)
    assert data.summary.intensity_std == pytest.approx((train / 255).std(), abs=1e-6)


def test_split_is_recorded_with_native_areas(prepared):
    data = load_prepared(prepared.prepared_dir)
    # The parts are the recorded split's, and the summary lists each part's subjects.
    recorded = load_assignment(prepared.split_file).parts()
    assert data.frames.groupby("subject")["split"].first().to_dict() == recorded
    assert data.summary.subjects == {part: sorted(s for s, p in recorded.items() if p == part)
                                     for part in ("train", "validation", "holdout")}
    assert all(data.summary.subjects.values())
    # Areas in native pixels, counted on the 420x580 masks, not the working-size ones.
    native = [int((read_gray(prepared.raw_dir / path) > 0).sum()) for path in data.frames["mask_path"]]
    assert data.frames["mask_area"].tolist() == native
    assert min(a for a in native if a) > 5000  # a 55x40 ellipse


def test_mask_coverage_keeps_the_outline_that_the_working_grid_rounds_off(prepared):
    data = load_prepared(prepared.prepared_dir)
    assert data.coverage.shape == data.masks.shape and data.coverage.dtype == np.uint8
    # The 0/1 mask is the coverage thresholded at half a pixel...
    assert np.array_equal(data.masks, (data.coverage >= 128).astype(np.uint8))
    # ... and the outline's pixels are partly covered, which the 0/1 mask cannot say.
    edge = (data.coverage > 0) & (data.coverage < 255)
    assert edge.any()
    soft = data.part_targets("train", soft=True)
    assert soft.dtype == np.float32 and 0 < soft[soft > 0].min() < 1 and soft.max() == 1
    assert np.array_equal(data.part_targets("train", soft=False), data.part("train")[1])
    # The native area agrees with the coverage's sum (in working pixels), unlike the rounded mask's.
    scale = 420 * 580 / (data.summary.height * data.summary.width)
    nerve = data.frames["has_nerve"].to_numpy()
    area = data.frames["mask_area"].to_numpy()[nerve]
    covered = data.coverage[nerve].reshape(nerve.sum(), -1).sum(1) / 255 * scale
    assert np.allclose(covered, area, rtol=0.02)


def test_soft_targets_need_prepared_data_with_coverage(prepared):
    data = load_prepared(prepared.prepared_dir)
    # An arrays.npz written before the coverage was stored.
    arrays = prepared.prepared_dir / "arrays.npz"
    np.savez_compressed(arrays, images=data.images, masks=data.masks)
    old = load_prepared(prepared.prepared_dir)
    assert old.coverage is None
    assert np.array_equal(old.part_targets("train", soft=False), data.part("train")[1])
    with pytest.raises(ValueError, match=r"arrays\.npz: no 'coverage' array.*run the preprocess stage again"):
        old.part_targets("train", soft=True)
