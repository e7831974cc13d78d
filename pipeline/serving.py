"""The served model's request and answer forms (docs/decisions/0019-compact-serving-form.md).

- **tensor** (as before): uint8 frames ``(N, H, W)`` or ``(H, W)``; masks ``(N, H, W)`` uint8 in {0, 1}.
- **image**: a column ``image`` of encoded frames (PNG, TIFF or JPEG), base64 text in JSON or bytes in
  process; frames of different sizes may share a request.
- answers chosen by the ``output`` parameter: ``tensor``, ``png`` (base64 text of an 8-bit PNG, 0 or
  255) or ``rle`` (the competition's run-length encoding, ``pipeline.rle``); ``auto`` (the default)
  answers in the form of the request: ``tensor`` for frames, ``png`` for images.

Over HTTP the compact forms move ~0.3 MB of base64 per native frame, where the tensor form moves
243,600 JSON numbers each way: their encoding, not the network, was most of a request's time.
"""

from __future__ import annotations

import base64
import binascii

import cv2
import numpy as np

IMAGE_COLUMN = "image"
OUTPUT_PARAM = "output"
OUTPUTS = ("auto", "tensor", "png", "rle")


def bad_request(message: str) -> Exception:
    """An MlflowException the scoring server answers with HTTP 400 and this message (any other error
    becomes a generic "unexpected error")."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def output_form(params: dict | None, images: bool) -> str:
    value = (params or {}).get(OUTPUT_PARAM) or "auto"
    if value not in OUTPUTS:
        raise bad_request(f"params.{OUTPUT_PARAM} must be one of {', '.join(OUTPUTS)}; got {value!r}")
    if value == "auto":
        return "png" if images else "tensor"
    return value


def image_values(model_input) -> list | None:
    """The encoded frames of an image-form request, or None for the tensor form.

    Accepts a DataFrame with an ``image`` column (``dataframe_split`` / ``dataframe_records``) or a
    mapping ``{"image": [...]}`` (``{"inputs": {"image": [...]}}``)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input[IMAGE_COLUMN].tolist() if IMAGE_COLUMN in model_input.columns else None
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        values = model_input[IMAGE_COLUMN]
        if isinstance(values, (str, bytes)):
            values = [values]
        return np.asarray(values, dtype=object).reshape(-1).tolist()
    return None


def tensor_frames(model_input) -> np.ndarray:
    """The tensor form's frames, checked as the former uint8 TensorSpec checked them: integers 0..255."""
    from pipeline.inference import as_frames

    if isinstance(model_input, dict):  # a named tensor, {"inputs": {"frames": [...]}}
        model_input = next(iter(model_input.values()))
    if hasattr(model_input, "to_numpy"):
        model_input = model_input.to_numpy()
    try:
        frames = np.asarray(model_input)
    except ValueError as error:  # ragged nested lists
        raise bad_request(f"frames must form an (N, H, W) or (H, W) array: {error}") from None
    if frames.dtype != np.uint8 and not (np.issubdtype(frames.dtype, np.integer) or frames.dtype == bool):
        raise bad_request(f"frames must be 8-bit integers (uint8, 0..255); got {frames.dtype} values. "
                          f"Send encoded images in a column {IMAGE_COLUMN!r} instead (base64 PNG or TIFF).")
    try:
        return as_frames(frames)
    except ValueError as error:
        raise bad_request(str(error)) from None


def decode_image(value, index: int) -> np.ndarray:
    """One encoded frame (base64 text or raw bytes) -> an 8-bit grayscale frame."""
    from pipeline.decode_errors import opencv_log_silenced, why_undecodable

    if isinstance(value, str):
        try:
            data = base64.b64decode(value)  # newlines of a wrapped `base64` are skipped
        except (binascii.Error, ValueError) as error:
            raise bad_request(f"image {index}: not base64 text ({error})") from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise bad_request(f"image {index}: expected base64 text or bytes, got {type(value).__name__}")
    with opencv_log_silenced():  # the reason goes into the answer, not the server's log
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None:
        raise bad_request(f"image {index}: not a readable image (PNG, TIFF or JPEG expected): "
                          f"{why_undecodable(data)}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise bad_request(f"image {index}: expected 8-bit grayscale pixels, found {image.dtype} "
                          f"of shape {image.shape}")
    return image


def predict_images(predictor, values: list) -> list[np.ndarray]:
    """Masks for encoded frames, in request order; frames of one size go through the network together."""
    if not values:
        raise bad_request(f"the column {IMAGE_COLUMN!r} holds no image")
    frames = [decode_image(value, i) for i, value in enumerate(values)]
    masks: list[np.ndarray | None] = [None] * len(frames)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, frame in enumerate(frames):
        by_shape.setdefault(frame.shape, []).append(i)
    for indices in by_shape.values():
        for i, mask in zip(indices, predictor.predict(np.stack([frames[i] for i in indices]))):
            masks[i] = mask
    return masks


def encode_png(mask: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", (mask > 0).astype(np.uint8) * 255)  # as `nerveseg predict` writes
    if not ok:
        raise RuntimeError("could not encode a mask as PNG")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def answer(masks, output: str):
    """Masks in the chosen form: an (N, H, W) array, or a list of N strings."""
    if output == "tensor":
        if isinstance(masks, np.ndarray):
            return masks
        if len({m.shape for m in masks}) > 1:
            raise bad_request("frames of different sizes cannot be answered as one tensor: "
                              f"ask for params.{OUTPUT_PARAM} png or rle")
        return np.stack(masks)
    if output == "png":
        return [encode_png(m) for m in masks]
    from pipeline.rle import rle_encode

    return [rle_encode(m) for m in masks]


def encode_image(frame: np.ndarray, ext: str = ".png") -> str:
    """A frame as base64 text of a PNG (or ``.tif``) file: what a client sends in the ``image`` column."""
    ok, encoded = cv2.imencode(ext, frame)
    if not ok:
        raise ValueError(f"could not encode a frame as {ext}")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def decode_png_answer(text: str) -> np.ndarray:
    """A ``png`` answer back to a {0, 1} mask (clients and tests)."""
    image = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_GRAYSCALE)
    return (image > 0).astype(np.uint8)
