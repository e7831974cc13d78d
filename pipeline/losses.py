"""Losses: soft Dice + BCE on the mask, BCE on presence.

Soft Dice is averaged over frames *with* a nerve only: on an empty frame the Dice of any
prediction is 0 or undefined, which would drown the signal; empty frames are handled by
the pixel BCE (which pushes their mask to zero) and by the presence head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import LossParams


def soft_dice_loss(mask_logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(mask_logits.float()).flatten(1)
    target = target.float().flatten(1)
    positive = target.sum(1) > 0
    if not positive.any():
        return mask_logits.sum() * 0.0  # keeps the graph; nothing to score
    prob, target = prob[positive], target[positive]
    dice = (2 * (prob * target).sum(1) + eps) / (prob.sum(1) + target.sum(1) + eps)
    return 1.0 - dice.mean()


def segmentation_loss(
    mask_logits: torch.Tensor,
    presence_logits: torch.Tensor,
    target: torch.Tensor,
    weights: LossParams,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts. ``target`` is (N,1,H,W): 0/1 masks or mask coverage in [0, 1]."""
    present = (target.flatten(1).sum(1) > 0).float()
    dice = soft_dice_loss(mask_logits, target)
    bce = F.binary_cross_entropy_with_logits(mask_logits.float(), target.float())
    presence = F.binary_cross_entropy_with_logits(presence_logits.float(), present)
    total = weights.dice_weight * dice + weights.bce_weight * bce + weights.presence_weight * presence
    parts = {"dice_loss": dice, "bce_loss": bce, "presence_loss": presence}
    return total, {key: float(value.detach()) for key, value in parts.items()}
