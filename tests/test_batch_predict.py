"""``nerveseg predict`` and :mod:`pipeline.batch_predict`: unique output names, unreadable frames listed
(the rest written, exit code 3), batches equal to one frame at a time, the model named by the settings.

Unit tests run an untrained two-level network (:class:`~pipeline.inference.Predictor`) directly; the CLI
tests load the same network as a pyfunc model registered in a real MLflow store.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from flows.cli_options import EXIT_FAILED, EXIT_PARTIAL, EXIT_USAGE
from pipeline import registry
from pipeline.batch_predict import FAILURES_CSV, PredictInputError, collect_frames, predict_frames
from pipeline.imageio import read_gray
from pipeline.inference import Postprocess, Predictor, write_bundle
from pipeline.model import build_model
from pipeline.rle import read_rle_csv, rle_decode
from tests.conftest import REPO, deep_update, tiny_model_config

runner = CliRunner()
MODEL_NAME = "nerves-of-this-project"  # not the default name: the commands must read it from the settings


def _network():
    torch.manual_seed(0)
    config = tiny_model_config("batch")
    return build_model(config), config


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """An untrained network with its threshold at the median probability of a sample frame: masks that
    cover about half of a frame, so a frame given the wrong mask shows."""
    model, config = _network()
    sample = _frame(99)
    probs, _ = Predictor(model, config, Postprocess()).probabilities(sample[None])
    return Predictor(model, config, Postprocess(mask_threshold=float(np.median(probs)), presence_threshold=0.0))


def _frame(seed: int, shape=(420, 580)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frame = rng.rayleigh(60, shape).clip(0, 255).astype(np.uint8)
    cv2.ellipse(frame, (shape[1] // 2 + 7 * seed % 50, shape[0] // 2), (shape[1] // 8, shape[0] // 9), 0, 0, 360,
                int(rng.integers(0, 40)), -1)
    return frame


def _write(path: Path, seed: int, shape=(420, 580)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), _frame(seed, shape))
    return path


# --- names ---------------------------------------------------------------------------------------------

def test_names_mirror_the_input_folders_and_stay_unique(tmp_path):
    _write(tmp_path / "a" / "1_1.tif", 1)
    _write(tmp_path / "a" / "deep" / "1_2.tif", 2)
    _write(tmp_path / "a" / "1_1_mask.tif", 3)          # a mask, not a frame
    (tmp_path / "a" / "notes.txt").write_text("not a frame")
    _write(tmp_path / "b" / "1_1.tif", 4)
    _write(tmp_path / "c" / "x" / "7.tif", 5)
    _write(tmp_path / "d" / "x" / "7.tif", 6)
    _write(tmp_path / "e" / "5.tif", 7)
    _write(tmp_path / "e" / "5.png", 8)
    inputs = [tmp_path / "a", tmp_path / "b", tmp_path / "c" / "x" / "7.tif", tmp_path / "d" / "x" / "7.tif",
              tmp_path / "e", tmp_path / "a" / "1_1.tif"]  # the last: already found in a/, one frame
    frames = collect_frames(inputs)
    assert [(f.path.relative_to(tmp_path).as_posix(), f.name) for f in frames] == [
        ("a/1_1.tif", "a/1_1"), ("a/deep/1_2.tif", "deep/1_2"), ("b/1_1.tif", "b/1_1"),
        ("c/x/7.tif", "c/x/7"), ("d/x/7.tif", "d/x/7"), ("e/5.png", "5.png"), ("e/5.tif", "5.tif")]
    assert collect_frames(inputs) == frames  # deterministic


def test_a_second_run_into_a_folder_inside_the_input_skips_the_first_runs_outputs(tmp_path, predictor):
    _write(tmp_path / "scans" / "1_1.tif", 1)
    out = tmp_path / "scans" / "predictions"
    predict_frames(predictor, collect_frames([tmp_path / "scans"], out), out, progress=False)
    assert (out / "1_1_overlay.png").is_file()
    assert [f.name for f in collect_frames([tmp_path / "scans"], out)] == ["1_1"]


def test_inputs_that_are_not_there_or_hold_no_frame_are_usage_errors(tmp_path):
    with pytest.raises(PredictInputError, match="no such file or folder"):
        collect_frames([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictInputError, match="no frames found"):
        collect_frames([tmp_path / "empty"])


# --- prediction ------------------------------------------------------------------------------------------

def test_batches_give_the_masks_of_one_frame_at_a_time(tmp_path, predictor):
    shapes = [(420, 580), (210, 290), (420, 580), (420, 580), (210, 290), (420, 580), (420, 580)]
    for i, shape in enumerate(shapes):
        _write(tmp_path / "in" / f"{i}.png", i, shape)
    frames = collect_frames([tmp_path / "in"])
    result = predict_frames(predictor, frames, tmp_path / "out", batch_size=3, submission=tmp_path / "sub.csv",
                            progress=False)
    assert result.written == [f.name for f in frames] and not result.failures
    rows = read_rle_csv(tmp_path / "sub.csv").set_index("img")
    assert list(rows.index) == result.written  # input order, whatever order the batches ran in
    covered = []
    for frame in frames:
        alone = predictor.predict(read_gray(frame.path)[None])[0]
        written = read_gray(tmp_path / "out" / f"{frame.name}_mask.png") > 0
        # A pixel exactly at the threshold may round either way in another batch size; a frame given
        # another frame's mask differs in a large share of its pixels.
        assert np.mean(written != (alone > 0)) < 1e-3, frame.name
        h, w = alone.shape
        assert np.array_equal(rle_decode(rows.loc[frame.name, "pixels"], h, w), written.astype(np.uint8))
        covered.append(written.mean())
    assert 0.05 < np.mean(covered) < 0.95  # the masks are not all empty or full: the comparison means something


def test_an_unreadable_frame_is_listed_and_the_others_are_written(tmp_path, predictor):
    _write(tmp_path / "in" / "1_1.tif", 1)
    (tmp_path / "in" / "1_2.png").write_text("this is text, not a PNG")
    _write(tmp_path / "in" / "1_3.tif", 3)
    result = predict_frames(predictor, collect_frames([tmp_path / "in"]), tmp_path / "out", batch_size=2,
                            submission=tmp_path / "sub.csv", progress=False)
    assert result.written == ["1_1", "1_3"]
    assert (tmp_path / "out" / "1_1_mask.png").is_file() and (tmp_path / "out" / "1_3_mask.png").is_file()
    assert not (tmp_path / "out" / "1_2_mask.png").exists()
    listed = list(csv.DictReader((tmp_path / "out" / FAILURES_CSV).open()))
    assert [(Path(r["file"]).name, r["frame_id"], r["check"]) for r in listed] == [("1_2.png", "1_2", "frame_decodes")]
    assert listed[0]["reason"] == "not a PNG (starts with bytes 74 68 69 73; 23 bytes)"  # why, in words
    assert list(read_rle_csv(tmp_path / "sub.csv")["img"]) == ["1_1", "1_3"]
    assert any("1_2.png" in line for line in result.summary())


# --- the command, with a registered model -------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project whose settings name the model MODEL_NAME, with a version of it as champion: the untrained
    network logged as the pyfunc model the flow registers."""
    import yaml

    from pipeline.config import load_params
    from pipeline.paths import ProjectPaths

    root = tmp_path_factory.mktemp("predict-project")
    settings = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), {"registry": {"model_name": MODEL_NAME}})
    (root / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    params = load_params(root / "params.yaml")
    paths = ProjectPaths.of(root, params)
    model, config = _network()
    torch.save(model.state_dict(), root / "weights.pt")
    bundle = write_bundle(root / "bundle", root / "weights.pt", config, Postprocess(presence_threshold=0.0))
    experiment = registry.configure(paths.mlflow_dir, params.registry.experiment)
    run = registry.client().create_run(experiment)
    uri = registry.log_model(run.info.run_id, bundle, np.zeros((1, 32, 44), np.uint8))
    registry.set_alias(MODEL_NAME, registry.CHAMPION, registry.register(uri, MODEL_NAME, {}))
    return root


def test_predict_names_same_named_frames_apart_with_the_settings_model(project, tmp_path):
    _write(tmp_path / "day1" / "1_1.tif", 1)
    _write(tmp_path / "day2" / "1_1.tif", 2)
    out, sub = tmp_path / "out", tmp_path / "sub.csv"
    out.mkdir()
    (out / FAILURES_CSV).write_text("file,frame_id,check,severity,reason,imported_as\n"
                                    "old/9_9.tif,9_9,frame_decodes,blocking,x,\n")  # an earlier run's list
    done = runner.invoke(app, ["predict", str(tmp_path / "day1"), str(tmp_path / "day2"), "--out", str(out),
                               "--submission", str(sub), "--batch-size", "2", "-C", str(project)])
    assert done.exit_code == 0, done.output
    assert (out / "day1" / "1_1_mask.png").is_file() and (out / "day2" / "1_1_mask.png").is_file()
    assert (out / "day1" / "1_1_overlay.png").is_file() and (out / "day2" / "1_1_overlay.png").is_file()
    assert list(read_rle_csv(sub)["img"]) == ["day1/1_1", "day2/1_1"]
    assert "wrote 2 masks" in done.output
    # written on every run: a list from an earlier run into this folder does not linger
    failures = out / FAILURES_CSV
    assert failures.read_text().startswith("file,") and list(csv.DictReader(failures.open())) == []


def test_predict_exits_3_listing_an_unreadable_frame_and_1_when_none_could_be_read(project, tmp_path):
    _write(tmp_path / "in" / "1_1.tif", 1)
    (tmp_path / "in" / "1_2.png").write_text("this is text, not a PNG")
    out = tmp_path / "out"
    partly = runner.invoke(app, ["predict", str(tmp_path / "in"), "--out", str(out), "-C", str(project)])
    assert partly.exit_code == EXIT_PARTIAL == 3, partly.output
    assert (out / "1_1_mask.png").is_file() and not (out / "1_2_mask.png").exists()
    listed = list(csv.DictReader((out / FAILURES_CSV).open()))
    assert [Path(r["file"]).name for r in listed] == ["1_2.png"]
    assert listed[0]["reason"] == "not a PNG (starts with bytes 74 68 69 73; 23 bytes)"
    assert "1_2.png" in partly.output and "1 of 2 frames could not be read" in partly.output

    none = runner.invoke(app, ["predict", str(tmp_path / "in" / "1_2.png"), "--out", str(out), "-C", str(project)])
    assert none.exit_code == EXIT_FAILED, none.output
    missing = runner.invoke(app, ["predict", str(tmp_path / "nowhere"), "-C", str(project)])
    assert missing.exit_code == EXIT_USAGE


def test_audit_and_card_read_the_model_name_from_the_settings(project, tmp_path):
    done = runner.invoke(app, ["audit", "--json", "-C", str(project)])
    assert done.exit_code == 0, done.output
    assert f'"model": "{MODEL_NAME}"' in done.output
    card = runner.invoke(app, ["card", "--out", str(tmp_path / "card.html"), "-C", str(project)])
    assert card.exit_code == 0, card.output
    assert f"models:/{MODEL_NAME}@champion" in card.output and MODEL_NAME in (tmp_path / "card.html").read_text()

