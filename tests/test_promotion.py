import numpy as np
import pytest

from pipeline.config import PromotionParams
from pipeline.promotion import FrameScores, decide, paired_bootstrap

IDS = [f"1_{i}" for i in range(40)]
RULES = PromotionParams(bootstrap_resamples=1000)


def scores(dice, presence=1.0) -> FrameScores:
    dice = np.asarray(dice, float)
    ok = np.arange(len(dice)) < round(presence * len(dice))
    return FrameScores(IDS[: len(dice)], dice, ok)


def test_first_valid_model_becomes_champion():
    d = decide("1", scores([0.5] * 40), None, None, RULES, validation_passed=True)
    assert d.promote and d.alias == "champion" and "no champion" in d.reason


def test_clearly_better_model_is_promoted():
    rng = np.random.default_rng(0)
    champion = rng.uniform(0.4, 0.7, 40)
    d = decide("2", scores(champion + 0.1), "1", scores(champion), RULES, True)
    assert d.promote and d.interval_low > 0 and "better" in d.reason


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
        decide("2", scores([0.5] * 40), "1", FrameScores(IDS[::-1], np.full(40, 0.5), np.ones(40, bool)), RULES, True)


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    diff = np.random.default_rng(2).normal(0.02, 0.05, 200)
    mean, low, high = paired_bootstrap(diff, 2000, 0.95, seed=0)
    assert low < mean < high
    assert paired_bootstrap(diff, 2000, 0.95, seed=0) == (mean, low, high)


def test_decision_is_recorded_as_tags_and_markdown():
    d = decide("2", scores([0.6] * 40), "1", scores([0.5] * 40), RULES, True)
    tags = d.tags()
    assert tags["promotion.champion_dice_same_frames"] == "0.500000"
    assert tags["promotion.interval"].startswith("[")
    assert "champion v1" in d.to_markdown()
