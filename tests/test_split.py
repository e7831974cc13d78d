import pandas as pd
import pytest

from pipeline.config import SplitParams
from pipeline.split import SplitError, assign_subjects, split_frames


def test_every_subject_in_exactly_one_part_and_each_part_used():
    frames = pd.DataFrame({"subject": [s for s in range(1, 11) for _ in range(4)]})
    out = split_frames(frames, SplitParams(seed=3))
    per_subject = out.groupby("subject")["split"].nunique()
    assert (per_subject == 1).all()
    assert set(out["split"]) == {"train", "validation", "holdout"}


def test_split_is_seeded():
    subjects = list(range(1, 21))
    assert assign_subjects(subjects, SplitParams(seed=5)) == assign_subjects(subjects, SplitParams(seed=5))
    assert assign_subjects(subjects, SplitParams(seed=5)) != assign_subjects(subjects, SplitParams(seed=6))


def test_fractions_are_respected():
    parts = assign_subjects(list(range(1, 21)), SplitParams(seed=0, validation_fraction=0.2, holdout_fraction=0.25))
    counts = pd.Series(parts).value_counts()
    assert counts["holdout"] == 5 and counts["validation"] == 4 and counts["train"] == 11


def test_too_few_subjects_is_a_clear_error():
    with pytest.raises(SplitError, match="at least 3 subjects"):
        assign_subjects([1, 2], SplitParams())
