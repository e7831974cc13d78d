"""What a training keeps on disk and reads back: the best weights (``model.pt``) with their network's
config (``model_config.json``), and the checkpoint (``checkpoint.pt``) a rerun resumes from. Every
save is atomic (a killed process leaves the previous file, never half a new one), and every load reads
tensors without unpickling objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.atomic import atomic_output
from pipeline.model import ModelConfig, build_model
from pipeline.weight_average import WeightAverage

WEIGHTS = "model.pt"
CONFIG = "model_config.json"
CHECKPOINT = "checkpoint.pt"


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` whole or not at all (:func:`pipeline.atomic.atomic_output`)."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def identity_key(identity: dict, world: int) -> str:
    """What a checkpoint must match to be resumed: the settings and data, and the number of ranks."""
    return json.dumps({**identity, "world": world}, sort_keys=True, default=str)


@dataclass
class Progress:
    """Where a training stands besides its weights and optimiser: the epochs' history, the best
    validation Dice so far and the epochs since it improved (early stopping counts them)."""

    next_epoch: int = 1
    best: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None

    def record(self, row: dict) -> bool:
        """Add an epoch's row (with its ``epoch`` and ``val_dice``); True when it is the best so far."""
        self.history.append(row)
        if row["val_dice"] > self.best:
            self.best, self.best_epoch, self.stale = row["val_dice"], row["epoch"], 0
            return True
        self.stale += 1
        return False


def resume(path: Path, key: str, model, optimizer, scheduler, average: WeightAverage | None) -> Progress:
    """Load the checkpoint at ``path`` into the model, optimiser, schedule and weight average when it is
    an unfinished run with this ``key`` (:func:`identity_key`); otherwise leave them as they are and
    start at epoch 1."""
    if not path.is_file():
        return Progress()
    # Onto the CPU whatever the training device: torch.set_rng_state takes only a CPU tensor (loaded
    # onto cuda it raised "RNG state must be a torch.ByteTensor" on the first GPU run), and the
    # load_state_dict calls below copy each tensor to where the model's and optimiser's already are.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("identity") != key or state["finished"]:
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if average is not None:
        average.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"])
    return Progress(state["epoch"] + 1, state["best"], state["best_epoch"], state.get("stale", 0),
                    json.loads(state["history"]), state["epoch"])


def save_checkpoint(path: Path, key: str, finished: bool, epoch: int, progress: Progress, model, optimizer,
                    scheduler, average: WeightAverage | None) -> None:
    """What a resume needs; ``model`` holds the raw weights and, with ``train.ema_decay``, ``ema``
    their average (the weights that were validated)."""
    extra = {"ema": average.state_dict()} if average is not None else {}
    save_atomic({
        "identity": key,
        "finished": finished,
        "epoch": epoch,
        "best": progress.best,
        "best_epoch": progress.best_epoch,
        "stale": progress.stale,
        "history": json.dumps(progress.history),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        **extra,
    }, path)


def finished(path: Path, key: str) -> bool:
    """Whether the checkpoint at ``path`` is of a training with this ``key`` that ran to its end."""
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    return bool(state["finished"]) and state.get("identity") == key


def load_model_config(models_dir: Path) -> ModelConfig:
    return ModelConfig(**json.loads((Path(models_dir) / CONFIG).read_text()))


def load_trained(models_dir: Path, device: str = "cpu"):
    """The trained network in eval mode, its weights read without unpickling objects."""
    config = load_model_config(models_dir)
    model = build_model(config)
    state = torch.load(Path(models_dir) / WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), config
