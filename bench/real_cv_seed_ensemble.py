"""5-fold cross-validation of an ensemble of finished ``bench/real_cv.py`` runs: no training.

    python bench/real_cv_seed_ensemble.py --runs /tmp/cv-hard,/tmp/cv-hard-seed1,/tmp/cv-soft

Each run directory (``--work`` of ``bench/real_cv.py``, the same settings file and folds) holds one
model per fold, trained without that fold's subjects. For every fold, the runs' last-epoch models are
combined as :class:`pipeline.model.FoldEnsemble` (mean of the probabilities, the registered ensemble's
rule) and score the held-out fold at 420x580, as ``bench/real_cv.py`` does. No member saw the scored
subjects, so this is a cross-validation estimate of the ensemble, and of each member for comparison.
Writes ``bench/results/real_cv_seed_ensemble.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from real_cv import (command_line, last_epoch_model, load_positives, load_settings, native_dice,  # noqa: E402
                     native_masks, real_data_missing, repo_relative, score_variants, subject_folds)

from pipeline.model import FoldEnsemble  # noqa: E402
from pipeline.train import predict_prepared  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated --work folders of finished real_cv runs")
    parser.add_argument("--settings", default=str(ROOT / "real_cv.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "real_cv_seed_ensemble.json"))
    args = parser.parse_args()
    if real_data_missing():
        return 2
    torch.set_num_threads(args.threads)
    runs = [Path(r) for r in args.runs.split(",")]
    params = load_settings(args.settings)
    h, w = params.preprocess.height, params.preprocess.width
    began = time.perf_counter()
    images, masks, _, subjects, names = load_positives(h, w)
    groups = subject_folds(subjects, params)
    cpu = torch.device("cpu")
    folds = []
    for fold, group in enumerate(groups):
        held = np.isin(subjects, group)
        native = native_masks(list(names[held]))
        loaded = [last_epoch_model(run / f"fold{fold}") for run in runs]
        config = loaded[0][1]
        if any(c != config for _, c in loaded):
            raise ValueError(f"fold {fold}: the runs' model configs differ; ensemble runs of one settings file")
        x = images[held]
        row = {"fold": fold, "frames": int(held.sum()), "members": {}}
        for run, (model, _) in zip(runs, loaded):
            row["members"][repo_relative(run)] = round(float(native_dice(predict_prepared(model, x, config, cpu)[0], native).mean()), 4)
        variants = score_variants(FoldEnsemble([m for m, _ in loaded]).eval(), config, x, masks[held], native)
        row["ensemble"] = round(float(variants["plain"].mean()), 4)
        row["ensemble_mirror_tta"] = round(float(variants["mirror TTA"].mean()), 4)
        folds.append(row)
        print(f"fold {fold}: members {list(row['members'].values())}, ensemble {row['ensemble']:.4f}, "
              f"+ mirror TTA {row['ensemble_mirror_tta']:.4f}")
    report = {"runs": [repo_relative(r) for r in runs], "folds": folds,
              "mean_members": {repo_relative(r): round(float(np.mean([f["members"][repo_relative(r)] for f in folds])), 4)
                               for r in runs},
              "mean_ensemble": round(float(np.mean([f["ensemble"] for f in folds])), 4),
              "mean_ensemble_mirror_tta": round(float(np.mean([f["ensemble_mirror_tta"] for f in folds])), 4),
              "seconds": round(time.perf_counter() - began, 1), "command": command_line()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n| fold | frames | " + " | ".join(r.name for r in runs) + " | ensemble | + mirror TTA |")
    print("|---" * (len(runs) + 4) + "|")
    for f in folds:
        print(f"| {f['fold']} | {f['frames']} | " + " | ".join(f"{v:.4f}" for v in f["members"].values())
              + f" | {f['ensemble']:.4f} | {f['ensemble_mirror_tta']:.4f} |")
    print("| mean | | " + " | ".join(f"{v:.4f}" for v in report["mean_members"].values())
          + f" | **{report['mean_ensemble']:.4f}** | {report['mean_ensemble_mirror_tta']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
