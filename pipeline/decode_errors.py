"""Why a file does not decode, in words, and keeping the decoders' own messages off the terminal.

OpenCV returns ``None`` for a file it cannot decode and prints its reason (libtiff's through its
log, libpng's straight to file descriptor 2) where no report keeps it. :func:`why_undecodable`
says what is wrong from the bytes (empty, not an image, a TIFF cut short, ...), with Pillow's
message as a fallback; :func:`quiet_decoders` silences OpenCV's log and catches what C
libraries write to fd 2 while files are decoded, passing on any line that is not a decoder's.
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import cv2

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_BIGTIFF_MAGIC = (b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_KIND_OF_SUFFIX = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
# TIFF field types -> byte size, for the tags read here (SHORT, LONG, LONG8)
_TYPE_SIZE = {3: 2, 4: 4, 16: 8}
_STRIP_TAGS = {273: "offsets", 279: "counts", 324: "offsets", 325: "counts"}  # strips or tiles
# What libpng, libjpeg, libtiff and OpenCV's log write: dropped; any other line is passed on.
_DECODER_LINE = re.compile(
    rb"^(libpng (error|warning)|libtiff|TIFF|Corrupt JPEG|Premature end of JPEG|Invalid JPEG|"
    rb"Not a JPEG|Bogus |Unsupported JPEG|\[ ?(ERROR|WARN|INFO|DEBUG):)"
)


def _hex(data: bytes, n: int = 4) -> str:
    return " ".join(f"{b:02X}" for b in data[:n])


def why_undecodable(data: bytes | None, name: str = "", read_error: str = "") -> str:
    """A short reason why ``data`` (the bytes of the file ``name``) did not decode."""
    if data is None:
        return f"cannot be read: {read_error}" if read_error else "cannot be read"
    if not data:
        return "empty file (0 bytes)"
    expected = _KIND_OF_SUFFIX.get(os.path.splitext(name)[1].lower())
    if data[:4] in _TIFF_MAGIC:
        return _tiff_reason(data) or _pillow_reason(data) or f"OpenCV cannot decode this TIFF ({len(data):,} bytes)"
    if data[:4] in _BIGTIFF_MAGIC:
        return "a BigTIFF, which OpenCV does not read"
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        kind = "PNG" if data.startswith(_PNG_MAGIC) else "JPEG"
        named = f" (named .{name.rsplit('.', 1)[-1]})" if expected and expected != kind else ""
        if kind == "PNG" and data[12:16] != b"IHDR":
            return f"damaged PNG{named}: no header chunk (IHDR) after the signature ({len(data):,} bytes)"
        return f"damaged {kind}{named}: " + (_pillow_reason(data) or f"OpenCV cannot decode it ({len(data):,} bytes)")
    what = f"not a {expected}" if expected else "not a TIFF, PNG or JPEG image"
    return f"{what} (starts with bytes {_hex(data)}; {len(data):,} bytes)"


def _tiff_reason(data: bytes) -> str | None:
    """What is cut short in a classic TIFF: its header, first directory or pixel data (else None)."""
    size = len(data)
    if size < 8:
        return f"truncated: {size} bytes, shorter than a TIFF header (8 bytes)"
    end = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(end + "I", data[4:8])[0]
    if ifd < 8 or ifd + 2 > size:
        return (f"truncated or damaged TIFF: its image directory is at byte {ifd:,}, "
                f"past the end of the file ({size:,} bytes)")
    (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
    if ifd + 2 + 12 * count > size:
        return (f"truncated TIFF: the image directory at byte {ifd:,} has {count} entries, "
                f"but the file ends at byte {size:,}")
    arrays: dict[str, list[int]] = {"offsets": [], "counts": []}
    for i in range(count):
        tag, typ, n = struct.unpack(end + "HHI", data[ifd + 2 + 12 * i: ifd + 10 + 12 * i])
        if tag not in _STRIP_TAGS or typ not in _TYPE_SIZE:
            continue
        width = _TYPE_SIZE[typ]
        field = data[ifd + 10 + 12 * i: ifd + 14 + 12 * i]
        start = None if n * width <= 4 else struct.unpack(end + "I", field)[0]
        raw = field[: n * width] if start is None else data[start: start + n * width]
        if len(raw) < n * width:
            return f"truncated TIFF: its strip table (at byte {start:,}) lies past the end of the file ({size:,} bytes)"
        fmt = {2: "H", 4: "I", 8: "Q"}[width]
        arrays[_STRIP_TAGS[tag]] = list(struct.unpack(f"{end}{n}{fmt}", raw))
    ends = [o + c for o, c in zip(arrays["offsets"], arrays["counts"])]
    if ends and max(ends) > size:
        return f"truncated TIFF: its pixel data runs to byte {max(ends):,}, but the file ends at byte {size:,}"
    return None


def _pillow_reason(data: bytes) -> str | None:
    """Pillow's message for what it cannot read, without its object reprs; None if Pillow reads it."""
    try:
        import warnings

        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Exception as exc:  # noqa: BLE001 (any failure is a reason)
        text = re.sub(r"\s*<[^>]*>", "", str(exc)).strip() or type(exc).__name__
        return text if text != "cannot identify image file" else "Pillow cannot identify it either"
    return None


# --------------------------------------------------------------------------------------------
# Keeping the decoders quiet
# --------------------------------------------------------------------------------------------
_lock = threading.Lock()
_log_depth = 0
_log_level_before = None
_fd_depth = 0
_fd_state: dict = {}


@contextmanager
def opencv_log_silenced() -> Iterator[None]:
    """OpenCV's log (where libtiff's TIFF_Error lines go) off inside the block. Thread-safe and
    nestable: the level is restored when the last block ends. Cheap enough to use per file."""
    global _log_depth, _log_level_before
    with _lock:
        if _log_depth == 0:
            _log_level_before = cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _log_depth += 1
    try:
        yield
    finally:
        with _lock:
            _log_depth -= 1
            if _log_depth == 0 and _log_level_before is not None:
                cv2.utils.logging.setLogLevel(_log_level_before)


@contextmanager
def quiet_decoders() -> Iterator[None]:
    """:func:`opencv_log_silenced`, and file descriptor 2 caught while the block runs (libpng writes
    there directly); afterwards every caught line that is not a decoder's is written to it. Python's
    ``sys.stderr`` (progress bars) keeps writing to the terminal meanwhile. Thread-safe, nestable."""
    with opencv_log_silenced():
        _catch_fd2()
        try:
            yield
        finally:
            _release_fd2()


def _catch_fd2() -> None:
    global _fd_depth
    with _lock:
        _fd_depth += 1
        if _fd_depth > 1:
            return
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 (a daemon): nothing to catch
            return
        capture = tempfile.TemporaryFile()
        os.dup2(capture.fileno(), 2)
        state = {"saved": saved, "capture": capture, "stderr": None, "ours": None}
        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            on_fd2 = False  # a test runner's stream: not affected by fd 2 anyway
        if on_fd2:
            state["stderr"] = sys.stderr
            state["ours"] = sys.stderr = os.fdopen(
                os.dup(saved), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                errors=getattr(sys.stderr, "errors", None) or "backslashreplace")
        _fd_state.update(state)


def _release_fd2() -> None:
    global _fd_depth
    with _lock:
        _fd_depth -= 1
        if _fd_depth > 0 or not _fd_state:
            return
        state = dict(_fd_state)
        _fd_state.clear()
        if state["ours"] is not None:
            try:
                state["ours"].close()
            finally:
                if sys.stderr is state["ours"]:  # unless someone replaced it meanwhile
                    sys.stderr = state["stderr"]
        os.dup2(state["saved"], 2)
        os.close(state["saved"])
        capture = state["capture"]
        capture.seek(0)
        kept = [line for line in capture.read().splitlines(keepends=True) if not _DECODER_LINE.match(line)]
        capture.close()
        if kept:
            os.write(2, b"".join(kept))
