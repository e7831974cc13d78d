"""Real-time inference: one native 420x580 frame in, its native-size mask out.

    python bench/inference_speed.py [--bundle DIR] [--norm batch|instance|group|none] [--frames 300] [--threads 0] [--batch 64]

Times the whole path of :class:`pipeline.inference.Predictor` one frame at a time (resize,
normalise, network, presence rule, post-processing, resize back), the share of each part,
and the network's CPU variants (eager fp32, BatchNorm folded, channels-last, torch.compile)
in the same run. With a CUDA device it also times batched throughput (bf16 autocast). Without
``--bundle`` the network of params.yaml is built with random weights (speed does not depend
on the weights' values); real frames from ../shared are used when present.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.inference import Postprocess, Predictor  # noqa: E402
from pipeline.model import NORMS, build_model  # noqa: E402
from pipeline.train import model_config  # noqa: E402

REAL = ROOT.parent / "shared" / "datasets" / "kaggle-uns" / "test"


def frames(n: int) -> np.ndarray:
    paths = sorted(REAL.glob("*.tif")) if REAL.is_dir() else []
    if paths:
        real = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
        return np.stack([real[i % len(real)] for i in range(n)])
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, 420, 580), dtype=np.uint8)


def per_frame(predictor: Predictor, stack: np.ndarray, warmup: int = 10) -> tuple[float, dict[str, float]]:
    """frames/s one at a time, and seconds per part."""
    parts = {"resize + normalise": 0.0, "network": 0.0, "presence rule + post-process + resize back": 0.0}
    for frame in stack[:warmup]:
        predictor.predict(frame)
    began = time.perf_counter()
    for frame in stack:
        t0 = time.perf_counter()
        x = predictor._to_input(frame[None])
        t1 = time.perf_counter()
        with torch.inference_mode():
            mask_logits, presence_logits = predictor.model(x)
            prob = torch.sigmoid(mask_logits)[:, 0].numpy()
            pres = torch.sigmoid(presence_logits).numpy()
        t2 = time.perf_counter()
        predictor.masks_from_probabilities(prob, pres, frame.shape)
        t3 = time.perf_counter()
        parts["resize + normalise"] += t1 - t0
        parts["network"] += t2 - t1
        parts["presence rule + post-process + resize back"] += t3 - t2
    total = time.perf_counter() - began
    return len(stack) / total, parts


def through_predict(predictor: Predictor, stack: np.ndarray) -> float:
    for frame in stack[:10]:
        predictor.predict(frame)
    began = time.perf_counter()
    for frame in stack:
        predictor.predict(frame)
    return len(stack) / (time.perf_counter() - began)


def path_name(predictor: Predictor) -> str:
    """The row name of a Predictor's CPU path, read from what it does rather than how it was built."""
    if not predictor.fused:
        return "eager fp32, NCHW" if not predictor.channels_last else "eager fp32, channels-last"
    return "BatchNorm folded + channels-last" if predictor.channels_last else "BatchNorm folded, NCHW"


def cpu_paths(model: torch.nn.Module, config, post: Postprocess, compile_too: bool) -> dict[str, Predictor]:
    """The CPU variants of one network, each named by :func:`path_name` (the first row is the baseline).
    Every option is passed by name: Predictor's defaults change with the normalisation."""
    paths = [Predictor(model, config, post, fuse=False, channels_last=False),
             Predictor(model, config, post, fuse=True, channels_last=False),
             Predictor(model, config, post, fuse=True, channels_last=True)]
    variants = {path_name(p): p for p in paths}
    if compile_too:
        compiled = Predictor(model, config, post, fuse=True, channels_last=True)
        compiled.model = torch.compile(compiled.model, dynamic=False)
        variants["BatchNorm folded + channels-last + torch.compile"] = compiled
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="a registered model's bundle folder (model.pt, model_config.json, ...)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--members", type=int, default=1, help="time a fold ensemble of this many networks")
    parser.add_argument("--norm", choices=NORMS, help="override model.norm of --params (ignored with --bundle)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stack = frames(args.frames)
    post = Postprocess(0.5, 0.5, 0)
    if args.bundle:
        base = Predictor.from_bundle(args.bundle, fuse=False, channels_last=False)
        model, config = base.model, base.config
    else:
        params = load_params(args.params)
        config = replace(model_config(params, params.preprocess.height, params.preprocess.width, 0.3, 0.2),
                         members=args.members, norm=args.norm or params.model.norm)
        torch.manual_seed(0)
        model = build_model(config).eval()
    print(f"network: depth {config.depth}, width {config.base_width}, members {config.members}, working size {config.height}x{config.width}; "
          f"{len(stack)} frames of 420x580; {torch.get_num_threads()} CPU threads; {platform.processor() or platform.machine()}")

    variants = cpu_paths(model, config, post, compile_too=not args.no_compile)
    default = Predictor(model, config, post)
    default_path = path_name(default)
    print(f"default path for {config.norm} norm: {default_path}")
    rows = []
    for name, predictor in variants.items():
        t0 = time.perf_counter()
        predictor.predict(stack[0])  # first call (compilation happens here)
        first = time.perf_counter() - t0
        rows.append((name, through_predict(predictor, stack), first))
    base_fps = rows[0][1]
    print("\n| CPU path, one native frame at a time | frames/s | vs eager | first call (s) |\n|---|---|---|---|")
    for name, fps, first in rows:
        print(f"| {name} | {fps:.1f} | {fps / base_fps:.2f}x | {first:.2f} |")

    fps, parts = per_frame(variants[default_path], stack)
    total = sum(parts.values())
    print(f"\nshares of the default path ({default_path}, {fps:.1f} frames/s, {1000 / fps:.1f} ms/frame):")
    print("| part | ms/frame | share |\n|---|---|---|")
    for name, seconds in parts.items():
        print(f"| {name} | {1000 * seconds / len(stack):.2f} | {100 * seconds / total:.0f} % |")

    if torch.cuda.is_available():
        gpu = Predictor(model, config, post, device="cuda")
        gpu.probabilities(stack[: args.batch], batch_size=args.batch)
        torch.cuda.synchronize()
        began = time.perf_counter()
        gpu.probabilities(stack, batch_size=args.batch)
        torch.cuda.synchronize()
        network_fps = len(stack) / (time.perf_counter() - began)
        began = time.perf_counter()
        gpu.predict(stack)
        full_fps = len(stack) / (time.perf_counter() - began)
        print(f"\nGPU {torch.cuda.get_device_name()}: batched {args.batch}, bf16: {network_fps:.0f} frames/s to "
              f"probabilities, {full_fps:.0f} frames/s end to end (native masks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
