"""How far the real masks agree with themselves: a ceiling for any Dice measured on them.

    python bench/label_agreement.py

The acquisition produced runs of near-identical frames of one subject, each annotated on its own.
Where two frames are near-identical (the Pearson correlation of their 48x64 thumbnails is at least
``t``), a perfect model would see the same picture twice, yet it is scored against two different
masks. Two figures per threshold:

- **pairwise**: the Dice between the two masks of each near-identical pair;
- **consensus**: for each frame with at least two near-identical neighbours, the Dice between its
  mask and the majority vote of its neighbours' masks: what a model that found the annotators'
  consensus exactly would score on that frame.

Neither is a hard bound (the nerve may move a little between two frames, and frames without
near-duplicates may be easier or harder), but they put the cross-validation Dice in scale.
Writes ``bench/results/label_agreement.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from real_cv import command_line, load_positives, real_data_missing  # noqa: E402

THRESHOLDS = (0.90, 0.95, 0.98, 0.99)
# The letterbox's content of a positives-256 export: 256 columns by 186 rows (the 580x420 frame).
CONTENT = (186, 256)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def thumbnails(images: np.ndarray) -> np.ndarray:
    """Each frame as a zero-mean, unit-variance 48x64 vector, so a dot product is a correlation."""
    small = np.stack([cv2.resize(i, (64, 48), interpolation=cv2.INTER_AREA) for i in images]).astype(np.float32)
    small = small.reshape(len(small), -1)
    return (small - small.mean(1, keepdims=True)) / (small.std(1, keepdims=True) + 1e-6)


def consensus_masks(thumbs: np.ndarray, masks: np.ndarray, subjects: np.ndarray, correlation: float,
                    include_self: bool = False) -> dict[int, np.ndarray]:
    """Frame index -> the majority vote of its near-identical neighbours' masks (2+ neighbours),
    with its own mask among the voters if ``include_self``; ``thumbs`` from :func:`thumbnails`."""
    out = {}
    for subject in np.unique(subjects):
        idx = np.flatnonzero(subjects == subject)
        near = thumbs[idx] @ thumbs[idx].T / thumbs.shape[1] >= correlation
        np.fill_diagonal(near, False)
        for i in range(len(idx)):
            neighbours = idx[near[i]]
            if len(neighbours) >= 2:
                voters = np.append(neighbours, idx[i]) if include_self else neighbours
                out[int(idx[i])] = masks[voters].mean(0) >= 0.5
    return out


def agreement(images: np.ndarray, masks: np.ndarray, subjects: np.ndarray) -> list[dict]:
    thumbs = thumbnails(images)
    masks = masks.astype(bool)
    pairs: dict[float, list[float]] = {t: [] for t in THRESHOLDS}
    consensus: dict[float, list[float]] = {t: [] for t in THRESHOLDS}
    pair_subjects: dict[float, set[int]] = {t: set() for t in THRESHOLDS}
    for subject in np.unique(subjects):
        idx = np.flatnonzero(subjects == subject)
        corr = thumbs[idx] @ thumbs[idx].T / thumbs.shape[1]
        for t in THRESHOLDS:
            near = corr >= t
            np.fill_diagonal(near, False)
            for i, j in zip(*np.nonzero(np.triu(near))):
                pairs[t].append(dice(masks[idx[i]], masks[idx[j]]))
                pair_subjects[t].add(int(subject))
    for t in THRESHOLDS:
        consensus[t] = [dice(masks[i], vote) for i, vote in consensus_masks(thumbs, masks, subjects, t).items()]
    rows = []
    for t in THRESHOLDS:
        p, c = np.asarray(pairs[t]), np.asarray(consensus[t])
        rows.append({"correlation_at_least": t, "pairs": len(p), "subjects": len(pair_subjects[t]),
                     "pairwise_mean": round(float(p.mean()), 4), "pairwise_median": round(float(np.median(p)), 4),
                     "pairwise_share_below_0_5": round(float((p < 0.5).mean()), 4),
                     "consensus_frames": len(c), "consensus_mean": round(float(c.mean()), 4)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "label_agreement.json"))
    args = parser.parse_args()
    if real_data_missing():
        return 2
    images, masks, _, subjects, _ = load_positives(*CONTENT)
    rows = agreement(images, masks, subjects)
    print(f"{len(images)} nerve frames of {len(set(subjects))} subjects\n")
    print("| thumbnail correlation | pairs | subjects | pairwise Dice mean / median | pairs below 0.5 "
          "| frames with 2+ neighbours | consensus Dice |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| ≥ {r['correlation_at_least']:.2f} | {r['pairs']} | {r['subjects']} | {r['pairwise_mean']:.3f} / "
              f"{r['pairwise_median']:.3f} | {100 * r['pairwise_share_below_0_5']:.1f} % | {r['consensus_frames']} "
              f"| {r['consensus_mean']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "frames": len(images),
                                          "command": command_line()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
