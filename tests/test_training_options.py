"""Every training option of params.yaml is a real code path: model variants, augmentations,
schedules, k-fold cross-validation, resume that reproduces an uninterrupted run, data-loader
workers, torch.compile and DistributedDataParallel under torchrun (gloo, two CPU processes)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import stages
from pipeline.checkpoints import WEIGHTS, load_trained
from pipeline.config import AugmentParams, TrainParams, load_params
from pipeline.devices import _cpu_flags_have_bf16, cpu_has_native_bf16, use_autocast
from pipeline.inference import Postprocess, Predictor, fuse_conv_bn
from pipeline.model import ModelConfig, ResizeConv, build_model
from pipeline.preprocess import load_prepared
from pipeline.train import METRICS, _validation_scores, lr_factor, predict_prepared, stop_early
from pipeline.weight_average import WeightAverage

from .conftest import REPO, prepare_again, seed_mlflow_store, tiny_model_config, with_settings


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_every_model_variant_builds_and_keeps_the_shapes(norm, residual, upsample):
    config = ModelConfig(depth=2, base_width=8, dropout=0.2, height=16, width=24, intensity_mean=0.3,
                         intensity_std=0.2, norm=norm, residual=residual, upsample=upsample)
    net = build_model(config)
    mask, presence = net(torch.randn(2, 1, 16, 24))
    assert mask.shape == (2, 1, 16, 24) and presence.shape == (2,)
    norms = {type(m).__name__ for m in net.modules()}
    expected = {"batch": "BatchNorm2d", "instance": "InstanceNorm2d", "group": "GroupNorm"}.get(norm)
    if expected:
        assert expected in norms
    else:
        assert not norms & {"BatchNorm2d", "InstanceNorm2d", "GroupNorm"}
    assert any(b.shortcut is not None for b in net.down) == residual
    assert any(isinstance(m, ResizeConv) for m in net.up) == (upsample == "resize")
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.up) == (upsample == "transpose")


def test_old_model_configs_without_the_new_fields_still_load():
    old = {"depth": 2, "base_width": 4, "dropout": 0.0, "height": 16, "width": 16, "intensity_mean": 0.5,
           "intensity_std": 0.2}
    config = ModelConfig(**old)
    assert (config.norm, config.residual, config.upsample, config.deep_supervision) == ("batch", False, "transpose", 0)


def test_augmentations_are_each_switched_by_their_probability_and_move_mask_with_frame():
    from pipeline.augment import training_transform

    off = training_transform(AugmentParams(elastic_p=0, grid_distortion_p=0, gamma_p=0, speckle_p=0), seed=0)
    names_off = {type(t).__name__ for t in off.transforms}
    assert not names_off & {"ElasticTransform", "GridDistortion", "RandomGamma", "MultiplicativeNoise"}
    on = training_transform(AugmentParams(elastic_p=1, grid_distortion_p=1, gamma_p=1, speckle_p=1, affine_p=1,
                                          shear_limit=10, hflip_p=1), seed=0)
    names_on = {type(t).__name__ for t in on.transforms}
    assert {"ElasticTransform", "GridDistortion", "RandomGamma", "MultiplicativeNoise", "Affine"} <= names_on
    # Geometry is shared: a frame that *is* its mask stays its mask after every transform
    # (only the intensity transforms, which leave the mask alone, change the frame's values).
    mask = np.zeros((64, 96), np.uint8)
    mask[20:44, 30:70] = 1
    geometric = training_transform(AugmentParams(elastic_p=1, grid_distortion_p=1, affine_p=1, shear_limit=10,
                                                 hflip_p=1, brightness_contrast_p=0), seed=3)
    out = geometric(image=mask * 255, mask=mask)
    agreement = ((out["image"] > 127) == (out["mask"] > 0)).mean()
    assert agreement > 0.98
    assert not np.array_equal(out["mask"], mask)  # it did move


def test_learning_rate_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)      # warm-up starts low
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)     # cosine from the top ...
    assert lr_factor(99, 100, 10, "cosine") < 0.01                     # ... to zero
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_cross_validation_trains_every_fold(prepared, tiny_params):
    from pipeline.cross_validation import cross_validate
    from pipeline.split import SplitError

    params = with_settings(tiny_params, {"split": {"folds": 3}, "train": {"epochs": 1}})
    with pytest.raises(SplitError, match="not the 3 fold"):  # prepared with one fold: say so, never recompute
        cross_validate(prepared.prepared_dir, prepared.models_dir / "cv", params, progress=False)
    prepare_again(prepared, params)
    outcome = cross_validate(prepared.prepared_dir, prepared.models_dir / "cv", params, progress=False)
    assert [f.fold for f in outcome.folds] == [0, 1, 2]
    seen = [s for f in outcome.folds for s in f.validation_subjects]
    assert len(seen) == len(set(seen)) == 4  # 6 subjects, 2 in the holdout
    assert json.loads((prepared.models_dir / "cv" / "cv.json").read_text())["mean_dice"] == outcome.mean_dice
    for fold in range(3):
        assert (prepared.models_dir / "cv" / f"fold{fold}" / WEIGHTS).is_file()

    # A rerun (a retried task) keeps the folds that finished with the same settings and data...
    weights = [prepared.models_dir / "cv" / f"fold{fold}" / WEIGHTS for fold in range(3)]
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = cross_validate(prepared.prepared_dir, prepared.models_dir / "cv", params, progress=False)
    assert again == outcome and [w.stat().st_mtime_ns for w in weights] == stamps
    # ... and trains again the folds whose settings changed.
    changed = with_settings(params, {"train": {"epochs": 2}})
    retrained = cross_validate(prepared.prepared_dir, prepared.models_dir / "cv", changed, progress=False)
    assert all(f.epochs_run == 2 for f in retrained.folds)
    assert all(w.stat().st_mtime_ns != t for w, t in zip(weights, stamps))


def test_resumed_training_equals_an_uninterrupted_one(prepared, tiny_params, tmp_path):
    """Seeded and reproducible: stopping after an epoch and rerunning gives the same weights."""
    params = with_settings(tiny_params, {"train": {"epochs": 3, "warmup_epochs": 1, "augment": {"speckle_p": 0.5}}})
    whole = stages.fit(prepared, params, progress=False)
    reference = torch.load(prepared.models_dir / "checkpoint.pt", weights_only=True)["model"]
    shutil.rmtree(prepared.models_dir)
    first = stages.fit(prepared, params, progress=False, max_epochs_this_call=1)
    second = stages.fit(prepared, params, progress=False)
    assert first.epochs_run == 1 and second.resumed_from_epoch == 1
    resumed = torch.load(prepared.models_dir / "checkpoint.pt", weights_only=True)["model"]
    for key, value in reference.items():
        assert torch.allclose(value.float(), resumed[key].float(), atol=1e-6), key
    assert second.best_val_dice == whole.best_val_dice


def test_weight_average_moves_towards_the_weights_and_copies_counters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.99)
    start = {k: v.clone() for k, v in average.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    average.update(model)  # the first update takes the weights as they are (decay 0)...
    assert torch.equal(average.module[0].weight, model[0].weight)
    assert int(average.module[1].num_batches_tracked) == 7
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model)  # ... the next ones keep the mean of all so far (decay n / (n + 1))...
    assert torch.allclose(average.module[0].weight, start["0.weight"] + 1.5)
    assert average.current_decay() == pytest.approx(2 / 3)
    average.updates = 10_000  # ... until the horizon 1 / (1 - decay) is shorter than the training
    assert average.current_decay() == 0.99
    assert not any(p.requires_grad for p in average.module.parameters())
    copy = WeightAverage(model, decay=0.99)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 10_000 and torch.equal(copy.module[0].weight, average.module[0].weight)
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(model, decay=1.0)


def test_weight_average_is_validated_shipped_and_resumed_without_changing_the_training(prepared, tiny_params):
    """``train.ema_decay``: the average is what fit validates and ships, the optimiser's raw weights
    follow the same path as without it (so one run compares both), and a resume restores it."""
    base = {"epochs": 3, "warmup_epochs": 1, "early_stopping_patience": 100}
    stages.fit(prepared, with_settings(tiny_params, {"train": base}), progress=False)
    plain_raw = torch.load(prepared.models_dir / "checkpoint.pt", weights_only=True)["model"]
    shutil.rmtree(prepared.models_dir)

    params = with_settings(tiny_params, {"train": {**base, "ema_decay": 0.9}})
    whole = stages.fit(prepared, params, progress=False)
    ckpt = torch.load(prepared.models_dir / "checkpoint.pt", weights_only=True)
    for key, value in plain_raw.items():
        assert torch.equal(value, ckpt["model"][key]), key
    assert ckpt["ema"]["updates"] > 0
    assert any(not torch.equal(v, ckpt["ema"]["module"][k]) for k, v in ckpt["model"].items() if v.is_floating_point())

    data = load_prepared(prepared.prepared_dir)
    val_x, val_y, _ = data.part("validation")
    model, config = load_trained(prepared.models_dir)  # model.pt: the best epoch's average
    amp = whole.precision == "bf16"  # fit validates in the precision it trained in
    assert _validation_scores(model, val_x, val_y, config, torch.device("cpu"), amp)["val_dice"] == \
        pytest.approx(whole.best_val_dice, abs=1e-6)
    model.load_state_dict(ckpt["ema"]["module"])  # the last epoch's average scored the last history row
    last = pd.read_csv(prepared.models_dir / "history.csv")["val_dice"].iloc[-1]
    assert _validation_scores(model, val_x, val_y, config, torch.device("cpu"), amp)["val_dice"] == \
        pytest.approx(last, abs=1e-6)

    shutil.rmtree(prepared.models_dir)
    stages.fit(prepared, params, progress=False, max_epochs_this_call=1)
    resumed = stages.fit(prepared, params, progress=False)
    assert resumed.resumed_from_epoch == 1
    again = torch.load(prepared.models_dir / "checkpoint.pt", weights_only=True)
    assert again["ema"]["updates"] == ckpt["ema"]["updates"]
    for key, value in ckpt["ema"]["module"].items():
        assert torch.allclose(value.float(), again["ema"]["module"][key].float(), atol=1e-6), key


def test_variant_network_with_loader_workers_trains_and_serves(prepared, tiny_params):
    params = with_settings(tiny_params, {
        "model": {"norm": "group", "residual": True, "upsample": "resize"},
        "train": {"epochs": 1, "loader_workers": 2, "lr_schedule": "constant"},
    })
    result = stages.fit(prepared, params, progress=False)
    assert result.epochs_run == 1
    model, config = load_trained(prepared.models_dir)
    assert (config.norm, config.residual, config.upsample) == ("group", True, "resize")
    masks = Predictor(model, config, Postprocess()).predict(np.zeros((2, 420, 580), np.uint8))
    assert masks.shape == (2, 420, 580)


def test_folded_batchnorm_and_channels_last_give_the_same_masks(prepared, tiny_params):
    stages.fit(prepared, with_settings(tiny_params, {"model": {"norm": "batch"}, "train": {"epochs": 1}}), progress=False)
    model, config = load_trained(prepared.models_dir)
    x = torch.randn(3, 1, config.height, config.width)
    with torch.inference_mode():
        plain_mask, plain_presence = model(x)
        fused = fuse_conv_bn(model)
        fused_mask, fused_presence = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert torch.allclose(plain_mask, fused_mask, atol=1e-4)
    assert torch.allclose(plain_presence, fused_presence, atol=1e-4)
    frames = np.random.default_rng(0).integers(0, 255, (2, 420, 580), dtype=np.uint8)
    post = Postprocess(0.5, 0.0, 0)
    eager = Predictor(model, config, post, fuse=False).probabilities(frames)[0]
    fast = Predictor(model, config, post, fuse=True, channels_last=True).probabilities(frames)[0]
    assert np.abs(eager - fast).max() < 1e-3


def test_channels_last_training_runs_in_nhwc_on_the_cpu_and_learns_the_same(prepared, tiny_params):
    """``train.channels_last`` applies on the CPU too (1.12-1.15x faster steps, docs/benchmarks.md):
    the weights it trains are stored NHWC, and the first epoch's loss matches the NCHW run's."""
    losses = {}
    for nhwc in (False, True):
        shutil.rmtree(prepared.models_dir, ignore_errors=True)
        stages.fit(prepared, with_settings(tiny_params, {"train": {"epochs": 1, "channels_last": nhwc}}), progress=False)
        losses[nhwc] = pd.read_csv(prepared.models_dir / "history.csv")["loss"].iloc[0]
        state = torch.load(prepared.models_dir / "checkpoint.pt", weights_only=True)["model"]
        # 3x3 convolutions with several input channels: their layout tells NHWC from NCHW apart.
        kernels = [v for v in state.values() if v.dim() == 4 and v.shape[1] > 1 and v.shape[2] > 1]
        assert kernels
        assert all(k.is_contiguous(memory_format=torch.channels_last) == nhwc for k in kernels)
        assert all(k.is_contiguous() != nhwc for k in kernels)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    model, config = load_trained(prepared.models_dir)  # NHWC weights load into a plain model
    assert model(torch.zeros(1, 1, config.height, config.width))[0].shape[-2:] == (config.height, config.width)


@pytest.mark.parametrize("norm,nhwc", [("batch", True), ("instance", False)])
def test_channels_last_auto_trains_nhwc_only_where_the_normalisation_runs_faster_in_it(prepared, tiny_params,
                                                                                        norm, nhwc):
    # Measured on the CPU (docs/benchmarks.md): NHWC speeds batch-norm training up and slows instance norm's.
    shutil.rmtree(prepared.models_dir, ignore_errors=True)
    stages.fit(prepared, with_settings(tiny_params, {"model": {"norm": norm}, "train": {"epochs": 1, "channels_last": "auto"}}),
               progress=False)
    state = torch.load(prepared.models_dir / "checkpoint.pt", weights_only=True)["model"]
    kernels = [v for v in state.values() if v.dim() == 4 and v.shape[1] > 1 and v.shape[2] > 1]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) == nhwc for k in kernels)


def test_lovasz_weight_joins_the_training_loss(prepared, tiny_params):
    params = with_settings(tiny_params, {"train": {"epochs": 1, "loss": {"lovasz_weight": 0.5}}})
    stages.fit(prepared, params, progress=False)
    row = pd.read_csv(prepared.models_dir / "history.csv").iloc[0]
    w = params.train.loss
    assert row["lovasz_loss"] > 0
    # The epoch's loss is the weighted sum of its logged parts, the Lovász hinge included.
    assert row["loss"] == pytest.approx(w.dice_weight * row["dice_loss"] + w.bce_weight * row["bce_loss"]
                                        + w.presence_weight * row["presence_loss"] + 0.5 * row["lovasz_loss"], rel=1e-4)


def test_deep_supervision_trains_the_coarse_heads_and_serves_the_plain_network(prepared, tiny_params):
    params = with_settings(tiny_params, {"model": {"deep_supervision": 2}, "train": {"epochs": 1}})
    stages.fit(prepared, params, progress=False)
    row = pd.read_csv(prepared.models_dir / "history.csv").iloc[0]
    w = params.train.loss
    assert row["deep_supervision_loss"] > 0
    # The epoch's loss: the full-size mask loss at weight 4/7, the coarse levels' share, presence.
    assert row["loss"] == pytest.approx(4 / 7 * (w.dice_weight * row["dice_loss"] + w.bce_weight * row["bce_loss"])
                                        + row["deep_supervision_loss"] + w.presence_weight * row["presence_loss"],
                                        rel=1e-4)
    model, config = load_trained(prepared.models_dir)
    assert config.deep_supervision == 2 and len(model.aux_heads) == 2
    masks = Predictor(model, config, Postprocess()).predict(np.zeros((2, 420, 580), np.uint8))
    assert masks.shape == (2, 420, 580)


def test_soft_targets_train_on_the_mask_coverage(prepared, tiny_params):
    """``train.soft_targets`` feeds each pixel's mask coverage to the loss: same seed and frames,
    so only the targets can make the losses differ; the validation Dice still scores 0/1 masks."""
    runs = {}
    for soft in (False, True):
        shutil.rmtree(prepared.models_dir, ignore_errors=True)
        result = stages.fit(prepared, with_settings(tiny_params, {"train": {"epochs": 1, "soft_targets": soft}}),
                            progress=False)
        runs[soft] = pd.read_csv(prepared.models_dir / "history.csv").iloc[0], result
    hard, soft = runs[False][0], runs[True][0]
    # Training is deterministic (the bf16 and resume tests rely on it): equal losses would mean
    # the coverage never reached the loss.
    assert soft["bce_loss"] != hard["bce_loss"] and soft["dice_loss"] != hard["dice_loss"]
    assert 0 <= runs[True][1].best_val_dice <= 1
    # Cross-validation trains on the same targets as the train stage.
    from pipeline.cross_validation import cross_validate

    params = with_settings(tiny_params, {"split": {"folds": 2}, "train": {"epochs": 1, "soft_targets": True}})
    prepare_again(prepared, params)
    outcome = cross_validate(prepared.prepared_dir, prepared.models_dir / "cv", params, progress=False)
    fold_loss = pd.read_csv(prepared.models_dir / "cv" / "fold0" / "history.csv")["bce_loss"].iloc[0]
    hard_cv = with_settings(params, {"train": {"soft_targets": False}})
    cross_validate(prepared.prepared_dir, prepared.models_dir / "cv-hard", hard_cv, progress=False)
    assert fold_loss != pd.read_csv(prepared.models_dir / "cv-hard" / "fold0" / "history.csv")["bce_loss"].iloc[0]
    assert len(outcome.folds) == 2


def test_compiled_training_runs(prepared, tiny_params):
    # aot_eager traces forward and backward graphs like inductor does, without generating C++
    # kernels (minutes on two cores); inductor itself is timed by bench/train_throughput.py.
    params = with_settings(tiny_params, {"model": {"depth": 1, "base_width": 4},
                                 "train": {"epochs": 1, "compile": True, "compile_backend": "aot_eager"}})
    from torch._dynamo.utils import counters

    counters.clear()
    result = stages.fit(prepared, params, progress=False)
    assert result.epochs_run == 1 and (prepared.models_dir / WEIGHTS).is_file()
    assert counters["stats"]["unique_graphs"] >= 1  # the network really went through torch.compile


def _run_torchrun(prepared, params) -> subprocess.CompletedProcess:
    """``nerveseg stage train`` in two gloo processes."""
    from pipeline.config import write_params

    write_params(params, prepared.root / "params.yaml")
    torchrun = Path(sys.executable).with_name("torchrun")
    nerveseg = Path(sys.executable).with_name("nerveseg")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", str(nerveseg), "stage", "train",
         "--project", str(prepared.root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def _train_under_torchrun(prepared, params) -> list[dict]:
    """``nerveseg stage train`` in two gloo processes; the JSON lines it printed."""
    done = _run_torchrun(prepared, params)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.e2e
def test_distributed_data_parallel_trains_on_two_cpu_processes(prepared, tiny_params):
    """``torchrun`` starts two processes; gloo all-reduces their gradients; rank 0 writes. With a
    weight average (``train.ema_decay``), which each rank keeps from its synchronised weights."""
    params = with_settings(tiny_params, {"train": {"epochs": 2, "device": "cpu", "threads": 1, "ema_decay": 0.9}})
    results = _train_under_torchrun(prepared, params)
    assert len(results) == 1 and results[0]["world_size"] == 2  # rank 0 reports, once
    metrics = json.loads((prepared.models_dir / METRICS).read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 2
    ckpt = torch.load(prepared.models_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["ema"]["updates"] > 0
    model, config = load_trained(prepared.models_dir)
    assert Predictor(model, config, Postprocess()).predict(np.zeros((420, 580), np.uint8)).shape == (1, 420, 580)


@pytest.mark.e2e
def test_fold_ensemble_trains_under_torchrun(prepared, tiny_params):
    """``train.ensemble_folds`` under two processes: both ranks train every fold in one process group
    and rank 0 alone assembles the ensemble. A group re-created per fold hung at a fold change in
    about half the runs; three folds give that two chances to show."""
    from pipeline.ensemble import FOLDS_DIR

    params = with_settings(tiny_params, {"split": {"folds": 3},
                                 "train": {"epochs": 1, "device": "cpu", "threads": 1, "ensemble_folds": True}})
    prepare_again(prepared, params)
    results = _train_under_torchrun(prepared, params)
    assert len(results) == 1 and results[0]["world_size"] == 2  # rank 0 reports, once
    for fold in range(3):
        fold_metrics = json.loads((prepared.models_dir / FOLDS_DIR / f"fold{fold}" / METRICS).read_text())
        assert fold_metrics["world_size"] == 2 and fold_metrics["epochs_run"] == 1
    model, config = load_trained(prepared.models_dir)
    assert config.members == 3
    assert Predictor(model, config, Postprocess()).predict(np.zeros((420, 580), np.uint8)).shape == (1, 420, 580)


@pytest.mark.e2e
def test_a_failure_on_one_rank_ends_the_distributed_training_at_once(prepared, tiny_params):
    """Only rank 0 writes: when its checkpoint cannot be written (here a folder is in the way; in life a
    full disk), it must fail the launch at once with the reason, not wait at a barrier while the other
    rank waits in its next all-reduce (gloo's default timeout is 30 minutes)."""
    import time

    blocker = prepared.models_dir / "checkpoint.pt"
    (blocker / "in-the-way").mkdir(parents=True)
    params = with_settings(tiny_params, {"train": {"epochs": 4, "min_epochs": 4, "device": "cpu", "threads": 1}})
    began = time.monotonic()
    done = _run_torchrun(prepared, params)
    seconds = time.monotonic() - began
    assert done.returncode != 0
    assert "IsADirectoryError" in done.stderr, done.stderr[-3000:]  # the reason reaches the operator
    assert seconds < 120, f"the launch took {seconds:.0f} s to fail"


def test_largest_blob_and_mirror_averaging_in_the_inference_path():
    from pipeline.inference import largest_component

    mask = np.zeros((40, 60), np.uint8)
    mask[5:10, 5:10] = 1       # 25 px
    mask[20:35, 30:50] = 1     # 300 px: the one kept
    kept = largest_component(mask)
    assert kept.sum() == 300 and kept[25, 40] == 1 and kept[7, 7] == 0
    assert np.array_equal(largest_component(np.zeros_like(mask)), np.zeros_like(mask))

    config = ModelConfig(depth=2, base_width=4, dropout=0.0, height=16, width=24, intensity_mean=0.3,
                         intensity_std=0.2)
    torch.manual_seed(0)
    model = build_model(config).eval()
    frames = np.random.default_rng(1).integers(0, 255, (2, 420, 580), dtype=np.uint8)
    plain = Predictor(model, config, Postprocess(), fuse=False)
    tta = Predictor(model, config, Postprocess(tta_hflip=True), fuse=False)
    p_plain, _ = plain.probabilities(frames)
    p_mirror, _ = plain.probabilities(np.ascontiguousarray(frames[:, :, ::-1]))
    p_tta, _ = tta.probabilities(frames)
    assert np.allclose(p_tta, (p_plain + p_mirror[:, :, ::-1]) / 2, atol=1e-5)


def test_convex_hull_fills_each_blob_out_and_runs_in_order_with_the_other_rules():
    import cv2

    from pipeline.config import PostprocessParams
    from pipeline.inference import convex_hulls, postprocess_masks

    crescent = np.zeros((60, 80), np.uint8)
    cv2.circle(crescent, (30, 30), 20, 1, -1)
    cv2.circle(crescent, (42, 30), 16, 0, -1)   # bite out of the disc: a crescent
    crescent[28:32, 14:18] = 0                   # and a hole
    speck = (slice(2, 5), slice(70, 73))         # a 9 px blob far away
    crescent[speck] = 1
    hull = convex_hulls(crescent)
    assert hull[30, 16] == 1 and hull[30, 40] == 1  # the hole and the bite are filled
    assert hull[speck].all() and hull[12:18, 52:58].sum() == 0  # each blob its own hull: one around both would cover this
    assert (hull >= crescent).all() and hull.sum() > crescent.sum()
    assert not convex_hulls(np.zeros_like(crescent)).any()

    # At native size, after the threshold: largest blob first (the speck goes), then its hull.
    probs = crescent.astype(np.float32)[None]
    both = postprocess_masks(probs, np.ones(1), (60, 80), Postprocess(0.5, 0.0, largest_component=True, convex_hull=True))
    assert both[0][speck].sum() == 0 and both[0][30, 40] == 1
    assert np.array_equal(postprocess_masks(probs, np.ones(1), (60, 80), Postprocess(0.5, 0.0))[0], crescent)
    # params.yaml's section maps onto the rules by name, the new one included.
    assert Postprocess.from_params(PostprocessParams(convex_hull=True, min_area=7)) == Postprocess(min_area=7, convex_hull=True)


def test_cv_command_logs_every_fold_to_mlflow(prepared, tiny_params, mlflow_store_template):
    import mlflow
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.config import write_params

    seed_mlflow_store(prepared.mlflow_dir, mlflow_store_template)  # an empty store: MLflow's migrations done once
    two_folds = with_settings(tiny_params, {"split": {"folds": 2}, "train": {"epochs": 1}})
    write_params(two_folds, prepared.root / "params.yaml")
    prepare_again(prepared, two_folds)
    done = CliRunner().invoke(app, ["cv", "--project", str(prepared.root), "--json"])
    assert done.exit_code == 0, done.output
    outcome = json.loads(done.output[done.output.index("{"):])
    assert [f["fold"] for f in outcome["folds"]] == [0, 1]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName = 'cv-2-fold'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.cv_mean_dice"] == pytest.approx(outcome["mean_dice"])

    write_params(tiny_params, prepared.root / "params.yaml")  # folds: 1
    refused = CliRunner().invoke(app, ["cv", "--project", str(prepared.root)])
    assert refused.exit_code == 2 and "split.folds" in refused.output


def test_early_stopping_waits_for_min_epochs():
    tp = TrainParams(early_stopping_patience=2, min_epochs=10)
    assert not stop_early(epoch=5, stale=4, tp=tp)   # patience used up, but too early
    assert stop_early(epoch=10, stale=2, tp=tp)
    assert not stop_early(epoch=12, stale=1, tp=tp)  # still improving
    off = TrainParams(early_stopping_patience=0, min_epochs=10)
    assert not stop_early(epoch=20, stale=15, tp=off)  # 0: the schedule runs to its end


def test_bf16_autocast_on_the_cpu_trains_only_where_the_cpu_has_native_bf16(prepared, tiny_params, caplog):
    fp32 = with_settings(tiny_params, {"train": {"epochs": 1, "amp": True, "amp_cpu": False}})
    stages.fit(prepared, fp32, progress=False)
    fp32_loss = pd.read_csv(prepared.models_dir / "history.csv")["loss"].iloc[0]
    shutil.rmtree(prepared.models_dir)
    bf16 = with_settings(tiny_params, {"train": {"epochs": 1, "amp": True, "amp_cpu": True}})
    with caplog.at_level(logging.WARNING, logger="pipeline.devices"):
        result = stages.fit(prepared, bf16, progress=False)
    bf16_loss = pd.read_csv(prepared.models_dir / "history.csv")["loss"].iloc[0]
    assert result.epochs_run == 1 and np.isfinite(bf16_loss)
    if cpu_has_native_bf16():
        # Same seed and data: only the bf16 arithmetic can make the two losses differ.
        assert bf16_loss != fp32_loss
        assert result.precision == "bf16"
    else:
        # Emulated bf16 is many times slower than fp32: the run stays fp32 and says why.
        assert bf16_loss == fp32_loss
        assert result.precision == "fp32"
        assert "no native bf16" in caplog.text


def test_the_default_trains_bf16_exactly_where_the_cpu_has_it(prepared, tiny_params, caplog):
    """``amp_cpu: auto`` (the default) is the fast path on a CPU with native bf16 and silent fp32 elsewhere."""
    assert TrainParams().amp_cpu == "auto" and load_params(REPO / "params.yaml").train.amp_cpu == "auto"
    auto = with_settings(tiny_params, {"train": {"epochs": 1, "amp": True, "amp_cpu": "auto"}})
    with caplog.at_level(logging.WARNING, logger="pipeline.devices"):
        result = stages.fit(prepared, auto, progress=False)
    assert result.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert "bf16" not in caplog.text  # nothing to warn about either way


@pytest.mark.parametrize("amp", [True, False])
def test_validation_runs_in_the_precision_it_is_given(amp):
    """The validation ``fit`` runs (``_validation_scores(..., amp)``) computes in the precision it is given,
    on the CPU as on CUDA: under bf16 autocast exactly when asked, with fp32's probabilities to bf16's
    rounding. That ``fit`` hands it the training's own precision is pinned, on a CPU with native bf16, by the
    weight-average test above, which rescores the shipped model in the recorded precision to 1e-6."""
    config = tiny_model_config("instance")
    torch.manual_seed(0)
    model = build_model(config).eval()
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, config.height, config.width), dtype=np.uint8)
    masks = np.zeros(frames.shape, dtype=bool)
    masks[:3, 8:20, 10:30] = True
    scores = _validation_scores(model, frames, masks, config, torch.device("cpu"), amp)
    assert seen == [amp] and 0.0 <= scores["val_dice"] <= 1.0
    seen.clear()
    prob, presence = predict_prepared(model, frames, config, torch.device("cpu"), amp=amp)
    fp32_prob, fp32_presence = predict_prepared(model, frames, config, torch.device("cpu"))
    assert seen == [amp, False]
    assert np.abs(prob - fp32_prob).max() < 0.05 and np.abs(presence - fp32_presence).max() < 0.05
    assert bool((prob == fp32_prob).all()) is (not amp)  # bf16 does round: the two paths really differ


def test_autocast_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_autocast(TrainParams(amp=True), cuda)
    assert not use_autocast(TrainParams(amp=False, amp_cpu=True), cuda)
    assert not use_autocast(TrainParams(amp=True, amp_cpu=False), cpu)
    assert use_autocast(TrainParams(amp=True, amp_cpu=True), cpu) == cpu_has_native_bf16()
    assert use_autocast(TrainParams(amp=True, amp_cpu="auto"), cpu) == cpu_has_native_bf16()
    assert not use_autocast(TrainParams(amp=False, amp_cpu="auto"), cpu)  # amp off switches both off


def test_the_cpu_flags_tell_native_bf16_as_onednn_does(tmp_path):
    """The fallback probe (``/proc/cpuinfo``) for a torch without oneDNN's private op: it agrees with
    oneDNN on this machine, and reads both kinds of CPU."""
    if Path("/proc/cpuinfo").is_file():
        assert _cpu_flags_have_bf16(Path("/proc/cpuinfo")) == cpu_has_native_bf16()
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\nbugs\t\t: avx512_bf16_is_not_a_flag_here\n")
    assert _cpu_flags_have_bf16(amx) and not _cpu_flags_have_bf16(avx2)
    assert not _cpu_flags_have_bf16(tmp_path / "missing")


@pytest.mark.parametrize("native", [True, False])
def test_autocast_rule_on_either_kind_of_cpu(caplog, native):
    """The rule on both kinds of CPU, whichever this one is."""
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="pipeline.devices"):
        assert use_autocast(TrainParams(amp=True, amp_cpu="auto"), cpu, native) is native
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="pipeline.devices"):
        assert use_autocast(TrainParams(amp=True, amp_cpu=True), cpu, native) is native
    assert ("no native bf16" in caplog.text) is (not native)
    assert use_autocast(TrainParams(amp=True, amp_cpu=False), cpu, native) is False
