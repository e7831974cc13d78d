"""Where and how training computes: the device, the CPU's thread count, bf16 autocast where it pays
(CUDA, or a CPU with native bf16), the channels-last layout and torch.compile. It probes and decides;
the training loop (``pipeline.train``) only follows :class:`Compute`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.model import uses_channels_last

log = logging.getLogger(__name__)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def set_threads(threads: int) -> None:
    """``train.threads`` (0: PyTorch's own choice, one per core)."""
    if threads:
        torch.set_num_threads(threads)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it PyTorch
    emulates bf16, and a convolution measured 67x *slower* than fp32 on an AVX2-only EPYC.

    oneDNN's own answer first (what the convolutions will use; a private op, so it may move
    between torch releases); where it is missing, the CPU's flags as Linux reports them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return _cpu_flags_have_bf16(Path("/proc/cpuinfo"))


def _cpu_flags_have_bf16(cpuinfo: Path) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no way to tell, and emulated bf16 is the expensive mistake
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_autocast(tp, device: torch.device, native_bf16: bool | None = None) -> bool:
    """bf16 autocast for training: always on CUDA (with ``train.amp``); on the CPU only where it
    computes bf16 natively and ``train.amp_cpu`` is ``"auto"`` or true. Emulated bf16 is many times
    slower than fp32, so a CPU without it trains in fp32 (with a warning where true asked for bf16).
    ``native_bf16`` answers for the CPU instead of asking it."""
    if not tp.amp:
        return False
    if device.type == "cuda":
        return True
    if tp.amp_cpu is False:
        return False
    if not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        if tp.amp_cpu is True:
            log.warning("train.amp_cpu is true, but this CPU has no native bf16 (AVX512-BF16 or AMX): emulated "
                        "bf16 is many times slower than fp32 (67x measured on an AVX2-only CPU), so training "
                        "runs in fp32")
        return False
    return True


def precision_name(autocast: bool) -> str:
    """What the training steps compute in, as runs record it (``TrainResult.precision``)."""
    return "bf16" if autocast else "fp32"


def compile_network(net: torch.nn.Module, tp) -> torch.nn.Module:
    """``net`` through ``torch.compile`` with ``train.compile_backend`` where ``train.compile`` asks for it."""
    return torch.compile(net, backend=tp.compile_backend) if tp.compile else net


@dataclass(frozen=True)
class Compute:
    """How one process's training steps compute: on ``device``, under bf16 autocast (``amp``) or not,
    in the NHWC layout (``channels_last``) or not."""

    device: torch.device
    amp: bool
    channels_last: bool

    @classmethod
    def for_training(cls, tp, device: torch.device, norm: str) -> "Compute":
        # NHWC on the CPU too: 1.12-1.27x faster training with batch norm (docs/benchmarks.md).
        return cls(device, use_autocast(tp, device), uses_channels_last(tp.channels_last, norm))

    @property
    def precision(self) -> str:
        return precision_name(self.amp)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network on this device, in this layout."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of frames and targets on this device, the frames in this layout."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)
