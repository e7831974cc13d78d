"""The real retraining flow, end to end, on a tiny phantom: real Prefect server, real MLflow
store, real DVC repository."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.conftest import TINY_SETTINGS, deep_update, make_project, write_settings

pytestmark = pytest.mark.e2e

MODEL = "nerve-segmentation"


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, prefect_server):
    from flows.retrain import retrain

    root = make_project(tmp_path_factory.mktemp("e2e") / "project")
    result = retrain(project_dir=str(root))
    return root, result


def _registry(root):
    from pipeline import registry

    registry.configure(root / "mlflow", "nerve-segmentation")
    return registry


def test_first_model_becomes_champion_with_lineage(flow_project):
    from pipeline import versioning

    root, result = flow_project
    registry = _registry(root)
    champion = registry.version_by_alias(MODEL, registry.CHAMPION)
    assert champion is not None and str(champion.version) == result["version"] == "1"
    data = versioning.current_data_version(root, root / "data" / "raw")
    assert champion.tags[registry.TAG_DATA_HASH] == data.dvc_hash
    assert champion.tags[registry.TAG_DATA_REV] == data.git_revision
    assert champion.tags[registry.TAG_PARAMS_HASH]
    assert champion.tags[registry.TAG_FLOW_RUN]
    assert champion.tags["promotion.decision"] == "promoted"
    assert 0.0 <= float(champion.tags["holdout.dice"]) <= 1.0


def test_run_logs_params_curves_and_overlays(flow_project):
    import mlflow

    root, result = flow_project
    _registry(root)
    client = mlflow.MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(TINY_SETTINGS["train"]["epochs"])
    history = client.get_metric_history(result["run_id"], "val_dice")
    assert len(history) == result["train"]["epochs_run"]
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "evaluation")}
    assert "evaluation/overlays.png" in artifacts
    assert run.data.tags["validation.success"] == "true"


def test_dvc_status_is_clean_after_the_flow(flow_project):
    from pipeline import versioning

    root, _ = flow_project
    assert versioning.pipeline_status(root) == {}


def test_worse_model_does_not_take_the_alias(flow_project):
    """A model that learnt nothing (learning rate 0) and keeps every pixel above 0.5 is really
    worse on the same frames; it becomes challenger and the champion stays."""
    from flows.retrain import retrain
    from pipeline import versioning

    root, first = flow_project
    write_settings(root, deep_update(TINY_SETTINGS, {
        "train": {"learning_rate": 0.0, "epochs": 1},
        "postprocess": {"tune": False, "presence_threshold": 0.0},
    }))
    versioning.git_commit(root, ["params.yaml"], "params: a deliberately worse model")
    second = retrain(project_dir=str(root))

    registry = _registry(root)
    assert second["decision"]["promote"] is False
    assert str(registry.version_by_alias(MODEL, registry.CHAMPION).version) == first["version"]
    assert str(registry.version_by_alias(MODEL, registry.CHALLENGER).version) == second["version"]
    assert second["decision"]["champion_score"] > second["decision"]["challenger_score"]
    assert second["decision"]["n_frames"] == first["holdout"]["n_frames"]
    assert second["prepared"]["reused"] is True  # only train/postprocess settings changed
    assert first["prepared"]["reused"] is False
    assert versioning.pipeline_status(root) == {}


def test_models_json_lists_the_champion(flow_project):
    from flows.cli import app

    root, result = flow_project
    out = CliRunner().invoke(app, ["models", "--json", "-C", str(root)])
    assert out.exit_code == 0, out.output
    listing = json.loads(out.stdout)
    champion = [v for v in listing["versions"] if "champion" in v["aliases"]]
    assert len(champion) == 1
    assert champion[0]["data_hash"] == result["data"]["dvc_hash"]
    assert "dice" in champion[0]["holdout_metrics"]


def test_predict_writes_masks_and_overlays(flow_project, tmp_path):
    from flows.cli import app
    from pipeline.imageio import read_gray

    root, _ = flow_project
    frames = sorted((root / "data" / "raw" / "train").glob("*_1.tif"))[:2]
    out = CliRunner().invoke(app, ["predict", *map(str, frames), "--out", str(tmp_path / "pred"), "-C", str(root)])
    assert out.exit_code == 0, out.output
    for frame in frames:
        mask = read_gray(tmp_path / "pred" / f"{frame.stem}_mask.png")
        assert mask.shape == (420, 580) and set(map(int, set(mask.ravel()))) <= {0, 255}
        assert (tmp_path / "pred" / f"{frame.stem}_overlay.png").is_file()


def test_flow_stops_on_invalid_data_before_training(tmp_path, prefect_server):
    from flows.retrain import retrain
    from pipeline import versioning
    from pipeline.validation import DataValidationError

    root = make_project(tmp_path / "bad")
    broken = root / "data" / "raw" / "train" / "2_3.tif"
    broken.write_bytes(b"not an image")
    versioning.version_data(root, root / "data" / "raw", "data: a broken frame")

    with pytest.raises(DataValidationError) as info:
        retrain(project_dir=str(root))
    assert "2_3" in str(info.value)
    assert not (root / "models" / "model.pt").exists()
    registry = _registry(root)
    assert registry.list_versions(MODEL) == []
    assert registry.version_by_alias(MODEL, registry.CHAMPION) is None
