"""Registration, the promotion gate, manual promotion, rollback and audit on a real MLflow store."""

from __future__ import annotations

import getpass

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pipeline import registry, release, stages
from pipeline.audit import lineage
from pipeline.config import Params
from pipeline.paths import ProjectPaths
from tests.conftest import TINY_SETTINGS, deep_update, seed_mlflow_store, write_simple_dataset

NAME = "nerve-segmentation"
WORSE = {"train": {"learning_rate": 0.0, "epochs": 1}, "postprocess": {"tune": False, "presence_threshold": 0.0}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A good and a deliberately worse model on the same simple dataset, trained once."""
    root = tmp_path_factory.mktemp("release")
    base = deep_update(Params().model_dump(), TINY_SETTINGS)
    base = deep_update(base, {"train": {"epochs": 6}})
    params = Params.model_validate(base)
    paths = ProjectPaths.of(root, params)
    write_simple_dataset(paths.raw_dir, subjects=6, frames=6)
    stages.prepare(paths, params, progress=False)
    bundles = {}
    for label, p in (("good", params), ("worse", Params.model_validate(deep_update(base, WORSE)))):
        stages.fit(paths, p, progress=False)
        stages.score(paths, p)
        bundles[label] = root / label
        shutil.copytree(paths.models_dir, root / label / "models")
        shutil.copytree(paths.reports_dir, root / label / "reports")
    return paths, params, bundles


@pytest.fixture
def store(trained, tmp_path, mlflow_store_template):
    """The trained models with a fresh MLflow store of their own (a copy of the session's empty store:
    MLflow's schema migrations once, not per test)."""
    paths, params, bundles = trained
    paths = dataclasses.replace(paths, mlflow_dir=tmp_path / "mlflow")
    seed_mlflow_store(paths.mlflow_dir, mlflow_store_template)
    registry.configure(paths.mlflow_dir, params.registry.experiment)

    def register(label: str, validation: str = "true") -> str:
        shutil.rmtree(paths.models_dir)
        shutil.rmtree(paths.reports_dir)
        shutil.copytree(bundles[label] / "models", paths.models_dir)
        shutil.copytree(bundles[label] / "reports", paths.reports_dir)
        experiment = registry.configure(paths.mlflow_dir, params.registry.experiment)
        run = registry.client().create_run(experiment)
        tags = {registry.TAG_VALIDATION: validation, registry.TAG_DATA_HASH: "d41d8cd98f.dir"}
        return release.register_model(paths, params, run.info.run_id, tags, {"dice": 0.5})

    return paths, params, register


def champion() -> str | None:
    found = registry.version_by_alias(NAME, registry.CHAMPION)
    return None if found is None else str(found.version)


def test_better_challenger_is_promoted_and_recorded(store):
    paths, params, register = store
    worse = register("worse")
    assert release.promote(paths, params, worse).promote  # no champion yet
    better = register("good")
    decision = release.promote(paths, params, better)
    assert decision.promote and decision.interval_low > 0
    assert champion() == better
    tags = registry.client().get_model_version(NAME, better).tags
    assert tags[release.PREVIOUS_CHAMPION] == worse
    assert float(tags["promotion.champion_dice_same_frames"]) == pytest.approx(decision.champion_dice, abs=1e-6)
    assert tags["promotion.champion_version"] == worse and tags["promotion.reason"] == decision.reason
    actions = [(e["version"], e["action"]) for e in release.history(NAME)]
    assert actions == [(worse, "promote"), (better, "promote")]


def test_worse_or_equal_challenger_is_not_promoted(store):
    paths, params, register = store
    first = register("good")
    release.promote(paths, params, first)
    worse = release.promote(paths, params, register("worse"))
    assert not worse.promote and worse.champion_dice > worse.challenger_dice
    same = release.promote(paths, params, register("good"))
    assert not same.promote and "not measurably better" in same.reason
    assert champion() == first
    assert str(registry.version_by_alias(NAME, registry.CHALLENGER).version) == same.challenger_version
    assert [e["action"] for e in release.history(NAME)] == ["promote", "reject", "reject"]


def test_gate_can_resample_the_holdout_subjects(store):
    paths, params, register = store
    release.promote(paths, params, register("worse"))
    subjects = release.holdout_table(paths)["subject"].nunique()
    rules = params.model_copy(update={"promotion": params.promotion.model_copy(
        update={"resample": "subject", "min_subjects": subjects + 1})})
    good = register("good")
    decision = release.promote(paths, rules, good)  # far better, but too few subjects to tell
    assert not decision.promote and f"{subjects} subjects, fewer than promotion.min_subjects" in decision.reason
    tags = registry.client().get_model_version(NAME, good).tags
    assert (tags["promotion.resample"], tags["promotion.n_subjects"]) == ("subject", str(subjects))
    assert release.history(NAME)[-1]["n_subjects"] == subjects


def test_the_floor_keeps_an_untrained_model_from_becoming_the_first_champion(store):
    paths, params, register = store
    # The repository's floor, not the tests' off (on a holdout of 2 subjects, the minimum of subjects to compare on
    # is the tests' own).
    rules = params.model_copy(update={"promotion": Params().promotion.model_copy(
        update={"min_comparison_subjects": params.promotion.min_comparison_subjects})})
    untrained = register("worse")
    decision = release.promote(paths, rules, untrained)
    assert not decision.promote and "below the floor" in decision.reason
    assert champion() is None
    assert str(registry.version_by_alias(NAME, registry.CHALLENGER).version) == untrained
    tags = registry.client().get_model_version(NAME, untrained).tags
    assert float(tags["promotion.challenger_nerve_dice"]) < rules.promotion.min_nerve_dice
    assert tags["promotion.reason"] == decision.reason
    event = release.history(NAME)[-1]
    assert (event["action"], event["challenger_nerve_dice"]) == ("reject", decision.challenger_nerve_dice)
    trained = release.promote(paths, rules, register("good"))  # no champion yet, and it clears the floor
    assert trained.promote and trained.challenger_nerve_dice >= rules.promotion.min_nerve_dice
    assert "clears the floor" in trained.reason and champion() == trained.challenger_version
    # A person may overrule the floor by hand; the ledger keeps the gate's refusal beside the reason.
    forced = release.manual_promote(NAME, untrained, "demo of an untrained model", on_behalf_of="carol")
    assert champion() == untrained and forced["overrules_gate"] == decision.reason
    clean = release.manual_promote(NAME, trained.challenger_version, "back to the trained one", on_behalf_of="carol")
    assert clean["overrules_gate"] == ""  # the gate had promoted it: nothing overruled


def test_failed_validation_blocks_promotion(store):
    paths, params, register = store
    release.promote(paths, params, register("worse"))
    decision = release.promote(paths, params, register("good", validation="false"))
    assert not decision.promote and decision.reason == "the data validation of this data version did not pass"


def test_a_version_that_cannot_load_never_becomes_champion(store):
    paths, params, register = store
    good = register("good")
    release.promote(paths, params, good)
    broken = str(registry.client().create_model_version(NAME, str(paths.root / "no-such-model"), run_id=None).version)
    with pytest.raises(release.PromotionError, match="cannot be loaded"):
        release.promote(paths, params, broken)
    with pytest.raises(release.PromotionError, match="cannot be loaded"):
        release.manual_promote(NAME, broken, "operator insists", on_behalf_of="ops")
    assert champion() == good


def test_manual_promotion_and_rollback_are_recorded(store):
    paths, params, register = store
    first = register("good")
    release.promote(paths, params, first)
    second = register("worse")
    release.promote(paths, params, second)  # rejected: stays challenger
    with pytest.raises(release.PromotionError, match="reason"):
        release.manual_promote(NAME, second, "  ")
    event = release.manual_promote(NAME, second, "hotfix requested by the ward", on_behalf_of="alice")
    assert champion() == second and event["previous_champion"] == first
    # the identity is who acts (the OS user on an embedded store); --actor text is kept beside it
    assert (event["actor"], event["identity"], event["on_behalf_of"]) == (getpass.getuser(), "os-user", "alice")
    back = release.rollback(NAME, "hotfix made things worse", on_behalf_of="bob")
    assert champion() == first and back["replaced"] == second
    with pytest.raises(release.PromotionError, match="nothing to roll back"):
        release.rollback(NAME, "again")
    last = release.history(NAME)[-1]
    assert (last["action"], last["actor"], last["on_behalf_of"], last["reason"]) == (
        "rollback", getpass.getuser(), "bob", "hotfix made things worse")


def test_audit_gives_lineage_and_history(store):
    paths, params, register = store
    version = register("good")
    release.promote(paths, params, version)
    record = lineage(f"models:/{NAME}@champion", NAME)
    assert record["version"] == version and record["aliases"] == ["champion"]
    assert record["data"]["dvc_hash"] == "d41d8cd98f.dir"
    assert record["holdout"]["dice"] == 0.5
    assert record["history"][0]["action"] == "promote"


def test_an_alias_moved_outside_the_project_commands_is_reported(store):
    paths, params, register = store
    first = register("good")
    release.promote(paths, params, first)
    second = register("worse")
    release.promote(paths, params, second)
    assert release.unrecorded_alias_move(NAME) is None
    registry.set_alias(NAME, registry.CHAMPION, second)  # behind the ledger's back
    warning = release.unrecorded_alias_move(NAME)
    assert warning and f"points at version {second}" in warning and f"set version {first}" in warning
    assert lineage(f"models:/{NAME}@champion", NAME)["warnings"] == [warning]


def _split_artifact(run_id: str):
    from urllib.parse import urlparse

    from pipeline.comparison import SPLIT_ARTIFACT

    return Path(urlparse(registry.client().get_run(run_id).info.artifact_uri).path) / SPLIT_ARTIFACT


def test_the_gate_never_scores_a_model_on_subjects_it_trained_or_validated_on(store):
    """A champion whose recorded split trained on a subject now in the holdout (a resplit since) is
    compared only on the holdout subjects neither model saw, and the decision and the ledger say which."""
    from pipeline.comparison import SPLIT_ARTIFACT

    paths, params, register = store
    first = register("good")
    release.promote(paths, params, first)
    run_id = registry.client().get_model_version(NAME, first).run_id
    recorded = json.loads(_split_artifact(run_id).read_text())
    seen, kept = sorted(release.holdout_table(paths)["subject"].unique())
    recorded["train"] = sorted(recorded["train"] + [int(seen)])
    recorded["holdout"] = [s for s in recorded["holdout"] if s != seen]
    registry.client().log_dict(run_id, recorded, SPLIT_ARTIFACT)

    decision = release.promote(paths, params, register("worse"))
    assert decision.comparison_subjects == [kept] and decision.holdout_subjects == [seen, kept]
    assert decision.excluded_subjects == {str(seen): f"champion v{first} trained on it"}
    holdout = release.holdout_table(paths)
    assert decision.n_frames == int((holdout["subject"] == kept).sum())
    assert not decision.promote and decision.champion_dice > decision.challenger_dice  # really worse, and seen so
    event = release.history(NAME)[-1]
    assert event["comparison"]["subjects"] == [kept] and str(seen) in event["comparison"]["excluded"]
    assert f"left out: {seen}: champion v{first} trained on it" in decision.to_markdown()
    tags = registry.client().get_model_version(NAME, decision.challenger_version).tags
    assert tags["promotion.comparison_n_subjects"] == "1" and tags["promotion.holdout_n_subjects"] == "2"

    # With fewer unseen subjects than promotion.min_comparison_subjects, nothing is promoted, even a better model.
    strict = params.model_copy(update={"promotion": params.promotion.model_copy(update={"min_comparison_subjects": 2})})
    refused = release.promote(paths, strict, register("good"))
    assert not refused.promote and "only 1 of the 2 current holdout subjects are unseen" in refused.reason
    assert "promotion.min_comparison_subjects 2" in refused.reason and champion() == first


def test_a_version_without_a_recorded_split_is_recovered_or_distrusted(store):
    """Versions registered before splits were recorded: with a logged holdout, only its subjects count as
    unseen; with nothing logged, every subject counts as seen and no comparison is possible."""
    from pipeline.comparison import version_split

    paths, params, register = store
    first = register("good")
    release.promote(paths, params, first)
    run_id = registry.client().get_model_version(NAME, first).run_id
    _split_artifact(run_id).unlink()
    assert version_split(NAME, first).source == "unknown"
    decision = release.promote(paths, params, register("good"))
    assert not decision.promote and decision.comparison_subjects == []
    assert f"champion v{first} has an unknown split" in decision.reason and decision.champion_dice is None

    holdout = release.holdout_table(paths)
    registry.client().log_text(run_id, holdout[["frame_id", "subject"]].to_csv(index=False),
                               "evaluation/holdout_frames.csv")
    record = version_split(NAME, first)
    assert record.source == "holdout-only" and record.holdout == sorted(int(s) for s in holdout["subject"].unique())
    compared = release.promote(paths, params, register("worse"))
    assert compared.comparison_subjects == record.holdout and compared.champion_dice is not None
