"""The competition's file layout: ``train/{subject}_{n}.tif`` and ``train/{subject}_{n}_mask.tif``."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

FRAME_NAME = re.compile(r"^(?P<subject>\d+)_(?P<n>\d+)$")
IMAGE_SUFFIX = ".tif"
MASK_SUFFIX = "_mask.tif"


def train_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "train"


def list_frame_pairs(data_dir: Path) -> pd.DataFrame:
    """Frames that have a mask, sorted by subject and frame number.

    Columns: frame_id, subject, n, image_path, mask_path (paths relative to ``data_dir``).
    Validation reports unpaired or badly named files; this only lists the good pairs.
    """
    data_dir = Path(data_dir)
    rows = []
    for image in sorted(train_dir(data_dir).glob(f"*{IMAGE_SUFFIX}")):
        if image.name.endswith(MASK_SUFFIX):
            continue
        match = FRAME_NAME.match(image.stem)
        mask = image.with_name(image.stem + MASK_SUFFIX)
        if not match or not mask.is_file():
            continue
        rows.append(
            {
                "frame_id": image.stem,
                "subject": int(match["subject"]),
                "n": int(match["n"]),
                "image_path": image.relative_to(data_dir).as_posix(),
                "mask_path": mask.relative_to(data_dir).as_posix(),
            }
        )
    frame = pd.DataFrame(rows, columns=["frame_id", "subject", "n", "image_path", "mask_path"])
    return frame.sort_values(["subject", "n"], kind="stable").reset_index(drop=True)
