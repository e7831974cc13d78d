"""Losses: soft Dice + BCE on the mask (+ optionally the Lovász hinge), BCE on presence.

Soft Dice is averaged over frames *with* a nerve only: on an empty frame the Dice of any
prediction is 0 or undefined, which would drown the signal; empty frames are handled by
the pixel BCE (which pushes their mask to zero) and by the presence head. The Lovász hinge
(Berman et al., CVPR 2018: a convex surrogate of each frame's Jaccard loss, so it works on the
outline that the per-frame Dice scores) follows the same rule.
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


def lovasz_hinge_loss(mask_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the frames with a nerve of the Lovász hinge on that frame's pixels.

    Each frame's pixel errors ``1 - logit * sign`` are sorted, largest first, and weighted by the
    gradient of the Jaccard loss along that order, which is what makes the sum a tight convex
    extension of 1 - IoU. Coverage targets (``train.soft_targets``) count as nerve at 0.5 and above.
    """
    logits = mask_logits.float().flatten(1)
    labels = (target.float().flatten(1) >= 0.5).float()
    positive = labels.sum(1) > 0
    if not positive.any():
        return mask_logits.sum() * 0.0
    logits, labels = logits[positive], labels[positive]
    errors = 1.0 - logits * (2.0 * labels - 1.0)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    gt_sorted = torch.gather(labels, 1, order)
    total = gt_sorted.sum(1, keepdim=True)
    jaccard = 1.0 - (total - gt_sorted.cumsum(1)) / (total + (1.0 - gt_sorted).cumsum(1))
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (F.relu(errors_sorted) * grad).sum(1).mean()


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
    if weights.lovasz_weight > 0:  # a sort per frame: only paid for when asked for
        parts["lovasz_loss"] = lovasz_hinge_loss(mask_logits, target)
        total = total + weights.lovasz_weight * parts["lovasz_loss"]
    return total, {key: float(value.detach()) for key, value in parts.items()}
