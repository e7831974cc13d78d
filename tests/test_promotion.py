from pipeline.promotion import decide


def test_first_model_becomes_champion():
    d = decide("dice", "1", 0.4, None, None, 20)
    assert d.promote and d.alias == "champion" and "no champion" in d.reason


def test_better_model_is_promoted_worse_or_equal_is_not():
    assert decide("dice", "2", 0.71, "1", 0.70, 20).promote
    assert not decide("dice", "2", 0.70, "1", 0.70, 20).promote
    worse = decide("dice", "2", 0.60, "1", 0.70, 20)
    assert not worse.promote and worse.alias == "challenger"
    assert "does not beat" in worse.reason


def test_margin_is_respected_and_recorded_in_tags():
    d = decide("dice", "2", 0.705, "1", 0.70, 20, min_improvement=0.01)
    assert not d.promote
    tags = d.tags()
    assert tags["promotion.decision"] == "not_promoted"
    assert tags["promotion.champion_score_same_frames"] == "0.700000"
    assert "0.7050" in d.to_markdown()
