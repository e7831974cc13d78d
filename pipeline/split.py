"""Split frames into train / validation / holdout **by subject**, seeded and recorded.

Frames of one subject are strongly correlated (a slow sweep), so a frame-level split
would leak; every subject lands in exactly one part.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import SplitParams

PARTS = ("train", "validation", "holdout")


class SplitError(ValueError):
    pass


def assign_subjects(subjects: list[int], params: SplitParams) -> dict[int, str]:
    """Map each subject to a part; at least one subject per part."""
    unique = sorted(set(int(s) for s in subjects))
    if len(unique) < 3:
        raise SplitError(
            f"a subject split needs at least 3 subjects, found {len(unique)}: add frames of more subjects"
        )
    order = np.random.default_rng(params.seed).permutation(unique)
    n_holdout = max(1, round(params.holdout_fraction * len(unique)))
    n_validation = max(1, round(params.validation_fraction * len(unique)))
    if n_holdout + n_validation >= len(unique):
        n_holdout, n_validation = 1, 1
    parts: dict[int, str] = {}
    for i, subject in enumerate(order):
        if i < n_holdout:
            parts[int(subject)] = "holdout"
        elif i < n_holdout + n_validation:
            parts[int(subject)] = "validation"
        else:
            parts[int(subject)] = "train"
    return parts


def split_frames(frames: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """Add a ``split`` column to a frame table that has a ``subject`` column."""
    parts = assign_subjects(frames["subject"].tolist(), params)
    out = frames.copy()
    out["split"] = out["subject"].map(parts)
    return out
