"""Preprocess stage: resize frames and masks to the working size, split by subject,
and record the normalisation statistics of the training part.

Outputs (``data/prepared``, a DVC stage output):
- ``arrays.npz``: ``images`` (N, h, w) uint8, ``masks`` (N, h, w) uint8 in {0, 1} and ``coverage``
  (N, h, w) uint8, the share of each working-size pixel that the native mask covers (0-255): a
  native outline falls inside working pixels, and 0/1 masks round it to the working grid
  (``train.soft_targets`` trains on the coverage instead);
- ``frames.csv``: one row per frame with its part (``split``), its subject's recorded ``group``
  (a part, or a fold group), native paths and native mask area;
- ``summary.json``: subjects per part, the recorded split's digest and revision, working size,
  intensity mean/std of train.

The parts come from the recorded subject split (:mod:`pipeline.split`, ``data/split.yaml``),
never from a split computed here.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import Params
from pipeline.atomic import atomic_output, atomic_write_text
from pipeline.imageio import read_gray
from pipeline.layout import list_frame_pairs
from pipeline.split import (
    PARTS,
    SubjectAssignment,
    assert_no_subject_leak,
    create_assignment,
    split_frames,
    subjects_by_part,
)

ARRAYS = "arrays.npz"
FRAMES = "frames.csv"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class PreparedSummary:
    n_frames: int
    height: int
    width: int
    split_seed: int
    subjects: dict[str, list[int]]
    frames_per_part: dict[str, int]
    empty_share: dict[str, float]
    intensity_mean: float      # of train frames, on the 0-1 scale
    intensity_std: float
    split_digest: str = ""     # the recorded subject split (pipeline.split) the parts come from
    split_revision: int = 0
    split_fold: int = 0        # the fold whose group validates (split.fold)


def resize_frame(image: np.ndarray, height: int, width: int) -> np.ndarray:
    # INTER_AREA averages speckle instead of aliasing it when shrinking.
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The working-size mask (0/1: pixels at least half covered) and its coverage (0-255)."""
    small = cv2.resize((mask > 0).astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return (small >= 0.5).astype(np.uint8), np.round(small * 255).astype(np.uint8)


def _load_pair(data_dir: Path, row: pd.Series, height: int, width: int):
    return load_pair((str(data_dir / row.image_path), str(data_dir / row.mask_path), height, width))


def load_pair(job: tuple[str, str, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The per-file unit of preprocessing: ``(frame path, mask path, height, width)`` -> the resized
    frame, mask and mask coverage and the native mask area. Module-level, so a Dask worker can run it."""
    image_path, mask_path, height, width = job
    image = read_gray(Path(image_path))
    mask = read_gray(Path(mask_path))
    return resize_frame(image, height, width), *resize_mask(mask, height, width), int((mask > 0).sum())


def preprocess(data_dir: Path, out_dir: Path, params: Params, progress: bool = True,
               mapper=None, assignment: SubjectAssignment | None = None) -> PreparedSummary:
    """``mapper(load_pair, jobs) -> results`` (same order) runs the per-file work elsewhere (e.g. a Dask
    cluster, see ``flows/runner.py``); without it, a pool of 4 threads does. ``assignment``: the
    recorded subject split (``stages.prepare`` passes it); without one, a first assignment of these
    subjects is made in memory (tools and tests that prepare a folder outside a project)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    frames = list_frame_pairs(data_dir)
    if frames.empty:
        raise ValueError(f"{data_dir}: no frame/mask pairs in train/; expected train/{{subject}}_{{n}}.tif")
    if assignment is None:
        assignment = create_assignment(frames["subject"].tolist(), params.split)
    frames = split_frames(frames, assignment, params.split.fold)
    # The split is by subject by construction; check it anyway, since a leak would inflate every score.
    assert_no_subject_leak(frames)
    h, w = params.preprocess.height, params.preprocess.width

    if mapper is not None:
        loaded = list(mapper(load_pair, [(str(data_dir / r.image_path), str(data_dir / r.mask_path), h, w)
                                         for r in frames.itertuples(index=False)]))
    else:
        with ThreadPoolExecutor(max_workers=4) as pool:  # decoding releases the GIL
            loaded = list(
                tqdm(
                    pool.map(lambda r: _load_pair(data_dir, r, h, w), frames.itertuples(index=False)),
                    total=len(frames),
                    desc="preprocess",
                    disable=not progress,
                )
            )
    images = np.stack([item[0] for item in loaded])
    masks = np.stack([item[1] for item in loaded])
    coverage = np.stack([item[2] for item in loaded])
    frames["mask_area"] = [item[3] for item in loaded]
    frames["has_nerve"] = frames["mask_area"] > 0

    train = images[frames["split"].to_numpy() == "train"].astype(np.float32) / 255.0
    summary = PreparedSummary(
        n_frames=len(frames),
        height=h,
        width=w,
        split_seed=params.split.seed,
        subjects=subjects_by_part(frames),
        frames_per_part={p: int((frames.split == p).sum()) for p in PARTS},
        empty_share={p: round(float((~frames.loc[frames.split == p, "has_nerve"]).mean()), 4) for p in PARTS},
        intensity_mean=round(float(train.mean()), 6),
        intensity_std=round(float(train.std()) or 1.0, 6),
        split_digest=assignment.digest(),
        split_revision=assignment.revision,
        split_fold=params.split.fold,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / ARRAYS, suffix=".npz") as tmp:  # np.savez adds .npz to any other name
        np.savez_compressed(tmp, images=images, masks=masks, coverage=coverage)
    atomic_write_text(out_dir / FRAMES, frames.to_csv(index=False))
    atomic_write_text(out_dir / SUMMARY, json.dumps(asdict(summary), indent=2))
    return summary


@dataclass
class PreparedData:
    images: np.ndarray
    masks: np.ndarray
    frames: pd.DataFrame
    summary: PreparedSummary
    coverage: np.ndarray | None = None  # absent from data prepared before it was stored
    source: Path | None = None          # the folder it was loaded from, for error messages

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        keep = self.frames["split"].to_numpy() == name
        return self.images[keep], self.masks[keep], self.frames[keep].reset_index(drop=True)

    def targets(self, keep: np.ndarray, soft: bool) -> np.ndarray:
        """Training targets of the frames in ``keep``: the 0/1 masks, or with ``soft`` each pixel's
        mask coverage as float32 in [0, 1] (``train.soft_targets``)."""
        if not soft:
            return self.masks[keep]
        if self.coverage is None:
            where = self.source / ARRAYS if self.source else ARRAYS
            raise ValueError(f"{where}: no 'coverage' array (prepared before it was stored), and "
                             "train.soft_targets needs it; run the preprocess stage again "
                             "(dvc repro preprocess, or nerveseg run)")
        return self.coverage[keep].astype(np.float32) / 255.0

    def part_targets(self, name: str, soft: bool) -> np.ndarray:
        return self.targets(self.frames["split"].to_numpy() == name, soft)


def load_prepared(out_dir: Path) -> PreparedData:
    out_dir = Path(out_dir)
    if not (out_dir / ARRAYS).is_file():
        raise FileNotFoundError(f"{out_dir / ARRAYS}: missing; run the preprocess stage first")
    with np.load(out_dir / ARRAYS) as arrays:
        images, masks = arrays["images"], arrays["masks"]
        coverage = arrays["coverage"] if "coverage" in arrays.files else None
    frames = pd.read_csv(out_dir / FRAMES)
    summary = PreparedSummary(**json.loads((out_dir / SUMMARY).read_text()))
    return PreparedData(images, masks, frames, summary, coverage, out_dir)
