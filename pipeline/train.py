"""Train stage: the U-Net with its presence head on the prepared train part, early stopping
on the validation part, a checkpoint every epoch and resume after an interrupted process.

This module is the training loop (:func:`fit`) and what it feeds and scores; it leans on
``pipeline.devices`` (device, precision, layout, compile), ``pipeline.distributed`` (``torchrun``)
and ``pipeline.checkpoints`` (the weights and the resume checkpoint on disk).

Outputs (``models/``): ``model.pt`` (best weights, a plain state dict; with ``train.ema_decay``
the best epoch's weight average), ``model_config.json``,
``history.csv`` (per-epoch curves), ``train_metrics.json``; ``checkpoint.pt`` holds the state
to resume from and is not a stage output.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.atomic import atomic_write_text
from pipeline.augment import training_transform
from pipeline.checkpoints import (CHECKPOINT, CONFIG, WEIGHTS, Progress, finished, identity_key, resume,
                                  save_atomic, save_checkpoint)
from pipeline.checkpoints import load_trained  # noqa: F401  (re-exported for bench/ scripts)
from pipeline.config import Params
from pipeline.devices import Compute, compile_network, set_threads
from pipeline.devices import cpu_has_native_bf16, use_autocast  # noqa: F401  (re-exported for bench/ scripts)
from pipeline.distributed import (Distributed, barrier, broadcast_buffers, data_parallel, process_group, rank_device,
                                  shard_sampler)
from pipeline.losses import segmentation_loss
from pipeline.metrics import dice_per_frame
from pipeline.model import ModelConfig, build_model
from pipeline.preprocess import load_prepared
from pipeline.weight_average import WeightAverage

HISTORY = "history.csv"
METRICS = "train_metrics.json"

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainResult:
    best_epoch: int
    best_val_dice: float
    epochs_run: int
    resumed_from_epoch: int | None
    device: str
    seconds: float
    train_frames_per_second: float
    world_size: int = 1
    precision: str = "fp32"  # what the steps computed in: "bf16" (autocast) or "fp32"


class FrameDataset(Dataset):
    def __init__(self, images: np.ndarray, masks: np.ndarray, config: ModelConfig, transform=None):
        self.images, self.masks, self.config, self.transform = images, masks, config, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, mask = self.images[i], self.masks[i]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        x = (image.astype(np.float32) / 255.0 - self.config.intensity_mean) / self.config.intensity_std
        return torch.from_numpy(x)[None], torch.from_numpy(mask.astype(np.float32))[None]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def combine_outputs(mask_prob: np.ndarray, presence_prob: np.ndarray, mask_threshold: float,
                    presence_threshold: float) -> np.ndarray:
    """The rule joining both heads: no mask where presence is below its threshold."""
    masks = mask_prob > mask_threshold
    masks[presence_prob < presence_threshold] = False
    return masks


@torch.inference_mode()
def predict_prepared(model, images: np.ndarray, config: ModelConfig, device: torch.device,
                     batch_size: int = 64, amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mask and presence probabilities at the working size for prepared uint8 frames.

    ``amp`` runs the network under bf16 autocast on any device: ``fit`` passes its own precision, so
    validation costs what training's precision costs (``bench/validation_precision.py``). Evaluation,
    the promotion gate and serving go through ``inference.Predictor`` instead, fp32 on every CPU, so a
    model is judged alike wherever it trained."""
    model.eval()
    probs, presences = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size].astype(np.float32) / 255.0)[:, None]
        x = ((x - config.intensity_mean) / config.intensity_std).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mask_logits, presence_logits = model(x)
        probs.append(torch.sigmoid(mask_logits.float())[:, 0].cpu().numpy())
        presences.append(torch.sigmoid(presence_logits.float()).cpu().numpy())
    return np.concatenate(probs), np.concatenate(presences)


def model_config(params: Params, height: int, width: int, intensity_mean: float, intensity_std: float) -> ModelConfig:
    m = params.model
    return ModelConfig(depth=m.depth, base_width=m.base_width, dropout=m.dropout, height=height, width=width,
                       intensity_mean=intensity_mean, intensity_std=intensity_std, norm=m.norm,
                       residual=m.residual, upsample=m.upsample, deep_supervision=m.deep_supervision)


def stop_early(epoch: int, stale: int, tp) -> bool:
    """Early stopping: ``early_stopping_patience`` epochs without a better validation Dice (0: never),
    but never before ``min_epochs`` (on a hard set the first epochs all score the "everything empty"
    Dice, and counting patience from there would stop before the network learned anything)."""
    patience = tp.early_stopping_patience
    return patience > 0 and stale >= patience and epoch >= tp.min_epochs


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at the last step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _reseed_worker(worker_id: int) -> None:
    """Data-loader workers start with a copy of the transform: give each its own stream."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def train(
    prepared_dir: Path,
    out_dir: Path,
    params: Params,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    max_epochs_this_call: int | None = None,
) -> TrainResult:
    """Train on the prepared train part with early stopping on the validation part, or resume
    an unfinished training of the same settings and data (see :func:`fit`)."""
    data = load_prepared(Path(prepared_dir))
    config = model_config(params, data.summary.height, data.summary.width, data.summary.intensity_mean,
                          data.summary.intensity_std)
    train_x, _, _ = data.part("train")
    train_y = data.part_targets("train", params.train.soft_targets)
    val_x, val_y, _ = data.part("validation")
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError(f"{prepared_dir}: the train or validation part is empty; add subjects")
    identity = {"params": params.digest(), "data": data.summary.__dict__}
    return fit(train_x, train_y, val_x, val_y, config, params, Path(out_dir), identity, on_epoch=on_epoch,
               progress=progress, max_epochs_this_call=max_epochs_this_call)


def _training_loader(dataset: Dataset, tp, dist: Distributed, device: torch.device,
                     generator: torch.Generator) -> tuple[DataLoader, torch.utils.data.DistributedSampler | None]:
    """The shuffled loader of the training frames; under ``torchrun`` each rank reads its own share."""
    batch = max(1, tp.batch_size // dist.world)
    sampler = shard_sampler(dataset, dist, tp.seed)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset) // dist.world > batch,
        generator=generator,
        num_workers=tp.loader_workers,
        worker_init_fn=_reseed_worker if tp.loader_workers else None,
        pin_memory=device.type == "cuda",
    )
    return loader, sampler


@dataclass
class _Training:
    """What one training steps and feeds: the network (unwrapped), its optimiser and schedule, the
    weight average, and the loader with the random streams behind its shuffle and augmentation."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    average: WeightAverage | None
    loader: DataLoader
    sampler: torch.utils.data.DistributedSampler | None
    transform: object
    shuffle_gen: torch.Generator

    @property
    def scored(self) -> torch.nn.Module:
        """The network that is validated, kept as the best and shipped: the average where there is one."""
        return self.average.module if self.average is not None else self.model

    def begin_epoch(self, epoch: int, seed: int) -> None:
        # Streams from the epoch number: a resumed run sees the same frames in the same order.
        self.shuffle_gen.manual_seed(seed * 1_000_003 + epoch)
        self.transform.set_random_seed(seed * 1_000_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)


def _build(train_x: np.ndarray, train_y: np.ndarray, config: ModelConfig, tp, dist: Distributed,
           compute: Compute) -> _Training:
    """The seeded network, loader, optimiser, schedule and weight average, before any resume."""
    _seed_everything(tp.seed)
    model = compute.place(build_model(config))
    transform = training_transform(tp.augment, tp.seed)
    shuffle_gen = torch.Generator()
    loader, sampler = _training_loader(FrameDataset(train_x, train_y, config, transform), tp, dist, compute.device,
                                       shuffle_gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tp.learning_rate, weight_decay=tp.weight_decay)
    per_epoch = max(1, len(loader))
    steps, warmup = tp.epochs * per_epoch, tp.warmup_epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, tp.lr_schedule))
    average = WeightAverage(model, tp.ema_decay) if tp.ema_decay > 0 else None
    return _Training(model, optimizer, scheduler, average, loader, sampler, transform, shuffle_gen)


def _start(run: _Training, out_dir: Path, key: str, dist: Distributed) -> Progress:
    """Resume only a checkpoint of the same settings and data that did not finish; a fresh start
    removes the previous run's weights (never left beside new history) before any rank goes on."""
    progress = resume(out_dir / CHECKPOINT, key, run.model, run.optimizer, run.scheduler, run.average)
    if dist.main and progress.resumed_from is None and (out_dir / WEIGHTS).exists():
        (out_dir / WEIGHTS).unlink()
    barrier(dist)
    return progress


def _train_one_epoch(net, run: _Training, epoch: int, tp, compute: Compute, dist: Distributed,
                     show: bool) -> tuple[dict[str, float], int]:
    """One pass over this rank's share of the frames; the frame-weighted mean of the loss and its parts,
    and the frames this rank saw. With a weight average, each step also moves it towards the raw weights."""
    run.begin_epoch(epoch, tp.seed)
    net.train()
    sums = {"loss": 0.0, "dice_loss": 0.0, "bce_loss": 0.0, "presence_loss": 0.0}
    seen = 0
    batches = tqdm(run.loader, desc=f"epoch {epoch}/{tp.epochs}", disable=not show, leave=False)
    for x, y in batches:
        x, y = compute.batch(x, y)
        with compute.autocast():
            mask_logits, presence_logits, *coarse = net(x)  # coarse: deep-supervision outputs, if any
        loss, parts = segmentation_loss(mask_logits, presence_logits, y, tp.loss, *coarse)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        if run.average is not None:
            run.average.update(run.model)
        sums["loss"] += float(loss.detach()) * len(x)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value * len(x)
        seen += len(x)
        batches.set_postfix(loss=f"{float(loss.detach()):.3f}")
    # Each rank updated its own BatchNorm statistics (and averaged them): take rank 0's everywhere.
    broadcast_buffers([run.model, *([run.average.module] if run.average is not None else [])], dist)
    return {key: value / max(1, seen) for key, value in sums.items()}, seen


def _validation_scores(model, val_x: np.ndarray, val_y: np.ndarray, config: ModelConfig, device: torch.device,
                       amp: bool) -> dict[str, float]:
    """Validation Dice (both heads combined at 0.5) and presence accuracy at the working size."""
    prob, presence = predict_prepared(model, val_x, config, device, amp=amp)
    val_pred = combine_outputs(prob, presence, 0.5, 0.5)
    return {"val_dice": float(dice_per_frame(val_pred, val_y).mean()),
            "val_presence_accuracy": float(((presence >= 0.5) == val_y.reshape(len(val_y), -1).any(1)).mean())}


def _save_epoch(run: _Training, out_dir: Path, key: str, epoch: int, progress: Progress, improved: bool,
                done: bool) -> None:
    """Rank 0's files after an epoch: the weights when they are the best so far, then the checkpoint."""
    if improved:
        save_atomic(run.scored.state_dict(), out_dir / WEIGHTS)
    save_checkpoint(out_dir / CHECKPOINT, key, done, epoch, progress, run.model, run.optimizer, run.scheduler,
                    run.average)


def _report(epoch: int, row: dict[str, float], on_epoch: EpochCallback | None, show: bool) -> None:
    if on_epoch is not None:
        on_epoch(epoch, row)
    if show:
        tqdm.write(f"epoch {epoch:3d}  loss {row['loss']:.4f}  val Dice {row['val_dice']:.4f}"
                   f"  presence acc {row['val_presence_accuracy']:.3f}")


def _epochs(progress: Progress, tp, max_epochs_this_call: int | None) -> range:
    """The epochs this call may run: to the end of the schedule, or ``max_epochs_this_call`` (at least one)."""
    last = tp.epochs
    if max_epochs_this_call is not None:
        last = min(last, progress.next_epoch + max(1, max_epochs_this_call) - 1)
    return range(progress.next_epoch, last + 1)


def _result(progress: Progress, epochs_run: int, compute: Compute, seconds: float, frames: int,
            dist: Distributed) -> TrainResult:
    return TrainResult(
        best_epoch=progress.best_epoch,
        best_val_dice=round(progress.best, 6),
        epochs_run=epochs_run,
        resumed_from_epoch=progress.resumed_from,
        device=str(compute.device),
        seconds=round(seconds, 2),
        train_frames_per_second=round(frames / seconds, 2) if seconds > 0 else 0.0,
        world_size=dist.world,
        precision=compute.precision,
    )


def _write_outputs(out_dir: Path, config: ModelConfig, history: list[dict], result: TrainResult) -> None:
    atomic_write_text(out_dir / CONFIG, json.dumps(config.to_dict(), indent=2))
    atomic_write_text(out_dir / HISTORY, pd.DataFrame(history).to_csv(index=False))
    atomic_write_text(
        out_dir / METRICS,
        json.dumps({"best_epoch": result.best_epoch, "best_val_dice": result.best_val_dice,
                    "epochs_run": result.epochs_run, "world_size": result.world_size, "seconds": result.seconds},
                   indent=2),
    )


def fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    config: ModelConfig,
    params: Params,
    out_dir: Path,
    identity: dict,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    max_epochs_this_call: int | None = None,
) -> TrainResult:
    """Train the network on prepared uint8 frames; the core of the train stage and of
    cross-validation. ``train_y`` holds 0/1 masks or, with ``train.soft_targets``, float mask
    coverage in [0, 1]; ``val_y`` is always 0/1 (the validation Dice scores masks).

    Every epoch ends with a checkpoint (weights, optimiser, schedule, random state); a rerun with
    the same ``identity`` (settings and data) continues from it instead of starting over, and
    because the shuffle and augmentation streams are re-seeded from the epoch number, the result
    equals that of an uninterrupted run. ``max_epochs_this_call`` stops after that many epochs
    without marking the run finished, the way a killed process would; tests use it.

    With ``train.ema_decay`` a moving average of the weights (:class:`WeightAverage`) follows every
    optimiser step; it is what is validated and written as the best weights, and the checkpoint
    keeps it beside the raw weights, which train exactly as they would without it.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the network is wrapped in DistributedDataParallel
    (NCCL on CUDA, gloo on the CPU), each process trains on its share of every epoch's frames
    (``train.batch_size`` is the global batch) and only rank 0 writes files.
    """
    tp = params.train
    out_dir.mkdir(parents=True, exist_ok=True)
    set_threads(tp.threads)
    dist = Distributed.from_env()
    compute = Compute.for_training(tp, rank_device(tp.device, dist), config.norm)

    with process_group(dist, compute.device):
        run = _build(train_x, train_y, config, tp, dist, compute)
        key = identity_key(identity, dist.world)
        state = _start(run, out_dir, key, dist)
        net = compile_network(data_parallel(run.model, dist, compute.device), tp)

        began, frames_seen, epoch = time.perf_counter(), 0, state.next_epoch - 1
        for epoch in _epochs(state, tp, max_epochs_this_call):
            row, seen = _train_one_epoch(net, run, epoch, tp, compute, dist, show=progress and dist.main)
            frames_seen += seen * dist.world
            # Every rank scores the same validation frames with the same (synchronised) weights,
            # so every rank takes the same early-stopping decision.
            row.update(_validation_scores(run.scored, val_x, val_y, config, compute.device, compute.amp))
            row.update(lr=run.scheduler.get_last_lr()[0], epoch=epoch)
            improved = state.record(row)
            done = epoch == tp.epochs or stop_early(epoch, state.stale, tp)
            if dist.main:
                _save_epoch(run, out_dir, key, epoch, state, improved, done)
                _report(epoch, row, on_epoch, progress)
            if done:
                break

    result = _result(state, epoch, compute, time.perf_counter() - began, frames_seen, dist)
    if dist.main:
        _write_outputs(out_dir, config, state.history, result)
    return result


def finished_metrics(out_dir: Path, identity: dict) -> dict | None:
    """The metrics of a training in ``out_dir`` that *finished* with this identity (settings and
    data), else None: lets a rerun of several trainings skip the ones already done."""
    out_dir = Path(out_dir)
    if not all((out_dir / name).is_file() for name in (CHECKPOINT, WEIGHTS, METRICS)):
        return None
    if not finished(out_dir / CHECKPOINT, identity_key(identity, Distributed.from_env().world)):
        return None
    return json.loads((out_dir / METRICS).read_text())
