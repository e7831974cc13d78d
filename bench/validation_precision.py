"""How much of a training epoch the validation takes, and what validating in bf16 saves there.

    python bench/validation_precision.py [--settings bench/real_cv_96_instance_long_strong.yaml]
                                         [--epochs 2] [--repeats 2] [--threads 2]

Trains fold 0 of ``bench/real_cv.py`` for ``--epochs`` with ``fit`` (everything else as the settings say),
then scores the fold's held-out frames exactly as ``fit``'s per-epoch validation does
(``pipeline.train._validation_scores``), in fp32 and under bf16 autocast, the two taking turns
``--repeats`` times. Prints frames/s, validation Dice, the share of mask pixels whose decision differs,
and the validation's share of one of ``fit``'s epochs in either precision. On a CPU without native bf16
(where ``fit`` trains and validates in fp32 anyway) it says so and times nothing.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from real_cv import fold_config, load_positives, load_settings, real_data_missing, subject_folds  # noqa: E402

from pipeline.train import (_validation_scores, combine_outputs, cpu_has_native_bf16, fit, load_trained,  # noqa: E402
                            predict_prepared)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=str(ROOT / "real_cv_96_instance_long_strong.yaml"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if real_data_missing():
        return 2
    if not cpu_has_native_bf16():
        print("this CPU has no native bf16: fit trains and validates in fp32 here, nothing to compare")
        return 0
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    base = load_settings(args.settings, args.epochs)
    h, w = base.preprocess.height, base.preprocess.width
    images, masks, _, subjects, _ = load_positives(h, w)
    held = np.isin(subjects, subject_folds(subjects, base)[0])
    config = fold_config(base, images[~held])
    val_x, val_y = images[held], masks[held]
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"{h}x{w}, {int((~held).sum())} training / {len(val_x)} validation frames")

    work = Path(tempfile.mkdtemp(prefix="validation-precision-"))
    try:
        trained = fit(images[~held], masks[~held], val_x, val_y, config, base, work,
                      identity={"bench": "validation_precision"}, progress=False)
        model, config = load_trained(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    epoch = trained.seconds / trained.epochs_run
    print(f"fit: {trained.epochs_run} epochs in {trained.precision}, {epoch:.1f} s per epoch "
          f"(validating in {trained.precision})")

    best: dict[bool, float] = {}
    dice: dict[bool, float] = {}
    for _ in range(args.repeats):
        for amp in (False, True):
            began = time.perf_counter()
            dice[amp] = _validation_scores(model, val_x, val_y, config, cpu, amp)["val_dice"]
            took = time.perf_counter() - began
            best[amp] = min(best.get(amp, took), took)
    decisions = [combine_outputs(*predict_prepared(model, val_x, config, cpu, amp=amp), 0.5, 0.5) for amp in (False, True)]
    differ = float((decisions[0] != decisions[1]).mean())

    # fit's epoch holds one validation in its own precision: swap it for the other to get the other epoch.
    own = trained.precision == "bf16"
    rest = epoch - best[own]
    print("\n| validation | seconds (best run) | frames/s | validation Dice | share of an epoch |\n|---|---:|---:|---:|---:|")
    for amp in (False, True):
        print(f"| {'bf16 autocast' if amp else 'fp32'} | {best[amp]:.2f} | {len(val_x) / best[amp]:.1f} | "
              f"{dice[amp]:.5f} | {best[amp] / (rest + best[amp]):.0%} |")
    print(f"\nbf16 validation {best[False] / best[True]:.2f}x the speed of fp32; mask decisions differ on "
          f"{differ:.4%} of the pixels; an epoch {(rest + best[False]) / (rest + best[True]):.2f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
