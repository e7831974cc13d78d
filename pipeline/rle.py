"""The competition's run-length encoding of masks, exactly.

A mask is written as space-separated ``start length`` pairs. Pixels are numbered from 1,
top to bottom, then left to right (column-major: pixel 2 is the one *below* pixel 1), runs are
in ascending order and never touch or overlap. An empty mask is the empty string.

- :func:`rle_encode` / :func:`rle_decode`: one mask.
- :func:`read_rle_csv`: the competition's ``train_masks.csv`` (header ``subject,img,pixels``, as in
  ``../shared/datasets/kaggle-uns``) or a submission-like file (header ``img,pixels``).
- :func:`write_submission`: a submission file (header ``img,pixels``), written atomically.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_write_text

HEIGHT = 420
WIDTH = 580
_RLE_TEXT = re.compile(r"^[0-9 ]*$")


class RLEError(ValueError):
    """A run-length string that does not decode to a mask of the expected size."""


def rle_encode(mask: np.ndarray) -> str:
    """Encode a (H, W) mask (nonzero = nerve) as column-major, 1-indexed ``start length`` pairs.

    Returns ``""`` for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode: expected a 2-D mask (H, W), got shape {mask.shape}")
    pixels = np.ascontiguousarray(mask.T).reshape(-1) != 0  # column-major order
    if not pixels.any():
        return ""
    edges = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1  # 0-indexed: run starts and (exclusive) ends
    if pixels[0]:
        edges = np.concatenate(([0], edges))
    if pixels[-1]:
        edges = np.concatenate((edges, [pixels.size]))
    starts, ends = edges[0::2], edges[1::2]
    runs = np.empty(2 * len(starts), dtype=np.int64)
    runs[0::2] = starts + 1
    runs[1::2] = ends - starts
    return " ".join(map(str, runs.tolist()))


def rle_runs(rle: str | float | None, height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check a run-length string; returns 0-indexed starts and lengths.

    Raises :class:`RLEError` (a ``ValueError``) naming the problem for anything that is not
    ascending, non-overlapping pairs of positive integers inside a ``height`` x ``width`` frame.
    """
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        rle = ""
    if not isinstance(rle, str):
        raise RLEError(f"run-length encoding must be a string, got {type(rle).__name__}")
    text = rle.strip()
    if not text:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if not _RLE_TEXT.match(text):
        bad = next(ch for ch in text if not (ch.isdigit() or ch == " "))
        raise RLEError(f"run-length encoding holds {bad!r}: only digits and spaces are allowed")
    values = np.array(text.split(), dtype=np.int64)
    if len(values) % 2:
        raise RLEError(f"run-length encoding has an odd number of values ({len(values)}): "
                       "expected `start length` pairs")
    starts, lengths = values[0::2] - 1, values[1::2]
    total = height * width
    if (starts < 0).any():
        raise RLEError("run-length encoding has a start of 0: starts are 1-indexed")
    if (lengths < 1).any():
        i = int(np.flatnonzero(lengths < 1)[0])
        raise RLEError(f"run-length encoding has a run of length {int(lengths[i])} at start {int(starts[i]) + 1}")
    ends = starts + lengths
    if (ends > total).any():
        i = int(np.flatnonzero(ends > total)[0])
        raise RLEError(
            f"run {int(starts[i]) + 1} {int(lengths[i])} ends at pixel {int(ends[i])}, beyond the "
            f"{height}x{width} frame ({total} pixels)"
        )
    if len(starts) > 1 and (starts[1:] < ends[:-1]).any():
        i = int(np.flatnonzero(starts[1:] < ends[:-1])[0]) + 1
        raise RLEError(f"run-length encoding is not ascending: run {int(starts[i]) + 1} starts before the "
                       f"previous run ends (pixel {int(ends[i - 1])})")
    return starts, lengths


def rle_decode(rle: str, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Decode a run-length string to a (height, width) uint8 mask with values {0, 1}.

    Raises ``ValueError`` (:class:`RLEError`) for malformed strings or runs beyond the frame.
    """
    starts, lengths = rle_runs(rle, height, width)
    columns = np.zeros((width, height), dtype=np.uint8)  # column-major: row i of this is column i
    flat = columns.reshape(-1)
    for start, end in zip(starts.tolist(), (starts + lengths).tolist()):
        flat[start:end] = 1
    return np.ascontiguousarray(columns.T)


def read_rle_csv(path: Path | str) -> pd.DataFrame:
    """Read ``train_masks.csv`` (``subject,img,pixels``) or a submission (``img,pixels``).

    Returns a DataFrame with columns ``frame_id`` (``{subject}_{img}``, or ``img`` when there is no
    subject column), ``subject`` (nullable Int64), ``img`` (str) and ``pixels`` (str, ``""`` for an
    empty mask). Rows are not decoded here; :func:`rle_decode` does that.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc})") from exc
    columns = [c.strip() for c in table.columns]
    table.columns = columns
    if not {"img", "pixels"} <= set(columns):
        raise ValueError(f"{path}: expected the header `subject,img,pixels` or `img,pixels`, found "
                         f"`{','.join(columns)}`")
    img = table["img"].str.strip()
    if "subject" in columns:
        subject_text = table["subject"].str.strip()
        bad = ~subject_text.str.fullmatch(r"\d+")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise ValueError(f"{path}, line {row}: subject {subject_text.iloc[row - 2]!r} is not a number")
        subject = pd.to_numeric(subject_text).astype("Int64")
        frame_id = subject_text.str.lstrip("0").replace("", "0") + "_" + img
    else:
        subject = pd.Series(pd.NA, index=table.index, dtype="Int64")
        frame_id = img
    return pd.DataFrame({
        "frame_id": frame_id.astype(str),
        "subject": subject,
        "img": img.astype(str),
        "pixels": table["pixels"].fillna("").astype(str).str.strip(),
    })


def write_submission(path: Path | str, rows: Iterable[tuple[str, np.ndarray | str]]) -> int:
    """Write a submission CSV (header ``img,pixels``) from ``(img, mask)`` pairs, atomically.

    ``img`` is the frame's name as the competition numbers it (e.g. ``"1"`` for ``test/1.tif``).
    A mask may come already encoded (a string), so a long batch need not keep every mask in memory.
    Returns the number of rows written.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["img", "pixels"])
    count = 0
    for img, mask in rows:
        writer.writerow([str(img), mask if isinstance(mask, str) else rle_encode(mask)])
        count += 1
    atomic_write_text(path, buffer.getvalue())
    return count
