"""Where the cross-validation loses its Dice: missed nerves, wrong places, outlines, or the labels.

    python bench/real_cv.py --frames-out /tmp/cv_frames.npz ...   # first: the held-out predictions
    python bench/error_analysis.py --frames /tmp/cv_frames.npz [--picture /tmp/failures.png]

Reads every held-out frame's working-size probabilities and native-size Dice written by
``bench/real_cv.py --frames-out`` and answers two questions:

1. **What kind of error** costs the mean Dice: each frame's shortfall (1 - Dice) is split by the
   frame's outcome (``pipeline.metrics.frame_outcomes``, as in the evaluation report): missed (an
   empty prediction), elsewhere (a prediction that does not touch the mask: the wrong structure),
   poor overlap (Dice < 0.5) or found (an outline at Dice 0.5 or more).
2. **Is it the model or the label**: for frames with at least two near-identical neighbours of the
   same subject (48x64 thumbnails correlating at least 0.90 ... 0.99, as in
   ``bench/label_agreement.py``), the neighbours' majority mask stands in for the annotators'
   consensus. A failed frame (Dice < 0.5) whose own label disagrees with that consensus while the
   prediction agrees with it is a frame the label, not the model, gets wrong.

Outcomes and the three comparisons of (2) are made at the content resolution of the exports
(186x256); the Dice of (1) is the benchmark's own (native 420x580). ``--picture`` draws the worst frames with the label (green),
the prediction (red) and the neighbours' consensus (blue). It shows real frames: keep it out of
the repository. Writes ``bench/results/error_analysis.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from label_agreement import CONTENT, THRESHOLDS, consensus_masks, thumbnails  # noqa: E402
from real_cv import command_line, load_positives, real_data_missing, repo_relative  # noqa: E402

sys.path.insert(0, str(ROOT.parent))
from pipeline.metrics import OUTCOMES, dice_per_frame, frame_outcomes  # noqa: E402

def label_noise(consensus: dict[int, np.ndarray], labels: np.ndarray, preds: np.ndarray, correlation: float) -> dict:
    """The model and each frame's own label, both against the neighbours' consensus."""
    frames = np.asarray(sorted(consensus))
    votes = np.stack([consensus[i] for i in frames])
    # All three at the content resolution, so that no comparison gains from a finer grid.
    vs_label = dice_per_frame(preds[frames], labels[frames])
    vs_consensus = dice_per_frame(preds[frames], votes)
    label_vs_consensus = dice_per_frame(labels[frames], votes)
    failed = vs_label < 0.5
    return {
        "correlation_at_least": correlation, "frames_with_consensus": len(frames),
        "model_vs_label": round(float(vs_label.mean()), 4),
        "model_vs_consensus": round(float(vs_consensus.mean()), 4),
        "label_vs_consensus": round(float(label_vs_consensus.mean()), 4),
        "failed_frames": int(failed.sum()),
        "failed_where_label_disagrees_with_consensus": int((failed & (label_vs_consensus < 0.5)).sum()),
        "failed_where_model_agrees_with_consensus": int((failed & (vs_consensus >= 0.5)).sum()),
    }


def outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, colour, 1)


def draw_failures(images, labels, preds, consensus, order, dices, path: Path, count: int = 24) -> None:
    tiles = []
    for i in order[:count]:
        tile = cv2.cvtColor(images[i], cv2.COLOR_GRAY2BGR)
        if i in consensus:
            outline(tile, consensus[i], (255, 96, 0))
        outline(tile, labels[i], (0, 220, 0))
        outline(tile, preds[i], (0, 0, 255))
        cv2.putText(tile, f"{dices[i]:.2f}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        tiles.append(tile)
    while len(tiles) % 6:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[r : r + 6]) for r in range(0, len(tiles), 6)]
    cv2.imwrite(str(path), np.vstack(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", required=True, help="the .npz of bench/real_cv.py --frames-out")
    parser.add_argument("--correlation", type=float, default=0.95,
                        help="thumbnail correlation of a near-duplicate, for the picture's consensus outline")
    parser.add_argument("--picture", default="", help="draw the worst frames into this PNG (real frames: not for the repository)")
    parser.add_argument("--out", default=str(ROOT / "results" / "error_analysis.json"))
    args = parser.parse_args()
    if real_data_missing():
        return 2
    frames = np.load(args.frames)
    images, labels, _, subjects, names = load_positives(*CONTENT)
    labels = labels.astype(bool)
    index = {str(n): i for i, n in enumerate(names)}
    rows = np.asarray([index[str(n)] for n in frames["name"]])
    if len(set(rows.tolist())) != len(names):
        print(f"{args.frames}: holds {len(set(rows.tolist()))} of the {len(names)} frames; run all folds", file=sys.stderr)
        return 2
    # Back in the order of load_positives, at the content resolution.
    order = np.argsort(rows)
    dices = frames["dice"][order].astype(float)
    preds = np.stack([cv2.resize(p.astype(np.float32), CONTENT[::-1], interpolation=cv2.INTER_LINEAR) > 0.5
                      for p in frames["prob"][order]])
    n = len(names)

    kinds = frame_outcomes(preds, labels)  # every frame has a nerve: the first four outcomes
    by_outcome = []
    for kind in OUTCOMES[:4]:
        sel = kinds == kind
        by_outcome.append({"outcome": kind, "frames": int(sel.sum()), "share": round(float(sel.mean()), 4),
                           "mean_dice": round(float(dices[sel].mean()), 4) if sel.any() else None,
                           "dice_lost": round(float((1 - dices[sel]).sum() / n), 4)})

    thumbs = thumbnails(images)
    consensus = {t: consensus_masks(thumbs, labels, subjects, t) for t in {*THRESHOLDS, args.correlation}}
    noise = [label_noise(consensus[t], labels, preds, t) for t in THRESHOLDS]
    print(f"{n} held-out nerve frames, mean Dice {dices.mean():.4f} (native 420x580)\n")
    print("| outcome | frames | share | mean Dice | Dice lost (of the mean) |\n|---|---:|---:|---:|---:|")
    for r in by_outcome:
        md = "—" if r["mean_dice"] is None else f"{r['mean_dice']:.3f}"
        print(f"| {r['outcome']} | {r['frames']} | {100 * r['share']:.1f} % | {md} | {r['dice_lost']:.4f} |")
    print("\n| neighbours' thumbnail correlation | frames with a consensus | model vs own label | model vs consensus "
          "| own label vs consensus | failed frames (< 0.5) | of which the label is the odd one out | "
          "of which the model agrees with the consensus |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in noise:
        print(f"| ≥ {r['correlation_at_least']:.2f} | {r['frames_with_consensus']} | {r['model_vs_label']:.3f} | "
              f"{r['model_vs_consensus']:.3f} | {r['label_vs_consensus']:.3f} | {r['failed_frames']} | "
              f"{r['failed_where_label_disagrees_with_consensus']} | {r['failed_where_model_agrees_with_consensus']} |")

    if args.picture:
        picture = consensus[args.correlation]
        worst = [i for i in np.argsort(dices) if i in picture][:24]
        draw_failures(images, labels, preds, picture, worst, dices, Path(args.picture))
        print(f"\nworst frames with a consensus: {args.picture} (green label, red prediction, blue consensus)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"frames": n, "mean_dice": round(float(dices.mean()), 4),
                                          "by_outcome": by_outcome, "label_noise": noise,
                                          "settings": repo_relative(str(frames["settings"])),
                                          "command": command_line()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
