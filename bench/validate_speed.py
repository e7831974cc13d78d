"""How fast is data validation at the real competition's size (5,635 frame pairs)?

Builds a dataset of N frame pairs in the competition's layout (47 subjects) from the real frames
in ``../shared/datasets/kaggle-uns/train`` (byte copies, each a real file of its own) or, when that
folder is absent, from synthetic speckle frames; then times, in one process:

1. ``cold``: manifest (every file read) + the GX checkpoint with Data Docs, on a fresh GX project;
2. ``warm``: the same again, nothing changed (every manifest row from the cache);
3. ``+5 frames``: five new frame pairs added, validated again (only the new files are read).

Run:  python bench/validate_speed.py [--pairs 5635] [--keep DIR]
The figures go into docs/validation.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "datasets" / "kaggle-uns" / "train"
SUBJECTS = 47


def _sources() -> list[tuple[Path, Path]] | list[tuple[np.ndarray, np.ndarray]]:
    if REAL.is_dir():
        frames = sorted(p for p in REAL.glob("*.tif") if not p.name.endswith("_mask.tif"))
        return [(p, p.with_name(p.stem + "_mask.tif")) for p in frames]
    rng = np.random.default_rng(0)
    out = []
    for i in range(56):
        image = rng.rayleigh(60, (420, 580)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((420, 580), np.uint8)
        if i % 2:
            cv2.ellipse(mask, (250 + i, 210), (55, 40), 0, 0, 360, 255, -1)
        out.append((image, mask))
    return out


def _put(src, dst: Path) -> None:
    if isinstance(src, Path):
        shutil.copyfile(src, dst)
    else:
        cv2.imwrite(str(dst), src)


def build_dataset(data_dir: Path, pairs: int) -> None:
    """``pairs`` frame pairs over 47 subjects, each a separate file (copies of the sources)."""
    train = data_dir / "train"
    train.mkdir(parents=True, exist_ok=True)
    sources = _sources()
    per_subject = -(-pairs // SUBJECTS)
    k = 0
    for subject in range(1, SUBJECTS + 1):
        for n in range(1, per_subject + 1):
            if k == pairs:
                return
            image, mask = sources[(subject * 7 + n) % len(sources)]
            _put(image, train / f"{subject}_{n}.tif")
            _put(mask, train / f"{subject}_{n}_mask.tif")
            k += 1


def add_frames(data_dir: Path, count: int) -> None:
    sources = _sources()
    for n in range(1, count + 1):
        image, mask = sources[n % len(sources)]
        _put(image, data_dir / "train" / f"{SUBJECTS + 1}_{n}.tif")
        _put(mask, data_dir / "train" / f"{SUBJECTS + 1}_{n}_mask.tif")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {platform.system()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5635)
    ap.add_argument("--keep", type=Path, default=None, help="build the dataset here and keep it")
    args = ap.parse_args()

    from pipeline.config import ValidationParams

    work = args.keep or Path(tempfile.mkdtemp(prefix="nerveseg-bench-"))
    data_dir, gx_dir = work / "data", work / "project"
    try:
        t = time.perf_counter()
        if not (data_dir / "train").is_dir():
            build_dataset(data_dir, args.pairs)
        built = time.perf_counter() - t
        if (gx_dir / "gx").exists():
            shutil.rmtree(gx_dir / "gx")
        shutil.copytree(REPO / "gx", gx_dir / "gx", ignore=shutil.ignore_patterns("uncommitted"))

        t = time.perf_counter()
        import great_expectations  # noqa: F401  (imported once per process; timed apart)
        from pipeline import validation

        import_s = time.perf_counter() - t
        rules = ValidationParams()
        rows = []
        load0 = os.getloadavg()

        def timed(label: str) -> None:
            t0, c0 = time.perf_counter(), time.process_time()
            manifest, report = validation.validate_data_dir(data_dir, rules, gx_dir, build_docs=True)
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows.append((label, len(manifest), manifest.attrs.get("files_read"),
                         total - report.seconds, report.seconds, total, report, cpu))

        timed("cold (no cache)")
        timed("warm (nothing changed)")
        add_frames(data_dir, 5)
        timed("+5 frame pairs")

        print(f"machine: {machine()}")
        print(f"dataset: {args.pairs} pairs ({'real frames copied' if REAL.is_dir() else 'synthetic'}),"
              f" built in {built:.1f} s; GX import {import_s:.1f} s (once per process, not below)")
        print()
        print(f"load average before: {load0}, after: {os.getloadavg()}")
        print()
        print("| run | frames | files read | manifest s | GX checkpoint + Data Docs s | total s "
              "| CPU s (all threads) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, n, read, man_s, gx_s, total, _, cpu in rows:
            print(f"| {label} | {n} | {read} | {man_s:.1f} | {gx_s:.1f} | {total:.1f} | {cpu:.1f} |")
        cold, rerun = rows[0][5], rows[2][5]
        print(f"\nre-validation after adding 5 pairs: {rerun / cold:.2f} of the cold run")
        report = rows[0][6]
        print(f"cold report: success={report.success}, blocking={len(report.blocking)}, "
              f"warnings={len(report.warnings)}, contradicting pairs={len(report.contradicting_pairs)}")
        return 0 if cold <= 20 else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
