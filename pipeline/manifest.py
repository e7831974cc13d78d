"""One row per scan: what is on disk under ``<data_dir>/train`` and what each file looks like.

The manifest is the table that :mod:`pipeline.validation` checks with Great Expectations. It is
built by reading every frame and mask once (a thread pool; OpenCV releases the GIL while it
decodes) and never raises on a bad file: a file that cannot be read or decoded is recorded as
such, with the reason in words (``image_error``, ``mask_error``), so the validation report can name
it; the decoders' own messages are kept off the terminal (:mod:`pipeline.decode_errors`).

Layout: ``train/{subject}_{n}.tif`` (8-bit grayscale frame) and ``train/{subject}_{n}_mask.tif``
(same size, values 0/255). Any other file in ``train/`` gets a row with ``name_ok`` False.

Re-reading is avoided with a cache file (JSON, one entry per file keyed by its path relative to
the data folder, its size and its ``mtime_ns``): with ``cache_file`` given, only files that are
new or changed are read and decoded. The cache is never inside the data folder (DVC hashes it);
:mod:`pipeline.validation` keeps it in the GX project's ``uncommitted/`` folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.atomic import atomic_write_text
from pipeline.decode_errors import opencv_log_silenced, quiet_decoders, why_undecodable

TRAIN_SUBDIR = "train"
# No leading zeros, so that one frame id cannot come from two files ("3_7.tif", "03_7.tif").
NAME_PATTERN = re.compile(r"^(?P<subject>0|[1-9]\d*)_(?P<n>0|[1-9]\d*)(?P<mask>_mask)?\.tif$")

# Column name -> pandas dtype, in output order. ``mask_channels`` and ``mask_sha1`` go beyond
# the minimum: a colour mask must be caught too, and lineage wants the masks' hashes as well.
COLUMNS: dict[str, str] = {
    "frame_id": "str",
    "subject": "Int64",
    "n": "Int64",
    "image_path": "str",
    "mask_path": "str",
    "image_exists": "bool",
    "mask_exists": "bool",
    "name_ok": "bool",
    "image_decodes": "bool",
    "mask_decodes": "bool",
    "height": "Int64",
    "width": "Int64",
    "channels": "Int64",
    "dtype": "str",
    "mask_height": "Int64",
    "mask_width": "Int64",
    "mask_channels": "Int64",
    "mask_binary": "boolean",
    "mask_area": "Int64",
    "intensity_mean": "float64",
    "intensity_std": "float64",
    "content_sha1": "str",
    "mask_sha1": "str",
    "mask_values": "str",  # the distinct mask values, e.g. "0,255" (first 8)
    "phash": "str",  # perceptual hash of the frame: 256 bits (DCT of a 64x64 thumbnail), hex
    "mask_thumb": "str",  # the mask at 1/8 size, bit-packed, base64 ("" when empty)
    "image_error": "str",  # why the frame file does not decode, in words ("" when it does)
    "mask_error": "str",  # ... the mask file
}
# Bump when the per-file fields change: old cache entries are then ignored.
CACHE_VERSION = 3
PHASH_SIZE, PHASH_BITS_SIDE = 64, 16
THUMB_FACTOR = 8


@dataclass
class _Entry:
    frame_id: str
    subject: int | None = None
    n: int | None = None
    name_ok: bool = True
    image_path: str = ""
    mask_path: str = ""
    fields: dict = field(default_factory=dict)


def _read_bytes(path: Path) -> tuple[bytes | None, str]:
    """The file's bytes, or None and the reason it cannot be read."""
    try:
        return path.read_bytes(), ""
    except OSError as exc:
        return None, exc.strerror or str(exc)


def _decode(data: bytes | None, name: str, read_error: str = "") -> tuple[np.ndarray | None, str]:
    """The decoded array and "", or None and why it does not decode (the decoders stay quiet)."""
    if not data:
        return None, why_undecodable(data, name, read_error)
    try:
        with opencv_log_silenced():
            arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        return None, f"OpenCV: {str(exc).strip().splitlines()[-1]}"
    if arr is None:
        return None, why_undecodable(data, name)
    if arr.ndim not in (2, 3) or arr.size == 0:
        return None, f"decodes to an array of shape {arr.shape}, not an image"
    return arr, ""


def _image_fields(path: Path) -> dict:
    data, read_error = _read_bytes(path)
    out: dict = {"content_sha1": hashlib.sha1(data).hexdigest() if data is not None else ""}
    arr, out["image_error"] = _decode(data, path.name, read_error)
    out["image_decodes"] = arr is not None
    if arr is None:
        return out
    out["height"], out["width"] = int(arr.shape[0]), int(arr.shape[1])
    out["channels"] = 1 if arr.ndim == 2 else int(arr.shape[2])
    out["dtype"] = str(arr.dtype)
    if arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16, np.float32):
        mean, std = cv2.meanStdDev(arr)  # several times faster than numpy on a frame
        out["intensity_mean"], out["intensity_std"] = float(mean[0, 0]), float(std[0, 0])
    else:  # over all channels together
        values = arr.astype(np.float64, copy=False)
        out["intensity_mean"], out["intensity_std"] = float(values.mean()), float(values.std())
    out["phash"] = perceptual_hash(arr)
    return out


def perceptual_hash(arr: np.ndarray) -> str:
    """A DCT perceptual hash: the 16x16 lowest frequencies of a 64x64 thumbnail against their
    median, as 64 hex digits. Near-identical frames differ in a few of the 256 bits."""
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    if arr.dtype not in (np.uint8, np.uint16, np.float32):
        arr = arr.astype(np.float32)
    # Resize first (fast on uint8; a whole-number factor first, which OpenCV does fastest),
    # and convert only the 64x64 thumbnail.
    h, w = arr.shape[:2]
    if h >= 4 * PHASH_SIZE and w >= 4 * PHASH_SIZE:
        arr = cv2.resize(arr[: h - h % 4, : w - w % 4], (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    small = cv2.resize(arr, (PHASH_SIZE, PHASH_SIZE), interpolation=cv2.INTER_AREA)
    coeffs = cv2.dct(small.astype(np.float32))[:PHASH_BITS_SIDE, :PHASH_BITS_SIDE].ravel()
    bits = coeffs > np.median(coeffs[1:])
    bits[0] = False  # the DC term says only "how bright", not "what"
    return np.packbits(bits).tobytes().hex()


def mask_thumbnail(arr: np.ndarray) -> str:
    """The mask at 1/``THUMB_FACTOR`` size (nerve where at least half the block is), packed."""
    f = THUMB_FACTOR
    h, w = (arr.shape[0] // f) * f, (arr.shape[1] // f) * f
    if not h or not w:
        return base64.b64encode(np.packbits(arr > 0).tobytes()).decode("ascii")
    binary = (arr[:h, :w] > 0).view(np.uint8) * np.uint8(255)
    # A whole-number factor: OpenCV's fast block average.
    small = cv2.resize(binary, (w // f, h // f), interpolation=cv2.INTER_AREA)
    return base64.b64encode(np.packbits(small >= 128).tobytes()).decode("ascii")


def thumbnail_bits(thumb: str) -> np.ndarray:
    """The bits of :func:`mask_thumbnail` (padded to a whole byte)."""
    return np.unpackbits(np.frombuffer(base64.b64decode(thumb), dtype=np.uint8)).astype(bool)


def _mask_fields(path: Path) -> dict:
    data, read_error = _read_bytes(path)
    out: dict = {"mask_sha1": hashlib.sha1(data).hexdigest() if data is not None else ""}
    arr, out["mask_error"] = _decode(data, path.name, read_error)
    out["mask_decodes"] = arr is not None
    if arr is None:
        return out
    out["mask_height"], out["mask_width"] = int(arr.shape[0]), int(arr.shape[1])
    out["mask_channels"] = 1 if arr.ndim == 2 else int(arr.shape[2])
    if arr.ndim == 2 and arr.dtype == np.uint8:  # one histogram gives both answers, fast
        counts = cv2.calcHist([arr], [0], None, [256], [0, 256]).ravel()
        present = set(np.flatnonzero(counts).tolist())
        area = arr.size - int(counts[0])
    else:
        present = set(np.unique(arr).tolist())
        nonzero = arr != 0 if arr.ndim == 2 else (arr != 0).any(axis=2)
        area = int(np.count_nonzero(nonzero))
    out["mask_binary"] = present <= {0, 255} or present <= {0, 1}
    out["mask_area"] = area
    out["mask_values"] = ",".join(str(v) for v in sorted(present)[:8])
    if area and arr.ndim == 2:
        out["mask_thumb"] = mask_thumbnail(arr)
    return out


def read_file_fields(job: tuple[str, bool]) -> dict:
    """The per-file unit of the manifest: ``(path, is_mask)`` -> that file's figures. Never raises
    (an odd file is recorded as not decoding). Module-level, so a Dask worker can run it."""
    path, is_mask = job
    try:
        return _mask_fields(Path(path)) if is_mask else _image_fields(Path(path))
    except Exception as exc:  # never let one odd file stop the scan
        reason = f"{type(exc).__name__}: {exc}"
        return {"mask_decodes": False, "mask_error": reason} if is_mask else {
            "image_decodes": False, "image_error": reason}


def _scan(train: Path, data_dir: Path) -> list[_Entry]:
    entries: dict[str, _Entry] = {}
    odd: list[_Entry] = []
    try:
        names = sorted(os.listdir(train))
    except OSError:
        return []
    for name in names:
        path = train / name
        if not path.is_file():
            continue
        rel = path.relative_to(data_dir).as_posix()
        m = NAME_PATTERN.match(name)
        if m is None:
            odd.append(_Entry(frame_id=Path(name).stem, name_ok=False, image_path=rel))
            continue
        frame_id = f"{int(m['subject'])}_{int(m['n'])}"
        entry = entries.get(frame_id)
        if entry is None:
            entry = entries[frame_id] = _Entry(frame_id, int(m["subject"]), int(m["n"]))
        if m["mask"]:
            entry.mask_path = rel
        else:
            entry.image_path = rel
    return list(entries.values()) + odd


def empty_manifest() -> pd.DataFrame:
    """A manifest with no rows and the right columns and dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _load_cache(cache_file: Path | None) -> dict:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # a broken cache is only a slower run
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _save_cache(cache_file: Path, files: dict) -> None:
    atomic_write_text(cache_file, json.dumps({"version": CACHE_VERSION, "files": files}, separators=(",", ":")))


def build_manifest(
    data_dir: Path, workers: int | None = None, cache_file: Path | None = None, mapper=None
) -> pd.DataFrame:
    """Read every frame and mask under ``data_dir/train`` into a table, one row per frame id.

    Frames and masks are paired by name; a frame without mask (or mask without frame) still
    gets a row, with the missing side's path ``""`` and ``*_exists`` False. A file whose name
    does not follow ``{subject}_{n}.tif`` / ``{subject}_{n}_mask.tif`` gets a row with
    ``name_ok`` False and ``frame_id`` its stem. Files that cannot be read or decoded give
    ``*_decodes`` False and nulls in the figures. Sorted by subject, then n; odd names last.

    With ``cache_file``, files whose path, size and ``mtime_ns`` match a cached entry are not
    read again, and the cache is rewritten with the current files. ``df.attrs["files_read"]``
    and ``df.attrs["files_cached"]`` say how many files were read and how many reused.

    ``mapper(read_file_fields, jobs) -> results`` (same order) runs the per-file work elsewhere, e.g.
    on a Dask cluster (``flows/runner.py``); without it, a thread pool of ``workers`` threads does.

    Raises ``FileNotFoundError`` only when ``data_dir`` itself does not exist. A missing
    ``train/`` folder gives an empty manifest (which then fails validation on the row count).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data folder")
    entries = _scan(data_dir / TRAIN_SUBDIR, data_dir)
    if not entries:
        out = empty_manifest()
        out.attrs.update(files_read=0, files_cached=0)
        return out

    cached = _load_cache(cache_file)
    fresh_cache: dict = {}
    jobs: list[tuple[_Entry, Path, bool, str, list[int] | None]] = []
    n_cached = 0
    for e in entries:
        for rel, is_mask in ((e.image_path, False), (e.mask_path, True)):
            if not rel or (not e.name_ok and is_mask):
                continue
            path = data_dir / rel
            stat = _stat(path) if cache_file is not None else None
            hit = cached.get(rel)
            if stat is not None and hit is not None and hit[:2] == stat:
                e.fields.update(hit[2])
                fresh_cache[rel] = hit
                n_cached += 1
            else:
                jobs.append((e, path, is_mask, rel, stat))

    workers = workers or min(16, (os.cpu_count() or 2) * 2)
    if jobs:
        units = [(str(path), is_mask) for _, path, is_mask, _, _ in jobs]
        with quiet_decoders():  # each file's reason goes into the manifest, not onto the terminal
            if mapper is not None:
                results = list(mapper(read_file_fields, units))
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    results = list(pool.map(read_file_fields, units, chunksize=16))
        for (entry, _, _, rel, stat), result in zip(jobs, results, strict=True):
            entry.fields.update(result)
            if stat is not None:
                fresh_cache[rel] = [*stat, result]
    if cache_file is not None:
        try:
            _save_cache(Path(cache_file), fresh_cache)
        except OSError:
            pass  # a read-only place only costs speed next time

    rows = []
    for e in entries:
        row = {
            "frame_id": e.frame_id,
            "subject": e.subject,
            "n": e.n,
            "image_path": e.image_path,
            "mask_path": e.mask_path,
            "image_exists": bool(e.image_path),
            "mask_exists": bool(e.mask_path),
            "name_ok": e.name_ok,
            "image_decodes": False,
            "mask_decodes": False,
            "content_sha1": "",
            "mask_sha1": "",
            "mask_values": "",
            "phash": "",
            "mask_thumb": "",
            "image_error": "",
            "mask_error": "",
        }
        row.update(e.fields)
        rows.append(row)

    df = pd.DataFrame.from_records(rows)
    for col, dtype in COLUMNS.items():
        if col not in df:
            df[col] = None
        df[col] = df[col].astype(dtype)
    df = df[list(COLUMNS)]
    df = df.sort_values(
        ["name_ok", "subject", "n", "frame_id"],
        ascending=[False, True, True, True],
        na_position="last",
        kind="stable",
    )
    df = df.reset_index(drop=True)
    df.attrs.update(files_read=len(jobs), files_cached=n_cached)
    return df
