"""What the shape rules of the post-processing do to the cross-validation's held-out frames.

    python bench/real_cv.py --frames-out /tmp/cv_frames.npz ...   # first: the held-out predictions
    python bench/postprocess_options.py --frames /tmp/cv_frames.npz[,/tmp/other_frames.npz]

Reads the working-size probabilities that ``bench/real_cv.py --frames-out`` kept for every
held-out frame and turns them into native 420x580 masks through the inference path's own
:func:`pipeline.inference.postprocess_masks`, once per option: largest blob, convex hull, both, and
(as a sensitivity, not a choice: picking it here would select on the scored frames) a few mask
thresholds. Scored like the benchmark itself: per-frame Dice against the native masks, mean per
fold, mean of the folds. Several runs give one table each and the per-fold gain of each option
over plain, counted across all runs. Writes ``bench/results/postprocess_options.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from real_cv import command_line, native_masks, real_data_missing, repo_relative  # noqa: E402

sys.path.insert(0, str(ROOT.parent))
from pipeline.inference import Postprocess, postprocess_masks  # noqa: E402
from pipeline.metrics import dice_per_frame  # noqa: E402

PLAIN = Postprocess(mask_threshold=0.5, presence_threshold=0.0)  # every frame has a nerve: no presence rule
OPTIONS = {
    "plain": PLAIN,
    "largest blob": replace(PLAIN, largest_component=True),
    "convex hull": replace(PLAIN, convex_hull=True),
    "largest blob + convex hull": replace(PLAIN, largest_component=True, convex_hull=True),
    "mask threshold 0.4": replace(PLAIN, mask_threshold=0.4),
    "mask threshold 0.6": replace(PLAIN, mask_threshold=0.6),
}


def fold_means(dice: np.ndarray, folds: np.ndarray) -> list[float]:
    return [float(dice[folds == f].mean()) for f in sorted(set(folds.tolist()))]


def score_run(path: Path) -> dict:
    frames = np.load(path)
    names, folds = [str(n) for n in frames["name"]], frames["fold"]
    truth = native_masks(names)
    probs = frames["prob"].astype(np.float32)
    presence = np.ones(len(probs), np.float32)
    rows = {}
    for name, post in OPTIONS.items():
        per_fold = fold_means(dice_per_frame(postprocess_masks(probs, presence, truth.shape[1:], post), truth), folds)
        rows[name] = {"mean_dice": round(float(np.mean(per_fold)), 4), "folds": [round(d, 4) for d in per_fold]}
    return {"frames": repo_relative(path), "settings": repo_relative(str(frames["settings"])), "n_frames": len(names),
            "options": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", required=True, help="comma-separated .npz files of bench/real_cv.py --frames-out")
    parser.add_argument("--out", default=str(ROOT / "results" / "postprocess_options.json"))
    args = parser.parse_args()
    if real_data_missing():
        return 2
    began = time.perf_counter()
    runs = [score_run(Path(p)) for p in args.frames.split(",") if p]
    gains = {}
    for name in OPTIONS:
        diffs = [a - b for run in runs for a, b in zip(run["options"][name]["folds"], run["options"]["plain"]["folds"])]
        gains[name] = {"mean_gain": round(float(np.mean(diffs)), 4), "folds_better": sum(d > 0 for d in diffs),
                       "folds_worse": sum(d < 0 for d in diffs), "folds": len(diffs)}
    for run in runs:
        print(f"\n{run['frames']} ({run['settings']}, {run['n_frames']} frames)\n"
              "| option | mean of the folds | per fold |\n|---|---:|---|")
        for name, row in run["options"].items():
            print(f"| {name} | {row['mean_dice']:.4f} | {' '.join(f'{d:.4f}' for d in row['folds'])} |")
    print("\n| option | mean gain over plain | folds better / worse (all runs) |\n|---|---:|---:|")
    for name, g in gains.items():
        if name != "plain":
            print(f"| {name} | {g['mean_gain']:+.4f} | {g['folds_better']} / {g['folds_worse']} of {g['folds']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "gain_over_plain": gains,
                                          "seconds": round(time.perf_counter() - began, 1),
                                          "command": command_line()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
