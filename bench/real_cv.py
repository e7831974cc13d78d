"""Subject-grouped k-fold cross-validation on the real nerve frames of ``positives-256``.

    python bench/real_cv.py [--settings bench/real_cv.yaml] [--folds-to-run 0,1] [--epochs N]
                            [--seed N] [--soft-targets] [--threads N] [--loader-workers N] [--work DIR] [--out FILE]
                            [--consensus-targets] [--frames-out FILE.npz]

A settings file goes on top of ``params.yaml``; one that says ``base: other.yaml`` goes on top of
that file (``bench/real_cv_reference_64.yaml``).

All 47 subjects, nerve frames only (``positives-256`` holds no empty frame). Each letterboxed
256x256 export is cropped to its content (rows 35-220, the 580x420 frame scaled to 256x186)
and resized to the working size, which is exactly what the inference path does to a native
420x580 frame, so the fold models can also score the full-size frames of ``train/`` whose
subject they did not train on, through :class:`pipeline.inference.Predictor` at native size.

The held-out fold is scored with the weights of the *last* epoch (no model selection on the
scored frames), at 420x580 like a native frame, with and without the inference options
(largest blob, mirror TTA); ``--rescore`` scores trained folds again without training. Writes ``bench/results/real_cv.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import Params  # noqa: E402
from pipeline.importers import letterbox_rows  # noqa: E402
from pipeline.layout import FRAME_NAME  # noqa: E402
from pipeline.inference import Postprocess, Predictor, largest_component  # noqa: E402
from pipeline.preprocess import resize_frame, resize_mask  # noqa: E402
from pipeline.model import ModelConfig  # noqa: E402
from pipeline.metrics import dice_per_frame  # noqa: E402
from pipeline.split import fold_groups  # noqa: E402
from pipeline.train import combine_outputs, fit, load_trained, model_config, predict_prepared  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "kaggle-uns"


def repo_relative(path: str | Path) -> str:
    """``path`` as a results file records it: relative to the repository when it lies inside it (a result
    must not hold one machine's folders), otherwise as given."""
    resolved = Path(path).resolve()
    return resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(path)


def command_line(argv: list[str] | None = None) -> str:
    """``python`` and the arguments as given (``sys.argv``), with the repository's absolute location taken out
    of them: its paths become relative to it, the repository itself ``.``."""
    text = " ".join(["python", *(sys.argv if argv is None else argv)])
    return re.sub(re.escape(str(ROOT)) + r"(/|(?![\w.-]))", lambda m: "" if m.group(1) else ".", text)


def real_data_missing() -> bool:
    """True (and says so on stderr) when the real frames are not beside this checkout."""
    if DATA.is_dir():
        return False
    print(f"{DATA}: not found; these benchmarks need the real frames (../shared/datasets/kaggle-uns)", file=sys.stderr)
    return True


def deep_update(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def settings_layers(settings: str | Path) -> dict:
    """A settings file's changes, on top of the file its ``base:`` names (relative to it), if any:
    a variant states only what differs from the settings it varies."""
    path = Path(settings)
    changes = yaml.safe_load(path.read_text()) or {}
    base = changes.pop("base", None)
    return deep_update(settings_layers(path.parent / base), changes) if base else changes


def load_settings(settings: str | Path, epochs: int = 0) -> Params:
    """``params.yaml`` with a benchmark's settings file on top (and ``train.epochs`` if given)."""
    raw = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), settings_layers(settings))
    if epochs:
        raw["train"]["epochs"] = epochs
    return Params.model_validate(raw)


def load_positives(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Frames, 0/1 masks and mask coverage (float32 in [0, 1], the targets of ``train.soft_targets``)
    at the working size, made as the preprocess stage makes them; with each frame's subject and name."""
    images, masks, coverages, subjects, names = [], [], [], [], []
    for path in sorted((DATA / "positives-256" / "images").glob("*.jpg")):
        match = FRAME_NAME.match(path.stem)
        mask_path = DATA / "positives-256" / "masks" / f"{path.stem}_mask.jpg"
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        box = letterbox_rows(image)  # the importer's detection (rows 35-220 for positives-256)
        if box is None:
            raise ValueError(f"{path}: not a letterboxed export")
        top, rows = box
        image, mask = image[top : top + rows], cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)[top : top + rows]
        images.append(resize_frame(image, height, width))
        binary, coverage = resize_mask(mask > 127, height, width)
        masks.append(binary)
        coverages.append(coverage.astype(np.float32) / 255.0)
        subjects.append(int(match["subject"]))
        names.append(path.stem)
    return np.stack(images), np.stack(masks), np.stack(coverages), np.asarray(subjects), np.asarray(names)


def subject_folds(subjects: np.ndarray, params: Params) -> list[list[int]]:
    """The benchmarks' folds: groups of subjects in the order of ``split.seed``."""
    order = [int(s) for s in np.random.default_rng(params.split.seed).permutation(sorted(set(subjects)))]
    return fold_groups(order, params.split.folds)


def fold_config(params: Params, train_images: np.ndarray) -> ModelConfig:
    """The model config of a fold, normalised with its training frames' mean and spread."""
    scaled = train_images.astype(np.float32) / 255.0
    h, w = train_images.shape[1:]
    return model_config(params, h, w, round(float(scaled.mean()), 6), round(float(scaled.std()), 6))


def last_epoch_model(fold_dir: Path, raw: bool = False) -> tuple[torch.nn.Module, ModelConfig] | None:
    """A finished fold's network with its *last* epoch's weights (the checkpoint), not the best:
    scoring held-out frames must not select on them. With ``train.ema_decay`` those are the weight
    average, which fit validates and ships; ``raw`` asks for the raw weights instead (None when the
    run kept no average, so raw and shipped are the same)."""
    model, config = load_trained(fold_dir)
    state = torch.load(fold_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    if raw and "ema" not in state:
        return None
    model.load_state_dict(state["model"] if raw or "ema" not in state else state["ema"]["module"])
    return model.eval(), config


def native_train_frames() -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    out = []
    for path in sorted((DATA / "train").glob("*.tif")):
        if path.stem.endswith("_mask"):
            continue
        frame = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(path.with_name(path.stem + "_mask.tif")), cv2.IMREAD_GRAYSCALE) > 127
        out.append((int(path.stem.split("_")[0]), path.stem, frame, mask.astype(np.uint8)))
    return out


def consensus_targets(images: np.ndarray, masks: np.ndarray, subjects: np.ndarray,
                      correlation: float = 0.95) -> np.ndarray:
    """The training masks with each frame that has 2+ near-identical neighbours replaced by the
    majority vote of its own and their masks: one annotator's outline, denoised by the others'.
    Only training frames vote, so no held-out mask leaks into training."""
    from label_agreement import consensus_masks, thumbnails  # here: label_agreement itself imports this module

    out = masks.copy()
    votes = consensus_masks(thumbnails(images), masks.astype(bool), subjects, correlation, include_self=True)
    for i, vote in votes.items():
        out[i] = vote.astype(masks.dtype)
    return out


def folds_variants(variants: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {v.mean():.4f}" for k, v in variants.items())


# The headline is the plain path: picking the best option on the held-out frames would be selection.
SCORED = "plain"


def native_masks(names: list[str]) -> np.ndarray:
    """The held-out masks at the competition's 420x580, un-letterboxed as the importer does."""
    out = np.zeros((len(names), 420, 580), np.uint8)
    for i, name in enumerate(names):
        mask = cv2.imread(str(DATA / "positives-256" / "masks" / f"{name}_mask.jpg"), cv2.IMREAD_GRAYSCALE)
        top, rows = letterbox_rows(cv2.imread(str(DATA / "positives-256" / "images" / f"{name}.jpg"),
                                              cv2.IMREAD_GRAYSCALE))
        out[i] = cv2.resize(mask[top : top + rows], (580, 420), interpolation=cv2.INTER_LINEAR) > 127
    return out


def native_dice(prob: np.ndarray, native: np.ndarray, largest: bool = False) -> np.ndarray:
    """Per-frame Dice of working-size probabilities, resized to 420x580 and thresholded at 0.5
    as the inference path does, against the native masks."""
    masks = np.zeros_like(native)
    for i, frame_prob in enumerate(prob):
        mask = (cv2.resize(frame_prob, (580, 420), interpolation=cv2.INTER_LINEAR) > 0.5).astype(np.uint8)
        masks[i] = largest_component(mask) if largest else mask
    return dice_per_frame(masks, native)


def held_out_probabilities(model, config, val_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Working-size mask probabilities of the held-out frames, plain and with mirror TTA, and presence."""
    cpu = torch.device("cpu")
    prob, presence = predict_prepared(model, val_x, config, cpu)
    mirrored, _ = predict_prepared(model, np.ascontiguousarray(val_x[:, :, ::-1]), config, cpu)
    return prob, (prob + mirrored[:, :, ::-1]) / 2, presence


def score_probabilities(prob: np.ndarray, tta: np.ndarray, presence: np.ndarray, val_y: np.ndarray,
                        native: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame Dice of the held-out frames under each inference option, at 420x580: the
    probabilities are resized back to the frame's size and thresholded there, as the inference
    path does with a native frame (scoring at the small working size would also count the
    working size's own rounding of the true outline against the model)."""
    out = {}
    for name, p, largest in (("plain", prob, False), ("largest blob", prob, True),
                             ("mirror TTA", tta, False), ("largest blob + mirror TTA", tta, True)):
        out[name] = native_dice(p, native, largest)
    small = combine_outputs(prob, presence, 0.5, 0.0)
    out["plain, at the working size"] = dice_per_frame(small, val_y)
    return out


def score_variants(model, config, val_x: np.ndarray, val_y: np.ndarray, native: np.ndarray) -> dict[str, np.ndarray]:
    return score_probabilities(*held_out_probabilities(model, config, val_x), val_y, native)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=str(ROOT / "bench" / "real_cv.yaml"))
    parser.add_argument("--folds-to-run", default="", help="comma-separated fold numbers (default: all)")
    parser.add_argument("--epochs", type=int, default=0, help="override train.epochs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_cv.json"))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: 2 when idle, else 1)")
    parser.add_argument("--rescore", action="store_true", help="score the fold models in --work again, no training")
    parser.add_argument("--work", default="/tmp/nerveseg-real-cv")
    parser.add_argument("--seed", type=int, default=None,
                        help="override train.seed (initial weights, shuffling, augmentation; the folds stay)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="override train.loader_workers (data-loader processes; 4+ on a GPU machine)")
    parser.add_argument("--soft-targets", action="store_true",
                        help="set train.soft_targets: train on each working-size pixel's mask coverage")
    parser.add_argument("--consensus-targets", action="store_true",
                        help="train each frame on the majority vote of its own and its near-identical neighbours' "
                             "masks (bench/label_agreement.py), not its own mask alone; the scoring keeps the own masks")
    parser.add_argument("--frames-out", default="",
                        help="also write each held-out frame's name, fold, Dice and working-size probabilities "
                             "(.npz, for bench/error_analysis.py)")
    args = parser.parse_args()
    if real_data_missing():
        return 2

    params = load_settings(args.settings, args.epochs)
    if args.soft_targets and args.consensus_targets:
        parser.error("--soft-targets and --consensus-targets are two different targets; pick one")
    changes = {"soft_targets": True} if args.soft_targets else {}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.loader_workers is not None:
        changes["loader_workers"] = args.loader_workers
    params = params.model_copy(update={"train": params.train.model_copy(update=changes)})
    h, w, k = params.preprocess.height, params.preprocess.width, params.split.folds

    began = time.perf_counter()
    images, masks, coverage, subjects, names = load_positives(h, w)
    targets = coverage if params.train.soft_targets else masks
    print(f"loaded {len(images)} nerve frames of {len(set(subjects))} subjects at {h}x{w} "
          f"in {time.perf_counter() - began:.1f} s")
    groups = subject_folds(subjects, params)
    wanted = [int(f) for f in args.folds_to_run.split(",") if f] or list(range(k))
    native = native_train_frames()

    # A rescore keeps the training figures of the run that trained the folds.
    trained, trained_minutes = {}, None
    if args.rescore and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())
        trained = {f["fold"]: f for f in previous["folds"]}
        trained_minutes = previous.get("training_minutes", previous.get("minutes"))
    folds, per_frame = [], []
    for fold in wanted:
        held = np.isin(subjects, groups[fold])
        train_x, train_y = images[~held], targets[~held]
        if args.consensus_targets:
            train_y = consensus_targets(train_x, train_y, subjects[~held])
        val_x, val_y = images[held], masks[held]
        config = fold_config(params, train_x)
        out_dir = Path(args.work) / f"fold{fold}"
        print(f"fold {fold}: train {len(train_x)} frames / {int((~held).sum() and len(set(subjects[~held])))} "
              f"subjects, held out {len(val_x)} frames / {len(groups[fold])} subjects")
        # The machine may be shared: two threads of one process only when it is otherwise idle
        # (OpenMP threads that wait on a busy core slow everything down).
        threads = args.threads or (2 if os.getloadavg()[0] < 1.5 else 1)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        if args.rescore:  # score the finished fold models again (e.g. other inference options)
            metrics = json.loads((out_dir / "train_metrics.json").read_text())
            result = argparse.Namespace(best_val_dice=metrics["best_val_dice"], epochs_run=metrics["epochs_run"],
                                        train_frames_per_second=None)
        else:
            result = fit(train_x, train_y, val_x, val_y, config, params, out_dir,
                         identity={"bench": "real_cv", "fold": fold, "params": params.digest()})
        seconds = time.perf_counter() - t0
        model, _ = last_epoch_model(out_dir)
        prob, tta, presence = held_out_probabilities(model, config, val_x)
        native_held = native_masks(list(names[held]))
        variants = score_probabilities(prob, tta, presence, val_y, native_held)
        raw = last_epoch_model(out_dir, raw=True)
        if raw is not None:  # the same training's raw weights, beside their average: a paired comparison
            raw_variants = score_probabilities(*held_out_probabilities(raw[0], config, val_x), val_y, native_held)
            variants["plain, raw weights (no average)"] = raw_variants["plain"]
            variants["mirror TTA, raw weights (no average)"] = raw_variants["mirror TTA"]
        if args.frames_out:
            per_frame.append({"name": names[held], "fold": np.full(int(held.sum()), fold), "prob": prob.astype(np.float16),
                              "dice": variants["plain"], "dice_tta": variants["mirror TTA"]})
            if raw is not None:
                per_frame[-1]["dice_raw"] = variants["plain, raw weights (no average)"]
        dice = variants[SCORED]
        native_rows = [(s, n, f, m) for s, n, f, m in native if s in groups[fold]]
        native_dice = None
        if native_rows:
            predictor = Predictor(model, config, Postprocess(0.5, 0.0, 0))
            pred = predictor.predict(np.stack([r[2] for r in native_rows]))
            truth = np.stack([r[3] for r in native_rows])
            has = truth.reshape(len(truth), -1).any(1)
            d = dice_per_frame(pred, truth)
            native_dice = {"frames": len(native_rows), "nerve_frames": int(has.sum()),
                           "dice_nerve_frames": round(float(d[has].mean()), 4) if has.any() else None,
                           "subjects": sorted({r[0] for r in native_rows})}
        if fold in trained:
            seconds, threads = trained[fold]["seconds"], trained[fold].get("threads")
            result.train_frames_per_second = trained[fold]["train_fps"]
        folds.append({"fold": fold, "subjects": groups[fold], "frames": int(held.sum()),
                      "dice": round(float(dice.mean()), 4), "best_epoch_dice": result.best_val_dice,
                      "dice_by_inference": {k: round(float(v.mean()), 4) for k, v in variants.items()},
                      "epochs": result.epochs_run, "seconds": round(seconds, 1),
                      "train_fps": result.train_frames_per_second, "threads": threads,
                      "precision": getattr(result, "precision", None), "native_train_frames": native_dice})
        print(f"fold {fold}: Dice {dice.mean():.4f} (last epoch) in {seconds / 60:.1f} min, "
              f"{result.train_frames_per_second} frames/s; by inference option: {folds_variants(variants)}" +
              (f"; native train/ frames of its subjects: Dice {native_dice['dice_nerve_frames']} on "
               f"{native_dice['nerve_frames']} nerve frames" if native_dice else ""))

    mean = float(np.mean([f["dice"] for f in folds]))
    report = {"mean_dice": round(mean, 4), "folds": folds, "settings": json.loads(params.model_dump_json()),
              "consensus_targets": args.consensus_targets,
              "minutes": round((time.perf_counter() - began) / 60, 1),
              "training_minutes": trained_minutes or round((time.perf_counter() - began) / 60, 1), "machine": platform.processor() or platform.machine(),
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "command": command_line()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if args.frames_out:
        Path(args.frames_out).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.frames_out, **{key: np.concatenate([f[key] for f in per_frame])
                                                 for key in per_frame[0]}, settings=repo_relative(args.settings))
    print("\n| fold | held-out subjects | frames | Dice | minutes |\n|---|---|---|---|---|")
    for f in folds:
        print(f"| {f['fold']} | {len(f['subjects'])} | {f['frames']} | {f['dice']:.4f} | {f['seconds'] / 60:.1f} |")
    print(f"| mean | | | **{mean:.4f}** | {report['training_minutes']} total |")
    for name in folds[0]["dice_by_inference"]:
        values = [f["dice_by_inference"][name] for f in folds]
        print(f"mean Dice with inference option {name!r}: {np.mean(values):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
