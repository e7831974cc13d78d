"""Evaluate stage: tune post-processing on the validation subjects (for a fold ensemble, on its
members' out-of-fold predictions), freeze it, and score
the holdout subjects at native resolution through the same path the registered model uses.

Outputs (``reports/``): ``postprocess.json`` (frozen thresholds), ``holdout_metrics.json``,
``holdout_frames.csv`` (one row per frame), ``overlays.png`` (true and predicted outlines),
``training_curves.png``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.atomic import atomic_write_text
from pipeline.checkpoints import load_trained
from pipeline.imageio import read_gray
from pipeline.inference import Postprocess, Predictor
from pipeline.metrics import FAILURES, dice_per_frame, frame_outcomes, full_summary, iou_per_frame
from pipeline.preprocess import FRAMES
from pipeline.train import HISTORY

POSTPROCESS = "postprocess.json"
METRICS = "holdout_metrics.json"
PER_FRAME = "holdout_frames.csv"
OVERLAYS = "overlays.png"
CURVES = "training_curves.png"
PER_SUBJECT = "holdout_subjects.csv"
THRESHOLD_CURVE = "threshold_curve.csv"
THRESHOLD_PLOT = "threshold_curve.png"
REPORT = "evaluation.html"

PRESENCE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_AREA_GRID = (0, 1000, 2000, 3000, 4000)
MASK_GRID = (0.4, 0.5, 0.6)


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, float]
    postprocess: Postprocess
    per_frame: pd.DataFrame


def load_native(data_dir: Path, frames: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Native frames and binary masks (N,H,W) for the rows of a frame table."""
    images = np.stack([read_gray(Path(data_dir) / p) for p in frames["image_path"]])
    masks = np.stack([(read_gray(Path(data_dir) / p) > 0).astype(np.uint8) for p in frames["mask_path"]])
    return images, masks


def tune_postprocess(predictor: Predictor, images: np.ndarray, masks: np.ndarray,
                     base: Postprocess) -> tuple[Postprocess, pd.DataFrame]:
    """Grid-search the thresholds and minimum area for the best mean Dice on validation frames.

    Returns the best setting and the curve: for each presence threshold, the best Dice over the
    other two settings (what an operator looks at to see how sharp the optimum is).
    """
    probs, presence = predictor.probabilities(images)
    return tune_on_probabilities(predictor, probs, presence, masks, base)


def tune_on_probabilities(predictor: Predictor, probs: np.ndarray, presence: np.ndarray, masks: np.ndarray,
                          base: Postprocess) -> tuple[Postprocess, pd.DataFrame]:
    """:func:`tune_postprocess` on probabilities already computed (the out-of-fold ones of an ensemble)."""
    rows = []
    for m_thr, p_thr, min_area in itertools.product(MASK_GRID, PRESENCE_GRID, MIN_AREA_GRID):
        candidate = replace(base, mask_threshold=m_thr, presence_threshold=p_thr, min_area=min_area)
        pred = predictor.masks_from_probabilities(probs, presence, masks.shape[1:], candidate)
        rows.append({"mask_threshold": m_thr, "presence_threshold": p_thr, "min_area": min_area,
                     "dice": float(dice_per_frame(pred, masks).mean())})
    grid = pd.DataFrame(rows)
    # Ties go to the first maximum in grid order (the lowest thresholds and area).
    best = grid.loc[grid["dice"].idxmax()]
    curve = grid.groupby("presence_threshold", as_index=False)["dice"].max()
    curve["frames"] = len(masks)  # how many frames the thresholds were tuned on (audit)
    return replace(base, mask_threshold=float(best.mask_threshold), presence_threshold=float(best.presence_threshold),
                   min_area=int(best.min_area)), curve


def frame_table(pred: np.ndarray, masks: np.ndarray, frames: pd.DataFrame) -> pd.DataFrame:
    """Per-frame Dice, IoU, areas and outcome (missed, elsewhere, ... :func:`frame_outcomes`) of
    predicted (N,H,W) masks against the true ones."""
    if pred.shape != masks.shape:
        raise ValueError(f"model returned masks of shape {pred.shape}, expected {masks.shape}")
    table = frames[["frame_id", "subject"]].copy()
    table["dice"] = dice_per_frame(pred, masks)
    table["iou"] = iou_per_frame(pred, masks)
    table["true_area"] = masks.reshape(len(masks), -1).sum(1)
    table["pred_area"] = pred.reshape(len(pred), -1).sum(1)
    table["outcome"] = frame_outcomes(pred, masks)
    return table


def _clean(value):
    """JSON-safe metric: NaN becomes null (DVC and JSON readers reject NaN)."""
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 6)
    return value


def per_subject_table(table: pd.DataFrame) -> pd.DataFrame:
    grouped = table.assign(nerve=table.true_area > 0, presence_ok=(table.true_area > 0) == (table.pred_area > 0),
                           failed=table.outcome.isin(FAILURES))
    return grouped.groupby("subject", as_index=False).agg(
        frames=("frame_id", "count"),
        nerve_frames=("nerve", "sum"),
        dice=("dice", "mean"),
        iou=("iou", "mean"),
        presence_accuracy=("presence_ok", "mean"),
        failed_frames=("failed", "sum"),
    )


def evaluate(data_dir: Path, prepared_dir: Path, models_dir: Path, out_dir: Path, params: Params) -> EvaluationResult:
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    frames = pd.read_csv(Path(prepared_dir) / FRAMES)
    model, config = load_trained(models_dir)
    base = Postprocess.from_params(params.postprocess)
    predictor = Predictor(model, config, base)

    validation = frames[frames.split == "validation"].reset_index(drop=True)
    holdout = frames[frames.split == "holdout"].reset_index(drop=True)
    if holdout.empty:
        raise ValueError(f"{prepared_dir / FRAMES}: no holdout frames")
    curve = None
    if params.postprocess.tune and config.members > 1:
        predictor.post, curve = _tune_out_of_fold(predictor, model, config, frames, data_dir, params, base)
    elif params.postprocess.tune and not validation.empty:
        val_images, val_masks = load_native(data_dir, validation)
        predictor.post, curve = tune_postprocess(predictor, val_images, val_masks, base)

    images, masks = load_native(data_dir, holdout)
    probs, presence = predictor.probabilities(images)
    pred = predictor.masks_from_probabilities(probs, presence, masks.shape[1:])
    table = frame_table(pred, masks, holdout)
    table["presence_probability"] = presence
    metrics = full_summary(pred, masks, presence, outcomes=table["outcome"].to_numpy())
    metrics["n_subjects"] = int(holdout["subject"].nunique())
    subjects = per_subject_table(table)

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / POSTPROCESS, json.dumps(predictor.post.to_dict(), indent=2))
    atomic_write_text(out_dir / METRICS, json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=2))
    atomic_write_text(out_dir / PER_FRAME, table.to_csv(index=False))
    atomic_write_text(out_dir / PER_SUBJECT, subjects.to_csv(index=False))
    from pipeline.figures import draw_overlays, draw_threshold_curve, draw_training_curves
    from pipeline.report import write_evaluation_report

    draw_overlays(images, masks, pred, table, out_dir / OVERLAYS, params.evaluate.overlays)
    history = Path(models_dir) / HISTORY
    if history.is_file():
        draw_training_curves(pd.read_csv(history), out_dir / CURVES)
    if curve is None:
        curve = pd.DataFrame({"presence_threshold": [predictor.post.presence_threshold], "dice": [float("nan")]})
    atomic_write_text(out_dir / THRESHOLD_CURVE, curve.to_csv(index=False))
    draw_threshold_curve(curve, predictor.post.presence_threshold, out_dir / THRESHOLD_PLOT)
    write_evaluation_report(out_dir / REPORT, metrics, subjects, predictor.post,
                            [out_dir / OVERLAYS, out_dir / THRESHOLD_PLOT, out_dir / CURVES])
    return EvaluationResult(metrics, predictor.post, table)


def _tune_out_of_fold(predictor: Predictor, model, config, frames: pd.DataFrame, data_dir: Path, params: Params,
                      base: Postprocess) -> tuple[Postprocess, pd.DataFrame]:
    """An ensemble's members each saw all but one fold: tune on the out-of-fold probabilities."""
    from pipeline.ensemble import out_of_fold_members

    probs, presence, masks = [], [], []
    for member, single, rows in out_of_fold_members(model, config, frames, params):
        part = frames.iloc[rows].reset_index(drop=True)
        if part.empty:
            continue
        images, part_masks = load_native(data_dir, part)
        p, q = Predictor(member, single, base).probabilities(images)
        probs.append(p)
        presence.append(q)
        masks.append(part_masks)
    return tune_on_probabilities(predictor, np.concatenate(probs), np.concatenate(presence), np.concatenate(masks),
                                 base)


def load_postprocess(reports_dir: Path) -> Postprocess:
    return Postprocess(**json.loads((Path(reports_dir) / POSTPROCESS).read_text()))
