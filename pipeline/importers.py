"""Importers: bring outside datasets into the canonical ``data/raw`` layout, with a manifest.

Canonical layout (what validation, preprocessing and training read)::

    data/raw/train/{subject}_{n}.tif        8-bit grayscale frame, 420 x 580
    data/raw/train/{subject}_{n}_mask.tif   its mask, same size, values {0, 255}
    data/raw/test/{n}.tif                   unlabeled frames (training ignores test/)
    data/raw/manifests/{name}.csv           one row per imported frame: where it came from

Sources (``detect_format`` picks one; ``fmt`` forces it):

- ``competition``: the 2016 Kaggle layout: a folder with ``train/`` and/or ``test/`` and maybe
  ``train_masks.csv``. Frames in ``train/`` without a ``_mask`` file take their mask from the CSV
  (run-length decoded, :mod:`pipeline.rle`).
- ``folders``: labelled frames as PNG, JPEG or TIFF, either ``images/`` + ``masks/`` or one folder
  holding ``{subject}_{n}.ext`` and ``{subject}_{n}_mask.ext``; a mask in ``masks/`` may be named
  ``{stem}_mask.ext`` or ``{stem}.ext``. The competition's own ``train/`` folder is this format too.
  Lossy masks are thresholded (> 127); letterboxed square exports (``positives-256``: the frame
  scaled to 256 x 186 on a gray canvas) are detected and scaled back to 420 x 580.
- ``unlabeled``: a folder of ``{n}.ext`` frames without masks (the competition's ``test/``).

An import never half-writes: the new ``data/raw`` is built in a temporary folder beside it
(existing files hard-linked, new ones written and checked), and only when every file passed is it
swapped in by two renames; the previous tree is kept until :meth:`StagedImport.finish` (or put back
by :meth:`StagedImport.rollback`). Bad input raises :class:`DataImportError` naming the file; every
file the import cannot take is found first (not only the first one) and listed in its ``problems``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.atomic import atomic_write_text
from pipeline.decode_errors import quiet_decoders
from pipeline.imageio import ImageReadError, read_gray
from pipeline.layout import FRAME_NAME

HEIGHT, WIDTH = 420, 580
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
FORMATS = ("competition", "folders", "unlabeled")
MANIFEST_DIR = "manifests"
MASK_THRESHOLD = 127
_UNLABELED = re.compile(r"^(?P<n>\d+)$")
MANIFEST_COLUMNS = ["frame_id", "split", "subject", "n", "image_path", "mask_path", "source_image",
                    "source_mask", "has_mask", "mask_area", "letterboxed", "status"]


@dataclass
class ImportProblem:
    """One source file the import cannot take: the validation check it breaks (a check name of
    ``params.yaml`` ``validation``, e.g. ``frame_decodes``) and why, in words."""
    path: Path
    frame_id: str
    check: str
    reason: str
    message: str = ""  # the full line, "{path}: ..."; default "{path}: {reason}"

    def __post_init__(self) -> None:
        self.message = self.message or f"{self.path}: {self.reason}"


class DataImportError(ValueError):
    """Bad input for an import; the message names the file and the problem. ``problems`` lists every
    file the import could not take (empty when the problem is the source as a whole)."""

    def __init__(self, message: str, problems: list[ImportProblem] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


SHOW_PROBLEMS = 10  # lines of a refusal's message; the exception's ``problems`` has them all


def _problem_order(problem: ImportProblem) -> tuple:
    """By path, numbers as numbers (``9_2`` before ``9_10``), then check."""
    parts = re.split(r"(\d+)", str(problem.path))
    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in parts), problem.check


def _refusal(problems: list[ImportProblem]) -> DataImportError:
    problems = sorted(problems, key=_problem_order)
    lines = [p.message for p in problems[:SHOW_PROBLEMS]]
    if len(problems) > SHOW_PROBLEMS:
        lines.append(f"... and {len(problems) - SHOW_PROBLEMS} more files that cannot be imported")
    return DataImportError("\n".join(lines), problems)


def _problem(path: Path, frame_id: str, check: str, reason: str, message: str = "") -> DataImportError:
    return DataImportError(message or f"{path}: {reason}", [ImportProblem(path, frame_id, check, reason, message)])


# --------------------------------------------------------------------------------------------
# Plans: what to import, before anything is read
# --------------------------------------------------------------------------------------------
@dataclass
class _Item:
    split: str                   # "train" or "test"
    frame_id: str                # "{subject}_{n}" or "{n}"
    subject: int | None
    n: int
    image: Path
    mask: Path | None = None     # a mask file, or
    rle: str | None = None       # a run-length string from train_masks.csv
    rle_origin: str = ""         # "train_masks.csv line N"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _image_suffix(path: Path, problems: list[ImportProblem]) -> bool:
    """True for a PNG, JPEG or TIFF name; otherwise the file is a problem."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    problems.append(ImportProblem(path, path.stem, "names", "not an image file (PNG, JPEG or TIFF expected)"))
    return False


def _labelled_id(path: Path, stem: str) -> tuple[str, int, int] | None:
    m = FRAME_NAME.match(stem)
    if not m:
        return None
    subject, n = int(m["subject"]), int(m["n"])
    return f"{subject}_{n}", subject, n


def detect_format(src: Path) -> str:
    """``competition``, ``folders`` or ``unlabeled``, from what ``src`` holds."""
    src = Path(src)
    if not src.is_dir():
        raise DataImportError(f"{src}: no such folder")
    if (src / "train").is_dir() or (src / "test").is_dir():
        return "competition"
    if (src / "images").is_dir():
        return "folders"
    files = [p for p in _images(src) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataImportError(f"{src}: holds no PNG, JPEG or TIFF frames, nor train/, test/ or images/")
    if any(p.stem.endswith("_mask") for p in files):
        return "folders"
    if all(_UNLABELED.match(p.stem) for p in files):
        return "unlabeled"
    return "folders"


def _plan_flat(folder: Path, problems: list[ImportProblem]) -> list[_Item]:
    """One folder of ``{subject}_{n}.ext`` + ``{subject}_{n}_mask.ext``."""
    frames: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for path in _images(folder):
        if not _image_suffix(path, problems):
            continue
        if path.stem.endswith("_mask"):
            masks[path.stem[: -len("_mask")]] = path
        else:
            frames[path.stem] = path
    for stem, mask in masks.items():
        if stem not in frames:
            problems.append(ImportProblem(mask, stem, "frame_for_mask",
                                          f"a mask without its frame ({stem}.* is missing)"))
    return _labelled_items(frames, masks, problems)


def _labelled_items(frames: dict[str, Path], masks: dict[str, Path], problems: list[ImportProblem]) -> list[_Item]:
    """One item per frame named ``{subject}_{n}``; a frame (and its mask) named otherwise is a problem."""
    items = []
    for stem, image in frames.items():
        ids = _labelled_id(image, stem)
        if ids is None:
            for path in (image, masks.get(stem)):
                if path is not None:
                    problems.append(ImportProblem(path, stem, "names", f"name does not follow {{subject}}_{{n}} "
                                                  f"(e.g. 12_34{path.suffix})"))
            continue
        items.append(_Item("train", *ids, image, masks.get(stem)))
    return items


def _without_mask(items: list[_Item], problems: list[ImportProblem], expected: str) -> list[_Item]:
    """The items that have a mask; each one without is a problem."""
    for item in items:
        if item.mask is None and item.rle is None:
            problems.append(ImportProblem(item.image, item.frame_id, "mask_for_frame",
                                          f"a frame without its mask ({expected.format(stem=item.image.stem)})"))
    return [item for item in items if item.mask is not None or item.rle is not None]


def _plan_folders(src: Path, problems: list[ImportProblem]) -> list[_Item]:
    if not (src / "images").is_dir():
        items = _plan_flat(src, problems)
    else:
        frames = {}
        for path in _images(src / "images"):
            if _image_suffix(path, problems):
                frames[path.stem] = path
        masks: dict[str, Path] = {}
        mask_dir = src / "masks"
        if mask_dir.is_dir():
            for path in _images(mask_dir):
                if not _image_suffix(path, problems):
                    continue
                stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
                if stem not in frames:
                    problems.append(ImportProblem(path, stem, "frame_for_mask",
                                                  f"a mask without its frame (images/{stem}.* is missing)"))
                    continue
                masks[stem] = path
        items = _labelled_items(frames, masks, problems)
    return _without_mask(items, problems, "expected {stem}_mask.*; import unlabeled frames as a folder of {{n}}.tif")


def _plan_unlabeled(folder: Path, problems: list[ImportProblem]) -> list[_Item]:
    items = []
    for path in _images(folder):
        if not _image_suffix(path, problems):
            continue
        m = _UNLABELED.match(path.stem)
        if not m:
            problems.append(ImportProblem(path, path.stem, "names", f"an unlabeled frame must be named "
                                          f"{{n}}{path.suffix} (e.g. 17{path.suffix})"))
            continue
        items.append(_Item("test", str(int(m["n"])), None, int(m["n"]), path))
    return items


def _plan_competition(src: Path, height: int, width: int, problems: list[ImportProblem]) -> list[_Item]:
    from pipeline.rle import RLEError, read_rle_csv, rle_runs

    items: list[_Item] = []
    train = src / "train"
    if train.is_dir():
        frames: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for path in _images(train):
            if _image_suffix(path, problems):
                (masks if path.stem.endswith("_mask") else frames)[path.stem.removesuffix("_mask")] = path
        for stem, mask in masks.items():
            if stem not in frames:
                problems.append(ImportProblem(mask, stem, "frame_for_mask",
                                              f"a mask without its frame (train/{stem}.tif is missing)"))
        rles: dict[str, tuple[str, int]] = {}
        csv_path = src / "train_masks.csv"
        if csv_path.is_file():
            table = read_rle_csv(csv_path)
            for line, (frame_id, pixels) in enumerate(zip(table.frame_id, table.pixels), start=2):
                try:
                    rle_runs(pixels, height, width)
                except RLEError as exc:
                    raise DataImportError(f"{csv_path}, line {line} (img {frame_id}): does not decode to a "
                                          f"{height}x{width} mask: {exc}") from None
                rles[frame_id] = (pixels, line)
        labelled = _labelled_items(frames, masks, problems)
        for item in labelled:
            if item.mask is None and item.frame_id in rles:
                item.rle, line = rles[item.frame_id]
                item.rle_origin = f"{csv_path.name}:{line}"
        items += _without_mask(labelled, problems, f"no {{stem}}_mask.tif and no row in {csv_path.name}")
    if (src / "test").is_dir():
        items += _plan_unlabeled(src / "test", problems)
    if not items and not problems:
        raise DataImportError(f"{src}: train/ and test/ hold no frames")
    return items


def _plan(src: Path, fmt: str, height: int, width: int, problems: list[ImportProblem]) -> list[_Item]:
    """What an import of ``src`` in format ``fmt`` takes; each file it cannot take goes to ``problems``."""
    if fmt == "competition":
        items = _plan_competition(src, height, width, problems)
    elif fmt == "folders":
        items = _plan_folders(src, problems)
    else:
        items = _plan_unlabeled(src, problems)
    seen: dict[str, Path] = {}
    unique = []
    for item in items:
        key = f"{item.split}/{item.frame_id}"
        if key in seen:
            problems.append(ImportProblem(item.image, item.frame_id, "unique_ids",
                                          f"frame {item.frame_id} also comes from {seen[key]}"))
            continue
        seen[key] = item.image
        unique.append(item)
    return unique


# --------------------------------------------------------------------------------------------
# Converting one frame
# --------------------------------------------------------------------------------------------
def letterbox_rows(image: np.ndarray, height: int = HEIGHT, width: int = WIDTH) -> tuple[int, int] | None:
    """``(top, rows)`` of the content of a square letterboxed export, or None if it is not one.

    A frame ``height`` x ``width`` scaled to fit an S x S canvas fills ``S * height / width`` rows
    (rounded either way), centred; the rows above and below are gray (128).
    """
    s = image.shape[0]
    if image.ndim != 2 or image.shape[1] != s or (s, s) == (height, width):
        return None
    exact = s * height / width
    for rows in sorted({int(np.floor(exact)), int(np.ceil(exact))}):
        top = (s - rows) // 2
        bands = [image[:top], image[top + rows:]]
        if top < 2 or any(b.size == 0 for b in bands):
            continue
        # every band row gray on average (JPEG rings near the edge, so not every pixel)
        if all((np.abs(b.astype(np.int16) - 128).mean(axis=1) < 12).all() for b in bands):
            return top, rows
    return None


def _unletterbox(image: np.ndarray, box: tuple[int, int], height: int, width: int) -> np.ndarray:
    top, rows = box
    return cv2.resize(image[top: top + rows], (width, height), interpolation=cv2.INTER_LINEAR)


def _write_tif(path: Path, image: np.ndarray, compress: bool) -> None:
    """Frames uncompressed (LZW costs ~6 ms a frame and saves ~15 %), masks LZW (50x smaller).

    Written into the staging folder, which is swapped in whole, so no temporary name is needed.
    """
    params = [] if compress else [cv2.IMWRITE_TIFF_COMPRESSION, 1]
    ok, encoded = cv2.imencode(".tif", image, params)
    if not ok:
        raise DataImportError(f"{path}: could not encode the frame as TIFF")
    path.write_bytes(encoded.tobytes())


def _plain_gray(path: Path) -> bool:
    """The file itself is single-channel 8-bit (so its bytes can be kept as they are)."""
    data = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    return data is not None and data.ndim == 2 and data.dtype == np.uint8


def _read(path: Path, frame_id: str, mask: bool) -> np.ndarray:
    try:
        return read_gray(path)
    except ImageReadError as exc:
        eight_bit = exc.reason.startswith("expected 8-bit")
        check = ("mask_decodes" if mask else "frame_dtype" if eight_bit else "frame_decodes")
        raise _problem(path, frame_id, check, exc.reason, str(exc)) from None


def _with_mask_problem(item: _Item, frame_problem: DataImportError) -> DataImportError:
    """The frame's problem, plus its mask's when the mask does not decode either: one run names both."""
    if item.split == "train" and item.mask is not None:
        try:
            _read(item.mask, item.frame_id, mask=True)
        except DataImportError as exc:
            frame_problem.problems += exc.problems
    return frame_problem


def _size_check(prefix: str, shape: tuple, height: int, width: int) -> str:
    """``frame_height`` when the rows are wrong, else ``frame_width`` (``mask_...`` for masks)."""
    return f"{prefix}_height" if shape[0] != height else f"{prefix}_width"


@dataclass
class _Converted:
    item: _Item
    image_rel: str
    mask_rel: str
    has_mask: bool
    mask_area: int
    letterboxed: bool


def _convert(item: _Item, stage: Path, letterbox: str, height: int, width: int) -> _Converted:
    from pipeline.rle import rle_decode

    try:
        image = _read(item.image, item.frame_id, mask=False)
    except DataImportError as exc:
        raise _with_mask_problem(item, exc) from None
    raw_shape = image.shape
    box = None
    if image.shape != (height, width):
        box = letterbox_rows(image, height, width) if letterbox in ("auto", "yes") else None
        if box is None and letterbox == "yes" and image.shape[0] == image.shape[1]:
            s = image.shape[0]
            rows = int(round(s * height / width))
            box = ((s - rows) // 2, rows)
        if box is None:
            hint = "" if image.shape[0] != image.shape[1] else " and is not a detectable letterboxed export"
            raise _with_mask_problem(item, _problem(
                item.image, item.frame_id, _size_check("frame", image.shape, height, width),
                f"frame is {image.shape[0]}x{image.shape[1]}, expected {height}x{width}{hint}"))
        image = _unletterbox(image, box, height, width)
    elif letterbox == "yes":
        raise DataImportError(f"{item.image}: frame is already {height}x{width}, not a letterboxed export")

    folder = "train" if item.split == "train" else "test"
    image_rel = f"{folder}/{item.frame_id}.tif"
    out_image = stage / image_rel
    source_is_canonical = box is None and item.image.suffix.lower() in (".tif", ".tiff") and _plain_gray(item.image)
    if source_is_canonical:
        shutil.copyfile(item.image, out_image)
        if not _plain_gray(out_image):  # a copy that does not read back is no frame
            raise DataImportError(f"{item.image}: could not be copied faithfully")
    else:
        _write_tif(out_image, image, compress=False)

    if item.split != "train":
        return _Converted(item, image_rel, "", False, 0, box is not None)

    if item.rle is not None:
        mask = rle_decode(item.rle, height, width).astype(bool)
        raw_mask = None
    else:
        raw_mask = _read(item.mask, item.frame_id, mask=True)
        mask_img = raw_mask
        if box is not None:
            if mask_img.shape != raw_shape:
                raise _problem(item.mask, item.frame_id, _size_check("mask", mask_img.shape, *raw_shape),
                               f"mask is {mask_img.shape[0]}x{mask_img.shape[1]}, its frame "
                               f"{item.image.name} is {raw_shape[0]}x{raw_shape[1]}")
            mask_img = _unletterbox(mask_img, box, height, width)
        elif mask_img.shape != (height, width):
            raise _problem(item.mask, item.frame_id, _size_check("mask", mask_img.shape, height, width),
                           f"mask is {mask_img.shape[0]}x{mask_img.shape[1]}, expected {height}x{width} like its frame")
        mask = mask_img > MASK_THRESHOLD
    mask_rel = f"train/{item.frame_id}_mask.tif"
    out_mask = stage / mask_rel
    canonical_mask = (raw_mask is not None and box is None and item.mask.suffix.lower() in (".tif", ".tiff")
                      and set(np.unique(raw_mask).tolist()) <= {0, 255} and _plain_gray(item.mask))
    if canonical_mask:
        shutil.copyfile(item.mask, out_mask)
    else:
        _write_tif(out_mask, mask.astype(np.uint8) * 255, compress=True)
    return _Converted(item, image_rel, mask_rel, True, int(mask.sum()), box is not None)


# --------------------------------------------------------------------------------------------
# Staging and swapping
# --------------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    source: str
    format: str
    name: str
    manifest: pd.DataFrame                           # rows of this import (MANIFEST_COLUMNS)
    manifest_path: str                               # relative to raw_dir
    added: list[str] = field(default_factory=list)   # frame ids ("train/1_1", "test/5") new to raw_dir
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # only with replace=True
    kept: list[str] = field(default_factory=list)     # only with keep_existing=True: old files kept
    problems: list[ImportProblem] = field(default_factory=list)  # only with keep_going=True: files left out

    def source_names(self) -> dict[str, str]:
        """``train/1_2.tif`` (as imported) -> its source file, relative to the source folder."""
        names: dict[str, str] = {}
        for row in self.manifest.itertuples():
            names[row.image_path] = row.source_image
            if isinstance(row.mask_path, str) and row.mask_path:  # unlabeled frames have none
                names[row.mask_path] = row.source_mask
        return names

    @property
    def n_train(self) -> int:
        return int((self.manifest.split == "train").sum())

    @property
    def n_test(self) -> int:
        return int((self.manifest.split == "test").sum())

    def summary(self) -> str:
        m = self.manifest
        train = m[m.split == "train"]
        parts = []
        if len(train):
            parts.append(f"{self.n_train} labelled frames of {train.subject.nunique()} subjects "
                         f"({(train.mask_area == 0).mean():.1%} empty masks)")
        if self.n_test:
            parts.append(f"{self.n_test} unlabeled frames")
        boxed = int(m.letterboxed.sum())
        if boxed:
            parts.append(f"{boxed} un-letterboxed to {HEIGHT}x{WIDTH}")
        return (f"{self.source} ({self.format}): " + ", ".join(parts) +
                f"; {len(self.added)} added, {len(self.replaced)} replaced, {len(self.unchanged)} unchanged, "
                f"{len(self.removed)} removed" + (f", {len(self.kept)} kept as they were" if self.kept else "") +
                f"; manifest {self.manifest_path}")


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _frame_keys(root: Path) -> set[str]:
    """``train/{id}`` and ``test/{id}`` for every frame under ``root``."""
    keys = set()
    for split in ("train", "test"):
        folder = root / split
        if folder.is_dir():
            keys |= {f"{split}/{p.stem}" for p in folder.glob("*.tif") if not p.stem.endswith("_mask")}
    return keys


class StagedImport:
    """Build the new ``raw_dir`` beside it, then swap it in; keep the old one until ``finish``."""

    def __init__(self, raw_dir: Path):
        self.raw_dir = Path(raw_dir)
        self.raw_dir.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.raw_dir.name}-import-", dir=self.raw_dir.parent))
        self.backup: Path | None = None
        self.swapped = False

    def swap(self) -> None:
        if self.raw_dir.exists():
            self.backup = Path(tempfile.mkdtemp(prefix=f".{self.raw_dir.name}-previous-", dir=self.raw_dir.parent))
            os.rmdir(self.backup)
            os.replace(self.raw_dir, self.backup)
        os.replace(self.stage, self.raw_dir)
        self.swapped = True

    def rollback(self) -> None:
        """Put the previous ``raw_dir`` back (or remove the new one if there was none)."""
        if self.swapped:
            shutil.rmtree(self.raw_dir, ignore_errors=True)
            if self.backup is not None:
                os.replace(self.backup, self.raw_dir)
            self.swapped = False
        shutil.rmtree(self.stage, ignore_errors=True)

    def finish(self) -> None:
        if self.backup is not None:
            shutil.rmtree(self.backup, ignore_errors=True)
            self.backup = None
        shutil.rmtree(self.stage, ignore_errors=True)


def _source_name(src: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.resolve().name).strip("-.") or "import"
    return name


def stage_import(
    src: Path | str,
    raw_dir: Path | str,
    fmt: str = "auto",
    letterbox: str = "auto",
    replace: bool = False,
    name: str | None = None,
    keep_existing: bool = False,
    height: int = HEIGHT,
    width: int = WIDTH,
    progress: bool = False,
    workers: int | None = None,
    keep_going: bool = False,
) -> tuple[StagedImport, ImportResult]:
    """Import ``src`` into a copy of ``raw_dir`` and swap it in; the caller must ``finish`` or ``rollback``.

    ``fmt``: ``auto`` or one of :data:`FORMATS`. ``letterbox``: ``auto`` (detect square
    letterboxed exports), ``yes`` (every frame is one) or ``no``. ``replace``: the imported frames
    become the whole of ``train/``/``test/`` (other frames are removed) instead of being merged.
    ``keep_existing``: when merging, a frame id already in ``raw_dir`` keeps its files (status
    ``kept``) instead of being replaced, e.g. native TIFFs over a lossy re-export of the same frames.
    Raises :class:`DataImportError` naming the bad files (all of them in its ``problems``: every file
    is planned and converted first); then ``raw_dir`` is untouched. With ``keep_going`` the files
    that cannot be imported are left out and listed in ``ImportResult.problems`` instead
    (``nerveseg validate`` of a folder that needs importing).
    """
    src, raw_dir = Path(src), Path(raw_dir)
    if letterbox not in ("auto", "yes", "no"):
        raise DataImportError(f"letterbox must be auto, yes or no, not {letterbox!r}")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataImportError(f"unknown format {fmt!r}: expected auto, {', '.join(FORMATS)}")
    if not src.is_dir():
        raise DataImportError(f"{src}: no such folder")
    if src.resolve() == raw_dir.resolve() or raw_dir.resolve() in src.resolve().parents:
        raise DataImportError(f"{src}: is inside {raw_dir}; import from outside the data folder")
    problems: list[ImportProblem] = []
    items = _plan(src, fmt, height, width, problems)
    if not items and not problems:
        raise DataImportError(f"{src}: no frames to import")
    name = name or _source_name(src)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise DataImportError(f"manifest name {name!r}: use letters, digits, '.', '_' or '-'")

    staged = StagedImport(raw_dir)
    try:
        new = staged.stage / "_new"
        for split in ("train", "test"):
            (new / split).mkdir(parents=True)
        converted, failed = _convert_all(items, new, letterbox, height, width, progress, workers)
        problems = sorted(problems + failed, key=_problem_order)
        if problems and not keep_going:
            raise _refusal(problems)
        before = _frame_keys(raw_dir)
        # The new tree: the old one (hard links, unless replaced), then the imported files on top.
        result_root = staged.stage
        if raw_dir.is_dir():
            for path in raw_dir.rglob("*"):
                if path.is_dir():
                    continue
                rel = path.relative_to(raw_dir)
                top = rel.parts[0]
                if replace and top in ("train", "test"):
                    continue
                _link_or_copy(path, result_root / rel)
        replaced, unchanged, kept = [], [], []
        for conv in converted:
            key = f"{conv.item.split}/{conv.item.frame_id}"
            pairs = [(conv.image_rel, new / conv.image_rel)]
            if conv.mask_rel:
                pairs.append((conv.mask_rel, new / conv.mask_rel))
            if key in before:
                same = all((raw_dir / rel).is_file() and _same_file(raw_dir / rel, path) for rel, path in pairs)
                if keep_existing and not replace and not same:
                    kept.append(key)
                    continue
                (unchanged if same else replaced).append(key)
            for rel, path in pairs:
                target = result_root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    target.unlink()
                os.replace(path, target)
        shutil.rmtree(new)
        incoming = {f"{c.item.split}/{c.item.frame_id}" for c in converted}  # what did import
        added = sorted(incoming - before, key=_sort_key)
        removed = sorted(before - incoming, key=_sort_key) if replace else []
        manifest = _manifest(converted, src, replaced, unchanged, kept)
        manifest_rel = f"{MANIFEST_DIR}/{name}.csv"
        (result_root / MANIFEST_DIR).mkdir(exist_ok=True)
        manifest_file = result_root / manifest_rel
        # A new file renamed over the name: never written through the hard link to the old manifest.
        atomic_write_text(manifest_file, manifest.to_csv(index=False))
        staged.swap()
    except BaseException:
        staged.rollback()
        raise
    result = ImportResult(str(src), fmt, name, manifest, manifest_rel, added, sorted(replaced, key=_sort_key),
                          sorted(unchanged, key=_sort_key), removed, sorted(kept, key=_sort_key), problems)
    return staged, result


def import_source(src: Path | str, raw_dir: Path | str, **kwargs) -> ImportResult:
    """:func:`stage_import`, then keep the result (drop the previous tree)."""
    staged, result = stage_import(src, raw_dir, **kwargs)
    staged.finish()
    return result


def _sort_key(key: str):
    split, frame_id = key.split("/", 1)
    return (split, tuple(int(x) for x in frame_id.split("_")) if re.fullmatch(r"[\d_]+", frame_id) else (), frame_id)


def _convert_all(items, new: Path, letterbox, height, width, progress, workers
                 ) -> tuple[list[_Converted], list[ImportProblem]]:
    """Every item converted, or its problem (a file that cannot be imported), so that one run names
    them all; an error that is not about one file (no ``problems``) stops at once."""
    from tqdm import tqdm

    workers = workers or min(8, os.cpu_count() or 2)

    def one(item: _Item) -> _Converted | list[ImportProblem]:
        try:
            return _convert(item, new, letterbox, height, width)
        except DataImportError as exc:
            if not exc.problems:
                raise
            folder = new / ("train" if item.split == "train" else "test")
            for leftover in (folder / f"{item.frame_id}.tif", folder / f"{item.frame_id}_mask.tif"):
                leftover.unlink(missing_ok=True)  # the frame may be written before its mask failed
            return exc.problems

    with quiet_decoders(), ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, items)
        out = list(tqdm(results, total=len(items), desc="import", disable=not progress, unit="frame"))
    converted = [r for r in out if isinstance(r, _Converted)]
    return converted, [p for r in out if not isinstance(r, _Converted) for p in r]


def _manifest(converted: list[_Converted], src: Path, replaced: list[str], unchanged: list[str],
              kept: list[str]) -> pd.DataFrame:
    replaced_set, unchanged_set, kept_set = set(replaced), set(unchanged), set(kept)
    rows = []
    for c in converted:
        it = c.item
        key = f"{it.split}/{it.frame_id}"
        status = ("replaced" if key in replaced_set else "unchanged" if key in unchanged_set
                  else "kept" if key in kept_set else "added")
        rows.append({
            "frame_id": it.frame_id,
            "split": it.split,
            "subject": it.subject,
            "n": it.n,
            "image_path": c.image_rel,
            "mask_path": c.mask_rel,
            "source_image": it.image.relative_to(src).as_posix(),
            "source_mask": it.mask.relative_to(src).as_posix() if it.mask is not None else it.rle_origin,
            "has_mask": c.has_mask,
            "mask_area": c.mask_area,
            "letterboxed": c.letterboxed,
            "status": status,
        })
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame["subject"] = frame["subject"].astype("Int64")
    frame["_order"] = (frame["split"] != "train").astype(int)
    frame = frame.sort_values(["_order", "subject", "n"], kind="stable", na_position="last")
    return frame.drop(columns="_order").reset_index(drop=True)
