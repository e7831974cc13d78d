"""Reading and writing frames and masks (8-bit grayscale), with atomic writes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.atomic import atomic_write_bytes


class ImageReadError(ValueError):
    """A file that should be a frame or mask could not be decoded; ``reason`` says why, in words."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def read_gray(path: Path | str) -> np.ndarray:
    """Read an 8-bit single-channel image; colour images are converted to gray."""
    from pipeline.decode_errors import opencv_log_silenced, why_undecodable

    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise ImageReadError(f"{path}: no such file", "no such file")
    with opencv_log_silenced():  # the reason goes into the error, not libtiff's lines onto the terminal
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        reason = why_undecodable(data.tobytes(), path.name)
        raise ImageReadError(f"{path}: not a readable image (PNG, JPEG or TIFF expected): {reason}", reason)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if image.dtype != np.uint8:
        raise ImageReadError(f"{path}: expected 8-bit pixels, found {image.dtype}",
                             f"expected 8-bit pixels, found {image.dtype}")
    return image


def write_image(path: Path | str, image: np.ndarray) -> None:
    """Write PNG/TIFF/JPEG by suffix, whole or not at all."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise OSError(f"{path}: could not encode image")
    atomic_write_bytes(path, encoded.tobytes())
