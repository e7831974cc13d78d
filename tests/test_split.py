"""The subject split: assigned once, recorded, never reshuffled by data that grows or shrinks."""

import getpass
from collections import Counter

import pandas as pd
import pytest

from pipeline.config import SplitParams
from pipeline.split import (
    SplitError,
    check_rule,
    create_assignment,
    ensure_assignment,
    legacy_groups,
    load_assignment,
    part_of,
    resplit,
    save_assignment,
    split_frames,
)


def _holdout(assignment) -> set[int]:
    return {s for s, p in assignment.parts().items() if p == "holdout"}


def test_every_subject_in_exactly_one_part_and_each_part_used():
    frames = pd.DataFrame({"subject": [s for s in range(1, 11) for _ in range(4)]})
    assignment = create_assignment(list(range(1, 11)), SplitParams(seed=3))
    out = split_frames(frames, assignment)
    assert (out.groupby("subject")["split"].nunique() == 1).all()
    assert out.groupby("subject")["split"].first().to_dict() == assignment.parts()  # the assignment's part
    assert set(out["split"]) == {"train", "validation", "holdout"}


def test_first_assignment_gives_each_part_its_share():
    parts = create_assignment(list(range(1, 21)), SplitParams(seed=0, validation_fraction=0.2,
                                                              holdout_fraction=0.25)).parts()
    assert Counter(parts.values()) == {"holdout": 5, "validation": 4, "train": 11}


def test_adding_a_subject_moves_nobody():
    """The issue's measurement: with the seeded permutation, 6 of 12 holdout subjects of 1-47 had been
    in train or validation for 1-46. Now none can move, and the holdout grows with the data."""
    params = SplitParams()
    first = create_assignment(list(range(1, 47)), params)
    grown, placed = first.extended(list(range(1, 48)))
    assert placed == [47]
    assert all(grown.groups[s] == g for s, g in first.groups.items())
    # The earlier rule, for contrast: the same two subject lists reshuffle the holdout.
    old_46, old_47 = legacy_groups(list(range(1, 47)), params), legacy_groups(list(range(1, 48)), params)
    moved_into_holdout = [s for s, g in old_47.items() if g == "holdout" and old_46.get(s, "holdout") != "holdout"]
    assert len(moved_into_holdout) >= 3


def test_batches_in_any_order_agree_after_the_first():
    """A subject that arrives after the first assignment is placed by its own id alone."""
    params = SplitParams()
    first = create_assignment(list(range(1, 21)), params)
    one_go, _ = first.extended(list(range(1, 48)))
    stepwise, _ = first.extended(list(range(1, 35)))
    stepwise, _ = stepwise.extended(list(range(1, 48)))
    reverse, _ = first.extended([47, 40, 30, *range(1, 48)])
    assert one_go.groups == stepwise.groups == reverse.groups
    assert one_go.digest() == stepwise.digest()
    assert len(_holdout(one_go)) > len(_holdout(first))  # the holdout grows as the data grows


def test_removing_a_subject_moves_no_other(tmp_path):
    params = SplitParams()
    path = tmp_path / "split.yaml"
    first, _, created = ensure_assignment(path, list(range(1, 21)), params)
    assert created
    save_assignment(path, first)
    without_7, placed, created = ensure_assignment(path, [s for s in range(1, 21) if s != 7], params)
    assert not placed and not created and without_7.groups == first.groups  # 7 keeps its part if it returns
    frames = pd.DataFrame({"subject": [s for s in range(1, 21) if s != 7]})
    parts = split_frames(frames, without_7).groupby("subject")["split"].first().to_dict()
    assert parts == {s: p for s, p in first.parts().items() if s != 7}


def test_settings_that_no_longer_match_are_an_error_not_a_reshuffle(tmp_path):
    path = save_assignment(tmp_path / "split.yaml", create_assignment(list(range(1, 13)), SplitParams()))
    with pytest.raises(SplitError, match=r"split.holdout_fraction: recorded 0.25, settings 0.4.*data resplit"):
        ensure_assignment(path, list(range(1, 13)), SplitParams(holdout_fraction=0.4))
    with pytest.raises(SplitError, match="split.seed"):
        check_rule(load_assignment(path), SplitParams(seed=7), str(path))
    # Which fold validates is not part of the rule: no resplit needed to move between folds.
    recorded = create_assignment(list(range(1, 13)), SplitParams(folds=3))
    folds = save_assignment(tmp_path / "folds.yaml", recorded)
    same, placed, created = ensure_assignment(folds, list(range(1, 13)), SplitParams(folds=3, fold=2))
    assert same.groups == recorded.groups and placed == [] and not created


def test_resplit_is_recorded_with_who_why_and_what_moved(tmp_path):
    params = SplitParams()
    first = create_assignment(list(range(1, 21)), params)
    with pytest.raises(SplitError, match="needs a reason"):
        resplit(first, list(range(1, 21)), params, " ")
    changed = SplitParams(holdout_fraction=0.4)
    new, moved = resplit(first, list(range(1, 21)), changed, "a bigger holdout", on_behalf_of="ops")
    assert new.revision == 2 and new.rule.holdout_fraction == 0.4
    assert moved and all(first.groups[s] == a and new.groups[s] == b for s, (a, b) in moved.items())
    record = new.resplits[-1]
    assert record["reason"] == "a bigger holdout" and record["on_behalf_of"] == "ops"
    assert record["actor"] == getpass.getuser() and record["identity"] == "os-user"  # --actor never replaces it
    assert record["previous_digest"] == first.digest() and len(record["moved"]) == len(moved)
    save_assignment(tmp_path / "split.yaml", new)
    back = load_assignment(tmp_path / "split.yaml")
    assert back == new and back.digest() == new.digest()
    current, placed, created = ensure_assignment(tmp_path / "split.yaml", list(range(1, 21)), changed)
    assert current.groups == new.groups and not placed and not created  # the new settings now match


def test_fold_groups_validate_each_subject_once_and_share_the_holdout():
    assignment = create_assignment(list(range(1, 21)), SplitParams(seed=4, folds=5))
    per_fold = [assignment.parts(fold) for fold in range(5)]
    holdouts = [{s for s, p in parts.items() if p == "holdout"} for parts in per_fold]
    assert all(h == holdouts[0] for h in holdouts)
    validated = [s for parts in per_fold for s, p in parts.items() if p == "validation"]
    assert sorted(validated) == sorted(set(range(1, 21)) - holdouts[0])
    assert part_of("fold1", 1) == "validation" and part_of("fold1", 0) == "train" and part_of("holdout", 3) == "holdout"
    with pytest.raises(ValueError, match="split.fold"):
        SplitParams(folds=3, fold=3)


def test_a_broken_split_file_names_itself(tmp_path):
    path = tmp_path / "split.yaml"
    path.write_text("rule: [unclosed\n")
    with pytest.raises(SplitError, match=f"{path}: not valid YAML"):
        load_assignment(path)
    path.write_text("rule: {seed: 1, holdout_fraction: 0.25, validation_fraction: 0.17, folds: 1}\n"
                    "subjects: {1: holdout, 2: fold3}\n")
    with pytest.raises(SplitError, match=r"unknown group\(s\) \['fold3'\]"):
        load_assignment(path)


def test_a_part_left_empty_by_removals_is_a_clear_error():
    assignment = create_assignment([1, 2, 3, 4, 5, 6], SplitParams())
    holdout = _holdout(assignment)
    frames = pd.DataFrame({"subject": [s for s in range(1, 7) if s not in holdout]})
    with pytest.raises(SplitError, match="no subject of the data is in the holdout part.*data resplit"):
        split_frames(frames, assignment)


def test_too_few_subjects_is_a_clear_error():
    with pytest.raises(SplitError, match="at least 3 subjects"):
        create_assignment([1, 2], SplitParams())


def test_an_earlier_preprocess_split_is_adopted_so_an_upgrade_moves_nobody(tmp_path):
    """A workspace prepared before splits were recorded keeps its parts when the split is first recorded."""
    params = SplitParams()
    legacy = legacy_groups(list(range(1, 13)), params)
    frames = pd.DataFrame({"subject": list(range(1, 13)), "split": [legacy[s] for s in range(1, 13)]})
    frames.to_csv(tmp_path / "frames.csv", index=False)
    adopted, placed, created = ensure_assignment(tmp_path / "split.yaml", list(range(1, 15)), params,
                                                 adopt_from=tmp_path / "frames.csv")
    assert created and adopted.method == "adopted"
    assert {s: adopted.groups[s] for s in range(1, 13)} == legacy
    assert set(adopted.groups) == set(range(1, 15))
