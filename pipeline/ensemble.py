"""The fold models of a k-fold cross-validation as one registered model.

With ``train.ensemble_folds`` the train stage trains every fold of ``split.folds`` (each in
``models/folds/fold<i>``, with its own checkpoint, so an interrupted run resumes at the fold and
epoch where it stopped) and writes their average as ``models/model.pt``: a
:class:`pipeline.model.FoldEnsemble` whose config says ``members: k``. Everything downstream
(evaluate, register, the MLflow model, ``nerveseg predict``) loads it like a single U-Net.

Each member is its fold's best epoch, chosen on its own validation fold. Every non-holdout
subject was seen by k-1 members, so the post-processing is tuned on the members' *out-of-fold*
probabilities (each frame scored by the one member that did not train on it), as nnU-Net does,
and the holdout subjects, which no member saw, judge the ensemble.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import Params
from pipeline.cross_validation import cross_validate
from pipeline.atomic import atomic_write_text
from pipeline.model import FoldEnsemble, ModelConfig
from pipeline.split import fold_parts
from pipeline.checkpoints import CONFIG, WEIGHTS, load_trained, save_atomic
from pipeline.devices import pick_device, precision_name, use_autocast
from pipeline.distributed import Distributed
from pipeline.train import HISTORY, METRICS, EpochCallback, TrainResult

FOLDS_DIR = "folds"


def train_fold_ensemble(prepared_dir: Path, out_dir: Path, params: Params, on_epoch: EpochCallback | None = None,
                        progress: bool = True) -> TrainResult:
    """Train all ``split.folds`` fold models and write their ensemble to ``out_dir``.

    ``on_epoch`` receives each fold's rows with keys prefixed ``fold<i>.`` (one MLflow run holds
    every fold's curves). The result's ``best_val_dice`` is the mean of the folds' best
    validation Dice: the cross-validated estimate, not a score of the ensemble itself.
    """
    k = params.split.folds
    if k < 2:
        raise ValueError(f"train.ensemble_folds needs split.folds >= 2 in params.yaml (it is {k})")
    out_dir = Path(out_dir)

    def on_epoch_of(fold: int) -> EpochCallback | None:
        if on_epoch is None:
            return None
        return lambda epoch, row: on_epoch(epoch, {f"fold{fold}.{key}": v for key, v in row.items() if key != "epoch"})

    outcome = cross_validate(prepared_dir, out_dir / FOLDS_DIR, params, progress=progress, on_epoch_of=on_epoch_of)
    device = pick_device(params.train.device)
    precision = precision_name(use_autocast(params.train, device))
    if not Distributed.from_env().main:
        return _result(outcome, "", precision)
    members, configs = [], []
    for fold in range(k):
        model, config = load_trained(out_dir / FOLDS_DIR / f"fold{fold}")
        members.append(model)
        configs.append(config)
    ensemble = FoldEnsemble(members)
    config = replace(configs[0], members=k)
    save_atomic(ensemble.state_dict(), out_dir / WEIGHTS)
    atomic_write_text(out_dir / CONFIG, json.dumps(config.to_dict(), indent=2))
    history = pd.concat([pd.read_csv(out_dir / FOLDS_DIR / f"fold{f}" / HISTORY).assign(fold=f) for f in range(k)])
    atomic_write_text(out_dir / HISTORY, history.to_csv(index=False))
    atomic_write_text(out_dir / METRICS, json.dumps({
        "best_val_dice": outcome.mean_dice, "std_val_dice": outcome.std_dice, "members": k,
        "best_epoch": max(f.best_epoch for f in outcome.folds), "epochs_run": max(f.epochs_run for f in outcome.folds),
        "folds": [{"fold": f.fold, "best_val_dice": f.best_val_dice, "best_epoch": f.best_epoch,
                   "validation_subjects": f.validation_subjects} for f in outcome.folds],
    }, indent=2))
    return _result(outcome, str(device), precision)


def _result(outcome, device: str, precision: str) -> TrainResult:
    seconds = sum(f.seconds for f in outcome.folds)
    frames = sum(f.train_frames * f.epochs_run for f in outcome.folds)
    return TrainResult(best_epoch=max(f.best_epoch for f in outcome.folds), best_val_dice=outcome.mean_dice,
                       epochs_run=max(f.epochs_run for f in outcome.folds), resumed_from_epoch=None, device=device,
                       seconds=round(seconds, 2),
                       train_frames_per_second=round(frames / seconds, 2) if seconds > 0 else 0.0,
                       world_size=Distributed.from_env().world, precision=precision)


def out_of_fold_members(model: torch.nn.Module, config: ModelConfig, frames: pd.DataFrame,
                        params: Params) -> list[tuple[torch.nn.Module, ModelConfig, np.ndarray]]:
    """For an ensemble: each member with the rows of ``frames`` (the whole prepared frame table,
    holdout included, as the split was made from it) of the subjects it did not train on, i.e.
    its fold's validation subjects."""
    if not isinstance(model, FoldEnsemble):
        raise TypeError("out-of-fold scoring needs a FoldEnsemble")
    single = replace(config, members=1)
    out = []
    for fold, member in enumerate(model.members):
        rows = np.flatnonzero(fold_parts(frames, fold, len(model.members)) == "validation")
        out.append((member, single, rows))
    return out
