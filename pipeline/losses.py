"""Losses: soft Dice + BCE on the mask (+ optionally the Lovász hinge), BCE on presence.

Soft Dice is averaged over frames *with* a nerve only: on an empty frame the Dice of any
prediction is 0 or undefined, which would drown the signal; empty frames are handled by
the pixel BCE (which pushes their mask to zero) and by the presence head. The Lovász hinge
(Berman et al., CVPR 2018: a convex surrogate of each frame's Jaccard loss, so it works on the
outline that the per-frame Dice scores) follows the same rule.

Deep supervision (``model.deep_supervision``) adds the same mask loss on each coarser decoder
level, against the mask averaged down to that level's size (each coarse pixel's nerve coverage,
so an outline pixel is not forced to 0 or 1). As in nnU-Net the levels weigh 1, 1/2, 1/4, ...
from the finest, normalised to sum to 1, so the mask loss keeps its scale and the full-size
output keeps the largest share.
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


def _mask_loss(mask_logits: torch.Tensor, target: torch.Tensor,
               weights: LossParams) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted mask loss of one output and its parts (Dice, BCE, and Lovász when weighted)."""
    parts = {"dice_loss": soft_dice_loss(mask_logits, target),
             "bce_loss": F.binary_cross_entropy_with_logits(mask_logits.float(), target.float())}
    total = weights.dice_weight * parts["dice_loss"] + weights.bce_weight * parts["bce_loss"]
    if weights.lovasz_weight > 0:  # a sort per frame: only paid for when asked for
        parts["lovasz_loss"] = lovasz_hinge_loss(mask_logits, target)
        total = total + weights.lovasz_weight * parts["lovasz_loss"]
    return total, parts


def deep_supervision_weights(levels: int) -> list[float]:
    """Weights of the full-size output and ``levels`` coarser ones: 1, 1/2, 1/4, ... normalised."""
    raw = [0.5**level for level in range(levels + 1)]
    return [w / sum(raw) for w in raw]


def segmentation_loss(
    mask_logits: torch.Tensor,
    presence_logits: torch.Tensor,
    target: torch.Tensor,
    weights: LossParams,
    coarse_logits: list[torch.Tensor] | tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts. ``target`` is (N,1,H,W): 0/1 masks or mask coverage in [0, 1].
    ``coarse_logits``: the deep-supervision outputs, finest first, each half the size of the one before.
    The reported parts are the full-size output's; ``deep_supervision_loss`` is the coarse levels' share."""
    present = (target.flatten(1).sum(1) > 0).float()
    mask_total, parts = _mask_loss(mask_logits, target, weights)
    if coarse_logits:
        level_weights = deep_supervision_weights(len(coarse_logits))
        coarse = mask_total.new_zeros(())
        for weight, logits in zip(level_weights[1:], coarse_logits):
            # Area averaging gives each coarse pixel its nerve coverage; exact for the halving sizes here.
            coarse_target = F.adaptive_avg_pool2d(target.float(), logits.shape[-2:])
            coarse = coarse + weight * _mask_loss(logits, coarse_target, weights)[0]
        mask_total = level_weights[0] * mask_total + coarse
        parts["deep_supervision_loss"] = coarse
    parts["presence_loss"] = F.binary_cross_entropy_with_logits(presence_logits.float(), present)
    total = mask_total + weights.presence_weight * parts["presence_loss"]
    return total, {key: float(value.detach()) for key, value in parts.items()}
