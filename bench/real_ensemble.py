"""Does the fold ensemble (``train.ensemble_folds``) pay on real data?

    python bench/real_ensemble.py [--settings bench/real_cv.yaml] [--test-fold 0] [--members 4]

One fold of ``bench/real_cv.py``'s 5-fold split of ``positives-256`` is the test set (its subjects
are seen by no member). The other subjects are dealt into ``--members`` inner folds, and each member
trains on all inner folds but one and keeps its best epoch on that one, as the train stage does with
``train.ensemble_folds``. The test frames are scored at 420x580 by each member alone, by the
:class:`pipeline.model.FoldEnsemble` of all of them, and by the ensemble with mirror TTA.
Writes ``bench/results/real_ensemble.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real_cv import fold_config, load_positives, load_settings, native_dice, native_masks, real_data_missing, subject_folds  # noqa: E402

from pipeline.model import FoldEnsemble  # noqa: E402
from pipeline.split import fold_groups  # noqa: E402
from pipeline.train import fit, load_trained, predict_prepared  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=str(ROOT / "bench" / "real_cv.yaml"))
    parser.add_argument("--test-fold", type=int, default=0)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_ensemble.json"))
    parser.add_argument("--work", default="/tmp/nerveseg-real-ensemble")
    args = parser.parse_args()
    if real_data_missing():
        return 2
    torch.set_num_threads(args.threads)
    params = load_settings(args.settings)
    h, w = params.preprocess.height, params.preprocess.width

    began = time.perf_counter()
    images, masks, coverage, subjects, names = load_positives(h, w)
    targets = coverage if params.train.soft_targets else masks
    order = [int(s) for s in np.random.default_rng(params.split.seed).permutation(sorted(set(subjects)))]
    test_subjects = subject_folds(subjects, params)[args.test_fold]
    rest = [s for s in order if s not in test_subjects]
    inner = fold_groups(rest, args.members)
    test = np.isin(subjects, test_subjects)
    # One normalisation for every member (the ensemble feeds them one input), from all training frames.
    config = fold_config(params, images[~test])
    print(f"test: {int(test.sum())} frames of {len(test_subjects)} subjects; {args.members} members on the other "
          f"{len(rest)} subjects")

    members, rows = [], []
    for i, group in enumerate(inner):
        val = np.isin(subjects, group)
        train = ~test & ~val
        t0 = time.perf_counter()
        fit(images[train], targets[train], images[val], masks[val], config, params, Path(args.work) / f"member{i}",
            identity={"bench": "real_ensemble", "member": i, "test_fold": args.test_fold, "params": params.digest()})
        model, _ = load_trained(Path(args.work) / f"member{i}")  # its best epoch on its own inner fold
        members.append(model)
        rows.append({"member": i, "train_frames": int(train.sum()), "minutes": round((time.perf_counter() - t0) / 60, 1)})

    cpu = torch.device("cpu")
    native = native_masks(list(names[test]))
    test_x = images[test]
    for row, model in zip(rows, members):
        row["dice"] = round(float(native_dice(predict_prepared(model, test_x, config, cpu)[0], native).mean()), 4)
    ensemble = FoldEnsemble(members).eval()
    prob = predict_prepared(ensemble, test_x, config, cpu)[0]
    mirrored = predict_prepared(ensemble, np.ascontiguousarray(test_x[:, :, ::-1]), config, cpu)[0][:, :, ::-1]
    ensemble_dice = float(native_dice(prob, native).mean())
    tta_dice = float(native_dice((prob + mirrored) / 2, native).mean())
    member_mean = float(np.mean([r["dice"] for r in rows]))

    print("\n| model | test Dice |\n|---|---|")
    for r in rows:
        print(f"| member {r['member']} ({r['train_frames']} training frames) | {r['dice']:.4f} |")
    print(f"| mean of the members | {member_mean:.4f} |")
    print(f"| **ensemble of {len(members)}** | **{ensemble_dice:.4f}** |")
    print(f"| ensemble + mirror TTA | {tta_dice:.4f} |")
    report = {"test_fold": args.test_fold, "test_subjects": test_subjects, "test_frames": int(test.sum()),
              "members": rows, "member_mean_dice": round(member_mean, 4), "ensemble_dice": round(ensemble_dice, 4),
              "ensemble_tta_dice": round(tta_dice, 4), "settings": json.loads(params.model_dump_json()),
              "minutes": round((time.perf_counter() - began) / 60, 1), "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
