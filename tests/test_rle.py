"""The competition's run-length encoding: column-major, 1-indexed, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.rle import RLEError, read_rle_csv, rle_decode, rle_encode, write_submission


def test_column_major_one_indexed():
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 0] = mask[1, 0] = 1  # pixels 1 and 2: down the first column
    mask[0, 1] = 255             # pixel 4: top of the second column
    mask[2, 3] = 1               # pixel 12: the last one
    assert rle_encode(mask) == "1 2 4 1 12 1"
    assert np.array_equal(rle_decode("1 2 4 1 12 1", 3, 4), (mask > 0).astype(np.uint8))


def test_empty_full_and_random_round_trip():
    assert rle_encode(np.zeros((420, 580), np.uint8)) == ""
    assert rle_decode("").shape == (420, 580) and rle_decode("").sum() == 0
    assert rle_encode(np.ones((420, 580))) == f"1 {420 * 580}"
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (rng.random((420, 580)) > rng.random()).astype(np.uint8)
        decoded = rle_decode(rle_encode(mask))
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, mask)


@pytest.mark.parametrize("text, words", [
    ("1 2 3", "odd number"),
    ("1 2 x 3", "'x'"),
    ("0 5", "1-indexed"),
    ("5 0", "length 0"),
    (f"{420 * 580} 2", "beyond the 420x580 frame"),
    ("10 5 12 3", "not ascending"),
    ("10 5 3 1", "not ascending"),
])
def test_malformed_strings_are_clear_errors(text, words):
    with pytest.raises(ValueError) as info:
        rle_decode(text)
    assert isinstance(info.value, RLEError)
    assert words in str(info.value)


def test_read_both_headers_and_write_submission(tmp_path):
    (tmp_path / "train_masks.csv").write_text("subject,img,pixels\n1,1,1 2\n1,2,\n10,3,5 1\n")
    table = read_rle_csv(tmp_path / "train_masks.csv")
    assert list(table.frame_id) == ["1_1", "1_2", "10_3"] and list(table.pixels) == ["1 2", "", "5 1"]
    assert list(table.subject) == [1, 1, 10]
    masks = [("1", rle_decode("1 2")), ("2", np.zeros((420, 580), np.uint8)), ("3", rle_decode("7 3 900 10"))]
    out = tmp_path / "submission.csv"
    assert write_submission(out, masks) == 3
    assert out.read_text() == "img,pixels\n1,1 2\n2,\n3,7 3 900 10\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    back = read_rle_csv(out)
    assert list(back.frame_id) == ["1", "2", "3"] and back.subject.isna().all()
    (tmp_path / "bad.csv").write_text("id,mask\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv: expected the header"):
        read_rle_csv(tmp_path / "bad.csv")


@pytest.mark.realdata
def test_real_csv_reproduces_every_train_mask(shared_data):
    from pipeline.imageio import read_gray

    table = read_rle_csv(shared_data / "train_masks.csv").set_index("frame_id")
    masks = sorted((shared_data / "train").glob("*_mask.tif"))
    assert len(masks) == 56
    for path in masks:
        truth = read_gray(path)
        decoded = rle_decode(table.loc[path.name.removesuffix("_mask.tif"), "pixels"])
        assert np.array_equal(decoded * 255, truth), path.name
        # row-major order would not reproduce it
        if truth.any():
            assert rle_encode(truth) == table.loc[path.name.removesuffix("_mask.tif"), "pixels"]


@pytest.mark.realdata
def test_real_csv_round_trips_all_rows(shared_data):
    table = read_rle_csv(shared_data / "train_masks.csv")
    assert len(table) == 5635 and table.subject.nunique() == 47
    assert (table.pixels == "").sum() == 3312
    for frame_id, pixels in zip(table.frame_id, table.pixels):
        assert rle_encode(rle_decode(pixels)) == pixels, frame_id
