"""Train stage: the U-Net with its presence head on the prepared train part, early stopping
on the validation part, a checkpoint every epoch and resume after an interrupted process.

Outputs (``models/``): ``model.pt`` (best weights, a plain state dict), ``model_config.json``,
``history.csv`` (per-epoch curves), ``train_metrics.json``; ``checkpoint.pt`` holds the state
to resume from and is not a stage output.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from pipeline.model import ModelConfig, build_model
from pipeline.preprocess import load_prepared

WEIGHTS = "model.pt"
CONFIG = "model_config.json"
HISTORY = "history.csv"
METRICS = "train_metrics.json"
CHECKPOINT = "checkpoint.pt"

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
    """Mask and presence probabilities at the working size for prepared uint8 frames."""
    model.eval()
    probs, presences = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size].astype(np.float32) / 255.0)[:, None]
        x = ((x - config.intensity_mean) / config.intensity_std).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            mask_logits, presence_logits = model(x)
        probs.append(torch.sigmoid(mask_logits.float())[:, 0].cpu().numpy())
        presences.append(torch.sigmoid(presence_logits.float()).cpu().numpy())
    return np.concatenate(probs), np.concatenate(presences)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    prepared_dir: Path,
    out_dir: Path,
    params: Params,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    max_epochs_this_call: int | None = None,
) -> TrainResult:
    """Train, or resume an unfinished training of the same settings and data.

    ``max_epochs_this_call`` stops after that many epochs without marking the run finished,
    the way a killed process would; tests use it to prove resume.
    """
    tp = params.train
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tp.threads:
        torch.set_num_threads(tp.threads)
    device = pick_device(tp.device)
    amp = tp.amp and device.type == "cuda"
    data = load_prepared(prepared_dir)
    config = ModelConfig(
        depth=params.model.depth,
        base_width=params.model.base_width,
        dropout=params.model.dropout,
        height=data.summary.height,
        width=data.summary.width,
        intensity_mean=data.summary.intensity_mean,
        intensity_std=data.summary.intensity_std,
    )
    train_x, train_y, _ = data.part("train")
    val_x, val_y, _ = data.part("validation")
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError(f"{prepared_dir}: the train or validation part is empty; add subjects")

    _seed_everything(tp.seed)
    model = build_model(config).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        FrameDataset(train_x, train_y, config, training_transform(tp.augment, tp.seed)),
        batch_size=tp.batch_size,
        shuffle=True,
        drop_last=len(train_x) > tp.batch_size,
        generator=torch.Generator().manual_seed(tp.seed),
        pin_memory=device.type == "cuda",
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=tp.learning_rate, weight_decay=tp.weight_decay)
    steps = tp.epochs * max(1, len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # cosine decay to 0
    )

    # Resume only a checkpoint of the same settings and data that did not finish.
    identity = {"params": params.digest(), "data": data.summary.__dict__}
    start_epoch, best, best_epoch, history, resumed = 1, -1.0, 0, [], None
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state.get("identity") == json.dumps(identity, sort_keys=True) and not state["finished"]:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
            history = json.loads(state["history"])
            resumed = state["epoch"]
    if resumed is None and (out_dir / WEIGHTS).exists():
        (out_dir / WEIGHTS).unlink()  # never leave the previous run's weights beside new history

    began, frames_seen, stale, epoch = time.perf_counter(), 0, 0, start_epoch - 1
    for epoch in range(start_epoch, tp.epochs + 1):
        model.train()
        sums = {"loss": 0.0, "dice_loss": 0.0, "bce_loss": 0.0, "presence_loss": 0.0}
        bar = tqdm(loader, desc=f"epoch {epoch}/{tp.epochs}", disable=not progress, leave=False)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                mask_logits, presence_logits = model(x)
            loss, parts = segmentation_loss(mask_logits, presence_logits, y, tp.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums["loss"] += float(loss.detach()) * len(x)
            for key, value in parts.items():
                sums[key] += value * len(x)
            frames_seen += len(x)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        n = len(loader.dataset)
        row = {key: value / n for key, value in sums.items()}

        prob, presence = predict_prepared(model, val_x, config, device, amp=amp)
        val_pred = combine_outputs(prob, presence, 0.5, 0.5)
        row["val_dice"] = float(dice_per_frame(val_pred, val_y).mean())
        row["val_presence_accuracy"] = float(((presence >= 0.5) == val_y.reshape(len(val_y), -1).any(1)).mean())
        row["lr"] = scheduler.get_last_lr()[0]
        row["epoch"] = epoch
        history.append(row)
        if row["val_dice"] > best:
            best, best_epoch, stale = row["val_dice"], epoch, 0
            _save_atomic(model.state_dict(), out_dir / WEIGHTS)
        else:
            stale += 1
        finished = epoch == tp.epochs or stale >= tp.early_stopping_patience
        _save_atomic(
            {
                "identity": json.dumps(identity, sort_keys=True),
                "finished": finished,
                "epoch": epoch,
                "best": best,
                "best_epoch": best_epoch,
                "history": json.dumps(history),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            ckpt_path,
        )
        if on_epoch is not None:
            on_epoch(epoch, row)
        if progress:
            tqdm.write(
                f"epoch {epoch:3d}  loss {row['loss']:.4f}  val Dice {row['val_dice']:.4f}"
                f"  presence acc {row['val_presence_accuracy']:.3f}"
            )
        if finished:
            break
        if max_epochs_this_call is not None and epoch - start_epoch + 1 >= max_epochs_this_call:
            break

    seconds = time.perf_counter() - began
    result = TrainResult(
        best_epoch=best_epoch,
        best_val_dice=round(best, 6),
        epochs_run=epoch,
        resumed_from_epoch=resumed,
        device=str(device),
        seconds=round(seconds, 2),
        train_frames_per_second=round(frames_seen / seconds, 2) if seconds > 0 else 0.0,
    )
    atomic_write_text(out_dir / CONFIG, json.dumps(config.to_dict(), indent=2))
    atomic_write_text(out_dir / HISTORY, pd.DataFrame(history).to_csv(index=False))
    atomic_write_text(
        out_dir / METRICS,
        json.dumps({"best_epoch": best_epoch, "best_val_dice": result.best_val_dice, "epochs_run": epoch}, indent=2),
    )
    return result


def load_model_config(models_dir: Path) -> ModelConfig:
    return ModelConfig(**json.loads((Path(models_dir) / CONFIG).read_text()))


def load_trained(models_dir: Path, device: str = "cpu"):
    """The trained network in eval mode, its weights read without unpickling objects."""
    config = load_model_config(models_dir)
    model = build_model(config)
    state = torch.load(Path(models_dir) / WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), config
