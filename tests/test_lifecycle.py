"""The life of a deployment on the phantom: data versions that add subjects, the flow after each, a
subject withdrawn, a rollback, a new lock file and a resplit. Through all of it no subject changes
part without the resplit, no gate scores a model on a subject it trained or validated on, and the
audit and the ledger show both. Real git, DVC, MLflow store and Prefect flow runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import (
    TINY_SETTINGS, deep_update, make_project, seed_mlflow_store, subject_batch, write_settings,
)

pytestmark = pytest.mark.e2e

MODEL = "nerve-segmentation"
BATCHES = (range(1, 9), range(9, 15), range(15, 21))  # subjects of the three imports
# What is trained does not matter here, only which subjects each model saw and was scored on: one epoch, one
# overlay, and two frames a subject (the parts are whole subjects; the 8 subjects of the first import clear the
# validation minimums of 6 frames and 3 subjects).
SETTINGS = deep_update(TINY_SETTINGS, {"train": {"epochs": 1}, "evaluate": {"overlays": 1}})
FRAMES_PER_SUBJECT = 2


def _cli(*args: str):
    from flows.cli import app

    return CliRunner().invoke(app, list(args))


def _groups_at(root: Path, revision: str) -> dict[int, str]:
    from pipeline import versioning

    shown = versioning.git(root, "show", f"{revision}:data/split.yaml")
    return {int(s): g for s, g in yaml.safe_load(shown.stdout)["subjects"].items()}


def _split_history(root: Path) -> list[tuple[str, str, dict[int, str]]]:
    """(commit, message, groups) of every commit of data/split.yaml, oldest first."""
    from pipeline import versioning

    log = versioning.git(root, "log", "--reverse", "--format=%H%x09%s", "--", "data/split.yaml").stdout
    return [(c, m, _groups_at(root, c)) for c, m in (line.split("\t", 1) for line in log.splitlines())]


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, prefect_server, mlflow_store_template):
    from flows.retrain import retrain
    from pipeline import registry, versioning
    from pipeline.phantom import PhantomSpec, generate_phantom

    base = tmp_path_factory.mktemp("lifecycle")
    source = base / "phantom"
    generate_phantom(source, PhantomSpec(subjects=20, frames_per_subject=FRAMES_PER_SUBJECT, seed=11))
    root = make_project(base / "project", SETTINGS, with_data=False)
    seed_mlflow_store(root / "mlflow", mlflow_store_template)  # an empty store: MLflow's migrations done once
    runs, notes = [], {}

    def add(*args: str) -> None:
        done = _cli("data", "add", *args, "--no-trigger", "-C", str(root))
        assert done.exit_code == 0, done.output

    def run(label: str) -> dict:
        result = retrain(project_dir=str(root))
        runs.append((label, result))
        return result

    for i, subjects in enumerate(BATCHES):
        add(str(subject_batch(source, base / f"batch{i + 1}", subjects)))
        run(f"batch {i + 1}")

    # A subject is withdrawn: the dataset is imported again without it.
    split = yaml.safe_load((root / "data" / "split.yaml").read_text())["subjects"]
    withdrawn = next(s for s, g in split.items() if g == "holdout")
    notes["withdrawn"] = withdrawn
    add(str(subject_batch(source, base / "withdrawn", [s for s in range(1, 21) if s != withdrawn])), "--replace")
    run("subject withdrawn")

    # Make sure there is a move to roll back: the newest version becomes champion by hand, then back.
    registry.configure(root / "mlflow", MODEL)
    newest = runs[-1][1]["version"]
    if str(registry.version_by_alias(MODEL, registry.CHAMPION).version) != newest:
        done = _cli("promote", newest, "--reason", "try the newest", "--actor", "ops", "-C", str(root))
        assert done.exit_code == 0, done.output
    done = _cli("rollback", "--reason", "back to the one before", "--actor", "ops", "-C", str(root))
    assert done.exit_code == 0, done.output
    notes["after_rollback"] = str(registry.version_by_alias(MODEL, registry.CHAMPION).version)

    # A new lock file (a new torch, say) retrains once, and says why; the next run skips.
    (root / "requirements.lock").write_text("torch==2.13.0\n")
    versioning.git_commit(root, ["requirements.lock"], "lock: a new dependency set")
    run("new lock file")
    notes["skipped"] = retrain(project_dir=str(root))

    # The split is changed on purpose: a bigger holdout, recorded, then the flow.
    settings = deep_update(SETTINGS, {"split": {"holdout_fraction": 0.5}})
    write_settings(root, settings)
    versioning.git_commit(root, ["params.yaml"], "params: a bigger holdout")
    notes["mismatch"] = _cli("run", "-C", str(root))  # refused until the split is changed on purpose
    done = _cli("data", "resplit", "--reason", "a bigger holdout", "--actor", "ops", "-C", str(root))
    assert done.exit_code == 0, done.output
    notes["resplit_output"] = done.output
    run("resplit")
    return root, runs, notes


def test_no_subject_changes_part_without_a_resplit(lifecycle):
    root, runs, notes = lifecycle
    history = _split_history(root)
    assert len(history) >= 3  # the first import, each later import that added subjects, the resplit
    for (_, _, before), (_, message, after) in zip(history, history[1:]):
        moved = {s for s in before if s in after and before[s] != after[s]}
        if "resplit" in message:
            assert moved, "the resplit moved nobody, so the test proves nothing"
        else:
            assert not moved, f"{message}: subjects {sorted(moved)} changed part without a resplit"
    # The withdrawn subject keeps its recorded part; nobody else moved when it left.
    withdrawn = notes["withdrawn"]
    assert withdrawn in history[-2][2]
    # The holdout grew with the data.
    holdouts = [sum(1 for g in groups.values() if g == "holdout") for _, m, groups in history if "resplit" not in m]
    assert holdouts == sorted(holdouts) and holdouts[-1] > holdouts[0]
    # The resplit is recorded in the file with who, why and what moved.
    record = yaml.safe_load((root / "data" / "split.yaml").read_text())["resplits"][-1]
    before, after = history[-2][2], history[-1][2]
    assert (record["reason"], record["on_behalf_of"]) == ("a bigger holdout", "ops")
    assert record["moved"] == {s: f"{before[s]} -> {after[s]}" for s in sorted(before) if before[s] != after[s]}
    assert "moved" in notes["resplit_output"]


def test_settings_that_disagree_with_the_recorded_split_stop_the_run(lifecycle):
    _, _, notes = lifecycle
    refused = notes["mismatch"]
    assert refused.exit_code == 2, refused.output  # a settings error, said before any flow run starts
    assert "split.holdout_fraction: recorded 0.34, settings 0.5" in refused.output
    assert "nerveseg data resplit" in refused.output


def test_no_gate_ever_scored_a_model_on_a_subject_it_trained_or_validated_on(lifecycle):
    from pipeline import registry
    from pipeline.comparison import version_split

    root, runs, _ = lifecycle
    registry.configure(root / "mlflow", MODEL)
    checked = 0
    for label, result in runs:
        decision = result["decision"]
        models = [result["version"]] + ([decision["champion_version"]] if decision["champion_version"] else [])
        seen = set().union(*(version_split(MODEL, v, root).seen for v in models))
        assert decision["comparison_subjects"], f"{label}: nothing compared"
        assert not set(decision["comparison_subjects"]) & seen, label
        # Every current holdout subject is either compared on or left out with its reason.
        assert set(decision["comparison_subjects"]) | {int(s) for s in decision["excluded_subjects"]} \
            == set(decision["holdout_subjects"])
        checked += 1
    assert checked == len(runs) == 6
    # After the resplit some of the new holdout had trained the champion: left out, with the reason.
    resplit = runs[-1][1]["decision"]
    champion = version_split(MODEL, resplit["champion_version"], root)
    expected = {s for s in resplit["holdout_subjects"] if s in champion.seen}
    assert expected and {int(s) for s in resplit["excluded_subjects"]} == expected
    assert all(f"champion v{resplit['champion_version']}" in why for why in resplit["excluded_subjects"].values())


def test_audit_and_ledger_show_the_split_and_the_comparison(lifecycle):
    root, runs, _ = lifecycle
    version = runs[-1][1]["version"]
    audit = _cli("audit", version, "--json", "-C", str(root))
    assert audit.exit_code == 0, audit.output
    record = json.loads(audit.stdout)
    assert record["split"]["source"] == "recorded" and record["split"]["holdout"]
    assert not set(record["split"]["holdout"]) & set(record["split"]["train"] + record["split"]["validation"])
    assert record["promotion"]["comparison_subjects"] and record["promotion"]["excluded_subjects"] != "none"
    text = _cli("audit", version, "-C", str(root)).output
    assert "split:       recorded" in text and "gate:        scored on" in text and "left out:" in text
    ledger = json.loads(_cli("ledger", "--json", "-C", str(root)).stdout)
    gated = [e for e in ledger["events"] if e.get("comparison")]
    assert len(gated) == len(runs)
    assert all(not set(e["comparison"]["subjects"]) & {int(s) for s in e["comparison"]["excluded"]} for e in gated)
    actions = [e["action"] for e in ledger["events"]]
    assert "rollback" in actions
    listing = json.loads(_cli("models", "--json", "-C", str(root)).stdout)
    from pipeline import registry

    # each version lists the split and environment it was trained with, as its run recorded them
    import mlflow

    uri = registry.tracking_uri(root / "mlflow")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for v in listing["versions"]:
        tags = client.get_model_version(MODEL, v["version"]).tags
        assert v["split"]["digest"] == tags[registry.TAG_SPLIT_DIGEST] != ""
    assert all(v["environment"]["digest"] for v in listing["versions"])
    assert len({v["split"]["digest"] for v in listing["versions"]}) > 1  # the split grew, and was changed


def test_a_new_lock_file_retrains_once_and_says_why(lifecycle):
    _, runs, notes = lifecycle
    label, result = runs[-2]
    assert label == "new lock file" and not result["skipped"]
    assert "environment (lock_digest" in result["retrain_reason"]
    assert notes["skipped"]["skipped"] is True and "environment" in notes["skipped"]["reason"]


def test_models_compare_scores_versions_on_one_set_and_caches_it(lifecycle):
    root, runs, _ = lifecycle
    last, before = runs[-1][1]["version"], runs[-2][1]["version"]
    first = _cli("models", "--compare", "--versions", f"{before},{last}", "--json", "-C", str(root))
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    subjects = result["comparison"]["subjects"]
    assert subjects and [v["version"] for v in result["versions"]] == [before, last]
    assert len({v["n_frames"] for v in result["versions"]}) == 1
    cache = root / "mlflow" / "comparison_cache" / f"{result['comparison']['digest']}.json"
    stored = json.loads(cache.read_text())
    assert sorted(v["dice"] for v in stored.values()) == sorted(v["dice"] for v in result["versions"])
    # The second call reads the cache and loads no model: a value planted there comes back.
    planted = {key: {**value, "dice": -1.0} for key, value in stored.items()}
    cache.write_text(json.dumps(planted))
    try:
        again = json.loads(_cli("models", "--compare", "--versions", f"{before},{last}", "--json", "-C",
                                str(root)).stdout)
    finally:
        cache.write_text(json.dumps(stored))
    assert [v["dice"] for v in again["versions"]] == [-1.0, -1.0]
    assert again["comparison"] == result["comparison"]
