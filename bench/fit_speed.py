"""Frames/s of the real training loop (``pipeline.train.fit``) under the CPU-relevant options.

    python bench/fit_speed.py [--settings bench/real_cv.yaml] [--epochs 1] [--repeats 2] [--threads 2]
                              [--variants layout|loader]

Unlike ``bench/train_throughput.py``, which times the bare training step, this times whole epochs of
``fit`` (data loader, augmentation, step, validation, checkpoint) on the real nerve frames of fold 0
of ``bench/real_cv.py``. ``--variants layout`` (the default) compares NCHW with 0/1 targets,
channels-last (``train.channels_last``) with 0/1 targets, channels-last with mask coverage targets
(``train.soft_targets``), and channels-last with a moving average of the weights (``train.ema_decay``);
``--variants loader`` compares augmenting in the training process (``train.loader_workers: 0``, the
default) with one and two loader worker processes, everything else as the settings say. The variants
take turns ``--repeats`` times in one process, so a change in the machine's speed hits them all alike;
the table gives each one's best run and its ratio to the first variant.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from real_cv import fold_config, load_positives, load_settings, real_data_missing, subject_folds  # noqa: E402

from pipeline.train import fit  # noqa: E402

VARIANTS = {
    "layout": {
        "NCHW, 0/1 targets": {"channels_last": False, "soft_targets": False},
        "channels-last, 0/1 targets": {"channels_last": True, "soft_targets": False},
        "channels-last, coverage targets": {"channels_last": True, "soft_targets": True},
        "channels-last, 0/1 targets, weight average": {"channels_last": True, "soft_targets": False, "ema_decay": 0.995},
    },
    "loader": {
        "augmenting in the training process (0 workers)": {"loader_workers": 0},
        "1 loader worker": {"loader_workers": 1},
        "2 loader workers": {"loader_workers": 2},
    },
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=str(ROOT / "real_cv.yaml"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", choices=sorted(VARIANTS), default="layout")
    args = parser.parse_args()
    if real_data_missing():
        return 2
    torch.set_num_threads(args.threads)
    base = load_settings(args.settings, args.epochs)
    h, w = base.preprocess.height, base.preprocess.width
    images, masks, coverage, subjects, _ = load_positives(h, w)
    held = np.isin(subjects, subject_folds(subjects, base)[0])
    config = fold_config(base, images[~held])
    variants = VARIANTS[args.variants]
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"{h}x{w}, {int((~held).sum())} training frames, {args.epochs} epoch(s) per run")
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, options in variants.items():
            params = base.model_copy(update={"train": base.train.model_copy(update=options)})
            targets = coverage if params.train.soft_targets else masks
            work = Path(tempfile.mkdtemp(prefix="fit-speed-"))
            try:
                result = fit(images[~held], targets[~held], images[held], masks[held], config, params, work,
                             identity={"bench": "fit_speed", "repeat": repeat, "variant": name}, progress=False)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            fps = result.train_frames_per_second
            print(f"run {repeat + 1}: {name}: {fps:.1f} frames/s ({result.precision})")
            best[name] = max(best.get(name, 0.0), fps)
    first = next(iter(variants))
    reference = best[first]
    print(f"\n| training loop | frames/s (best run) | vs {first} |\n|---|---:|---:|")
    for name, fps in best.items():
        print(f"| {name} | {fps:.1f} | {fps / reference:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
