"""Training in several processes on this machine: ``nerveseg stage train`` under ``torchrun``.

The flow's train task calls :func:`train_processes` when ``train.processes`` > 1. torchrun starts N
ranks of the same stage (``pipeline.train`` wraps the network in DistributedDataParallel: gloo on the
CPU, NCCL with one process per GPU; ``train.batch_size`` stays the global batch); rank 0 writes the
model and prints its result as the last JSON line. When one rank fails, torchrun stops the others and
exits non-zero; the error raised here names that rank and its exception, never a hang.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from pipeline.train import TrainResult

_ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)")
_EXCEPTION = re.compile(r"^(?:\[[^\]]*\]:?\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")


class DistributedTrainingError(RuntimeError):
    """A rank of a multi-process training failed; the message names it and its error."""


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def torchrun_command(root: Path, params_file: str, processes: int) -> list[str]:
    return [_tool("torchrun"), "--standalone", "--nproc-per-node", str(processes), "--no-python",
            _tool("nerveseg"), "stage", "train", "--project", str(root), "--params", params_file]


def backend(device: str) -> str:
    """The collective backend the ranks use (``pipeline.train`` picks it from the device)."""
    return "nccl" if device.startswith("cuda") else "gloo"


def _environment(processes: int, cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not cuda and "OMP_NUM_THREADS" not in env:
        # N ranks on the CPU share its cores; oversubscribed BLAS threads make each step slower
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def failure(lines: list[str], code: int) -> str:
    """``rank 1: IsADirectoryError: ...`` from torchrun's output, as well as it can be told."""
    text = "\n".join(lines)
    # torchrun's summary lists every rank it stopped; the one that failed first follows "Root Cause"
    cause = text.rfind("Root Cause")
    rank = _ROOT_CAUSE.findall(text[cause:] if cause >= 0 else text)
    errors = [m.group(1) for line in lines if (m := _EXCEPTION.match(line.strip()))
              and not m.group(1).startswith(("torch.distributed.elastic", "ChildFailedError"))]
    who = f"rank {rank[0]}" if rank else "a rank"
    what = errors[-1] if errors else f"exit code {code}"
    return f"distributed training failed on {who}: {what}"


def train_processes(root: Path, params_file: str, processes: int, device: str = "cpu",
                    log: Callable[[str], None] = print, tail: int = 400) -> TrainResult:
    """Run the train stage in ``processes`` ranks, forwarding their output line by line to ``log``;
    return rank 0's result. Raises :class:`DistributedTrainingError` naming the failing rank."""
    command = torchrun_command(Path(root), params_file, processes)
    lines: deque[str] = deque(maxlen=tail)
    result: dict | None = None
    with subprocess.Popen(command, cwd=root, env=_environment(processes, device.startswith("cuda")),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith("{") and '"world_size"' in line:
                try:
                    result = json.loads(line)
                    continue
                except ValueError:
                    pass
            lines.append(line)
            if line.strip():
                log(line)
        code = process.wait()
    if code != 0:
        raise DistributedTrainingError(failure(list(lines), code))
    if result is None:
        raise DistributedTrainingError(f"torchrun exited 0 but rank 0 printed no result; last lines:\n"
                                       + "\n".join(list(lines)[-20:]))
    return TrainResult(**result)
