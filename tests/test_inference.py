import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import stages
from pipeline.checkpoints import WEIGHTS, load_model_config, load_trained
from pipeline.evaluate import load_postprocess
from pipeline.inference import Postprocess, Predictor, write_bundle
from pipeline.metrics import FAILURES
from pipeline.model import build_model
from pipeline.preprocess import FRAMES

from .conftest import tiny_model_config, with_settings


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
    assert masks.shape == (3, 420, 580) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    single = predictor.predict(frames[0])  # one (H, W) frame is accepted, and gets its mask in the batch
    assert single.shape == (1, 420, 580) and np.array_equal(single[0], masks[0])
    assert predictor.post == result.postprocess  # tuned thresholds travel with the bundle
    # ... and so do the trained weights and their config: the bundle computes what the trained network does.
    model, config = load_trained(prepared.models_dir)
    direct = Predictor(model, config, result.postprocess, fuse=False, channels_last=False)
    assert np.allclose(predictor.probabilities(frames)[0], direct.probabilities(frames)[0], atol=1e-4)


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
    # Every holdout frame, in order, scored against its own native mask.
    holdout = pd.read_csv(prepared.prepared_dir / FRAMES).query("split == 'holdout'")
    assert result.per_frame["frame_id"].tolist() == holdout["frame_id"].tolist()
    assert result.per_frame["true_area"].tolist() == holdout["mask_area"].tolist()
    assert result.metrics["n_frames"] == len(holdout) == len(result.per_frame)
    assert result.metrics["dice"] == pytest.approx(result.per_frame["dice"].mean())
    stored = json.loads((prepared.reports_dir / "holdout_metrics.json").read_text())
    assert stored["n_frames"] == len(holdout) and stored["dice"] == pytest.approx(result.metrics["dice"], abs=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(prepared.reports_dir / "holdout_frames.csv")[["frame_id", "dice"]],
                                  result.per_frame[["frame_id", "dice"]].reset_index(drop=True), check_dtype=False)
    # The report's failure counts are the per-frame table's outcomes.
    outcomes = result.per_frame["outcome"].value_counts()
    assert result.metrics["false_alarms"] == outcomes.get("false alarm", 0)
    assert result.metrics["nerve_frames_missed"] == outcomes.get("missed", 0)
    assert "false alarms" in (prepared.reports_dir / "evaluation.html").read_text()
    failed = result.per_frame.groupby("subject")["outcome"].apply(lambda o: int(o.isin(FAILURES).sum()))
    subjects = pd.read_csv(prepared.reports_dir / "holdout_subjects.csv").set_index("subject")
    assert subjects["failed_frames"].to_dict() == failed.to_dict()


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_a_bundle_loads_with_or_without_the_fast_paths(prepared, tiny_params, tmp_path, norm):
    # batch: folded into the convolutions and NHWC; instance (the default): NCHW, where it is faster
    params = with_settings(tiny_params, {"model": {"norm": norm}})
    bundle, _ = _bundle(prepared, params, tmp_path)
    frames = np.random.default_rng(1).integers(0, 255, (2, 420, 580), dtype=np.uint8)
    fast = Predictor.from_bundle(bundle)
    plain = Predictor.from_bundle(bundle, fuse=False, channels_last=False)
    assert not plain.channels_last and fast.channels_last == {"batch": True, "instance": False}[norm]
    assert np.allclose(fast.probabilities(frames)[0], plain.probabilities(frames)[0], atol=1e-4)


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_the_fast_path_matches_the_plain_one_for_every_normalisation(norm):
    # Only batch norm is folded into the convolutions; instance and group norm must pass through the
    # fast path (channels-last) unchanged and still normalise each frame on its own.
    config = tiny_model_config(norm)
    torch.manual_seed(0)
    model = build_model(config)
    for module in model.modules():  # non-trivial statistics and affine weights, so a wrong fold shows
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d, torch.nn.GroupNorm)) and module.affine:
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.2, 0.2)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    frames = np.random.default_rng(2).integers(0, 255, (3, 420, 580), dtype=np.uint8)
    fast = Predictor(model, config, Postprocess(), channels_last=True)  # forced: the default is NCHW for some norms
    plain = Predictor(model, config, Postprocess(), fuse=False, channels_last=False)
    fast_probs, fast_presence = fast.probabilities(frames)
    plain_probs, plain_presence = plain.probabilities(frames)
    assert np.allclose(fast_probs, plain_probs, atol=1e-4) and np.allclose(fast_presence, plain_presence, atol=1e-4)
    # one frame at a time gives what the batch gives: no statistic leaks between frames in eval mode
    one_by_one = np.concatenate([fast.probabilities(frames[i : i + 1])[0] for i in range(len(frames))])
    assert np.allclose(one_by_one, fast_probs, atol=1e-4)
    assert np.ptp(fast_probs) > 1e-3  # the network's output is not constant, so the comparison means something


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_the_default_path_is_channels_last_only_for_norms_that_run_faster_in_it(norm):
    # Measured (docs/benchmarks.md): NHWC speeds up convolution-only networks (batch norm folded, or
    # none) and slows instance norm's reductions. The caller's model keeps its own layout either way.
    config = tiny_model_config(norm)
    model = build_model(config)
    def a_conv(net):  # one with several input channels: a 1-channel kernel is contiguous in both layouts
        return next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)

    first_conv = a_conv(model)
    for fuse in (True, False):
        predictor = Predictor(model, config, Postprocess(), fuse=fuse)
        assert predictor.channels_last == (norm in ("batch", "none"))
        served_conv = a_conv(predictor.model)
        assert served_conv.weight.is_contiguous(memory_format=torch.channels_last) == predictor.channels_last
        Predictor(model, config, Postprocess(), fuse=fuse, channels_last=True)
        assert first_conv.weight.is_contiguous() and not first_conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fuse", [True, False])
def test_building_a_predictor_leaves_the_callers_model_as_it_was(fuse):
    # A model handed over mid-training must come back still training, with its own weights untouched.
    config = tiny_model_config("batch")
    model = build_model(config).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predictor = Predictor(model, config, Postprocess(), fuse=fuse)
    assert model.training and all(m.training for m in model.modules())
    assert not predictor.model.training
    predictor.predict(np.zeros((2, 420, 580), np.uint8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm running stats included
