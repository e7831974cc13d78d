"""Importers into the canonical data/raw layout: formats, letterbox, manifests, refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.imageio import read_gray
from pipeline.importers import DataImportError, detect_format, import_source, letterbox_rows
from pipeline.rle import rle_encode


def _frame(seed: int, nerve: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.rayleigh(60, (420, 580)).clip(0, 255).astype(np.uint8), (9, 9), 0)
    mask = np.zeros((420, 580), np.uint8)
    if nerve:
        cv2.ellipse(mask, (260 + seed, 200), (60, 40), 0, 0, 360, 255, -1)
        image[mask > 0] //= 3
    return image, mask


def _letterbox(image: np.ndarray, fill: int) -> np.ndarray:
    canvas = np.full((256, 256), fill, np.uint8)
    canvas[35:221] = cv2.resize(image, (256, 186), interpolation=cv2.INTER_AREA)
    return canvas


def _snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folders_png_and_lossy_jpeg_masks(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i, (s, n) in enumerate([(3, 1), (3, 2), (4, 1)]):
        image, mask = _frame(i, nerve=n == 1)
        cv2.imwrite(str(src / "images" / f"{s}_{n}.png"), image)
        cv2.imwrite(str(src / "masks" / f"{s}_{n}_mask.jpg"), mask, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert detect_format(src) == "folders"
    raw = tmp_path / "raw"
    result = import_source(src, raw)
    assert sorted(p.name for p in (raw / "train").iterdir()) == [
        "3_1.tif", "3_1_mask.tif", "3_2.tif", "3_2_mask.tif", "4_1.tif", "4_1_mask.tif"]
    mask = read_gray(raw / "train" / "3_1_mask.tif")
    _, truth = _frame(0, True)
    assert set(np.unique(mask)) == {0, 255}
    assert np.count_nonzero(mask != truth) < 0.01 * np.count_nonzero(truth)
    assert np.array_equal(read_gray(raw / "train" / "3_1.tif"), read_gray(src / "images" / "3_1.png"))
    manifest = pd.read_csv(raw / result.manifest_path)
    assert list(manifest.frame_id) == ["3_1", "3_2", "4_1"]
    assert list(manifest.has_mask) == [True, True, True] and manifest.mask_area.iloc[1] == 0
    assert manifest.source_mask.iloc[0] == "masks/3_1_mask.jpg"
    assert result.added == ["train/3_1", "train/3_2", "train/4_1"]
    # the same import again changes nothing
    again = import_source(src, raw)
    assert again.added == [] and again.replaced == [] and len(again.unchanged) == 3


def test_letterboxed_export_is_detected_and_undone(tmp_path):
    src = tmp_path / "boxed"
    src.mkdir()
    image, mask = _frame(5, nerve=True)
    cv2.imwrite(str(src / "7_9.jpg"), cv2.cvtColor(_letterbox(image, 128), cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(src / "7_9_mask.jpg"), _letterbox(mask, 0))
    assert letterbox_rows(read_gray(src / "7_9.jpg")) == (35, 186)
    assert letterbox_rows(image) is None
    result = import_source(src, tmp_path / "raw")
    frame = read_gray(tmp_path / "raw" / "train" / "7_9.tif")
    got = read_gray(tmp_path / "raw" / "train" / "7_9_mask.tif") > 0
    assert frame.shape == (420, 580) and bool(result.manifest.letterboxed.iloc[0])
    assert np.corrcoef(frame.ravel(), image.ravel())[0, 1] > 0.9
    dice = 2 * (got & (mask > 0)).sum() / (got.sum() + (mask > 0).sum())
    assert dice > 0.95
    # without detection it is a wrongly sized frame, named
    with pytest.raises(DataImportError, match=r"7_9\.jpg: frame is 256x256, expected 420x580"):
        import_source(src, tmp_path / "raw2", letterbox="no")


def test_competition_layout_with_csv_masks_and_test(tmp_path):
    src = tmp_path / "kaggle"
    (src / "train").mkdir(parents=True)
    (src / "test").mkdir()
    rows = ["subject,img,pixels"]
    for n in (1, 2):
        image, mask = _frame(n, nerve=n == 1)
        cv2.imwrite(str(src / "train" / f"2_{n}.tif"), image)
        rows.append(f"2,{n},{rle_encode(mask)}")
    rows.append("9,9,1 5")  # a row for a frame that is not here: ignored
    (src / "train_masks.csv").write_text("\n".join(rows) + "\n")
    cv2.imwrite(str(src / "test" / "12.tif"), _frame(7, False)[0])
    assert detect_format(src) == "competition"
    raw = tmp_path / "raw"
    result = import_source(src, raw)
    assert np.array_equal(read_gray(raw / "train" / "2_1_mask.tif"), _frame(1, True)[1])
    assert (raw / "test" / "12.tif").is_file() and not (raw / "test" / "12_mask.tif").exists()
    assert result.n_train == 2 and result.n_test == 1
    assert list(result.manifest.source_mask) == ["train_masks.csv:2", "train_masks.csv:3", ""]
    assert list(result.manifest.split) == ["train", "train", "test"]


def test_replace_reports_removed_frames(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, ids in ((a, [(1, 1), (1, 2)]), (b, [(1, 2), (2, 1)])):
        folder.mkdir()
        for s, n in ids:
            image, mask = _frame(s * 10 + n, nerve=False)
            cv2.imwrite(str(folder / f"{s}_{n}.tif"), image)
            cv2.imwrite(str(folder / f"{s}_{n}_mask.tif"), mask)
    raw = tmp_path / "raw"
    import_source(a, raw)
    result = import_source(b, raw, replace=True)
    assert result.removed == ["train/1_1"] and result.added == ["train/2_1"] and result.unchanged == ["train/1_2"]
    assert sorted(p.name for p in (raw / "train").glob("*.tif")) == ["1_2.tif", "1_2_mask.tif", "2_1.tif",
                                                                     "2_1_mask.tif"]
    assert sorted(p.name for p in (raw / "manifests").iterdir()) == ["a.csv", "b.csv"]


@pytest.mark.parametrize("case, words", [
    ("not_an_image", r"5_2\.png: not a readable image"),
    ("text_suffix", r"notes\.txt: not an image file"),
    ("orphan_mask", r"6_1_mask\.png: a mask without its frame"),
    ("wrong_size", r"5_3\.png: frame is 100x120, expected 420x580"),
    ("bad_name", r"scan\.png: name does not follow \{subject\}_\{n\}"),
    ("csv_row", r"train_masks\.csv, line 3 \(img 5_2\): does not decode to a 420x580 mask"),
])
def test_bad_input_is_named_and_nothing_is_touched(tmp_path, case, words):
    raw = tmp_path / "raw"
    good = tmp_path / "good"
    good.mkdir()
    image, mask = _frame(1, True)
    cv2.imwrite(str(good / "5_1.png"), image)
    cv2.imwrite(str(good / "5_1_mask.png"), mask)
    import_source(good, raw)
    before = _snapshot(raw)

    src = tmp_path / "bad"
    src.mkdir()
    cv2.imwrite(str(src / "5_1.png"), image)
    cv2.imwrite(str(src / "5_1_mask.png"), mask)
    if case == "not_an_image":
        (src / "5_2.png").write_bytes(b"this is not a PNG")
        cv2.imwrite(str(src / "5_2_mask.png"), mask)
    elif case == "text_suffix":
        (src / "notes.txt").write_text("hello")
    elif case == "orphan_mask":
        cv2.imwrite(str(src / "6_1_mask.png"), mask)
    elif case == "wrong_size":
        cv2.imwrite(str(src / "5_3.png"), np.full((100, 120), 60, np.uint8))
        cv2.imwrite(str(src / "5_3_mask.png"), np.zeros((100, 120), np.uint8))
    elif case == "bad_name":
        cv2.imwrite(str(src / "scan.png"), image)
        cv2.imwrite(str(src / "scan_mask.png"), mask)
    elif case == "csv_row":
        for p in list(src.iterdir()):
            p.unlink()
        (src / "train").mkdir()
        cv2.imwrite(str(src / "train" / "5_2.tif"), image)
        (src / "train_masks.csv").write_text(f"subject,img,pixels\n5,1,\n5,2,{420 * 580 - 3} 10\n")
    with pytest.raises(DataImportError, match=words):
        import_source(src, raw)
    assert _snapshot(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "raw"]  # no staging left behind


@pytest.mark.realdata
def test_real_train_and_test(shared_data, tmp_path):
    raw = tmp_path / "raw"
    train = import_source(shared_data / "train", raw)
    assert train.format == "folders" and train.n_train == 56 and train.manifest.subject.nunique() == 7
    for row in train.manifest.itertuples():  # canonical TIFFs are copied byte for byte
        assert (raw / row.image_path).read_bytes() == (shared_data / "train" / row.source_image).read_bytes()
        assert (raw / row.mask_path).read_bytes() == (shared_data / "train" / row.source_mask).read_bytes()
    assert int((train.manifest.mask_area == 0).sum()) == 26
    test = import_source(shared_data / "test", raw)
    assert test.format == "unlabeled" and test.n_test == 50 and test.n_train == 0
    assert len(list((raw / "test").glob("*.tif"))) == 50
    assert sorted(p.name for p in (raw / "manifests").iterdir()) == ["test.csv", "train.csv"]


@pytest.mark.realdata
def test_real_competition_root_takes_masks_from_files(shared_data, tmp_path):
    result = import_source(shared_data, tmp_path / "raw", name="kaggle")
    assert result.format == "competition" and result.n_train == 56 and result.n_test == 50
    assert (tmp_path / "raw" / "manifests" / "kaggle.csv").is_file()


@pytest.mark.realdata
def test_real_positives_256_undoes_the_letterbox(shared_data, tmp_path):
    raw = tmp_path / "raw"
    result = import_source(shared_data / "positives-256", raw)
    m = result.manifest
    assert result.n_train == 2323 and m.subject.nunique() == 47
    assert m.letterboxed.all() and (m.mask_area > 0).all()
    assert m.mask_area.median() == pytest.approx(6976, rel=0.05)
    # frames present at full resolution in train/ too: the import matches them
    originals = sorted(p for p in (shared_data / "train").glob("*_mask.tif") if read_gray(p).any())
    assert len(originals) >= 20
    for mask_path in originals:
        frame_id = mask_path.name.removesuffix("_mask.tif")
        truth = read_gray(mask_path) > 0
        got = read_gray(raw / "train" / f"{frame_id}_mask.tif") > 0
        assert 2 * (truth & got).sum() / (truth.sum() + got.sum()) > 0.95, frame_id
        a = read_gray(raw / "train" / f"{frame_id}.tif").astype(float).ravel()
        b = read_gray(shared_data / "train" / f"{frame_id}.tif").astype(float).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.97, frame_id


def test_keep_existing_keeps_the_files_already_there(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seed in ((a, 1), (b, 2)):
        folder.mkdir()
        image, mask = _frame(seed, nerve=True)
        cv2.imwrite(str(folder / "1_1.tif"), image)
        cv2.imwrite(str(folder / "1_1_mask.tif"), mask)
    cv2.imwrite(str(b / "1_2.tif"), _frame(3, False)[0])
    cv2.imwrite(str(b / "1_2_mask.tif"), _frame(3, False)[1])
    raw = tmp_path / "raw"
    import_source(a, raw)
    original = (raw / "train" / "1_1.tif").read_bytes()
    result = import_source(b, raw, keep_existing=True)
    assert result.kept == ["train/1_1"] and result.added == ["train/1_2"] and result.replaced == []
    assert (raw / "train" / "1_1.tif").read_bytes() == original
    assert list(result.manifest.status) == ["kept", "added"]


def test_colour_tiff_is_converted_to_gray(tmp_path):
    src = tmp_path / "colour"
    src.mkdir()
    image, mask = _frame(4, nerve=True)
    cv2.imwrite(str(src / "2_3.tif"), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(src / "2_3_mask.tif"), cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR))
    import_source(src, tmp_path / "raw")
    for name in ("2_3.tif", "2_3_mask.tif"):
        stored = cv2.imread(str(tmp_path / "raw" / "train" / name), cv2.IMREAD_UNCHANGED)
        assert stored.ndim == 2 and stored.dtype == np.uint8
