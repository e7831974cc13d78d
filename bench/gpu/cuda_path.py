"""Does the CUDA path of the train stage and of inference really run? (The CPU suite cannot tell.)

    python bench/gpu/cuda_path.py [--frames 240] [--epochs 4] [--no-compile] [--device cpu]

On phantom frames rendered in memory (no data files), at the working size of params.yaml, it trains
with ``train.device: cuda``, bf16 autocast, channels-last, pinned memory, two loader workers and
(unless ``--no-compile``) ``torch.compile``: first ``epochs - 1`` epochs, then a second call that must
resume from the checkpoint and finish. Then the trained network serves native 420x580 frames through
:class:`pipeline.inference.Predictor` on the GPU. Each check prints PASS or FAIL; the exit status is
the number of failures. Without a CUDA device it exits 3 at once; ``--device cpu`` runs the same
checks on the CPU (fp32), to try the script itself before running it on the GPU machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.inference import Postprocess, Predictor  # noqa: E402
from pipeline.phantom import PhantomSpec, synth_frame  # noqa: E402
from pipeline.preprocess import resize_frame, resize_mask  # noqa: E402
from pipeline.train import fit, load_trained, model_config, use_autocast  # noqa: E402


def phantom(frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Native frames and masks, and the same at the working size, of ``frames`` phantom frames."""
    spec = PhantomSpec(subjects=max(2, frames // 30), frames_per_subject=30)
    native, native_masks, small, small_masks = [], [], [], []
    for i in range(frames):
        image, mask = synth_frame(spec, 1 + i // 30, 1 + i % 30)
        native.append(image)
        native_masks.append(mask > 0)
        small.append(resize_frame(image, height, width))
        small_masks.append(resize_mask(mask > 0, height, width)[0])
    return np.stack(native), np.stack(native_masks), np.stack(small), np.stack(small_masks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 3
    params = load_params(Path(args.params))
    tp = params.train.model_copy(update={
        "device": args.device, "amp": True, "channels_last": True, "compile": not args.no_compile, "loader_workers": 2,
        "epochs": args.epochs, "min_epochs": args.epochs, "warmup_epochs": 1})
    params = params.model_copy(update={"train": tp})
    h, w = params.preprocess.height, params.preprocess.width
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, working size {h}x{w}, "
          f"compile {tp.compile}, {args.frames} phantom frames")
    native, native_masks, x, y = phantom(args.frames, h, w)
    val = np.arange(len(x)) % 5 == 0
    config = model_config(params, h, w, float(x.mean() / 255), float(x.std() / 255))
    failures = 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        identity = {"bench": "cuda_path", "params": params.digest()}
        t0 = time.perf_counter()
        first = fit(x[~val], y[~val], x[val], y[val], config, params, out, identity, progress=False,
                    max_epochs_this_call=args.epochs - 1)
        second = fit(x[~val], y[~val], x[val], y[val], config, params, out, identity, progress=False)
        seconds = time.perf_counter() - t0
        history = pd.read_csv(out / "history.csv")  # written by fit, one row per epoch
        check(f"trains on {args.device}", first.device.startswith(args.device) and second.device.startswith(args.device),
              f"device {second.device}, {first.train_frames_per_second} then {second.train_frames_per_second} "
              f"frames/s (compile warm-up included), {seconds:.1f} s in all")
        check("resumes from the checkpoint", second.resumed_from_epoch == args.epochs - 1
              and second.epochs_run == args.epochs and list(history["epoch"]) == list(range(1, args.epochs + 1)),
              f"second call resumed from epoch {second.resumed_from_epoch}, ran to {second.epochs_run}")
        losses = history["loss"].to_numpy()
        amp = "bf16 autocast" if use_autocast(tp, torch.device(args.device)) else "fp32"
        check(f"finite, falling loss ({amp})", all(np.isfinite(losses)) and losses[-1] < losses[0],
              f"loss by epoch {', '.join(f'{v:.3f}' for v in losses)}; best val Dice {second.best_val_dice}")
        model, _ = load_trained(out)
        predictor = Predictor(model, config, Postprocess(0.5, 0.5, 0), device=args.device)
        predictor.predict(native[:4])  # warm-up
        sync()
        t0 = time.perf_counter()
        pred = predictor.predict(native)
        sync()
        fps = len(native) / (time.perf_counter() - t0)
        check(f"serves native frames on {args.device}", pred.shape == native_masks.shape and pred.dtype == np.uint8,
              f"{pred.shape} masks, {fps:.0f} frames/s batched through Predictor (CPU resizes included)")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
