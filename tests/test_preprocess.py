import numpy as np
import pytest

from pipeline.preprocess import load_prepared


def test_prepared_arrays_match_working_size_and_split(prepared, tiny_params):
    data = load_prepared(prepared.prepared_dir)
    h, w = tiny_params.preprocess.height, tiny_params.preprocess.width
    assert data.images.shape == (24, h, w) and data.images.dtype == np.uint8
    assert set(np.unique(data.masks)) <= {0, 1}
    assert set(data.frames["split"]) == {"train", "validation", "holdout"}
    assert data.frames.groupby("subject")["split"].nunique().max() == 1
    # the masks of frames with a nerve survive the resize
    assert (data.masks.reshape(24, -1).sum(1) > 0).tolist() == data.frames["has_nerve"].tolist()
    assert 0 < data.summary.intensity_mean < 1 and data.summary.intensity_std > 0


def test_split_is_recorded_with_native_areas(prepared):
    data = load_prepared(prepared.prepared_dir)
    assert data.summary.subjects["holdout"]
    assert data.frames.loc[data.frames.has_nerve, "mask_area"].min() > 5000  # native pixels, 55x40 ellipse


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
