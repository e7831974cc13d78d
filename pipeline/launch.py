"""Training in several processes on this machine: ``nerveseg stage train`` under ``torchrun``.

The flow's train task calls :func:`train_processes` when ``train.processes`` > 1. torchrun starts N
ranks of the same stage (``pipeline.distributed`` joins them and wraps the network in DistributedDataParallel:
gloo on the CPU, NCCL with one process per GPU; ``train.batch_size`` stays the global batch); rank 0 writes the
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
_ROOT_SIGNAL = re.compile(r"traceback\s*:\s*(Signal \d+ \(\w+\) received by PID \d+)")
_ROOT_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")
_EXCEPTION = re.compile(r"^(?:\[[^\]]*\]:?\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")
# A rank's traceback after it joined the process group: torch prefixes each line with "[rankN]: ".
_RANK_LINE = re.compile(r"^\[rank(\d+)\]: ?(.*)$")
# The exception line of a traceback, at the start of its line ("  File ..." and rich's boxes are not).
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b")
# Where a traceback's parts begin: none of them continues an exception's message.
_TRACEBACK_PART = ("Traceback (most recent call last)", "During handling of the above exception",
                   "The above exception was the direct cause", "\u2502", "\u256d", "\u2570")
# What a rank raises when a peer's process ended under it (gloo/NCCL lost the connection, the group timed out):
# a consequence of another rank's failure, never its cause.
_PEER_LOST = re.compile(r"^(?:[\w.]*\.)?Dist(?:Backend|Network|Store)?Error\b|gloo|nccl|ProcessGroup|"
                        r"Connection (?:closed|reset) by peer|Broken pipe|remote worker crash", re.IGNORECASE)


class DistributedTrainingError(RuntimeError):
    """A rank of a multi-process training failed; the message names it and its error."""


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def torchrun_command(root: Path, params_file: str, processes: int) -> list[str]:
    return [_tool("torchrun"), "--standalone", "--nproc-per-node", str(processes), "--no-python",
            _tool("nerveseg"), "stage", "train", "--project", str(root), "--params", params_file]


def _environment(processes: int, cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    # Plain tracebacks from the ranks: their lines go to a log, and rich's 80-column boxes would also fold
    # each exception's message over several lines (and long paths in the middle).
    env.setdefault("TYPER_STANDARD_TRACEBACK", "1")
    if not cuda and "OMP_NUM_THREADS" not in env:
        # N ranks on the CPU share its cores; oversubscribed BLAS threads make each step slower
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def _rank_errors(lines: list[str]) -> dict[int, str]:
    """The exception each rank raised last, its whole message (rich wraps a long one over several lines),
    keyed by rank in the order the ranks printed them."""
    errors: dict[int, str] = {}
    open_rank: dict[int, bool] = {}  # rank -> its last exception's message may go on in its next line
    for line in lines:
        m = _RANK_LINE.match(line)
        if not m:
            continue
        rank, text = int(m.group(1)), m.group(2)
        if _RAISED.match(text):
            errors.pop(rank, None)  # keep the order of each rank's last exception
            errors[rank], open_rank[rank] = text.strip(), True
        elif open_rank.get(rank) and text.strip() and not text.startswith((" ", *_TRACEBACK_PART)):
            errors[rank] += " " + text.strip()
        else:
            open_rank[rank] = False
    return errors


def peer_lost(error: str) -> bool:
    """Whether ``error`` is what a rank raises when another rank's process ended under it."""
    return bool(_PEER_LOST.search(error))


def failure(lines: list[str], code: int) -> str:
    """``rank 1: IsADirectoryError: ...`` from torchrun's output, as well as it can be told.

    The rank that failed first is the one whose error is its own: when one rank dies, its peers waiting
    in a collective raise a communication error of their own (gloo's "Connection closed by peer"), and
    under load torchrun may see that one exit in the same poll, or print it last. So each rank's last
    exception is read from its own "[rankN]: " lines; a communication error counts only when no rank
    has another; torchrun's "Root Cause" breaks ties."""
    text = "\n".join(lines)
    # torchrun's summary lists every rank it stopped; the one it saw fail first follows "Root Cause"
    cause = text.rfind("Root Cause")
    summary = text[cause:] if cause >= 0 else ""
    found = _ROOT_CAUSE.findall(summary or text)
    root = int(found[0]) if found else None
    by_rank = _rank_errors(lines)
    own = [rank for rank, error in by_rank.items() if not peer_lost(error)]
    rank = (root if root in own else own[0]) if own else (root if root is not None else next(iter(by_rank), None))
    if rank in by_rank:
        what = by_rank[rank]
    else:  # it failed before joining the group (no prefix): the exceptions printed, the rank's own first
        errors = [m.group(1).strip() for line in lines if not _RANK_LINE.match(line)
                  and (m := _EXCEPTION.match(line.strip()))
                  and not m.group(1).startswith(("torch.distributed.elastic", "ChildFailedError"))]
        mine = [e for e in errors if not peer_lost(e)] or errors
        if mine:
            what = mine[-1]
        else:  # no exception at all (killed, say): how torchrun saw it end
            signal, exit_code = _ROOT_SIGNAL.search(summary), _ROOT_EXIT.search(summary)
            what = signal.group(1) if signal else f"exit code {exit_code.group(1) if exit_code else code}"
    who = f"rank {rank}" if rank is not None else "a rank"
    return f"distributed training failed on {who}: {what}"


def train_processes(root: Path, params_file: str, processes: int, device: str = "cpu",
                    log: Callable[[str], None] = print, tail: int = 2000) -> TrainResult:
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
