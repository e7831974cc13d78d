"""The seed's U-Net with a second head for nerve presence.

Encoder/decoder with skip connections; the presence head pools the bottleneck and says
whether a nerve is in the frame at all (58.8 % of real frames have none, and one
false-positive pixel on such a frame scores 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network and feed it: frozen into the registered model."""

    depth: int
    base_width: int
    dropout: float
    height: int            # working size the network was trained at
    width: int
    intensity_mean: float  # normalisation of the 0-1 intensities, from the training frames
    intensity_std: float

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net returning ``(mask_logits (N,1,H,W), presence_logits (N,))``."""

    def __init__(self, depth: int = 4, base_width: int = 16, dropout: float = 0.1, in_channels: int = 1):
        super().__init__()
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for w in widths:
            self.down.append(_conv_block(c_in, w))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck_dropout = nn.Dropout2d(dropout)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_low, w_high in zip(reversed(widths[1:]), reversed(widths[:-1])):
            self.up.append(nn.ConvTranspose2d(w_low, w_high, 2, stride=2))
            self.merge.append(_conv_block(2 * w_high, w_high))
        self.mask_head = nn.Conv2d(widths[0], 1, 1)
        self.presence_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * widths[-1], 1))
        self.depth = depth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.mask_head(x), presence


def build_model(config: ModelConfig) -> UNet:
    factor = 2**config.depth
    if config.height % factor or config.width % factor:
        raise ValueError(
            f"working size {config.height}x{config.width} must be divisible by 2**depth = {factor}; "
            "change preprocess.height/width or model.depth in params.yaml"
        )
    return UNet(depth=config.depth, base_width=config.base_width, dropout=config.dropout)
