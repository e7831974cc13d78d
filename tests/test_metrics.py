import numpy as np
import pytest

from pipeline.metrics import dice_per_frame, iou_per_frame, presence_accuracy, summarise


def _masks(*areas):
    out = np.zeros((len(areas), 10, 10), np.uint8)
    for i, area in enumerate(areas):
        out[i].flat[:area] = 1
    return out


def test_dice_is_one_when_both_masks_are_empty():
    empty = _masks(0)
    assert dice_per_frame(empty, empty)[0] == 1.0
    assert iou_per_frame(empty, empty)[0] == 1.0


def test_one_false_positive_pixel_on_an_empty_frame_scores_zero():
    assert dice_per_frame(_masks(1), _masks(0))[0] == 0.0
    assert dice_per_frame(_masks(0), _masks(5))[0] == 0.0


def test_partial_overlap():
    pred, true = _masks(10), _masks(20)  # pred is inside true
    assert dice_per_frame(pred, true)[0] == pytest.approx(2 * 10 / 30)
    assert iou_per_frame(pred, true)[0] == pytest.approx(10 / 20)


def test_presence_accuracy_and_summary():
    pred, true = _masks(0, 5, 5, 0), _masks(0, 5, 0, 3)
    assert presence_accuracy(pred, true) == 0.5
    summary = summarise(pred, true)
    assert summary["n_frames"] == 4
    assert summary["dice"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert summary["dice_nerve_frames"] == pytest.approx(0.5)


def test_presence_auroc_and_boundary_distance():
    from pipeline.metrics import auroc, hausdorff95

    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert np.isnan(auroc(np.array([0.2, 0.9]), np.array([1, 1])))
    true = np.zeros((50, 50), np.uint8)
    true[10:20, 10:20] = 1
    shifted = np.roll(true, 2, axis=0)
    assert hausdorff95(true, true) == 0.0
    assert hausdorff95(shifted, true) == pytest.approx(2.0)
    assert np.isnan(hausdorff95(np.zeros_like(true), true))


def test_frame_outcomes_name_what_went_wrong_on_each_frame():
    from pipeline.metrics import frame_outcomes, full_summary

    true = np.zeros((6, 20, 20), np.uint8)
    pred = np.zeros_like(true)
    true[:4, 5:15, 5:15] = 1                     # frames 0-3 have a nerve, 4-5 none
    pred[1, 0:3, 0:3] = 1                        # 1: a mask that does not touch the nerve
    pred[2, 5:7, 5:15] = 1                       # 2: touches it, Dice 20 / 60 < 0.5
    pred[3, 5:15, 6:15] = 1                      # 3: Dice 180 / 190
    pred[4, 0:2, 0:2] = 1                        # 4: a mask on an empty frame
    outcomes = frame_outcomes(pred, true)
    assert list(outcomes) == ["missed", "elsewhere", "poor overlap", "found", "false alarm", "true empty"]
    summary = full_summary(pred, true, np.linspace(0, 1, 6))
    assert (summary["nerve_frames_missed"], summary["nerve_frames_elsewhere"],
            summary["nerve_frames_poor_overlap"], summary["false_alarms"]) == (1, 1, 1, 1)
    assert summary["empty_baseline_dice"] == pytest.approx(2 / 6)  # two of six frames are empty
    # The evaluation passes the outcomes its frame table already holds: the same counts, not computed twice.
    assert full_summary(pred, true, np.linspace(0, 1, 6), outcomes=outcomes) == summary
    given = full_summary(pred, true, outcomes=np.array(["missed"] * 4 + ["true empty"] * 2))
    assert (given["nerve_frames_missed"], given["false_alarms"]) == (4, 0)  # the given outcomes are the ones counted


def test_a_version_that_saw_too_few_frames_without_a_nerve_says_so_plainly():
    from pipeline.metrics import MIN_EMPTY_TRAIN_FRAMES, presence_counts, presence_statement

    split = ["train"] * 100 + ["holdout"] * 20
    has_nerve = [True] * 95 + [False] * 5 + [True] * 10 + [False] * 10
    counts = presence_counts(split, has_nerve)
    assert counts == {"train_frames": 100, "train_empty_frames": 5, "holdout_frames": 20, "holdout_empty_frames": 10}
    warning = presence_statement(counts)
    assert "only 5 frames without a nerve (of 100)" in warning and "will mark a nerve" in warning
    enough = {**counts, "train_empty_frames": MIN_EMPTY_TRAIN_FRAMES}
    assert presence_statement(enough) is None  # 20 of 100: enough examples of "no nerve"
    assert presence_statement({**enough, "train_frames": 1000}) is not None  # 2 %: too rare
    assert presence_statement(None) is None  # registered before the counts were kept: nothing claimed
