import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import REPO, deep_update, write_simple_dataset

runner = CliRunner()


def test_bad_params_exit_2_naming_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: -1\n")
    out = runner.invoke(app, ["models", "-C", str(tmp_path)])
    assert out.exit_code == 2
    assert "params.yaml" in out.output and "train.epochs" in out.output


def test_validate_passes_on_good_data_and_exits_1_naming_bad_files(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    data = write_simple_dataset(tmp_path / "data" / "raw", subjects=3, frames=4)
    good = runner.invoke(app, ["validate", str(data), "-C", str(tmp_path)])
    assert good.exit_code == 0, good.output
    assert "validation passed" in good.output and "12 frames of 3 subjects" in good.output
    (data / "train" / "2_2_mask.tif").unlink()
    bad = runner.invoke(app, ["validate", str(data), "-C", str(tmp_path)])
    assert bad.exit_code == 1
    # the frame without its mask, and only it, with the check it fails
    assert "train/2_2.tif: [mask_for_frame]" in bad.output and "1 files fail a blocking check" in bad.output


def test_models_on_an_empty_store_says_what_to_do(tmp_path):
    settings = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), {"registry": {"model_name": "my-nerves"}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    out = runner.invoke(app, ["models", "-C", str(tmp_path)])
    assert out.exit_code == 0, out.output
    # the model the settings name, and the commands that make a first version of it
    assert "no versions of my-nerves yet; run `nerveseg quickstart` or `nerveseg run`" in out.output.splitlines()


def test_predict_with_a_missing_model_fails_clearly(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    data = write_simple_dataset(tmp_path / "data" / "raw", subjects=1, frames=1)
    out = runner.invoke(app, ["predict", str(data / "train" / "1_1.tif"), "-C", str(tmp_path)])
    assert out.exit_code == 1
    assert "cannot load model" in out.output


def test_the_temporary_prefect_server_gets_time_for_its_first_start(tmp_path):
    """A new Prefect home migrates its database on the first start: Prefect's 20 s default timed
    out a fresh clone's quickstart; the project environment allows 180 s unless the user says otherwise."""
    import os
    import subprocess
    import sys

    probe = ("from flows.environment import configure_environment; configure_environment({!r}); "
             "from prefect.settings import get_current_settings; "
             "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    out = subprocess.run([sys.executable, "-c", probe.format(str(tmp_path))], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "180"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "45"  # an explicit setting wins
    out = subprocess.run([sys.executable, "-c", probe.format(str(tmp_path))], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "45"


def test_a_first_model_refused_by_the_floor_is_reported_without_a_champion(tmp_path, capsys):
    import numpy as np

    from flows.cli import _left_without_champion, _print_result
    from pipeline.config import Params
    from pipeline.paths import ProjectPaths
    from pipeline.promotion import FrameScores, decide

    params = Params()
    blind = FrameScores(["1_1", "1_2", "2_1"], np.array([0.0, 1.0, 1.0]), np.array([False, True, True]),
                        np.array([True, False, False]))
    decision = decide("1", blind, None, None, params.promotion, True).to_dict()
    result = {"decision": decision, "holdout": {"dice": 0.6667, "iou": 0.6667, "presence_accuracy": 0.6667,
                                                "n_frames": 3},
              "data": {"dvc_hash": "abc.dir", "dvc_file": "data/raw.dvc", "git_revision": "0123456789abcdef"},
              "tracking_uri": "sqlite:///mlflow/mlflow.db",
              "train": {"epochs_run": 12, "device": "cpu", "precision": "bf16", "train_frames_per_second": 51.3,
                        "best_val_dice": 0.4333, "best_epoch": 1}}
    assert _left_without_champion(result)
    _print_result(result, ProjectPaths.of(tmp_path, params), params.registry.model_name)
    out = capsys.readouterr().out
    assert "model 1 is the challenger; there is no champion yet" in out
    assert "below the floor" in out and "train.seed" in out
    assert "--model models:/nerve-segmentation/1" in out  # there is no @champion to predict with
    # How it trained, on this machine: what to compare when two machines train one recipe differently.
    assert "trained:       12 epochs on cpu in bf16, 51 frames/s; best validation Dice 0.4333 at epoch 1" in out
    assert "note:" not in out  # no empty_baseline_dice recorded: nothing to say about the empty frames

    # A holdout of nerve frames only (real data from positives-256): presence accuracy is said to be partial.
    result["holdout"].update(empty_baseline_dice=0.0, presence_accuracy=1.0)
    _print_result(result, ProjectPaths.of(tmp_path, params), params.registry.model_name)
    out = capsys.readouterr().out
    assert "note:          no holdout frame is without a nerve: presence accuracy only counts nerve frames" in out


def test_presence_caveat_when_the_holdout_has_few_empty_frames():
    from pipeline.metrics import presence_caveat

    assert presence_caveat(0.0, 559).startswith("no holdout frame is without a nerve")
    assert presence_caveat(3 / 90, 90).startswith("only 3 of the 90 holdout frames are without a nerve")
    assert presence_caveat(62 / 90, 90) is None  # the phantom's holdout: false alarms are measured
    assert presence_caveat(None, 90) is None and presence_caveat(float("nan")) is None
