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
    """Map each subject to a part; at least one subject per part.

    With ``params.folds = k > 1`` the non-holdout subjects are dealt into k groups in a seeded
    order, and group ``params.fold`` is the validation part: the holdout is the same for every
    fold, so fold models can be compared on it.
    """
    unique = sorted(set(int(s) for s in subjects))
    if len(unique) < 3:
        raise SplitError(
            f"a subject split needs at least 3 subjects, found {len(unique)}: add frames of more subjects"
        )
    order = [int(s) for s in np.random.default_rng(params.seed).permutation(unique)]
    n_holdout = max(1, round(params.holdout_fraction * len(unique)))
    if params.folds > 1:
        if len(unique) - n_holdout < params.folds + 1:
            raise SplitError(
                f"{params.folds}-fold cross-validation needs at least {params.folds + 1} subjects outside the "
                f"holdout, found {len(unique) - n_holdout}: lower split.folds or add subjects"
            )
        parts = {s: "holdout" for s in order[:n_holdout]}
        for index, group in enumerate(fold_groups(order[n_holdout:], params.folds)):
            for s in group:
                parts[s] = "validation" if index == params.fold else "train"
        return parts
    n_validation = max(1, round(params.validation_fraction * len(unique)))
    if n_holdout + n_validation >= len(unique):
        n_holdout, n_validation = 1, 1
    parts = {}
    for i, subject in enumerate(order):
        if i < n_holdout:
            parts[subject] = "holdout"
        elif i < n_holdout + n_validation:
            parts[subject] = "validation"
        else:
            parts[subject] = "train"
    return parts


def fold_groups(subjects: list[int], folds: int) -> list[list[int]]:
    """Deal subjects (already in a seeded order) into ``folds`` groups of near-equal size."""
    return [list(map(int, group)) for group in np.array_split(np.asarray(subjects), folds)]


def split_frames(frames: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """Add a ``split`` column to a frame table that has a ``subject`` column."""
    parts = assign_subjects(frames["subject"].tolist(), params)
    out = frames.copy()
    out["split"] = out["subject"].map(parts)
    return out
