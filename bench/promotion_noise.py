"""How often the promotion gate promotes a model that is no better, and how often one that is.

    python bench/real_cv.py --seed 0 --frames-out /tmp/a0.npz ...          # one recipe, two seeds: twins
    python bench/real_cv.py --seed 1 --frames-out /tmp/a1.npz ...
    python bench/real_cv.py --settings bench/real_cv_96.yaml --frames-out /tmp/b0.npz ...   # a better recipe
    python bench/promotion_noise.py --twins /tmp/a0.npz,/tmp/a1.npz --better /tmp/b0.npz:/tmp/a0.npz,/tmp/b0.npz:/tmp/a1.npz

A file may name one of its Dice columns: ``/tmp/a0.npz#dice_raw`` (the raw weights of a
``train.ema_decay`` run; ``dice``, the default, is what the run shipped).

Each held-out fold of the cross-validation (339-579 nerve frames of 9-10 unseen subjects) stands in
for a holdout set. On it, the gate of ``pipeline.promotion.decide`` (``params.yaml``'s promotion
settings) judges a challenger against a champion from the two runs' per-frame Dice, at several
margins:

- **twins**: the same recipe trained with another seed, in both directions: a promotion is a false
  one, since neither is better by construction (retraining on unchanged data does exactly this);
- **better**: a recipe measured better in the cross-validation over its champion: a promotion is a
  right one.

The gate resamples frames by default. Frames of one subject are near-duplicates of one video, so they
are not independent draws; every comparison is also made with ``promotion.resample: subject`` (whole
subjects drawn: a cluster bootstrap) to show what that costs and buys. Only nerve frames exist here, so the gate's
presence rule is not exercised. Writes ``bench/results/promotion_noise.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from pipeline.config import PromotionParams, load_params  # noqa: E402
from pipeline.layout import FRAME_NAME  # noqa: E402
from pipeline.promotion import FrameScores, decide  # noqa: E402

MARGINS = (0.0, 0.0025, 0.005, 0.01, 0.02)


def command_line() -> str:
    """The command as given, with the repository's absolute location taken out (as in bench/real_cv.py)."""
    return re.sub(re.escape(str(ROOT.parent)) + r"(/|(?![\w.-]))", lambda m: "" if m.group(1) else ".",
                  " ".join(["python", *sys.argv]))


@cache  # each run takes part in several comparisons: read it once
def load_run(spec: str) -> dict[str, tuple[int, float]]:
    """frame name -> (fold, Dice) of one ``bench/real_cv.py --frames-out`` file. ``FILE.npz#COLUMN``
    takes another of its Dice columns: ``dice_raw`` is the raw weights of a ``train.ema_decay`` run,
    whose ``dice`` is the weight average."""
    path, _, column = spec.partition("#")
    frames = np.load(path)
    column = column or "dice"
    if column not in frames:
        raise SystemExit(f"{path}: no column {column!r} (it has {', '.join(frames.files)})")
    return {str(n): (int(f), float(d)) for n, f, d in zip(frames["name"], frames["fold"], frames[column])}


def compare(kind: str, challenger: str, champion: str, params: PromotionParams) -> list[dict]:
    a, b = load_run(challenger), load_run(champion)
    if set(a) != set(b):
        raise SystemExit(f"{challenger} and {champion} hold different frames: not runs of the same folds")
    rows = []
    names = sorted(a)
    folds = sorted({a[n][0] for n in names})
    for fold in [*folds, "all"]:
        held = [n for n in names if fold == "all" or a[n][0] == fold]
        if fold != "all" and any(b[n][0] != fold for n in held):
            raise SystemExit(f"{challenger} and {champion} split the folds differently")
        ones = np.ones(len(held), bool)
        subjects = [FRAME_NAME.match(n)["subject"] for n in held]
        mine = FrameScores(held, np.array([a[n][1] for n in held]), ones, ones, subjects)
        theirs = FrameScores(held, np.array([b[n][1] for n in held]), ones, ones, subjects)
        row = {"kind": kind, "challenger": Path(challenger).name, "champion": Path(champion).name,
               "fold": fold, "frames": len(held), "subjects": len(set(subjects))}
        for unit in ("frame", "subject"):
            decisions = {m: decide("challenger", mine, "champion", theirs,
                                   params.model_copy(update={"margin": m, "resample": unit}), True) for m in MARGINS}
            first = decisions[MARGINS[0]]
            row["difference"] = round(first.dice_difference, 4)  # the same mean over frames for either unit
            row[f"{unit}_interval"] = [round(first.interval_low, 4), round(first.interval_high, 4)]
            row[f"promoted_{unit}s"] = {str(m): d.promote for m, d in decisions.items()}
        rows.append(row)
    return rows


def rates(rows: list[dict], kind: str, unit: str, pooled: bool) -> dict[str, str]:
    """How many of the comparisons promoted, at each margin: per fold, or on all folds' frames pooled."""
    chosen = [r for r in rows if r["kind"] == kind and (r["fold"] == "all") == pooled]
    return {str(m): f"{sum(r[unit][str(m)] for r in chosen)}/{len(chosen)}" for m in MARGINS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", required=True, help="comma-separated --frames-out files of one recipe, other seeds")
    parser.add_argument("--better", default="",
                        help="comma-separated CHALLENGER.npz:CHAMPION.npz pairs, the challenger measured better")
    parser.add_argument("--params", default=str(ROOT.parent / "params.yaml"), help="the promotion settings' source")
    parser.add_argument("--out", default=str(ROOT / "results" / "promotion_noise.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    params: PromotionParams = load_params(args.params).promotion
    twins = [p for p in args.twins.split(",") if p]
    if len(twins) < 2:
        parser.error("--twins needs two or more runs of the same settings")
    rows = []
    for i, first in enumerate(twins):
        for second in twins[i + 1:]:
            rows += compare("twins", first, second, params) + compare("twins", second, first, params)
    for pair in (p for p in args.better.split(",") if p):
        challenger, _, champion = pair.partition(":")
        rows += compare("better", challenger, champion, params)

    print(f"| comparison | fold | frames | subjects | Dice difference | {params.confidence:.0%} interval, frames "
          f"| promoted (margin {MARGINS[0]:g}) | interval, subjects | promoted (margin {MARGINS[0]:g}) |")
    print("|---|---|---:|---:|---:|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']}: {r['challenger']} over {r['champion']} | {r['fold']} | {r['frames']} | {r['subjects']} "
              f"| {r['difference']:+.4f} | [{r['frame_interval'][0]:+.4f}, {r['frame_interval'][1]:+.4f}] "
              f"| {'yes' if r['promoted_frames']['0.0'] else 'no'} "
              f"| [{r['subject_interval'][0]:+.4f}, {r['subject_interval'][1]:+.4f}] "
              f"| {'yes' if r['promoted_subjects']['0.0'] else 'no'} |")
    summary = {f"{kind}, {'all frames pooled' if pooled else 'per fold'}, resampling {unit.split('_')[1]}":
               rates(rows, kind, unit, pooled)
               for kind in ("twins", "better") for pooled in (False, True)
               for unit in ("promoted_frames", "promoted_subjects") if any(r["kind"] == kind for r in rows)}
    widths = [(r["subject_interval"][1] - r["subject_interval"][0]) / (r["frame_interval"][1] - r["frame_interval"][0])
              for r in rows if r["fold"] != "all"]
    summary["subject interval / frame interval, per fold (median, range)"] = (
        f"{np.median(widths):.2f} ({min(widths):.2f}-{max(widths):.2f})")
    twin_diffs = [abs(r["difference"]) for r in rows if r["kind"] == "twins" and r["fold"] != "all"]
    summary["twins' |Dice difference| per fold (mean, max)"] = f"{np.mean(twin_diffs):.4f} ({max(twin_diffs):.4f})"
    print("\npromotions, by margin: " + ", ".join(f"{m:g}" for m in MARGINS))
    for name, counts in summary.items():
        print(f"  {name}: " + ("  ".join(counts.values()) if isinstance(counts, dict) else counts))
    report = {"promotion": json.loads(params.model_dump_json()), "margins": list(MARGINS), "summary": summary,
              "rows": rows, "seconds": round(time.perf_counter() - began, 1), "command": command_line()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
