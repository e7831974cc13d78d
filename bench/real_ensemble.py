"""Does the fold ensemble (``train.ensemble_folds``) pay on real data?

    python bench/real_ensemble.py [--settings bench/real_cv.yaml] [--test-folds 0[,1,...]] [--members 4]
                                  [--frames-out FILE.npz]

Each test fold of ``bench/real_cv.py``'s 5-fold split of ``positives-256`` is a test set whose
subjects no member sees. The other subjects are dealt into ``--members`` inner folds, and each member
trains on all inner folds but one and keeps its best epoch on that one, as the train stage does with
``train.ensemble_folds``. The test frames are scored at 420x580 by each member alone, by the
:class:`pipeline.model.FoldEnsemble` of all of them, and by the ensemble with mirror TTA. With all five
test folds this is a 5-fold cross-validation of the ensemble, comparable with ``bench/real_cv.py``.
Writes ``bench/results/real_ensemble.json`` and prints a table; ``--frames-out`` writes the ensemble's
per-frame results in ``bench/real_cv.py --frames-out``'s format (for ``bench/promotion_noise.py`` and
``bench/error_analysis.py``). Members checkpoint every epoch: a rerun with the same ``--work`` resumes.
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

from real_cv import (command_line, fold_config, load_positives, load_settings, native_dice, native_masks,  # noqa: E402
                     real_data_missing, repo_relative, subject_folds)

from pipeline.model import FoldEnsemble  # noqa: E402
from pipeline.split import fold_groups  # noqa: E402
from pipeline.train import fit, load_trained, predict_prepared  # noqa: E402


def score_test_fold(k: int, params, data, members_n: int, work: Path) -> tuple[dict, dict]:
    """Train ``members_n`` members without test fold ``k``; score them and their ensemble on it."""
    images, masks, targets, subjects, names = data
    order = [int(s) for s in np.random.default_rng(params.split.seed).permutation(sorted(set(subjects)))]
    test_subjects = subject_folds(subjects, params)[k]
    rest = [s for s in order if s not in test_subjects]
    inner = fold_groups(rest, members_n)
    test = np.isin(subjects, test_subjects)
    # One normalisation for every member (the ensemble feeds them one input), from all training frames.
    config = fold_config(params, images[~test])
    print(f"test fold {k}: {int(test.sum())} frames of {len(test_subjects)} subjects; {members_n} members on the "
          f"other {len(rest)} subjects")
    began = time.perf_counter()
    members, rows = [], []
    for i, group in enumerate(inner):
        val = np.isin(subjects, group)
        train = ~test & ~val
        t0 = time.perf_counter()
        fit(images[train], targets[train], images[val], masks[val], config, params, work / f"member{i}",
            identity={"bench": "real_ensemble", "member": i, "test_fold": k, "params": params.digest()})
        model, _ = load_trained(work / f"member{i}")  # its best epoch on its own inner fold
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
    dice, dice_tta = native_dice(prob, native), native_dice((prob + mirrored) / 2, native)
    report = {"test_fold": k, "test_subjects": test_subjects, "test_frames": int(test.sum()), "members": rows,
              "member_mean_dice": round(float(np.mean([r["dice"] for r in rows])), 4),
              "ensemble_dice": round(float(dice.mean()), 4), "ensemble_tta_dice": round(float(dice_tta.mean()), 4),
              "minutes": round((time.perf_counter() - began) / 60, 1)}
    frames = {"name": names[test], "fold": np.full(int(test.sum()), k), "prob": prob.astype(np.float16),
              "dice": dice, "dice_tta": dice_tta}
    return report, frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=str(ROOT / "bench" / "real_cv.yaml"))
    parser.add_argument("--test-folds", "--test-fold", default="0",
                        help="comma-separated test folds of the 5-fold split (0,1,2,3,4: a cross-validation)")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_ensemble.json"))
    parser.add_argument("--work", default="/tmp/nerveseg-real-ensemble", help="members' checkpoints, per test fold")
    parser.add_argument("--frames-out", default="", help="also write the ensemble's per-frame results (.npz)")
    args = parser.parse_args()
    if real_data_missing():
        return 2
    params = load_settings(args.settings)
    try:
        wanted = [int(f) for f in args.test_folds.split(",") if f.strip()]
    except ValueError:
        parser.error(f"--test-folds {args.test_folds!r}: comma-separated fold numbers expected")
    if not wanted or any(not 0 <= f < params.split.folds for f in wanted):
        parser.error(f"--test-folds {args.test_folds!r}: folds run from 0 to {params.split.folds - 1}")
    torch.set_num_threads(args.threads)
    h, w = params.preprocess.height, params.preprocess.width

    began = time.perf_counter()
    images, masks, coverage, subjects, names = load_positives(h, w)
    data = (images, masks, coverage if params.train.soft_targets else masks, subjects, names)
    folds, per_frame = [], []
    for k in wanted:
        report, frames = score_test_fold(k, params, data, args.members, Path(args.work) / f"fold{k}")
        folds.append(report)
        per_frame.append(frames)
        print(f"test fold {k}: members {report['member_mean_dice']:.4f} on average, ensemble {report['ensemble_dice']:.4f}, "
              f"with mirror TTA {report['ensemble_tta_dice']:.4f} ({report['minutes']} min)")

    def mean(key: str) -> float:
        return round(float(np.mean([f[key] for f in folds])), 4)

    print(f"\n| test fold | frames | members (mean) | **ensemble of {args.members}** | ensemble + mirror TTA |")
    print("|---|---|---|---|---|")
    for f in folds:
        print(f"| {f['test_fold']} | {f['test_frames']} | {', '.join(format(r['dice'], '.4f') for r in f['members'])} "
              f"({f['member_mean_dice']:.4f}) | **{f['ensemble_dice']:.4f}** | {f['ensemble_tta_dice']:.4f} |")
    if len(folds) > 1:
        print(f"| mean | {sum(f['test_frames'] for f in folds)} | ({mean('member_mean_dice'):.4f}) | "
              f"**{mean('ensemble_dice'):.4f}** | {mean('ensemble_tta_dice'):.4f} |")
    report = {"test_folds": wanted, "members": args.members, "mean_member_dice": mean("member_mean_dice"),
              "mean_ensemble_dice": mean("ensemble_dice"), "mean_ensemble_tta_dice": mean("ensemble_tta_dice"),
              "folds": folds, "settings": json.loads(params.model_dump_json()),
              "minutes": round((time.perf_counter() - began) / 60, 1), "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "command": command_line()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if args.frames_out:
        Path(args.frames_out).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.frames_out, **{key: np.concatenate([f[key] for f in per_frame]) for key in per_frame[0]},
                            settings=repo_relative(args.settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
