"""Cross-validation logged to MLflow: one parent run with each fold's epochs (``fold{i}.{metric}`` by
epoch), each fold's best validation Dice (``fold_val_dice`` by fold) and the mean and spread.

Apart from :mod:`pipeline.cross_validation`, which trains without MLflow and takes the logging as
callbacks, as :mod:`pipeline.train` does. MLflow must point at the project's store first
(:func:`pipeline.registry.configure`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params
from pipeline.cross_validation import CrossValidationResult, cross_validate


def logged_cross_validation(prepared_dir: Path, out_dir: Path, params: Params,
                            progress: bool = True) -> CrossValidationResult:
    """:func:`~pipeline.cross_validation.cross_validate` inside an MLflow run ``cv-{folds}-fold``."""
    import mlflow

    with mlflow.start_run(run_name=f"cv-{params.split.folds}-fold") as parent:
        run_id = parent.info.run_id
        mlflow.log_params({"split.folds": params.split.folds, "params_digest": params.digest()})

        def on_epoch_of(fold: int):
            return lambda epoch, row: mlflow.log_metrics(
                {f"fold{fold}.{k}": float(v) for k, v in row.items() if k != "epoch"}, step=epoch, run_id=run_id)

        def on_fold(fold: int, result) -> None:
            mlflow.log_metric("fold_val_dice", result.best_val_dice, step=fold, run_id=run_id)

        outcome = cross_validate(prepared_dir, out_dir, params, progress=progress, on_fold=on_fold,
                                 on_epoch_of=on_epoch_of)
        mlflow.log_metrics({"cv_mean_dice": outcome.mean_dice, "cv_std_dice": outcome.std_dice})
    return outcome
