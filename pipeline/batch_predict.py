"""Segmenting a batch of frame files: find them, name their outputs, predict in batches, write masks,
overlays and the failure list (what ``nerveseg predict`` does).

Names. A frame found in a folder given as input is named by its path relative to that folder without
the extension (``scans/a/1_1.tif`` given ``scans/``: ``a/1_1``); a file given by itself by its name
without the extension (``1_1``). Its outputs are ``OUT/NAME_mask.png`` and ``OUT/NAME_overlay.png``,
and NAME is its submission row's ``img``. Frames that would share a name (compared ignoring case)
get the folders above them prepended, one at a time, until they differ (``a/1_1`` and ``b/1_1``);
frames that differ only by extension keep it (``1_1.tif``, ``1_1.png``); anything still shared is
numbered (``1_1~2``). The same file reached through two inputs is one frame.

A frame that cannot be read does not stop the batch: it is listed, with the reason, in
``OUT/predict_failures.csv`` (the columns of :mod:`pipeline.failure_list`) and the rest are written.

The model is anything with ``predict(frames) -> masks`` for an (N, H, W) uint8 stack: the registered
MLflow model as loaded, or a :class:`~pipeline.inference.Predictor`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import failure_list
from pipeline.imageio import ImageReadError, read_gray, write_image

FRAME_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg"})
FAILURES_CSV = "predict_failures.csv"
DEFAULT_BATCH_SIZE = 16
SHOW_FAILURES = 10  # on the terminal; the CSV lists every one


class PredictInputError(ValueError):
    """An input that is neither a file nor a folder, or inputs holding no frame at all."""


@dataclass(frozen=True)
class InputFrame:
    path: Path  # as given (the input folder joined with the path found in it)
    name: str   # unique among the batch: the outputs' stem (may hold "/") and the submission's img


@dataclass
class PredictResult:
    out_dir: Path
    frames: int                                         # frames found
    written: list[str] = field(default_factory=list)    # names, in input order
    failures: list[dict] = field(default_factory=list)  # failure_list entries, in input order
    failures_csv: Path | None = None
    submission: Path | None = None

    def summary(self) -> list[str]:
        """What an operator reads afterwards: what was written where, and every failure's reason
        (the first ones here, all in the CSV)."""
        lines = [f"wrote {len(self.written)} masks and overlays to {self.out_dir}"]
        if self.submission is not None:
            lines.append(f"wrote the run-length-encoded submission ({len(self.written)} rows, header img,pixels) "
                         f"to {self.submission}")
        if self.failures:
            lines.append(f"{len(self.failures)} of {self.frames} frames could not be read and have no mask"
                         f"{' or submission row' if self.submission is not None else ''}; each with its reason: "
                         f"{self.failures_csv}")
            lines += [f"  {line}" for line in failure_list.terminal_lines(self.failures, SHOW_FAILURES)]
        return lines


def mask_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir).joinpath(*f"{name}_mask.png".split("/"))


def overlay_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir).joinpath(*f"{name}_overlay.png".split("/"))


def collect_frames(inputs: Iterable[Path | str], out_dir: Path | str | None = None) -> list[InputFrame]:
    """The frames of ``inputs`` (files, and folders searched recursively for PNG, JPEG and TIFF files
    not named ``*_mask.*``), in input order, each with its unique name (module docstring).

    Files under ``out_dir`` are skipped when a folder is searched: a second run into a folder inside
    the input must not segment the first run's overlays."""
    skip = Path(out_dir).resolve() if out_dir is not None else None
    found: list[tuple[Path, tuple[str, ...]]] = []
    seen: set[Path] = set()

    def add(path: Path, parts: tuple[str, ...]) -> None:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            found.append((path, parts))

    for item in map(Path, inputs):
        if item.is_dir():
            for path in sorted(item.rglob("*")):
                if (path.suffix.lower() in FRAME_SUFFIXES and not path.stem.endswith("_mask") and path.is_file()
                        and not (skip is not None and skip in path.resolve().parents)):
                    add(path, path.relative_to(item).with_suffix("").parts)
        elif item.is_file():
            add(item, (item.stem,))
        else:
            raise PredictInputError(f"{item}: no such file or folder")
    if not found:
        raise PredictInputError("no frames found in the given inputs")
    return [InputFrame(path, name) for (path, _), name in zip(found, _unique_names(found))]


def _unique_names(found: list[tuple[Path, tuple[str, ...]]]) -> list[str]:
    # The absolute path without extension: its tail is the name, longer tails tell clashing frames apart.
    # abspath, not resolve: the names follow the folders the operator sees, not where links point.
    full = [Path(os.path.abspath(path)).with_suffix("").parts[1:] for path, _ in found]
    base = [len(parts) for _, parts in found]
    level = [0] * len(found)    # folders prepended to each name
    keep_suffix = [False] * len(found)

    def name(i: int) -> str:
        text = "/".join(full[i][-(base[i] + level[i]):])
        return text + found[i][0].suffix if keep_suffix[i] else text

    for _ in range(max(map(len, full)) + 2):  # each round prepends a folder or keeps the extension
        groups: dict[str, list[int]] = defaultdict(list)
        for i in range(len(found)):
            groups[name(i).casefold()].append(i)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return [name(i) for i in range(len(found))]
        for group in clashes:
            if len({"/".join(full[i]).casefold() for i in group}) > 1:  # their folders tell them apart
                for i in group:
                    level[i] = min(level[i] + 1, len(full[i]) - base[i])
            else:  # same folder and stem: only the extension differs
                for i in group:
                    keep_suffix[i] = True
    names, used = [], set()
    for i in range(len(found)):  # still shared (names differing only in case, in one folder): numbered
        candidate, n = name(i), 1
        while candidate.casefold() in used:
            n += 1
            candidate = f"{name(i)}~{n}"
        used.add(candidate.casefold())
        names.append(candidate)
    return names


def predict_frames(model, frames: list[InputFrame], out_dir: Path | str, batch_size: int = DEFAULT_BATCH_SIZE,
                   submission: Path | str | None = None, progress: bool = True) -> PredictResult:
    """Segment ``frames`` with ``model`` in batches of ``batch_size`` frames of one size; write each
    frame's mask (0/255 PNG) and overlay under ``out_dir``, the failure list
    (``out_dir/predict_failures.csv``, written on every run, empty when every frame was read) and,
    if asked, the submission CSV (one row per written frame, in input order)."""
    from tqdm import tqdm

    from pipeline.figures import outline_overlay
    from pipeline.rle import rle_encode, write_submission

    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = {f.name: i for i, f in enumerate(frames)}
    encoded: dict[str, str] = {}
    failures: list[dict] = []
    pending: dict[tuple[int, ...], list[tuple[InputFrame, np.ndarray]]] = {}

    def flush(shape: tuple[int, ...]) -> None:
        batch = pending.pop(shape)
        masks = np.asarray(model.predict(np.stack([image for _, image in batch])))
        for (frame, image), mask in zip(batch, masks):
            binary = (mask > 0).astype(np.uint8)
            write_image(mask_path(out_dir, frame.name), binary * 255)
            write_image(overlay_path(out_dir, frame.name), outline_overlay(image, None, binary))
            encoded[frame.name] = rle_encode(binary) if submission is not None else ""

    for frame in tqdm(frames, desc="predict", unit="frame", disable=not progress):
        try:
            image = read_gray(frame.path)
        except ImageReadError as exc:
            failures.append(_failure(frame, exc.reason))
            continue
        except OSError as exc:  # unreadable for the file system (permissions, a vanished file)
            failures.append(_failure(frame, exc.strerror or str(exc)))
            continue
        pending.setdefault(image.shape, []).append((frame, image))
        if len(pending[image.shape]) >= batch_size:
            flush(image.shape)
    for shape in list(pending):
        flush(shape)

    written = sorted(encoded, key=order.__getitem__)
    result = PredictResult(out_dir, len(frames), written, failures, out_dir / FAILURES_CSV)
    failure_list.write(failures, result.failures_csv)
    if submission is not None:
        write_submission(submission, ((name, encoded[name]) for name in written))
        result.submission = Path(submission)
    return result


def _failure(frame: InputFrame, reason: str) -> dict:
    return {"file": str(frame.path), "frame_id": frame.name, "check": "frame_decodes", "severity": "blocking",
            "reason": reason, "imported_as": ""}
