"""The fold models as one registered model (``train.ensemble_folds``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import stages
from pipeline.checkpoints import WEIGHTS, load_trained
from pipeline.devices import cpu_has_native_bf16
from pipeline.ensemble import FOLDS_DIR, out_of_fold_members
from pipeline.evaluate import load_native, load_postprocess, tune_on_probabilities
from pipeline.inference import Postprocess, Predictor, write_bundle
from pipeline.model import FoldEnsemble, ModelConfig, UNet, build_model
from pipeline.preprocess import FRAMES
from pipeline.train import HISTORY, METRICS

from .conftest import prepare_again, with_settings

CONFIG = ModelConfig(depth=2, base_width=4, dropout=0.0, height=32, width=48, intensity_mean=0.3, intensity_std=0.2)


def test_an_ensemble_averages_its_members_probabilities():
    torch.manual_seed(0)
    ensemble = build_model(ModelConfig(**{**CONFIG.to_dict(), "members": 3})).eval()
    assert isinstance(ensemble, FoldEnsemble) and len(ensemble.members) == 3
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        mask, presence = ensemble(x)
        outputs = [member(x) for member in ensemble.members]
    expected_mask = torch.stack([torch.sigmoid(m) for m, _ in outputs]).mean(0)
    expected_presence = torch.stack([torch.sigmoid(p) for _, p in outputs]).mean(0)
    assert torch.allclose(torch.sigmoid(mask), expected_mask, atol=1e-5)
    assert torch.allclose(torch.sigmoid(presence), expected_presence, atol=1e-5)
    # The members differ, so the mean is not any one of them.
    assert not torch.allclose(torch.sigmoid(outputs[0][0]), expected_mask, atol=1e-3)


def test_an_ensemble_of_deep_supervised_members_returns_the_plain_pair_in_either_mode():
    ensemble = build_model(ModelConfig(**{**CONFIG.to_dict(), "members": 2, "deep_supervision": 1}))
    x = torch.randn(2, 1, 32, 48)
    for mode in (True, False):
        mask, presence = ensemble.train(mode)(x)
        assert mask.shape == (2, 1, 32, 48) and presence.shape == (2,)


def test_configs_written_before_ensembles_still_load_as_one_unet():
    old = {k: v for k, v in CONFIG.to_dict().items() if k != "members"}
    assert isinstance(build_model(ModelConfig(**old)), UNet)


def test_the_train_stage_registers_the_fold_models_as_one(prepared, tiny_params, tmp_path):
    params = with_settings(tiny_params, {"split": {"folds": 2}, "train": {"epochs": 1, "ensemble_folds": True}})
    prepare_again(prepared, params)
    epochs: list[dict] = []
    result = stages.fit(prepared, params, progress=False, on_epoch=lambda e, row: epochs.append(row))

    metrics = json.loads((prepared.models_dir / METRICS).read_text())
    assert metrics["members"] == 2 and [f["fold"] for f in metrics["folds"]] == [0, 1]
    assert result.best_val_dice == pytest.approx(np.mean([f["best_val_dice"] for f in metrics["folds"]]), abs=1e-6)
    assert result.precision == ("bf16" if cpu_has_native_bf16() else "fp32")  # what the folds trained in
    # One MLflow run holds both folds' curves: the keys say which fold.
    assert {key.split(".")[0] for row in epochs for key in row} == {"fold0", "fold1"}
    assert sorted(pd.read_csv(prepared.models_dir / HISTORY)["fold"].unique()) == [0, 1]

    model, config = load_trained(prepared.models_dir)
    assert isinstance(model, FoldEnsemble) and config.members == 2
    for fold, member in enumerate(model.members):
        own = torch.load(prepared.models_dir / FOLDS_DIR / f"fold{fold}" / WEIGHTS, weights_only=True)
        for key, value in member.state_dict().items():
            assert torch.equal(value, own[key]), key

    # Out-of-fold: each member scores exactly the subjects it did not train on, and together they
    # cover every non-holdout frame once.
    frames = pd.read_csv(prepared.prepared_dir / FRAMES)
    cv = metrics["folds"]
    covered = []
    for fold, (member, single, rows) in enumerate(out_of_fold_members(model, config, frames, params)):
        assert member is model.members[fold] and single.members == 1
        assert sorted(frames.iloc[rows]["subject"].unique()) == cv[fold]["validation_subjects"]
        covered.extend(rows)
    assert sorted(covered) == sorted(np.flatnonzero((frames["split"] != "holdout").to_numpy()))

    # The evaluate stage and the inference path take the ensemble like any model.
    evaluation = stages.score(prepared, params)
    holdout = frames[frames["split"] == "holdout"]
    assert evaluation.per_frame["frame_id"].tolist() == holdout["frame_id"].tolist()
    assert evaluation.metrics["dice"] == pytest.approx(evaluation.per_frame["dice"].mean())
    # The thresholds were tuned on the out-of-fold probabilities (each frame scored by the member
    # that did not train on it), not on the ensemble's view of the validation part.
    base = Postprocess.from_params(params.postprocess)
    probs, presence, truth = [], [], []
    for member, single, rows in out_of_fold_members(model, config, frames, params):
        images, part_masks = load_native(prepared.raw_dir, frames.iloc[rows].reset_index(drop=True))
        p, q = Predictor(member, single, base).probabilities(images)
        probs.append(p)
        presence.append(q)
        truth.append(part_masks)
    expected_post, expected_curve = tune_on_probabilities(
        Predictor(model, config, base), np.concatenate(probs), np.concatenate(presence), np.concatenate(truth), base)
    assert evaluation.postprocess == expected_post
    curve = pd.read_csv(prepared.reports_dir / "threshold_curve.csv")
    assert np.allclose(curve["dice"], expected_curve["dice"])
    assert (curve["frames"] == sum(len(t) for t in truth)).all()  # every non-holdout frame, once
    post = load_postprocess(prepared.reports_dir)
    bundle = write_bundle(tmp_path / "bundle", prepared.models_dir / WEIGHTS, config, post)
    frames_in = np.random.default_rng(0).integers(0, 255, (2, 420, 580), dtype=np.uint8)
    loaded = Predictor.from_bundle(bundle)
    assert isinstance(loaded.model, FoldEnsemble)
    direct = Predictor(model, config, post).probabilities(frames_in)[0]
    assert np.allclose(loaded.probabilities(frames_in)[0], direct, atol=1e-5)
    assert loaded.predict(frames_in).shape == (2, 420, 580)


def test_ensemble_folds_needs_folds(prepared, tiny_params):
    with pytest.raises(ValueError, match="split.folds"):
        stages.fit(prepared, with_settings(tiny_params, {"train": {"ensemble_folds": True}}), progress=False)
