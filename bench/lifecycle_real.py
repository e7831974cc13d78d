"""The life of a deployment on real data: subjects arrive in batches, `nerveseg run` after each.

    python bench/lifecycle_real.py [--source DIR] [--batches 20,34,47] [--project DIR] [--out FILE]

Clones the repository's committed state into a temporary folder and sets it up (`make setup`), or
uses ``--project`` (a clone already set up). Then for each batch it builds an ``images/`` +
``masks/`` folder of the subjects with the first N ids of ``positives-256`` (hard links), imports it
with ``nerveseg data add`` (a new data version; new subjects are placed in the recorded split,
nobody moves) and runs ``nerveseg run --json`` with the project's own settings. One row per data
version: subjects and frames, the gate's comparison set (current holdout subjects that neither model
trained or validated on) with its frames, both models' Dice on it, the 95 % interval of the
difference, and the decision. Last, ``nerveseg models --compare`` scores every version on one set.
The real frames are read from ``../shared/datasets/kaggle-uns`` and never copied into the project.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "datasets" / "kaggle-uns" / "positives-256"


def command_line() -> str:
    """The command as given, with the repository's absolute location taken out (as in bench/real_cv.py)."""
    return re.sub(re.escape(str(ROOT)) + r"(/|(?![\w.-]))", lambda m: "" if m.group(1) else ".",
                  " ".join(["python", *sys.argv]))


def batch_folder(source: Path, out: Path, subjects: set[int]) -> Path:
    """``out/images`` + ``out/masks`` with the frames of ``subjects`` (hard links into ``source``)."""
    for kind in ("images", "masks"):
        (out / kind).mkdir(parents=True, exist_ok=True)
        for path in (source / kind).iterdir():
            if int(path.name.split("_")[0]) in subjects and not (out / kind / path.name).exists():
                try:
                    os.link(path, out / kind / path.name)
                except OSError:  # another file system
                    (out / kind / path.name).write_bytes(path.read_bytes())
    return out


def nerveseg(project: Path, *args: str) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    proc = subprocess.run([str(project / ".venv" / "bin" / "nerveseg"), *args, "-C", str(project)],
                          capture_output=True, text=True)
    proc.seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    if proc.returncode not in (0, 1):
        sys.exit(f"nerveseg {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def row(batch: int, result: dict, seconds: float) -> dict:
    d = result["decision"]
    return {
        "batch_subjects": batch, "version": result["version"], "data_hash": result["data"]["dvc_hash"],
        "frames": result["validation"]["n_frames"], "subjects": sorted(
            s for part in result["prepared"]["subjects"].values() for s in part),
        "parts": {p: len(s) for p, s in result["prepared"]["subjects"].items()},
        "holdout_subjects": d["holdout_subjects"], "comparison_subjects": d["comparison_subjects"],
        "excluded": d["excluded_subjects"], "comparison_frames": d["n_frames"],
        "challenger_dice": d["challenger_dice"], "champion_version": d["champion_version"],
        "champion_dice": d["champion_dice"], "difference": d["dice_difference"],
        "interval": [d["interval_low"], d["interval_high"]], "promoted": d["promote"], "reason": d["reason"],
        "own_holdout_dice": result["holdout"]["dice"], "retrain_reason": result.get("retrain_reason"),
        "epochs": result["train"]["epochs_run"], "precision": result["train"]["precision"],
        "run_seconds": round(seconds, 1),
    }


def table(rows: list[dict]) -> str:
    lines = ["| version | subjects (train/val/holdout) | frames | compared on: subjects (frames) | left out | "
             "challenger Dice | champion Dice | difference [95 % interval] | decision |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | --- | --- |"]
    for r in rows:
        parts = f"{len(r['subjects'])} ({r['parts']['train']}/{r['parts']['validation']}/{r['parts']['holdout']})"
        champ = "-" if r["champion_dice"] is None else f"{r['champion_dice']:.4f} (v{r['champion_version']})"
        diff = "-" if r["difference"] is None else (f"{r['difference']:+.4f} [{r['interval'][0]:+.4f}, "
                                                    f"{r['interval'][1]:+.4f}]")
        decision = "promoted" if r["promoted"] else "challenger"
        lines.append(f"| v{r['version']} | {parts} | {r['frames']} | {len(r['comparison_subjects'])} of "
                     f"{len(r['holdout_subjects'])} ({r['comparison_frames']}) | {len(r['excluded']) or 'none'} | "
                     f"{r['challenger_dice']:.4f} | {champ} | {diff} | {decision} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="positives-256 (images/, masks/)")
    parser.add_argument("--batches", default="20,34,47", help="subjects in each data version (first N ids)")
    parser.add_argument("--project", type=Path, help="a clone already set up (default: a fresh clone)")
    parser.add_argument("--out", type=Path, help="write the rows and the comparison as JSON here")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"{args.source}: no such folder (the real frames are only on development machines)")
    work = Path(tempfile.mkdtemp(prefix="nerveseg-lifecycle-"))
    project = args.project
    if project is None:
        project = work / "project"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
        subprocess.run(["make", "-s", "setup"], cwd=project, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    ids = sorted({int(p.name.split("_")[0]) for p in (args.source / "images").iterdir()})
    rows = []
    for n in (int(b) for b in args.batches.split(",")):
        folder = batch_folder(args.source, work / "incoming", set(ids[:n]))
        added = nerveseg(project, "data", "add", str(folder), "--name", "positives-256", "--no-trigger")
        if added.returncode:
            sys.exit(f"data add of {n} subjects failed:\n{added.stdout}\n{added.stderr}")
        split_line = next((line.strip() for line in added.stdout.splitlines() if "subject split" in line), "")
        ran = nerveseg(project, "run", "--json")
        if ran.returncode or "{\n" not in ran.stdout:
            sys.exit(f"nerveseg run after {n} subjects failed:\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}")
        result = json.loads(ran.stdout[ran.stdout.index("{\n"):])  # Prefect's log lines may come first
        if result.get("skipped"):
            sys.exit(f"the run after {n} subjects was skipped: {result['reason']}")
        rows.append({**row(n, result, ran.seconds), "import_seconds": round(added.seconds, 1), "split": split_line})
        r = rows[-1]
        print(f"{n} subjects: v{r['version']} {r['parts']}, compared on {len(r['comparison_subjects'])} subjects "
              f"({r['comparison_frames']} frames), {'promoted' if r['promoted'] else 'challenger'}: {r['reason']}",
              flush=True)
    compared = nerveseg(project, "models", "--compare", "--json")
    comparison = json.loads(compared.stdout[compared.stdout.index("{\n"):]) if compared.returncode == 0 else {
        "error": (compared.stderr or compared.stdout).strip()}
    print()
    print(table(rows))
    for v in comparison.get("versions", []):
        print(f"v{v['version']}: {v['dice']:.4f} [{v['dice_low']:.4f}, {v['dice_high']:.4f}] on the common set "
              f"of {len(comparison['comparison']['subjects'])} subjects ({v['n_frames']} frames)")
    if args.out:
        cpu = next((re.sub(r"\s+", " ", line.split(":", 1)[1]).strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.machine())
        args.out.write_text(json.dumps({"command": command_line(), "commit": commit,
                                        "cpu": cpu, "cores": os.cpu_count(), "rows": rows,
                                        "models_compare": comparison}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
