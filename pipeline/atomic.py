"""Writing a file whole or not at all: the one way the project stores state.

Every writer goes through :func:`atomic_output`: a temporary file beside the target (same file system,
so the rename is atomic), flushed and fsynced, given its mode, then renamed over the target. A reader
sees the old file or the new one, never half of one, and a crash leaves at most a hidden ``.tmp`` file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _default_mode() -> int:
    """What ``open()`` would give a new file: 0o666 less the umask (mkstemp's own 0o600 would hide
    reports and data from the team's other accounts)."""
    try:  # Linux states the umask without changing it; os.umask would, for every thread at once
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the folder's entry: without this a power cut may forget it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: Path | str, mode: int | None = None, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, the file written
    there is fsynced, given ``mode`` (default: as ``open()`` would) and renamed to ``path``. On error it is removed and ``path`` is
    untouched. ``suffix`` keeps an extension that a writer insists on (``np.savez`` adds ``.npz``,
    matplotlib picks the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all (see :func:`atomic_output`)."""
    with atomic_output(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all; ``mode`` (e.g. 0o600 for a file only its
    owner may read) is set before the file gets its name."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)
