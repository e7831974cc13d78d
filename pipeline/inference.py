"""Native frame in, native mask out: resize, normalise, network, presence rule,
post-processing (small-component removal), resize back.

This is the one inference path: evaluation, the registered MLflow model and
``nerveseg predict`` all go through :class:`Predictor`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.model import ModelConfig, build_model

BUNDLE_WEIGHTS = "model.pt"
BUNDLE_CONFIG = "model_config.json"
BUNDLE_POSTPROCESS = "postprocess.json"


@dataclass(frozen=True)
class Postprocess:
    """Thresholds frozen into the registered model."""

    mask_threshold: float = 0.5
    presence_threshold: float = 0.5
    min_area: int = 0  # native pixels

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, post: Postprocess, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.post = post

    @classmethod
    def from_bundle(cls, bundle_dir: Path | str, device: str = "cpu") -> "Predictor":
        """Load ``model.pt`` + ``model_config.json`` + ``postprocess.json`` from a folder.

        Weights are read with ``weights_only=True``: no arbitrary object is unpickled.
        """
        bundle_dir = Path(bundle_dir)
        config = ModelConfig(**json.loads((bundle_dir / BUNDLE_CONFIG).read_text()))
        post = Postprocess(**json.loads((bundle_dir / BUNDLE_POSTPROCESS).read_text()))
        model = build_model(config)
        model.load_state_dict(torch.load(bundle_dir / BUNDLE_WEIGHTS, map_location=device, weights_only=True))
        return cls(model, config, post, device)

    def _to_input(self, frames: np.ndarray) -> torch.Tensor:
        c = self.config
        small = np.stack([cv2.resize(f, (c.width, c.height), interpolation=cv2.INTER_AREA) for f in frames])
        x = (small.astype(np.float32) / 255.0 - c.intensity_mean) / c.intensity_std
        return torch.from_numpy(x)[:, None].to(self.device)

    @torch.inference_mode()
    def probabilities(self, frames: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(N,H,W) uint8 native frames -> working-size mask probabilities (N,h,w) and presence (N,)."""
        frames = as_frames(frames)
        probs, presence = [], []
        for start in range(0, len(frames), batch_size):
            mask_logits, presence_logits = self.model(self._to_input(frames[start : start + batch_size]))
            probs.append(torch.sigmoid(mask_logits)[:, 0].cpu().numpy())
            presence.append(torch.sigmoid(presence_logits).cpu().numpy())
        return np.concatenate(probs), np.concatenate(presence)

    def masks_from_probabilities(self, probs: np.ndarray, presence: np.ndarray, shape: tuple[int, int],
                                 post: Postprocess | None = None) -> np.ndarray:
        """Apply the presence rule and post-processing, at native size. Returns (N,H,W) uint8 {0,1}."""
        post = post or self.post
        height, width = shape
        out = np.zeros((len(probs), height, width), dtype=np.uint8)
        for i, (prob, p) in enumerate(zip(probs, presence)):
            if p < post.presence_threshold:
                continue
            native = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
            mask = (native > post.mask_threshold).astype(np.uint8)
            if post.min_area and mask.sum() < post.min_area:
                continue
            out[i] = mask
        return out

    def predict(self, frames: np.ndarray) -> np.ndarray:
        frames = as_frames(frames)
        probs, presence = self.probabilities(frames)
        return self.masks_from_probabilities(probs, presence, frames.shape[1:])


def as_frames(frames) -> np.ndarray:
    """Accept one (H,W) frame or a (N,H,W) stack of 8-bit frames."""
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected frames of shape (N, H, W) or (H, W), got {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("frame values must lie in 0..255")
        arr = arr.astype(np.uint8)
    return arr


def write_bundle(bundle_dir: Path, weights: Path, config: ModelConfig, post: Postprocess) -> Path:
    """Gather what the registered model needs into one folder."""
    import shutil

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, bundle_dir / BUNDLE_WEIGHTS)
    (bundle_dir / BUNDLE_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
    (bundle_dir / BUNDLE_POSTPROCESS).write_text(json.dumps(post.to_dict(), indent=2))
    return bundle_dir
