import numpy as np
import pandas as pd

from pipeline import stages
from pipeline.evaluate import load_postprocess
from pipeline.inference import Postprocess, Predictor, write_bundle
from pipeline.metrics import FAILURES
from pipeline.train import WEIGHTS, load_model_config


def _bundle(prepared, tiny_params, tmp_path):
    stages.fit(prepared, tiny_params, progress=False)
    result = stages.score(prepared, tiny_params)
    bundle = write_bundle(tmp_path / "bundle", prepared.models_dir / WEIGHTS,
                          load_model_config(prepared.models_dir), load_postprocess(prepared.reports_dir))
    return bundle, result


def test_native_frame_in_native_mask_out(prepared, tiny_params, tmp_path):
    bundle, result = _bundle(prepared, tiny_params, tmp_path)
    predictor = Predictor.from_bundle(bundle)
    frames = np.random.default_rng(0).integers(0, 255, (3, 420, 580), dtype=np.uint8)
    masks = predictor.predict(frames)
    assert masks.shape == (3, 420, 580) and masks.dtype == np.uint8
    assert predictor.predict(frames[0]).shape == (1, 420, 580)  # one (H, W) frame is accepted
    assert predictor.post == result.postprocess  # tuned thresholds travel with the bundle


def test_presence_rule_and_min_area_clear_masks(prepared, tiny_params, tmp_path):
    bundle, _ = _bundle(prepared, tiny_params, tmp_path)
    predictor = Predictor.from_bundle(bundle)
    probs = np.ones((2, 32, 48), np.float32)
    presence = np.array([0.9, 0.1], np.float32)
    out = predictor.masks_from_probabilities(probs, presence, (420, 580), Postprocess(0.5, 0.5, 0))
    assert out[0].all() and not out[1].any()
    out = predictor.masks_from_probabilities(probs, presence, (420, 580), Postprocess(0.5, 0.0, 10**6))
    assert not out.any()


def test_evaluation_writes_reports(prepared, tiny_params, tmp_path):
    _, result = _bundle(prepared, tiny_params, tmp_path)
    for name in ("holdout_metrics.json", "holdout_frames.csv", "overlays.png", "postprocess.json",
                 "training_curves.png"):
        assert (prepared.reports_dir / name).is_file(), name
    assert result.metrics["n_frames"] == len(result.per_frame) > 0
    assert 0 <= result.metrics["dice"] <= 1
    # Every frame's outcome is in the per-frame table, and the report's failure counts add up to it.
    outcomes = result.per_frame["outcome"].value_counts()
    assert outcomes.sum() == len(result.per_frame)
    assert result.metrics["false_alarms"] == outcomes.get("false alarm", 0)
    assert result.metrics["nerve_frames_missed"] == outcomes.get("missed", 0)
    assert "false alarms" in (prepared.reports_dir / "evaluation.html").read_text()
    failed = result.per_frame.groupby("subject")["outcome"].apply(lambda o: int(o.isin(FAILURES).sum()))
    subjects = pd.read_csv(prepared.reports_dir / "holdout_subjects.csv").set_index("subject")
    assert subjects["failed_frames"].to_dict() == failed.to_dict()


def test_a_bundle_loads_with_or_without_the_fast_paths(prepared, tiny_params, tmp_path):
    bundle, _ = _bundle(prepared, tiny_params, tmp_path)
    frames = np.random.default_rng(1).integers(0, 255, (2, 420, 580), dtype=np.uint8)
    fast = Predictor.from_bundle(bundle)
    plain = Predictor.from_bundle(bundle, fuse=False, channels_last=False)
    assert not plain.channels_last and fast.channels_last
    assert np.allclose(fast.probabilities(frames)[0], plain.probabilities(frames)[0], atol=1e-4)
