import numpy as np

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
