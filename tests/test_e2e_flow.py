"""The real retraining flow, end to end, on a tiny phantom: real Prefect server, real MLflow
store, real DVC repository."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.devices import cpu_has_native_bf16
from tests.conftest import TINY_SETTINGS, deep_update, make_project, seed_mlflow_store, write_settings

pytestmark = pytest.mark.e2e

MODEL = "nerve-segmentation"


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, project_copy, mlflow_store_template, prefect_server):
    from flows.retrain import retrain

    root = project_copy(tmp_path_factory.mktemp("e2e") / "project")
    seed_mlflow_store(root / "mlflow", mlflow_store_template)  # an empty store: MLflow's migrations done once
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
    from prefect.client.orchestration import get_client

    from pipeline.config import load_params

    assert champion.tags[registry.TAG_PARAMS_HASH] == load_params(root / "params.yaml").digest()
    with get_client(sync_client=True) as client:  # the test session's Prefect server ran the flow
        flow_run = client.read_flow_run(champion.tags[registry.TAG_FLOW_RUN])
    assert flow_run.state.is_completed() and flow_run.parameters["project_dir"] == str(root)
    assert champion.tags["promotion.decision"] == "promoted"
    assert float(champion.tags["holdout.dice"]) == pytest.approx(result["holdout"]["dice"], abs=1e-6)
    frames = pd.read_csv(root / "reports" / "holdout_frames.csv")
    # The floor's bar, recorded with the version: the holdout's share of empty frames.
    assert float(champion.tags["holdout.empty_baseline_dice"]) == pytest.approx((frames.true_area == 0).mean(), abs=1e-6)


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
    # What the training steps computed in, so that two runs of one recipe on two machines can be told apart.
    assert run.data.tags["train.precision"] == result["train"]["precision"]
    assert result["train"]["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")  # amp_cpu: auto


def test_dvc_status_is_clean_after_the_flow(flow_project):
    from pipeline import versioning

    root, _ = flow_project
    assert versioning.pipeline_status(root) == {}


def test_unchanged_run_is_skipped_and_trains_nothing(flow_project):
    from flows.retrain import retrain

    root, first = flow_project
    before = (root / "models" / "model.pt").stat().st_mtime_ns
    again = retrain(project_dir=str(root))
    assert again["skipped"] is True and "nothing changed since champion version 1" in again["reason"]
    assert (root / "models" / "model.pt").stat().st_mtime_ns == before
    registry = _registry(root)
    assert [v.version for v in registry.list_versions(MODEL)] == ["1"]


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
    assert second["decision"]["champion_dice"] > second["decision"]["challenger_dice"]
    assert second["decision"]["interval_high"] < 0
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


def test_flow_stops_on_invalid_data_before_training(tmp_path, project_copy, mlflow_store_template, prefect_server):
    from flows.retrain import retrain
    from pipeline import versioning
    from pipeline.validation import DataValidationError

    root = project_copy(tmp_path / "bad")
    seed_mlflow_store(root / "mlflow", mlflow_store_template)
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


def test_audit_json_of_the_champion_gives_the_dvc_data_hash(flow_project):
    from flows.cli import app
    from pipeline import versioning

    root, result = flow_project
    out = CliRunner().invoke(app, ["audit", "--json", "-C", str(root)])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["data"]["dvc_hash"] == versioning.current_data_version(root, root / "data" / "raw").dvc_hash
    assert record["version"] == result["version"] and "champion" in record["aliases"]
    assert record["validation"]["success"] == "true" and record["data"]["n_frames"] == "36"
    assert record["parameters"]["train.epochs"] == str(TINY_SETTINGS["train"]["epochs"])
    assert any(e["action"] == "promote" for e in record["history"])
    from pipeline.registry import product_version

    assert record["nerveseg_version"] == product_version() != "unknown"  # the release that trained it
    frames = pd.read_csv(root / "data" / "prepared" / "frames.csv")
    train, holdout = frames[frames.split == "train"], frames[frames.split == "holdout"]
    assert record["presence"] == {"train_frames": len(train), "train_empty_frames": int((~train.has_nerve).sum()),
                                  "holdout_frames": len(holdout),
                                  "holdout_empty_frames": int((~holdout.has_nerve).sum())}


def test_served_champion_answers_http_requests(flow_project):
    """`mlflow models serve` on a loopback port, in the current environment."""
    import os
    import socket
    import subprocess
    import sys

    import numpy as np

    from tests.service_helpers import invoke_when_up

    root, _ = flow_project
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
           # the server execs `uvicorn` from PATH: the environment's bin, as with an activated venv
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
    )
    try:
        frame = np.random.default_rng(0).integers(0, 255, (1, 420, 580)).astype(np.uint8)
        answer = invoke_when_up(port, {"inputs": frame.tolist()}, server)
        masks = np.asarray(answer["predictions"])
        assert masks.shape == (1, 420, 580) and set(np.unique(masks)) <= {0, 1}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_predict_submission_on_the_real_test_frames(flow_project, shared_data, tmp_path):
    import pandas as pd

    from flows.cli import app
    from pipeline.rle import rle_decode

    root, _ = flow_project
    csv = tmp_path / "submission.csv"
    out = CliRunner().invoke(app, ["predict", str(shared_data / "test"), "--out", str(tmp_path / "pred"),
                                   "--submission", str(csv), "-C", str(root)])
    assert out.exit_code == 0, out.output
    table = pd.read_csv(csv, keep_default_na=False)
    assert list(table.columns) == ["img", "pixels"]
    assert len(table) == len(list((shared_data / "test").glob("*.tif")))
    from pipeline.imageio import read_gray

    for img, pixels in table.itertuples(index=False):
        written = (read_gray(tmp_path / "pred" / f"{img}_mask.png") > 0).astype("uint8")
        assert (rle_decode(pixels) == written).all()  # the submission encodes exactly the masks written


def test_a_second_run_in_the_same_workspace_is_refused(flow_project):
    from flows.retrain import retrain
    from pipeline.workspace_lock import WorkspaceBusy, exclusive_run

    root, _ = flow_project
    with exclusive_run(root, "a run started by the test"):
        with pytest.raises(WorkspaceBusy, match="a run started by the test"):
            retrain(project_dir=str(root), force=True)
    assert not (root / ".nerveseg-run.holder").exists()


CARD_SECTIONS = ("intended-use", "no-nerve", "data", "training", "metrics", "pictures", "history")


def test_model_card_is_logged_and_renders_in_chromium(flow_project, tmp_path):
    import shutil
    import subprocess

    from flows.cli import app

    root, result = flow_project
    registry = _registry(root)
    champion = registry.version_by_alias(MODEL, registry.CHAMPION)
    logged = [a.path for a in registry.client().list_artifacts(champion.run_id, "model_card")]
    assert champion.tags["model_card"] in logged

    card = tmp_path / "card.html"
    out = CliRunner().invoke(app, ["card", "-o", str(card), "-C", str(root)])
    assert out.exit_code == 0, out.output
    page = card.read_text()
    for section in CARD_SECTIONS:
        assert f'id="{section}"' in page
    assert result["data"]["dvc_hash"] in page and "data:image/png;base64," in page
    assert "failed frames" in page  # the per-subject table counts each subject's failed frames
    assert "interval over frames" in page and re.search(r"interval over the \d+ subjects", page)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", card.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    for section in CARD_SECTIONS:
        assert f'id="{section}"' in dom  # the browser parsed and kept every section
    shot = tmp_path / "card.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,2400", card.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_quickstart_exits_1_when_the_floor_refuses_its_first_model(tmp_path, prefect_server, monkeypatch,
                                                                  mlflow_store_template):
    """The real quickstart command on a tiny phantom, with a floor that three epochs cannot reach: the
    model is registered and becomes challenger, no champion exists, the webhook hears of it, and the
    command exits 1 saying why."""
    from flows.cli import app
    from tests.webhook import Hook

    floor = deep_update(TINY_SETTINGS, {"promotion": {"min_nerve_dice": 0.99, "min_gain_over_empty": 0.0}})
    root = make_project(tmp_path / "project", floor, with_data=False)
    seed_mlflow_store(root / "mlflow", mlflow_store_template)
    with Hook() as hook:
        monkeypatch.setenv("NERVESEG_WEBHOOK_URL", hook.url)
        out = CliRunner().invoke(app, ["quickstart", "-C", str(root)])
    [notice] = [p["json"] for p in hook.posts]
    assert (notice["event"], notice["model"], notice["version"]) == ("nerveseg.promotion.no_champion", MODEL, "1")
    assert "under promotion.min_nerve_dice 0.99" in notice["reason"]
    assert out.exit_code == 1, out.output
    assert "model 1 is the challenger; there is no champion yet" in out.output
    assert "under promotion.min_nerve_dice 0.99" in out.output
    assert f"--model models:/{MODEL}/1" in out.output
    registry = _registry(root)
    assert registry.version_by_alias(MODEL, registry.CHAMPION) is None
    refused = registry.version_by_alias(MODEL, registry.CHALLENGER)
    assert str(refused.version) == "1" and refused.tags["promotion.decision"] == "not_promoted"
    assert float(refused.tags["promotion.challenger_nerve_dice"]) < 0.99
    assert notice["flow_run_id"] == refused.tags[registry.TAG_FLOW_RUN]  # the notice names the run that made it
