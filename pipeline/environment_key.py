"""The environment a model is trained in, as part of "nothing changed".

Two runs on the same data, settings and code still train different models when the resolved
dependency set (a new torch, a new numpy), the device or the precision differ. So the key that
decides whether a scheduled run may skip retraining carries the environment too: the lock file's
digest, the installed torch, the Python version, and the device kind and precision that training
would use here.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_FILE = "requirements.lock"


@dataclass(frozen=True)
class EnvironmentKey:
    lock_digest: str     # sha256 of requirements.lock (first 16 hex), "none" without one
    torch: str           # the installed torch, e.g. 2.13.0+cpu
    python: str          # e.g. 3.11.7
    device: str          # cpu, or cuda and the GPU's name
    precision: str       # what training computes in here: bf16 or fp32

    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        """The run's and version's tags: the digest and each part, so a changed key says what changed."""
        return {"env.digest": self.digest(), **{f"env.{k}": v for k, v in asdict(self).items()}}

    @staticmethod
    def changes(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
        """``torch 2.13.0 -> 2.14.1`` for each part that differs between two sets of ``tags()``."""
        keys = [k for k in current if k != "env.digest"]
        return [f"{k.removeprefix('env.')} {recorded.get(k) or '(not recorded)'} -> {current[k]}"
                for k in keys if recorded.get(k) != current[k]]


def lock_digest(root: Path) -> str:
    lock = Path(root) / LOCK_FILE
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else "none"


def environment_key(root: Path, train) -> EnvironmentKey:
    """The key here and now; ``train`` is the run's :class:`pipeline.config.TrainParams`."""
    import torch

    from pipeline.devices import pick_device, precision_name, use_autocast

    device = pick_device(train.device)
    kind = f"cuda {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    return EnvironmentKey(lock_digest=lock_digest(root), torch=torch.__version__, python=platform.python_version(),
                          device=kind, precision=precision_name(use_autocast(train, device)))
