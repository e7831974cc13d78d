"""Native frame in, native mask out: resize, normalise, network, presence rule,
post-processing (largest blob, convex hull, small-mask removal), resize back.

This is the one inference path: evaluation, the registered MLflow model and
``nerveseg predict`` all go through :class:`Predictor`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.model import ModelConfig, build_model, uses_channels_last

BUNDLE_WEIGHTS = "model.pt"
BUNDLE_CONFIG = "model_config.json"
BUNDLE_POSTPROCESS = "postprocess.json"


@dataclass(frozen=True)
class Postprocess:
    """Thresholds frozen into the registered model."""

    mask_threshold: float = 0.5
    presence_threshold: float = 0.5
    min_area: int = 0  # native pixels
    largest_component: bool = False  # keep only the largest blob (a nerve mask is one blob)
    tta_hflip: bool = False          # average the network over the frame and its mirror image
    convex_hull: bool = False        # fill each blob out to its convex hull (annotators draw convex outlines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_params(cls, params) -> "Postprocess":
        """The rules as ``params.yaml``'s ``postprocess`` section sets them (by name, so a new rule
        cannot be dropped by a positional call)."""
        return cls(**{f.name: getattr(params, f.name) for f in fields(cls)})


def fuse_conv_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm that follows a convolution into that convolution (eval only).

    Same outputs up to rounding, one layer less per pair (on an idle 2-core CPU it made no
    measurable difference; channels-last did: docs/benchmarks.md). Works on a copy; the trained
    model is left as it is.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Sequential):
            layers = list(module)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], torch.nn.Conv2d) and isinstance(layers[i + 1], torch.nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(layers[i], layers[i + 1])
                    module[i + 1] = torch.nn.Identity()
    return model


class Predictor:
    """``fuse`` folds BatchNorm into the convolutions; ``channels_last`` uses NHWC tensors
    (``"auto"``: where the network's normalisation runs faster in NHWC, as ``train.channels_last``)."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, post: Postprocess, device: str = "cpu",
                 fuse: bool = True, channels_last: bool | str = "auto"):
        self.device = torch.device(device)
        # Module.to and .eval change a module in place: serve a copy (fuse_conv_bn makes its own), so the
        # caller's model (a training loop's, mid-fit) keeps its device, its train/eval mode and its layout.
        self.model = (fuse_conv_bn(model) if fuse else copy.deepcopy(model)).to(self.device).eval()
        self.fused = fuse
        self.channels_last = uses_channels_last(channels_last, config.norm)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.config = config
        self.post = post

    @classmethod
    def from_bundle(cls, bundle_dir: Path | str, device: str = "cpu", fuse: bool = True,
                    channels_last: bool | str = "auto") -> "Predictor":
        """Load ``model.pt`` + ``model_config.json`` + ``postprocess.json`` from a folder.

        Weights are read with ``weights_only=True``: no arbitrary object is unpickled.
        """
        bundle_dir = Path(bundle_dir)
        config = ModelConfig(**json.loads((bundle_dir / BUNDLE_CONFIG).read_text()))
        post = Postprocess(**json.loads((bundle_dir / BUNDLE_POSTPROCESS).read_text()))
        model = build_model(config)
        model.load_state_dict(torch.load(bundle_dir / BUNDLE_WEIGHTS, map_location=device, weights_only=True))
        return cls(model, config, post, device, fuse=fuse, channels_last=channels_last)

    def _to_input(self, frames: np.ndarray) -> torch.Tensor:
        c = self.config
        small = np.stack([cv2.resize(f, (c.width, c.height), interpolation=cv2.INTER_AREA) for f in frames])
        x = (small.astype(np.float32) / 255.0 - c.intensity_mean) / c.intensity_std
        x = torch.from_numpy(x)[:, None].to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def probabilities(self, frames: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(N,H,W) uint8 native frames -> working-size mask probabilities (N,h,w) and presence (N,)."""
        frames = as_frames(frames)
        probs, presence = [], []
        for start in range(0, len(frames), batch_size):
            x = self._to_input(frames[start : start + batch_size])
            prob, pres = self._network(x)
            if self.post.tta_hflip:
                flipped_prob, flipped_pres = self._network(x.flip(-1))
                prob, pres = (prob + flipped_prob.flip(-1)) / 2, (pres + flipped_pres) / 2
            probs.append(prob[:, 0].cpu().numpy())
            presence.append(pres.cpu().numpy())
        return np.concatenate(probs), np.concatenate(presence)

    def _network(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            mask_logits, presence_logits = self.model(x)
        return torch.sigmoid(mask_logits.float()), torch.sigmoid(presence_logits.float())

    def masks_from_probabilities(self, probs: np.ndarray, presence: np.ndarray, shape: tuple[int, int],
                                 post: Postprocess | None = None) -> np.ndarray:
        """Apply the presence rule and post-processing, at native size. Returns (N,H,W) uint8 {0,1}."""
        return postprocess_masks(probs, presence, shape, post or self.post)

    def predict(self, frames: np.ndarray) -> np.ndarray:
        frames = as_frames(frames)
        probs, presence = self.probabilities(frames)
        return self.masks_from_probabilities(probs, presence, frames.shape[1:])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected blob of a {0,1} mask (all of it when there is one or none)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == keep).astype(mask.dtype)


def convex_hulls(mask: np.ndarray) -> np.ndarray:
    """Each blob of a {0,1} mask filled out to its convex hull (holes filled too). The real masks
    are single, nearly convex outlines (area / hull area 0.97 on average); a network's edge is
    ragged where the image is ambiguous."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros(mask.shape, dtype=np.uint8)
    for contour in contours:
        cv2.fillPoly(out, [cv2.convexHull(contour)], 1)
    return out.astype(mask.dtype)


def postprocess_masks(probs: np.ndarray, presence: np.ndarray, shape: tuple[int, int],
                      post: Postprocess) -> np.ndarray:
    """Working-size probabilities (N,h,w) and presence (N,) -> native-size masks (N,H,W) uint8 {0,1}:
    the presence rule, resize, threshold, then the shape rules of ``post`` in a fixed order
    (largest blob, convex hull, minimum area)."""
    height, width = shape
    out = np.zeros((len(probs), height, width), dtype=np.uint8)
    for i, (prob, p) in enumerate(zip(probs, presence)):
        if p < post.presence_threshold:
            continue
        native = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
        mask = (native > post.mask_threshold).astype(np.uint8)
        if post.largest_component:
            mask = largest_component(mask)
        if post.convex_hull:
            mask = convex_hulls(mask)
        if post.min_area and mask.sum() < post.min_area:
            continue
        out[i] = mask
    return out


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

    from pipeline.atomic import atomic_write_text

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, bundle_dir / BUNDLE_WEIGHTS)
    atomic_write_text(bundle_dir / BUNDLE_CONFIG, json.dumps(config.to_dict(), indent=2))
    atomic_write_text(bundle_dir / BUNDLE_POSTPROCESS, json.dumps(post.to_dict(), indent=2))
    return bundle_dir
