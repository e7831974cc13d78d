"""Subject-grouped k-fold cross-validation on the prepared frames.

The holdout subjects stay out of every fold (they judge the registered model); the other
subjects are dealt into ``split.folds`` groups, and fold i trains on all groups but the i-th
and validates on it. Each fold is a full :func:`pipeline.train.fit` run in its own folder, with
its own checkpoint, so an interrupted cross-validation resumes where it stopped: finished folds
(same settings and data) are kept, the unfinished one continues from its last epoch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.atomic import atomic_write_text
from pipeline.model import ModelConfig
from pipeline.preprocess import PreparedData, load_prepared
from pipeline.split import fold_parts
from pipeline.distributed import Distributed, process_group, rank_device
from pipeline.train import EpochCallback, TrainResult, finished_metrics, fit, model_config

REPORT = "cv.json"


@dataclass(frozen=True)
class FoldResult:
    fold: int
    validation_subjects: list[int]
    train_frames: int
    validation_frames: int
    best_val_dice: float
    best_epoch: int
    epochs_run: int
    seconds: float


@dataclass(frozen=True)
class CrossValidationResult:
    folds: list[FoldResult]
    mean_dice: float
    std_dice: float

    def to_dict(self) -> dict:
        return {"mean_dice": self.mean_dice, "std_dice": self.std_dice, "folds": [asdict(f) for f in self.folds]}


def cross_validate(prepared_dir: Path, out_dir: Path, params: Params, progress: bool = True,
                   on_fold: "callable | None" = None, on_epoch_of: "callable | None" = None) -> CrossValidationResult:
    """Train every fold of ``params.split.folds``; write ``out_dir/cv.json``.

    ``on_fold(fold, FoldResult)`` is called after each fold, ``on_epoch_of(fold)`` may return an
    epoch callback for that fold (the CLI logs both to MLflow).
    """
    k = params.split.folds
    if k < 2:
        raise ValueError("cross-validation needs split.folds >= 2 in params.yaml")
    data = load_prepared(Path(prepared_dir))
    subjects = data.frames["subject"].to_numpy()
    config = model_config(params, data.summary.height, data.summary.width, data.summary.intensity_mean,
                          data.summary.intensity_std)
    # Under torchrun the ranks join one process group for all folds (see pipeline.distributed.join_process_group).
    dist = Distributed.from_env()
    with process_group(dist, rank_device(params.train.device, dist)):
        results = _train_folds(data, subjects, config, params, out_dir, progress, on_fold, on_epoch_of)
    dice = np.array([r.best_val_dice for r in results])
    outcome = CrossValidationResult(results, round(float(dice.mean()), 6), round(float(dice.std()), 6))
    if dist.main:
        atomic_write_text(Path(out_dir) / REPORT, json.dumps(outcome.to_dict(), indent=2))
    return outcome


def _train_folds(data: PreparedData, subjects: np.ndarray, config: ModelConfig, params: Params, out_dir: Path,
                 progress: bool, on_fold, on_epoch_of) -> list[FoldResult]:
    k = params.split.folds
    results = []
    for fold in range(k):
        fold_params = params.model_copy(update={"split": params.split.model_copy(update={"fold": fold})})
        part = fold_parts(data.frames, fold, k)  # the recorded fold groups, never recomputed
        train, val = part == "train", part == "validation"
        epoch_cb: EpochCallback | None = on_epoch_of(fold) if on_epoch_of else None
        fold_dir = Path(out_dir) / f"fold{fold}"
        identity = {"params": fold_params.digest(), "data": data.summary.__dict__}
        # A fold that already finished with these settings and data is not trained again.
        done = finished_metrics(fold_dir, identity)
        if done is None:
            result: TrainResult = fit(
                data.images[train], data.targets(train, params.train.soft_targets), data.images[val],
                data.masks[val], config, fold_params,
                fold_dir, identity=identity, on_epoch=epoch_cb, progress=progress,
            )
            done = {"best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch,
                    "epochs_run": result.epochs_run, "seconds": result.seconds}
        fold_result = FoldResult(
            fold=fold, validation_subjects=sorted({int(s) for s in subjects[val]}), train_frames=int(train.sum()),
            validation_frames=int(val.sum()), best_val_dice=done["best_val_dice"], best_epoch=done["best_epoch"],
            epochs_run=done["epochs_run"], seconds=done.get("seconds", 0.0),
        )
        results.append(fold_result)
        if on_fold:
            on_fold(fold, fold_result)
    return results
