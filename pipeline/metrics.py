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


# What happened on a frame: four outcomes of a frame with a nerve, worst first, then two of an empty one.
OUTCOMES = ("missed", "elsewhere", "poor overlap", "found", "false alarm", "true empty")
FAILURES = ("missed", "elsewhere", "poor overlap", "false alarm")


def frame_outcomes(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N,H,W) binary arrays -> (N,) outcome names. A frame with a nerve is ``missed`` (nothing
    predicted), ``elsewhere`` (a prediction that does not touch the nerve: the wrong structure),
    ``poor overlap`` (Dice < 0.5) or ``found``; an empty frame is a ``false alarm`` or ``true empty``.
    Mean Dice hides which of these a model gets wrong, and they matter differently to a user."""
    dice = dice_per_frame(pred, true)
    pred = pred.reshape(len(pred), -1).astype(bool)
    true = true.reshape(len(true), -1).astype(bool)
    predicted, present, touches = pred.any(1), true.any(1), (pred & true).any(1)
    conditions = [present & ~predicted, present & ~touches, present & (dice < 0.5), present, predicted]
    return np.select(conditions, OUTCOMES[:5], OUTCOMES[5])


def outcome_counts(outcomes: np.ndarray) -> dict[str, int]:
    """The failure counts of a holdout summary (``found`` and ``true empty`` follow from them)."""
    return {"nerve_frames_missed": int((outcomes == "missed").sum()),
            "nerve_frames_elsewhere": int((outcomes == "elsewhere").sum()),
            "nerve_frames_poor_overlap": int((outcomes == "poor overlap").sum()),
            "false_alarms": int((outcomes == "false alarm").sum())}


def pixel_confusion(pred: np.ndarray, true: np.ndarray) -> dict[str, int]:
    pred, true = pred.astype(bool), true.astype(bool)
    tp = int((pred & true).sum())
    fp = int((pred & ~true).sum())
    fn = int((~pred & true).sum())
    tn = int(pred.size - tp - fp - fn)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of a score against binary labels; NaN with one class only."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, float)))


def hausdorff95(pred: np.ndarray, true: np.ndarray) -> float:
    """95th-percentile symmetric surface distance in pixels; NaN unless both masks are non-empty."""
    import cv2

    pred, true = pred.astype(np.uint8), true.astype(np.uint8)
    if not pred.any() or not true.any():
        return float("nan")

    def surface(mask: np.ndarray) -> np.ndarray:
        return mask.astype(bool) & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)

    def distance_to(mask: np.ndarray) -> np.ndarray:  # distance of every pixel to the mask's surface
        return cv2.distanceTransform((~surface(mask)).astype(np.uint8), cv2.DIST_L2, 5)

    d_pt = distance_to(true)[surface(pred)]
    d_tp = distance_to(pred)[surface(true)]
    return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))


def empty_baseline_dice(has_nerve: np.ndarray) -> float:
    """What predicting no nerve on any frame scores (empty frames 1, nerve frames 0): the bar the
    promotion floor asks a model to clear."""
    return float(np.mean(~np.asarray(has_nerve, bool)))


MIN_EMPTY_FRAMES = 10  # fewer holdout frames without a nerve than this, and false alarms go unmeasured
# Fewer training frames without a nerve than this (or under MIN_EMPTY_TRAIN_SHARE of them), and the presence
# head has had too few examples to learn "no nerve here": it marks one on (nearly) every frame.
MIN_EMPTY_TRAIN_FRAMES = 20
MIN_EMPTY_TRAIN_SHARE = 0.05


def presence_counts(split: "np.ndarray | list", has_nerve: "np.ndarray | list") -> dict[str, int]:
    """How many frames, and how many without a nerve, the version trained on and was scored on."""
    split, has_nerve = np.asarray(split), np.asarray(has_nerve, bool)
    out = {}
    for part in ("train", "holdout"):
        mine = split == part
        out[f"{part}_frames"] = int(mine.sum())
        out[f"{part}_empty_frames"] = int((mine & ~has_nerve).sum())
    return out


def presence_statement(counts: dict[str, int] | None) -> str | None:
    """The plain warning for a version that has not learnt to tell when no nerve is present, else None."""
    if not counts or "train_empty_frames" not in counts:
        return None
    empty, frames = counts["train_empty_frames"], counts["train_frames"]
    if empty >= MIN_EMPTY_TRAIN_FRAMES and empty >= MIN_EMPTY_TRAIN_SHARE * frames:
        return None
    return (f"this version trained on only {empty} frames without a nerve (of {frames}): it has not learnt to tell "
            "when no nerve is present, and it will mark a nerve on such frames anyway")


def presence_caveat(empty_share: float | None, n_frames: float | None = None) -> str | None:
    """What presence accuracy cannot say when the holdout has (almost) no frame without a nerve: it then
    counts nerve frames found, and how often the model marks a nerve on an empty frame is not measured
    (real data imported from ``positives-256`` is like that). ``empty_share``: ``empty_baseline_dice``."""
    if empty_share is None or np.isnan(empty_share):
        return None
    tail = ("presence accuracy only counts nerve frames found, and how often the model marks a nerve on a "
            "frame without one is not measured")
    if empty_share == 0:
        return f"no holdout frame is without a nerve: {tail}"
    if n_frames and round(empty_share * n_frames) < MIN_EMPTY_FRAMES:
        return f"only {round(empty_share * n_frames)} of the {int(n_frames)} holdout frames are without a nerve: {tail}"
    return None


def full_summary(pred: np.ndarray, true: np.ndarray, presence_prob: np.ndarray | None = None,
                 outcomes: np.ndarray | None = None) -> dict[str, float]:
    """Every holdout figure: competition Dice, IoU, the Dice of predicting no nerve anywhere, pixel
    sensitivity/specificity/accuracy, presence accuracy and AUROC, the 95th-percentile Hausdorff
    distance on nerve frames, and how many frames ended in each failure of :func:`frame_outcomes`
    (``outcomes``, where the caller has them)."""
    out = summarise(pred, true)
    present = true.reshape(len(true), -1).any(1)
    out["empty_baseline_dice"] = empty_baseline_dice(present)
    c = pixel_confusion(pred, true)
    out["sensitivity"] = c["tp"] / max(c["tp"] + c["fn"], 1)
    out["specificity"] = c["tn"] / max(c["tn"] + c["fp"], 1)
    out["pixel_accuracy"] = (c["tp"] + c["tn"]) / max(sum(c.values()), 1)
    out["presence_auroc"] = auroc(presence_prob, present) if presence_prob is not None else float("nan")
    distances = [hausdorff95(p, t) for p, t in zip(pred, true) if t.any()]
    found = [d for d in distances if not np.isnan(d)]
    out["hd95_px"] = float(np.mean(found)) if found else float("nan")
    out.update(outcome_counts(frame_outcomes(pred, true) if outcomes is None else np.asarray(outcomes)))
    return out
