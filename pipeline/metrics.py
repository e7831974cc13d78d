"""Segmentation metrics as the competition defines them.

Dice = 2|X∩Y| / (|X| + |Y|) per frame, **1 when both masks are empty**, averaged over frames.
"""

from __future__ import annotations

import numpy as np


def dice_per_frame(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N,H,W) binary arrays -> (N,) Dice, 1.0 where both are empty."""
    pred = pred.reshape(len(pred), -1).astype(bool)
    true = true.reshape(len(true), -1).astype(bool)
    inter = (pred & true).sum(1)
    total = pred.sum(1) + true.sum(1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def iou_per_frame(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N,) intersection over union, 1.0 where both are empty."""
    pred = pred.reshape(len(pred), -1).astype(bool)
    true = true.reshape(len(true), -1).astype(bool)
    inter = (pred & true).sum(1)
    union = (pred | true).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def presence_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Share of frames where 'a nerve is predicted' agrees with 'a nerve is there'."""
    pred_present = pred.reshape(len(pred), -1).any(1)
    true_present = true.reshape(len(true), -1).any(1)
    return float((pred_present == true_present).mean())


def summarise(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    dice = dice_per_frame(pred, true)
    iou = iou_per_frame(pred, true)
    nerve = true.reshape(len(true), -1).any(1)
    return {
        "dice": float(dice.mean()),
        "iou": float(iou.mean()),
        "presence_accuracy": presence_accuracy(pred, true),
        "dice_nerve_frames": float(dice[nerve].mean()) if nerve.any() else float("nan"),
        "n_frames": int(len(dice)),
    }
