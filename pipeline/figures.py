"""Pictures people would rather look at: outlines of true and predicted nerves, training curves."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.atomic import atomic_output

TRUE_COLOUR = (0, 200, 0)      # BGR: green, the annotator's outline
PRED_COLOUR = (0, 0, 230)      # BGR: red, the model's outline


def outline_overlay(frame: np.ndarray, true_mask: np.ndarray | None, pred_mask: np.ndarray) -> np.ndarray:
    """A BGR picture of the frame with the true (green) and predicted (red) nerve outlines."""
    canvas = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    for mask, colour in ((true_mask, TRUE_COLOUR), (pred_mask, PRED_COLOUR)):
        if mask is None:
            continue
        contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, colour, 2)
    return canvas


def _matplotlib():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_overlays(images, masks, preds, table: pd.DataFrame, path: Path, count: int) -> None:
    """The worst and best holdout frames (half each) among those with a true or predicted nerve."""
    plt = _matplotlib()
    interesting = table[(table.true_area > 0) | (table.pred_area > 0)].sort_values("dice")
    if interesting.empty:
        interesting = table.sort_values("dice")
    count = max(1, min(count, len(interesting)))
    worst = interesting.head((count + 1) // 2)
    best = interesting.tail(count // 2)
    chosen = pd.concat([worst, best]).drop_duplicates("frame_id")
    cols = min(4, len(chosen))
    rows = int(np.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, row) in zip(axes.flat, chosen.iterrows()):
        picture = outline_overlay(images[i], masks[i], preds[i])
        ax.imshow(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB))
        ax.set_title(f"{row.frame_id}  Dice {row.dice:.2f}", fontsize=9)
    fig.suptitle("holdout frames, worst and best: green = true nerve, red = predicted", fontsize=10)
    fig.tight_layout()
    with atomic_output(path, suffix=Path(path).suffix) as tmp:  # matplotlib picks the format by suffix
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def draw_training_curves(history: pd.DataFrame, path: Path) -> None:
    plt = _matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    # A fold ensemble's history holds one curve per fold.
    runs = history.groupby("fold") if "fold" in history else [(None, history)]
    for fold, run in runs:
        suffix = "" if fold is None else f", fold {fold}"
        left.plot(run["epoch"], run["loss"], label=f"train loss{suffix}")
        right.plot(run["epoch"], run["val_dice"], label=f"validation Dice{suffix}")
        right.plot(run["epoch"], run["val_presence_accuracy"], linestyle=":",
                   label=f"validation presence accuracy{suffix}")
    left.set_xlabel("epoch")
    left.legend(fontsize=7)
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path, suffix=Path(path).suffix) as tmp:  # matplotlib picks the format by suffix
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def draw_threshold_curve(curve: pd.DataFrame, chosen: float, path: Path) -> None:
    """Validation Dice against the presence threshold (best over the other settings)."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(curve["presence_threshold"], curve["dice"], marker="o")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen {chosen:g}")
    ax.set_xlabel("presence threshold")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path, suffix=Path(path).suffix) as tmp:  # matplotlib picks the format by suffix
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
