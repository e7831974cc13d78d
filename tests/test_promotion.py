import numpy as np
import pytest

from pipeline.config import PromotionParams
from pipeline.promotion import FrameScores, decide, paired_bootstrap

IDS = [f"1_{i}" for i in range(40)]
RULES = PromotionParams(bootstrap_resamples=1000)


def scores(dice, presence=1.0) -> FrameScores:
    """Scores on frames that all hold a nerve, ``presence`` of them with the presence right."""
    dice = np.asarray(dice, float)
    ok = np.arange(len(dice)) < round(presence * len(dice))
    return FrameScores(IDS[: len(dice)], dice, ok, np.ones(len(dice), bool))


def test_first_valid_model_becomes_champion():
    d = decide("1", scores([0.5] * 40), None, None, RULES, validation_passed=True)
    assert d.promote and d.alias == "champion" and "no champion" in d.reason


def test_clearly_better_model_is_promoted():
    rng = np.random.default_rng(0)
    champion = rng.uniform(0.4, 0.7, 40)
    d = decide("2", scores(champion + 0.1), "1", scores(champion), RULES, True)
    assert d.promote and d.alias == "champion" and d.interval_low > 0 and "better" in d.reason
    assert d.dice_difference == pytest.approx(0.1) and d.champion_dice == pytest.approx(champion.mean())


def test_equal_or_noisy_model_is_not_promoted():
    rng = np.random.default_rng(1)
    champion = rng.uniform(0.4, 0.7, 40)
    same = decide("2", scores(champion), "1", scores(champion), RULES, True)
    assert not same.promote and same.alias == "challenger" and "not measurably better" in same.reason
    noisy = decide("2", scores(champion + rng.normal(0.005, 0.1, 40)), "1", scores(champion), RULES, True)
    assert not noisy.promote and noisy.interval_low <= 0


def test_margin_presence_tolerance_and_validation_are_enforced():
    champion = np.full(40, 0.5)
    better = champion + 0.05
    assert not decide("2", scores(better), "1", scores(champion), PromotionParams(margin=0.1), True).promote
    drop = decide("2", scores(better, presence=0.9), "1", scores(champion), RULES, True)
    assert not drop.promote and "presence accuracy drops" in drop.reason
    invalid = decide("2", scores(better), "1", scores(champion), RULES, validation_passed=False)
    assert not invalid.promote and "validation" in invalid.reason


def test_frames_must_be_the_same():
    with pytest.raises(ValueError, match="same frames"):
        decide("2", scores([0.5] * 40), "1", FrameScores(IDS[::-1], np.full(40, 0.5), *[np.ones(40, bool)] * 2), RULES, True)


def test_bootstrap_interval_is_the_mean_with_its_sampling_spread_and_is_seeded():
    diff = np.random.default_rng(2).normal(0.02, 0.05, 200)
    mean, low, high = paired_bootstrap(diff, 2000, 0.95, seed=0)
    assert mean == pytest.approx(diff.mean(), abs=1e-12)
    # A percentile interval of the mean of 200 draws: about mean -+ 1.96 standard errors, centred on it.
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert low == pytest.approx(mean - half, abs=0.15 * half) and high == pytest.approx(mean + half, abs=0.15 * half)
    narrower = paired_bootstrap(diff, 2000, 0.5, seed=0)
    assert low < narrower[1] < mean < narrower[2] < high  # the confidence sets the interval's width
    assert paired_bootstrap(diff, 2000, 0.95, seed=0) == (mean, low, high)
    assert paired_bootstrap(diff, 2000, 0.95, seed=1) != (mean, low, high)  # the seed chooses the draws


def test_decision_is_recorded_as_tags_and_markdown():
    # Every frame gains exactly 0.1: every resample's mean is 0.1, so the interval is [0.1, 0.1].
    d = decide("2", scores([0.6] * 40), "1", scores([0.5] * 40), RULES, True)
    tags = d.tags()
    assert tags["promotion.decision"] == "promoted" and tags["promotion.reason"] == d.reason
    assert (tags["promotion.challenger_dice"], tags["promotion.champion_dice_same_frames"],
            tags["promotion.dice_difference"]) == ("0.600000", "0.500000", "0.100000")
    assert tags["promotion.champion_version"] == "1" and tags["promotion.n_frames"] == "40"
    assert tags["promotion.interval"] == "[0.100000, 0.100000] at 0.95"
    assert "champion v1" in d.to_markdown()
    refused = decide("2", scores([0.5] * 40), "1", scores([0.5] * 40), RULES, True).tags()
    assert refused["promotion.decision"] == "not_promoted"
    assert refused["promotion.interval"] == "[0.000000, 0.000000] at 0.95"


def clustered(offsets: list[float], frames_per_subject: int, seed: int = 3) -> tuple[np.ndarray, list[str]]:
    """Per-frame Dice differences where each subject's frames share its offset: one video's near-duplicates."""
    rng = np.random.default_rng(seed)
    diff = np.concatenate([o + rng.normal(0, 0.01, frames_per_subject) for o in offsets])
    return diff, [f"s{i}" for i, _ in enumerate(offsets) for _ in range(frames_per_subject)]


def test_resampling_subjects_sees_that_near_duplicate_frames_are_not_independent():
    # Eight subjects of 50 near-identical frames each: four gain, four lose a little or nothing; the mean gain
    # rests on eight draws, not on 400.
    diff, subjects = clustered([0.05, 0.03, 0.02, 0.0, -0.01, -0.02, 0.03, -0.005], 50)
    champion = np.full(len(diff), 0.6)
    ids = [f"{s}_{i}" for i, s in enumerate(subjects)]
    ones = np.ones(len(diff), bool)
    mine, theirs = FrameScores(ids, champion + diff, ones, ones, subjects), FrameScores(ids, champion, ones, ones, subjects)
    by_frame = decide("2", mine, "1", theirs, RULES, True)
    by_subject = decide("2", mine, "1", theirs, PromotionParams(bootstrap_resamples=1000, resample="subject"), True)
    assert by_frame.promote and not by_subject.promote
    assert (by_subject.interval_high - by_subject.interval_low) > 3 * (by_frame.interval_high - by_frame.interval_low)
    assert by_subject.dice_difference == pytest.approx(by_frame.dice_difference)  # the same mean over frames
    assert (by_subject.resample, by_subject.n_subjects, by_frame.n_subjects) == ("subject", 8, 8)
    assert by_subject.tags()["promotion.resample"] == "subject" and "of the 8 subjects" in by_subject.to_markdown()
    assert "of the 400 frames" in by_frame.to_markdown()
    # Enough subjects to resample them: the frame decision says so, the subject decision has nothing to add.
    assert "promotion.resample: subject gives an honest interval" in by_frame.to_markdown()
    assert by_subject.advice == "" and "Note:" not in by_subject.to_markdown()
    few = decide("2", FrameScores(ids[:100], champion[:100] + diff[:100], ones[:100], ones[:100], subjects[:100]),
                 "1", FrameScores(ids[:100], champion[:100], ones[:100], ones[:100], subjects[:100]), RULES, True)
    assert few.n_subjects == 2 and few.advice == ""  # too few subjects to resample: no such advice


def test_one_frame_per_subject_resamples_exactly_like_frames():
    diff = np.random.default_rng(4).normal(0.01, 0.05, 60)
    groups = [f"{i:03d}" for i in range(60)]  # already in np.unique's order: the same draws
    assert paired_bootstrap(diff, 500, 0.95, 0, groups) == paired_bootstrap(diff, 500, 0.95, 0)


def test_resampling_too_few_subjects_promotes_nothing_and_says_why():
    diff, subjects = clustered([0.2, 0.2, 0.2], 20)
    ids = [f"{s}_{i}" for i, s in enumerate(subjects)]
    ones = np.ones(len(diff), bool)
    rules = PromotionParams(resample="subject", min_subjects=5)
    d = decide("2", FrameScores(ids, 0.5 + diff, ones, ones, subjects), "1",
               FrameScores(ids, np.full(60, 0.5), ones, ones, subjects), rules, True)
    assert not d.promote and "3 subjects, fewer than promotion.min_subjects 5" in d.reason
    first = decide("1", FrameScores(ids, 0.5 + diff, ones, ones, subjects), None, None, rules, True)
    assert first.promote  # without a champion there is nothing to compare: the first valid model
    with pytest.raises(ValueError, match="subject"):
        decide("2", scores([0.6] * 40), "1", scores([0.5] * 40), rules, True)


def holdout(nerve_dice: float, false_alarms: int, nerve: int = 28, empty: int = 62) -> FrameScores:
    """The quickstart's holdout shape (90 frames, 62 empty): nerve frames at ``nerve_dice``, and
    ``false_alarms`` empty frames wrongly given a mask (Dice 0 there, 1 on the other empty frames)."""
    dice = np.concatenate([np.full(nerve, nerve_dice), np.zeros(false_alarms), np.ones(empty - false_alarms)])
    has_nerve = np.arange(nerve + empty) < nerve
    ok = np.concatenate([np.full(nerve, nerve_dice > 0), np.zeros(false_alarms, bool), np.ones(empty - false_alarms, bool)])
    return FrameScores([f"{i % 3}_{i}" for i in range(nerve + empty)], dice, ok, has_nerve)


def test_a_model_that_never_finds_the_nerve_does_not_become_the_first_champion():
    # Phantom seed 6 (docs/benchmarks.md): every frame left empty scores 0.689 on this holdout.
    blind = holdout(0.0, 0)
    assert blind.mean_dice == pytest.approx(62 / 90) and blind.empty_baseline_dice == pytest.approx(62 / 90)
    d = decide("1", blind, None, None, RULES, True)
    assert not d.promote and d.alias == "challenger"
    assert "Dice 0.0000 on the holdout's 28 nerve frames, under promotion.min_nerve_dice 0.5" in d.reason
    # Without the nerve-frame floor the gain over "no nerve anywhere" (exactly 0) still refuses it.
    no_nerve_floor = decide("1", blind, None, None, RULES.model_copy(update={"min_nerve_dice": 0.0}), True)
    assert not no_nerve_floor.promote and "gain of +0.0000" in no_nerve_floor.reason
    off = RULES.model_copy(update={"min_nerve_dice": 0.0, "min_gain_over_empty": -1.0})
    assert decide("1", blind, None, None, off, True).promote


def test_false_alarms_on_a_whole_subject_fall_below_predicting_nothing():
    # Phantom seed 3 with the former augmentation: nerve frames fine, 27 empty frames of one subject flagged.
    collapsed = holdout(0.787, 27)
    d = decide("1", collapsed, None, None, RULES, True)
    assert collapsed.nerve_dice == pytest.approx(0.787) and collapsed.mean_dice < collapsed.empty_baseline_dice
    assert not d.promote and "against 0.6889 for predicting no nerve on any frame" in d.reason
    healthy = decide("1", holdout(0.80, 0), None, None, RULES, True)
    assert healthy.promote and "clears the floor" in healthy.reason


def test_the_floor_holds_against_a_champion_too():
    # A broken champion is beaten, but the challenger is itself below the floor: the champion stays.
    champion, challenger = holdout(0.0, 0), holdout(0.3, 0)
    d = decide("2", challenger, "1", champion, RULES, True)
    assert d.interval_low > 0 and not d.promote and "min_nerve_dice" in d.reason
    assert decide("2", holdout(0.6, 0), "1", champion, RULES, True).promote


def test_a_holdout_without_nerve_frames_cannot_check_the_floor():
    empty = holdout(0.0, 0, nerve=0, empty=30)
    d = decide("1", empty, None, None, RULES, True)
    assert empty.nerve_dice is None and not d.promote and "no frame with a nerve" in d.reason
    assert "none in the holdout" in d.to_markdown()


def test_the_floor_is_recorded_in_tags_and_markdown():
    d = decide("1", holdout(0.8, 2), None, None, RULES, True)
    tags = d.tags()
    assert (tags["promotion.challenger_nerve_dice"], tags["promotion.empty_baseline_dice"]) == ("0.800000", "0.688889")
    assert "Floor: Dice on the nerve frames 0.8000 (at least 0.5)" in d.to_markdown()
    assert d.to_dict()["min_gain_over_empty"] == 0.0
