"""Train stage: the U-Net with its presence head on the prepared train part, early stopping
on the validation part, a checkpoint every epoch and resume after an interrupted process.

Outputs (``models/``): ``model.pt`` (best weights, a plain state dict; with ``train.ema_decay``
the best epoch's weight average), ``model_config.json``,
``history.csv`` (per-epoch curves), ``train_metrics.json``; ``checkpoint.pt`` holds the state
to resume from and is not a stage output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.augment import training_transform
from pipeline.config import Params
from pipeline.imageio import atomic_write_text
from pipeline.losses import segmentation_loss
from pipeline.metrics import dice_per_frame
from pipeline.model import ModelConfig, build_model, uses_channels_last
from pipeline.preprocess import load_prepared
from pipeline.weight_average import WeightAverage

WEIGHTS = "model.pt"
CONFIG = "model_config.json"
HISTORY = "history.csv"
METRICS = "train_metrics.json"
CHECKPOINT = "checkpoint.pt"

EpochCallback = Callable[[int, dict[str, float]], None]

log = logging.getLogger(__name__)


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


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it PyTorch
    emulates bf16, and a convolution measured 67x *slower* than fp32 on an AVX2-only EPYC.

    oneDNN's own answer first (what the convolutions will use; a private op, so it may move
    between torch releases); where it is missing, the CPU's flags as Linux reports them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return _cpu_flags_have_bf16(Path("/proc/cpuinfo"))


def _cpu_flags_have_bf16(cpuinfo: Path) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no way to tell, and emulated bf16 is the expensive mistake
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_autocast(tp, device: torch.device, native_bf16: bool | None = None) -> bool:
    """bf16 autocast for training: always on CUDA (with ``train.amp``); on the CPU only where it
    computes bf16 natively and ``train.amp_cpu`` is ``"auto"`` or true. Emulated bf16 is many times
    slower than fp32, so a CPU without it trains in fp32 (with a warning where true asked for bf16).
    ``native_bf16`` answers for the CPU instead of asking it."""
    if not tp.amp:
        return False
    if device.type == "cuda":
        return True
    if tp.amp_cpu is False:
        return False
    if not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        if tp.amp_cpu is True:
            log.warning("train.amp_cpu is true, but this CPU has no native bf16 (AVX512-BF16 or AMX): emulated "
                        "bf16 is many times slower than fp32 (67x measured on an AVX2-only CPU), so training "
                        "runs in fp32")
        return False
    return True


def precision_name(autocast: bool) -> str:
    """What the training steps compute in, as runs record it (``TrainResult.precision``)."""
    return "bf16" if autocast else "fp32"


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


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a killed process never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a ``torchrun`` launch (world 1 when not launched by it)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)


def join_process_group(dist: Distributed, device: torch.device) -> bool:
    """Join ``torchrun``'s process group unless this process is in it already; True when this
    call joined it, and so the caller leaves it (:func:`leave_process_group`).

    Joining once per process matters: with a group destroyed and created again for each fold of
    ``train.ensemble_folds``, both gloo ranks waited forever at the second fold's first barrier in
    about half the runs (torchrun's store still holds the first group's keys)."""
    if dist.world <= 1 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def leave_process_group(dist: Distributed, joined: bool, failed: bool = False) -> None:
    """Finish in step with the other ranks; destroy the group only where this caller joined it.

    After a failure (``failed``) there is no barrier: the other ranks are already in a collective this
    rank will never join (the next all-reduce), so waiting for them would hang both until gloo's
    30-minute timeout. Leaving at once lets the exception end this process, and torchrun's agent
    then stops the others and reports the failure."""
    if dist.world > 1 and torch.distributed.is_initialized():
        if not failed:
            torch.distributed.barrier()
        if joined:
            torch.distributed.destroy_process_group()


@contextmanager
def process_group(dist: Distributed, device: torch.device) -> Iterator[None]:
    """Run the block inside ``torchrun``'s process group (nothing to do outside torchrun): join it
    unless already in it, leave in step with the other ranks on a normal exit, and at once, without
    the barrier, when the block raises (:func:`leave_process_group`)."""
    joined = join_process_group(dist, device)
    try:
        yield
    except BaseException:
        leave_process_group(dist, joined, failed=True)
        raise
    leave_process_group(dist, joined)


def rank_device(choice: str, dist: Distributed) -> torch.device:
    """``train.device`` for this rank: under ``torchrun`` each process takes its own GPU."""
    device = pick_device(choice)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


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
    sampler = None
    if dist.world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, dist.world, dist.rank, shuffle=True, seed=tp.seed,
                                                      drop_last=True)
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
class _RunState:
    """Where a training stands, besides its weights and optimiser: what a checkpoint carries over."""

    next_epoch: int = 1
    best: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None


def _resume(ckpt_path: Path, identity_key: str, model, optimizer, scheduler,
            average: WeightAverage | None) -> _RunState:
    """Load the checkpoint into the model, optimiser and schedule when it is an unfinished run of the
    same settings and data; otherwise leave them as they are and start at epoch 1."""
    if not ckpt_path.is_file():
        return _RunState()
    # Onto the CPU whatever the training device: torch.set_rng_state takes only a CPU tensor (loaded
    # onto cuda it raised "RNG state must be a torch.ByteTensor" on the first GPU run), and the
    # load_state_dict calls below copy each tensor to where the model's and optimiser's already are.
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if state.get("identity") != identity_key or state["finished"]:
        return _RunState()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if average is not None:
        average.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"])
    return _RunState(state["epoch"] + 1, state["best"], state["best_epoch"], state.get("stale", 0),
                     json.loads(state["history"]), state["epoch"])


def _checkpoint(identity_key: str, finished: bool, epoch: int, state: _RunState, model, optimizer,
                scheduler, average: WeightAverage | None) -> dict:
    """What a resume needs; ``model`` holds the raw weights and, with ``train.ema_decay``, ``ema``
    their average (the weights that were validated)."""
    extra = {"ema": average.state_dict()} if average is not None else {}
    return {
        "identity": identity_key,
        "finished": finished,
        "epoch": epoch,
        "best": state.best,
        "best_epoch": state.best_epoch,
        "stale": state.stale,
        "history": json.dumps(state.history),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        **extra,
    }


def _train_epoch(net, loader: DataLoader, optimizer, scheduler, tp, device: torch.device, amp: bool, nhwc: bool,
                 bar: str, show: bool, model=None, average: WeightAverage | None = None) -> tuple[dict[str, float], int]:
    """One pass over the loader; the frame-weighted mean of the loss and its parts, and the frames seen.
    With ``average``, each step also moves the weight average towards ``model`` (the unwrapped network)."""
    net.train()
    sums = {"loss": 0.0, "dice_loss": 0.0, "bce_loss": 0.0, "presence_loss": 0.0}
    seen = 0
    batches = tqdm(loader, desc=bar, disable=not show, leave=False)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mask_logits, presence_logits, *coarse = net(x)  # coarse: deep-supervision outputs, if any
        loss, parts = segmentation_loss(mask_logits, presence_logits, y, tp.loss, *coarse)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update(model)
        sums["loss"] += float(loss.detach()) * len(x)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value * len(x)
        seen += len(x)
        batches.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {key: value / max(1, seen) for key, value in sums.items()}, seen


def _validation_scores(model, val_x: np.ndarray, val_y: np.ndarray, config: ModelConfig, device: torch.device,
                       amp: bool) -> dict[str, float]:
    """Validation Dice (both heads combined at 0.5) and presence accuracy at the working size."""
    prob, presence = predict_prepared(model, val_x, config, device, amp=amp)
    val_pred = combine_outputs(prob, presence, 0.5, 0.5)
    return {"val_dice": float(dice_per_frame(val_pred, val_y).mean()),
            "val_presence_accuracy": float(((presence >= 0.5) == val_y.reshape(len(val_y), -1).any(1)).mean())}


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
    if tp.threads:
        torch.set_num_threads(tp.threads)
    dist = Distributed.from_env()
    device = rank_device(tp.device, dist)
    amp = use_autocast(tp, device)

    with process_group(dist, device):
        _seed_everything(tp.seed)
        model = build_model(config).to(device)
        # NHWC on the CPU too: 1.12-1.27x faster training with batch norm (docs/benchmarks.md).
        nhwc = uses_channels_last(tp.channels_last, config.norm)
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        transform = training_transform(tp.augment, tp.seed)
        shuffle_gen = torch.Generator()
        loader, sampler = _training_loader(FrameDataset(train_x, train_y, config, transform), tp, dist, device,
                                           shuffle_gen)
        optimizer = torch.optim.AdamW(model.parameters(), lr=tp.learning_rate, weight_decay=tp.weight_decay)
        per_epoch = max(1, len(loader))
        steps, warmup = tp.epochs * per_epoch, tp.warmup_epochs * per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, tp.lr_schedule))
        average = WeightAverage(model, tp.ema_decay) if tp.ema_decay > 0 else None
        scored = average.module if average is not None else model  # validated, kept as the best, shipped

        # Resume only a checkpoint of the same settings and data that did not finish.
        identity_key = _identity_key(identity, dist.world)
        ckpt_path = out_dir / CHECKPOINT
        state = _resume(ckpt_path, identity_key, model, optimizer, scheduler, average)
        if dist.main and state.resumed_from is None and (out_dir / WEIGHTS).exists():
            (out_dir / WEIGHTS).unlink()  # never leave the previous run's weights beside new history
        if dist.world > 1:
            torch.distributed.barrier()

        net = model
        if dist.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if tp.compile:
            net = torch.compile(net, backend=tp.compile_backend)

        began, frames_seen, epoch = time.perf_counter(), 0, state.next_epoch - 1
        for epoch in range(state.next_epoch, tp.epochs + 1):
            # Streams from the epoch number: a resumed run sees the same frames in the same order.
            shuffle_gen.manual_seed(tp.seed * 1_000_003 + epoch)
            transform.set_random_seed(tp.seed * 1_000_003 + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            row, seen = _train_epoch(net, loader, optimizer, scheduler, tp, device, amp, nhwc,
                                     f"epoch {epoch}/{tp.epochs}", progress and dist.main, model, average)
            frames_seen += seen * dist.world
            if dist.world > 1:
                # Each rank updated its own BatchNorm statistics (and averaged them): take rank 0's everywhere.
                for buffer in [*model.buffers(), *(average.module.buffers() if average is not None else [])]:
                    torch.distributed.broadcast(buffer, 0)

            # Every rank scores the same validation frames with the same (synchronised) weights,
            # so every rank takes the same early-stopping decision.
            row.update(_validation_scores(scored, val_x, val_y, config, device, amp))
            row["lr"] = scheduler.get_last_lr()[0]
            row["epoch"] = epoch
            state.history.append(row)
            improved = row["val_dice"] > state.best
            if improved:
                state.best, state.best_epoch, state.stale = row["val_dice"], epoch, 0
            else:
                state.stale += 1
            finished = epoch == tp.epochs or stop_early(epoch, state.stale, tp)
            if dist.main:
                if improved:
                    save_atomic(scored.state_dict(), out_dir / WEIGHTS)
                save_atomic(_checkpoint(identity_key, finished, epoch, state, model, optimizer, scheduler, average),
                            ckpt_path)
                if on_epoch is not None:
                    on_epoch(epoch, row)
                if progress:
                    tqdm.write(
                        f"epoch {epoch:3d}  loss {row['loss']:.4f}  val Dice {row['val_dice']:.4f}"
                        f"  presence acc {row['val_presence_accuracy']:.3f}"
                    )
            if finished:
                break
            if max_epochs_this_call is not None and epoch - state.next_epoch + 1 >= max_epochs_this_call:
                break

    seconds = time.perf_counter() - began
    result = TrainResult(
        best_epoch=state.best_epoch,
        best_val_dice=round(state.best, 6),
        epochs_run=epoch,
        resumed_from_epoch=state.resumed_from,
        device=str(device),
        seconds=round(seconds, 2),
        train_frames_per_second=round(frames_seen / seconds, 2) if seconds > 0 else 0.0,
        world_size=dist.world,
        precision=precision_name(amp),
    )
    if dist.main:
        _write_outputs(out_dir, config, state.history, result)
    return result


def _identity_key(identity: dict, world: int) -> str:
    return json.dumps({**identity, "world": world}, sort_keys=True, default=str)


def finished_metrics(out_dir: Path, identity: dict) -> dict | None:
    """The metrics of a training in ``out_dir`` that *finished* with this identity (settings and
    data), else None: lets a rerun of several trainings skip the ones already done."""
    out_dir = Path(out_dir)
    if not all((out_dir / name).is_file() for name in (CHECKPOINT, WEIGHTS, METRICS)):
        return None
    state = torch.load(out_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    if not state["finished"] or state.get("identity") != _identity_key(identity, Distributed.from_env().world):
        return None
    return json.loads((out_dir / METRICS).read_text())


def load_model_config(models_dir: Path) -> ModelConfig:
    return ModelConfig(**json.loads((Path(models_dir) / CONFIG).read_text()))


def load_trained(models_dir: Path, device: str = "cpu"):
    """The trained network in eval mode, its weights read without unpickling objects."""
    config = load_model_config(models_dir)
    model = build_model(config)
    state = torch.load(Path(models_dir) / WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), config
