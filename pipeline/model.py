"""The seed's U-Net with a second head for nerve presence, configurable from ``params.yaml``.

Encoder/decoder with skip connections; the presence head pools the bottleneck and says
whether a nerve is in the frame at all (58.8 % of real frames have none, and one
false-positive pixel on such a frame scores 0). Options: depth, base width, normalisation,
dropout, residual blocks, transposed-convolution or resize-convolution upsampling, and deep
supervision (a mask head on coarser decoder levels too, trained against the downsampled mask, as
nnU-Net does; used by the training loss only, never by inference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "group", "none")
UPSAMPLES = ("transpose", "resize")
# Normalisations whose networks run faster in NHWC (channels-last) than in NCHW, measured on the CPU
# (docs/decisions/0008-channels-last-by-normalisation.md; docs/benchmarks.md, "Training throughput" and
# "Inference speed"): a network of convolutions only (no norm, or batch norm folded away at inference)
# gains 1.1-1.4x; instance norm's per-frame reductions run at 0.75-0.97x in NHWC (training steps
# 0.74-0.79x), so its networks stay NCHW, as do group norm's (mixed).
CHANNELS_LAST_NORMS = frozenset({"batch", "none"})


def uses_channels_last(setting: bool | str, norm: str) -> bool:
    """``train.channels_last`` (or Predictor's ``channels_last``) resolved: ``"auto"`` follows the normalisation."""
    return norm in CHANNELS_LAST_NORMS if setting == "auto" else bool(setting)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network and feed it: frozen into the registered model.

    Fields added after the first release have defaults equal to the old behaviour, so configs
    of older registered versions still load.
    """

    depth: int
    base_width: int
    dropout: float
    height: int            # working size the network was trained at
    width: int
    intensity_mean: float  # normalisation of the 0-1 intensities, from the training frames
    intensity_std: float
    norm: str = "batch"
    residual: bool = False
    upsample: str = "transpose"
    members: int = 1       # > 1: an ensemble of that many networks of this shape (the fold models)
    deep_supervision: int = 0  # coarser decoder levels with their own mask head during training

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        # 8 channels per group at most; small widths fall back to fewer groups.
        return nn.GroupNorm(max(1, channels // 8), channels)
    return nn.Identity()


class ConvBlock(nn.Module):
    """Two 3x3 conv-norm-ReLU layers, optionally with a residual (1x1-projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, norm: str = "batch", residual: bool = False):
        super().__init__()
        bias = norm == "none"
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias),
            _norm(norm, c_out),
        )
        self.shortcut = None
        if residual:
            self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act(out)


class ResizeConv(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv: no checkerboard artefacts."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """U-Net returning ``(mask_logits (N,1,H,W), presence_logits (N,))``.

    With ``deep_supervision`` = k > 0 and in training mode it returns a third item: the mask logits
    of the k next-coarser decoder levels, ``[(N,1,H/2,W/2), (N,1,H/4,W/4), ...]``, for the loss. In
    eval mode (validation, inference, export) the extra heads are not run and the output is the
    plain pair, so nothing downstream of training knows the option exists.
    """

    def __init__(self, depth: int = 4, base_width: int = 16, dropout: float = 0.1, in_channels: int = 1,
                 norm: str = "batch", residual: bool = False, upsample: str = "transpose",
                 deep_supervision: int = 0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.norm must be one of {NORMS}, got {norm!r}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"model.upsample must be one of {UPSAMPLES}, got {upsample!r}")
        if not 0 <= deep_supervision < depth:
            raise ValueError(f"model.deep_supervision must be between 0 and model.depth - 1 = {depth - 1} "
                             f"(the decoder has {depth - 1} levels below the output), got {deep_supervision}")
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for w in widths:
            self.down.append(ConvBlock(c_in, w, norm, residual))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck_dropout = nn.Dropout2d(dropout)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_low, w_high in zip(reversed(widths[1:]), reversed(widths[:-1])):
            self.up.append(nn.ConvTranspose2d(w_low, w_high, 2, stride=2) if upsample == "transpose"
                           else ResizeConv(w_low, w_high))
            self.merge.append(ConvBlock(2 * w_high, w_high, norm, residual))
        self.mask_head = nn.Conv2d(widths[0], 1, 1)
        # aux_heads[i] reads decoder level i + 1 (half, quarter, ... of the working size).
        self.aux_heads = nn.ModuleList(nn.Conv2d(widths[level], 1, 1) for level in range(1, deep_supervision + 1))
        self.presence_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * widths[-1], 1))
        self.depth = depth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        x = self.bottleneck_dropout(x)
        # Average and max pooling: "is there a nerve anywhere" is a max-like question.
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        presence = self.presence_head(pooled).squeeze(1)
        supervise = self.training and len(self.aux_heads) > 0
        aux: list[torch.Tensor] = []
        for level, up, merge, skip in zip(range(self.depth - 1, -1, -1), self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
            if supervise and 0 < level <= len(self.aux_heads):
                aux.append(self.aux_heads[level - 1](x))
        if supervise:
            return self.mask_head(x), presence, aux[::-1]  # finest first
        return self.mask_head(x), presence


class FoldEnsemble(nn.Module):
    """Several U-Nets of one shape as one network: the mean of their probabilities, returned as
    logits (``logit(mean(sigmoid))``) so every caller of a single U-Net works unchanged."""

    def __init__(self, members: list[UNet]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [:2]: a deep-supervised member in training mode also returns its coarse outputs, which an
        # ensemble (built for inference only) has no use for.
        outputs = [member(x)[:2] for member in self.members]
        mask = torch.stack([torch.sigmoid(m.float()) for m, _ in outputs]).mean(0)
        presence = torch.stack([torch.sigmoid(p.float()) for _, p in outputs]).mean(0)
        return torch.logit(mask, eps=1e-6), torch.logit(presence, eps=1e-6)


def build_model(config: ModelConfig) -> nn.Module:
    factor = 2**config.depth
    if config.height % factor or config.width % factor:
        raise ValueError(
            f"working size {config.height}x{config.width} must be divisible by 2**depth = {factor}; "
            "change preprocess.height/width or model.depth in params.yaml"
        )
    if config.members > 1:
        return FoldEnsemble([build_model(replace(config, members=1)) for _ in range(config.members)])
    return UNet(depth=config.depth, base_width=config.base_width, dropout=config.dropout,
                norm=config.norm, residual=config.residual, upsample=config.upsample,
                deep_supervision=config.deep_supervision)
