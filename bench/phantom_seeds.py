"""How far the quickstart's holdout figures move with the training seed, by normalisation.

    python bench/phantom_seeds.py [--seeds 0-5] [--norms instance,batch] [--epochs N] [--threads N]
                                  [--amp-cpu auto|true|false]
                                  [--subjects N] [--frames-per-subject N] [--keep DIR]
                                  [--out bench/results/phantom_seeds.json]

The quickstart trains one model and prints one holdout Dice, on the 3 holdout subjects of the phantom
(90 frames, 62 of them empty, where an empty prediction scores 1). This trains the same recipe with
several seeds to show how much of that figure is the seed. It generates the quickstart's phantom
(``params.yaml``'s ``data.synth``) once, preprocesses and splits it as the flow does, then for each
normalisation and seed runs the pipeline's own ``train`` (early stopping on the validation subjects) and
``evaluate`` (thresholds tuned on the validation subjects, holdout at native size) in a folder of its own.

One row per run: best epoch and its validation Dice, holdout Dice over all frames and over the nerve
frames, presence accuracy, false alarms, missed nerve frames, and each holdout subject's median presence
probability on its empty frames (a subject whose empty frames all drift towards the threshold is what
turns a 0.95 into a 0.6), and whether the promotion floor would let it become a first champion; then
each normalisation's median and range.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.phantom import PhantomSpec, generate_phantom  # noqa: E402
from pipeline.preprocess import FRAMES, preprocess  # noqa: E402
from pipeline.promotion import floor_check  # noqa: E402
from pipeline.train import train  # noqa: E402
from phantom_vs_real import machine  # noqa: E402
from real_cv import command_line, repo_relative  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    """``"0-5"`` or ``"0,3,7"`` (or both: ``"0-2,7"``) to a list of ints."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return seeds


def run_one(raw: Path, prepared: Path, work: Path, params) -> dict:
    """Train and evaluate one recipe in ``work``; the row of the table."""
    began = time.perf_counter()
    result = train(prepared, work / "models", params, progress=False)
    ev = evaluate(raw, prepared, work / "models", work / "reports", params)
    m, table = ev.metrics, ev.per_frame
    empty = table[table.true_area == 0]
    n_nerve = int((table.true_area > 0).sum())
    refused = floor_check(m["dice"], m["dice_nerve_frames"] if n_nerve else None, n_nerve,  # would the gate let
                          m["empty_baseline_dice"], params.promotion)                       # it be the first champion?
    return {
        "norm": params.model.norm, "seed": params.train.seed, "precision": result.precision,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "val_dice": round(result.best_val_dice, 4),
        "train_frames_per_second": result.train_frames_per_second,
        "dice": round(m["dice"], 4), "dice_nerve_frames": round(m["dice_nerve_frames"], 4),
        "empty_baseline_dice": round(m["empty_baseline_dice"], 4),
        "presence_accuracy": round(m["presence_accuracy"], 4),
        "false_alarms": int(m["false_alarms"]), "nerve_frames_missed": int(m["nerve_frames_missed"]),
        "presence_threshold": ev.postprocess.presence_threshold,
        "floor": "refused" if refused else "clears", "floor_reason": refused or "",
        "empty_presence_median": {str(s): round(float(g.presence_probability.median()), 3)
                                  for s, g in empty.groupby("subject")},
        "seconds": round(time.perf_counter() - began, 1),
    }


def table(rows: list[dict]) -> str:
    subjects = sorted({s for r in rows for s in r["empty_presence_median"]}, key=int)
    head = ["norm", "seed", "best epoch", "val Dice", "holdout Dice", "nerve frames", "presence acc",
            "false alarms", "missed", *[f"subj {s} empty p" for s in subjects], "floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["norm"], r["seed"], r["best_epoch"], f"{r['val_dice']:.3f}", f"{r['dice']:.3f}",
                 f"{r['dice_nerve_frames']:.3f}", f"{r['presence_accuracy']:.3f}", r["false_alarms"],
                 r["nerve_frames_missed"], *[f"{r['empty_presence_median'].get(s, float('nan')):.2f}" for s in subjects],
                 r.get("floor", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    lines = ["| norm | runs | holdout Dice median (min-max) | nerve frames median | presence acc median (min) |",
             "| --- | ---: | --- | --- | --- |"]
    for norm in dict.fromkeys(r["norm"] for r in rows):
        mine = [r for r in rows if r["norm"] == norm]
        d, n, p = (np.array([r[k] for r in mine]) for k in ("dice", "dice_nerve_frames", "presence_accuracy"))
        lines.append(f"| {norm} | {len(mine)} | {np.median(d):.3f} ({d.min():.3f}-{d.max():.3f}) | "
                     f"{np.median(n):.3f} | {np.median(p):.3f} ({p.min():.3f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0-5", help="training seeds: 0-5, or 0,3,7")
    ap.add_argument("--norms", default="instance,batch", help="model.norm values, comma-separated")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument("--threads", type=int, default=None, help="override train.threads")
    ap.add_argument("--amp-cpu", choices=["auto", "true", "false"], default=None,
                    help="override train.amp_cpu (bf16 where the CPU has it natively, or fp32)")
    ap.add_argument("--subjects", type=int, default=None, help="default: params.yaml data.synth")
    ap.add_argument("--frames-per-subject", type=int, default=None)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep every run's models and reports")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "phantom_seeds.json")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    synth = params.data.synth
    spec = PhantomSpec(args.subjects or synth.subjects, args.frames_per_subject or synth.frames_per_subject,
                       synth.seed)
    amp_cpu = {"auto": "auto", "true": True, "false": False}.get(args.amp_cpu)
    train_overrides = {k: v for k, v in (("epochs", args.epochs), ("threads", args.threads), ("amp_cpu", amp_cpu))
                       if v is not None}
    work = args.keep or Path(tempfile.mkdtemp(prefix="phantom-seeds-"))
    raw, prepared = work / "raw", work / "prepared"
    rows: list[dict] = []
    try:
        generate_phantom(raw, spec)
        preprocess(raw, prepared, params, progress=False)
        hold = pd.read_csv(prepared / FRAMES).query("split == 'holdout'")
        print(f"phantom {spec.subjects}x{spec.frames_per_subject} seed {spec.seed}: holdout subjects "
              f"{sorted(int(s) for s in hold.subject.unique())}, {len(hold)} frames, "
              f"{(~hold.has_nerve).mean():.0%} empty", flush=True)
        for norm in args.norms.split(","):
            for seed in parse_seeds(args.seeds):
                run = params.model_copy(update={
                    "model": params.model.model_copy(update={"norm": norm}),
                    "train": params.train.model_copy(update={"seed": seed, **train_overrides})})
                rows.append(run_one(raw, prepared, work / f"{norm}-{seed}", run))
                r = rows[-1]
                print(f"{norm:>8} seed {seed}: holdout Dice {r['dice']:.3f}, presence accuracy "
                      f"{r['presence_accuracy']:.3f} ({r['seconds']:.0f} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    print()
    print(summary(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": command_line(["bench/phantom_seeds.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "phantom": {"subjects": spec.subjects, "frames_per_subject": spec.frames_per_subject, "seed": spec.seed},
        # The augmentation too: a --params file outside the repository leaves no other trace of it.
        "params_file": repo_relative(args.params), "augment": params.train.augment.model_dump(mode="json"),
        "train_overrides": train_overrides, "runs": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
