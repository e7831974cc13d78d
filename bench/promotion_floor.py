"""What the promotion floor would have said about every recorded phantom seed run.

    python bench/promotion_floor.py [bench/results/phantom_seeds*.json ...] [--params params.yaml]
                                    [--out bench/results/promotion_floor.json]

``bench/phantom_seeds.py`` recorded, per run, the holdout Dice over all frames and over the nerve
frames. The floor (``pipeline/promotion.py``: ``promotion.min_nerve_dice`` and
``promotion.min_gain_over_empty``) also needs the Dice of predicting no nerve anywhere, which is the
holdout's share of empty frames. That is rebuilt here, exactly, by generating the run's phantom again
(its spec is in the file) and counting the frames of the holdout subjects (those the run reports
presence for). Then each run goes through the same ``floor_check`` that the gate calls; the table says
which runs the floor refuses and why, so the floor can be judged against runs known to be healthy or
collapsed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.phantom import PhantomSpec, generate_phantom  # noqa: E402
from pipeline.promotion import floor_check  # noqa: E402

DEFAULT_RUNS = sorted((ROOT / "bench" / "results").glob("phantom_seeds*.json"))


def repo_relative(path: Path) -> str:
    """``path`` as the results file records it: relative to the repository when it lies inside it, else as given."""
    resolved = path.resolve()
    return resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(path)


def holdout_counts(spec: dict, subjects: list[str]) -> tuple[int, int]:
    """(frames, nerve frames) of ``subjects`` in the phantom generated from ``spec``."""
    with tempfile.TemporaryDirectory() as tmp:
        table = generate_phantom(Path(tmp), PhantomSpec(spec["subjects"], spec["frames_per_subject"], spec["seed"]),
                                 progress=False)
    held = table[table.subject.astype(str).isin(subjects)]
    return len(held), int(held.has_nerve.sum())


def verdicts(files: list[Path], rules) -> list[dict]:
    counts: dict[tuple, tuple[int, int]] = {}
    rows = []
    for path in files:
        record = json.loads(path.read_text())
        for run in record["runs"]:
            subjects = sorted(run["empty_presence_median"], key=int)
            key = (json.dumps(record["phantom"], sort_keys=True), tuple(subjects))
            if key not in counts:
                counts[key] = holdout_counts(record["phantom"], subjects)
            frames, nerve = counts[key]
            baseline = (frames - nerve) / frames
            why = floor_check(run["dice"], run["dice_nerve_frames"] if nerve else None, nerve, baseline, rules)
            rows.append({"file": path.name, "norm": run["norm"], "precision": run.get("precision"),
                         "seed": run["seed"], "dice": run["dice"], "dice_nerve_frames": run["dice_nerve_frames"],
                         "empty_baseline": round(baseline, 4),
                         "false_alarms": run["false_alarms"], "holdout_frames": frames, "nerve_frames": nerve,
                         "floor": "refused" if why else "clears", "reason": why or ""})
    return rows


def recipe(row: dict) -> str:
    """The normalisation, and the precision where the run recorded it (older runs are fp32)."""
    return f"{row['norm']}, {row['precision']}" if row.get("precision") else row["norm"]


def table(rows: list[dict]) -> str:
    head = ["file", "norm (precision)", "seed", "holdout Dice", "nerve frames", "no-nerve baseline", "false alarms", "floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        mark = f"**{r['floor']}**" if r["floor"] == "refused" else r["floor"]
        lines.append(f"| {r['file'].removesuffix('.json')} | {recipe(r)} | {r['seed']} | {r['dice']:.3f} | "
                     f"{r['dice_nerve_frames']:.3f} | {r['empty_baseline']:.3f} | {r['false_alarms']} | {mark} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path, default=DEFAULT_RUNS, help="phantom_seeds result files")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="whose promotion floor to apply")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if not args.files:
        raise SystemExit("no phantom_seeds result files given or found in bench/results/")
    rules = load_params(args.params).promotion
    rows = verdicts(args.files, rules)
    print(f"floor: promotion.min_nerve_dice {rules.min_nerve_dice:g}, "
          f"promotion.min_gain_over_empty {rules.min_gain_over_empty:g} ({args.params})")
    print(table(rows))
    refused = [r for r in rows if r["floor"] == "refused"]
    print(f"\n{len(refused)} of {len(rows)} runs refused")
    for r in refused:
        print(f"- {r['file']} {recipe(r)} seed {r['seed']}: {r['reason']}")
    if args.out:
        args.out.write_text(json.dumps({"params": repo_relative(args.params), "min_nerve_dice": rules.min_nerve_dice,
                                        "min_gain_over_empty": rules.min_gain_over_empty, "runs": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
