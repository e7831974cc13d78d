"""Training throughput: the tuned step against a plain fp32 eager loop of the same network,
and the step fed by the real data loader against the step on tensors already in memory.

    python bench/train_throughput.py [--steps 30] [--batch 16] [--workers 2] [--no-compile]

Frames/s of each variant, measured in one run, as ratios to the plain loop. On the CPU the
variants are: channels-last, torch.compile (inductor), bf16 autocast; on CUDA: bf16 autocast, bf16
autocast + channels-last, then + torch.compile. The loader variant runs the tuned step on batches from
:class:`pipeline.train.FrameDataset` (augmentation included) with ``--workers`` processes. It also says
which step ``fit`` runs with the params.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.augment import training_transform  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.losses import segmentation_loss  # noqa: E402
from pipeline.model import build_model, uses_channels_last  # noqa: E402
from pipeline.train import FrameDataset, cpu_has_native_bf16, model_config, use_autocast  # noqa: E402


def frames(n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, h, w), dtype=np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    masks[::2, h // 3 : h // 2, w // 3 : w // 2] = 1
    return images, masks


def run(params, config, device, batches, steps: int, amp: bool, channels_last: bool, compile_: bool) -> float:
    torch.manual_seed(0)
    model = build_model(config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_ else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = iter(batches)

    def step() -> int:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mask, presence, *coarse = net(x)  # coarse: with model.deep_supervision, as pipeline/train.py
        loss, _ = segmentation_loss(mask, presence, y, params.train.loss, *coarse)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(x)

    for _ in range(5 if compile_ else 3):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    began, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - began)


def in_memory(images, masks, config, batch, device):
    x = torch.from_numpy((images[:batch].astype(np.float32) / 255 - config.intensity_mean) / config.intensity_std)[:, None]
    y = torch.from_numpy(masks[:batch].astype(np.float32))[:, None]
    x, y = x.to(device), y.to(device)
    while True:
        yield x, y


def from_loader(images, masks, config, params, batch, workers, device):
    dataset = FrameDataset(images, masks, config, training_transform(params.train.augment, 0))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    while True:
        yield from loader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    h, w = params.preprocess.height, params.preprocess.width
    config = model_config(params, h, w, 0.3, 0.2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, masks = frames(max(256, 4 * args.batch), h, w)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name() if cuda else (f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                                                               f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()})")
    print(f"network: depth {config.depth}, width {config.base_width}, {config.norm} norm, {h}x{w}, batch {args.batch}; device: {where}")
    tp = params.train
    print(f"fit's step with these params here: {'bf16 autocast' if use_autocast(tp, device) else 'fp32'}, "
          f"{'channels-last' if uses_channels_last(tp.channels_last, config.norm) else 'NCHW'}, "
          f"{'torch.compile' if tp.compile else 'eager'}")

    mem = lambda: in_memory(images, masks, config, args.batch, device)  # noqa: E731
    variants = [("plain fp32 eager (in memory)", dict(amp=False, channels_last=False, compile_=False), mem)]
    if cuda:
        # NCHW too: what `fit` runs by default for the norms that train.channels_last: auto keeps in NCHW.
        variants.append(("bf16 autocast", dict(amp=True, channels_last=False, compile_=False), mem))
        variants.append(("bf16 autocast + channels-last", dict(amp=True, channels_last=True, compile_=False), mem))
        if not args.no_compile:
            variants.append(("bf16 + channels-last + torch.compile", dict(amp=True, channels_last=True, compile_=True), mem))
    else:
        variants.append(("channels-last", dict(amp=False, channels_last=True, compile_=False), mem))
        if cpu_has_native_bf16():
            variants.append(("bf16 autocast", dict(amp=True, channels_last=False, compile_=False), mem))
        else:  # emulated bf16 is tens of times slower: minutes of nothing to learn
            print("bf16 autocast: not timed, this CPU has no native bf16 (AVX512-BF16 or AMX)")
        if not args.no_compile:
            variants.append(("torch.compile (inductor)", dict(amp=False, channels_last=False, compile_=True), mem))
    rows = []
    for name, options, batches in variants:
        rows.append((name, options, run(params, config, device, batches(), args.steps, **options)))
    base = rows[0][2]
    tuned_name, tuned_options, tuned_fps = max(rows, key=lambda r: r[2])
    loader_fps = run(params, config, device, from_loader(images, masks, config, params, args.batch, args.workers, device),
                     args.steps, **tuned_options)
    rows.append((f"{tuned_name} + data loader ({args.workers} workers, augmentation)", tuned_options, loader_fps))
    print("\n| training step | frames/s | vs plain fp32 |\n|---|---|---|")
    for name, _, fps in rows:
        print(f"| {name} | {fps:.1f} | {fps / base:.2f}x |")
    print(f"\ntuned step: {tuned_name}; with the real loader it runs at {loader_fps / tuned_fps:.2f}x of the in-memory "
          f"step ({'loading is the bottleneck' if loader_fps < 0.9 * tuned_fps else 'loading keeps up'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
