"""One retraining run per workspace at a time: DVC's own lock and GX's file writes do not allow two.

A second run fails at once with a message naming the run that holds the lock, rather than
colliding halfway through.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.atomic import atomic_write_text

LOCK_NAME = ".nerveseg-run.lock"
HOLDER_NAME = ".nerveseg-run.holder"


class WorkspaceBusy(RuntimeError):
    """Another retraining run holds this workspace."""


@contextmanager
def exclusive_run(root: Path, label: str):
    root = Path(root)
    lock = FileLock(str(root / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = root / HOLDER_NAME
        who = holder.read_text() if holder.is_file() else "{}"
        raise WorkspaceBusy(
            f"{root}: another retraining run is in progress ({who}); runs are serialised per workspace, "
            "try again when it has finished"
        ) from None
    try:
        atomic_write_text(root / HOLDER_NAME, json.dumps({
            "run": label, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }))
        yield
    finally:
        (root / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()
