"""The "average mask" prior on the real nerve frames: the floor every model must clear.

    python bench/real_prior.py [--settings bench/real_cv.yaml] [--out bench/results/real_prior.json]

For each fold of ``bench/real_cv.py``'s subject-grouped split, the mean of the training frames'
masks at the working size, thresholded at the level that scores best on those training frames,
is the prediction for every held-out frame; scored at 420x580 exactly like the fold models
(``native_dice``). No network, a few seconds. The issue quotes 0.44 for this prior.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real_cv import (command_line, load_positives, load_settings, native_dice, native_masks,  # noqa: E402
                     real_data_missing, subject_folds)
from pipeline.metrics import dice_per_frame  # noqa: E402

LEVELS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def best_level(mean_mask: np.ndarray, masks: np.ndarray) -> float:
    """The threshold of the mean mask that scores best on the frames it was averaged from."""
    scores = [dice_per_frame(np.broadcast_to(mean_mask > t, masks.shape).astype(np.uint8), masks).mean()
              for t in LEVELS]
    return float(LEVELS[int(np.argmax(scores))])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=str(ROOT / "bench" / "real_cv.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_prior.json"))
    args = parser.parse_args()
    if real_data_missing():
        return 2
    began = time.perf_counter()
    params = load_settings(args.settings)
    images, masks, _, subjects, names = load_positives(params.preprocess.height, params.preprocess.width)
    folds = []
    for fold, group in enumerate(subject_folds(subjects, params)):
        held = np.isin(subjects, group)
        mean_mask = masks[~held].astype(np.float32).mean(0)
        level = best_level(mean_mask, masks[~held])
        prob = np.broadcast_to((mean_mask > level).astype(np.float32), (int(held.sum()), *mean_mask.shape))
        dice = native_dice(np.ascontiguousarray(prob), native_masks(list(names[held])))
        folds.append({"fold": fold, "subjects": group, "frames": int(held.sum()), "level": level,
                      "dice": round(float(dice.mean()), 4)})
        print(f"fold {fold}: mean mask > {level:.2f}: Dice {dice.mean():.4f} on {int(held.sum())} frames")
    mean = float(np.mean([f["dice"] for f in folds]))
    report = {"mean_dice": round(mean, 4), "folds": folds, "working_size": [params.preprocess.height, params.preprocess.width],
              "seconds": round(time.perf_counter() - began, 1), "machine": platform.processor() or platform.machine(),
              "command": command_line()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"mean Dice of the average-mask prior: {mean:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
