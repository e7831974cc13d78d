import pytest
import torch
import torch.nn.functional as F

from pipeline.config import LossParams
from pipeline.losses import deep_supervision_weights, lovasz_hinge_loss, segmentation_loss, soft_dice_loss
from pipeline.model import ModelConfig, UNet, build_model


def test_working_size_must_fit_the_depth():
    config = ModelConfig(depth=4, base_width=4, dropout=0.0, height=40, width=48, intensity_mean=0.5,
                         intensity_std=0.2)
    with pytest.raises(ValueError, match="divisible"):
        build_model(config)


def test_loss_on_frames_without_nerve_is_finite_and_trains_presence():
    net = UNet(depth=2, base_width=4)
    x = torch.randn(3, 1, 16, 16)
    empty = torch.zeros(3, 1, 16, 16)
    mask, presence = net(x)
    loss, parts = segmentation_loss(mask, presence, empty, LossParams())
    assert torch.isfinite(loss)
    assert parts["dice_loss"] == 0.0  # Dice is not defined on empty frames: left to BCE and presence
    loss.backward()
    assert net.presence_head[1].weight.grad.abs().sum() > 0


def test_soft_dice_rewards_overlap():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    good = (target * 20 - 10)
    bad = -good
    assert soft_dice_loss(good, target) < 0.05 < 0.9 < soft_dice_loss(bad, target)


def _lovasz_one_frame(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference implementation of Berman et al. for one frame, written out step by step."""
    signs = 2 * labels - 1
    errors = 1 - logits * signs
    errors_sorted, perm = torch.sort(errors, descending=True)
    gt_sorted = labels[perm]
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return torch.dot(torch.relu(errors_sorted), jaccard)


def test_lovasz_hinge_matches_the_reference_and_skips_frames_without_nerve():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 12, 16, generator=gen)
    target = (torch.rand(4, 1, 12, 16, generator=gen) > 0.7).float()
    target[2] = 0  # an empty frame: no Jaccard to lose, left to BCE and presence like the Dice
    expected = torch.stack([_lovasz_one_frame(logits[i].flatten(), target[i].flatten()) for i in (0, 1, 3)]).mean()
    assert lovasz_hinge_loss(logits, target) == pytest.approx(float(expected), rel=1e-5)
    perfect = target * 20 - 10  # every pixel on the right side of the margin
    assert lovasz_hinge_loss(perfect, target) == 0.0
    assert lovasz_hinge_loss(logits, torch.zeros_like(target)) == 0.0

    # Off by default (no sort paid for); with a weight it joins the total and the logged parts.
    net = UNet(depth=2, base_width=4)
    mask, presence = net(torch.randn(2, 1, 16, 16))
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:10, 4:10] = 1
    plain, parts = segmentation_loss(mask, presence, target, LossParams())
    assert "lovasz_loss" not in parts
    with_lovasz, parts = segmentation_loss(mask, presence, target, LossParams(lovasz_weight=0.5))
    assert float(with_lovasz.detach()) == pytest.approx(float(plain.detach()) + 0.5 * parts["lovasz_loss"], rel=1e-5)
    # The hinge alone trains the mask head (Dice and BCE would give it gradients anyway).
    mask, _ = net(torch.randn(2, 1, 16, 16))
    lovasz_hinge_loss(mask, target).backward()
    assert net.mask_head.weight.grad.abs().sum() > 0


def test_deep_supervision_adds_coarse_mask_heads_in_training_only():
    net = UNet(depth=3, base_width=4, deep_supervision=2)
    x = torch.randn(2, 1, 32, 48)
    mask, presence, coarse = net.train()(x)
    assert mask.shape == (2, 1, 32, 48) and presence.shape == (2,)
    assert [c.shape for c in coarse] == [(2, 1, 16, 24), (2, 1, 8, 12)]  # finest first
    outputs = net.eval()(x)  # validation, inference and export see the plain network
    assert len(outputs) == 2 and outputs[0].shape == (2, 1, 32, 48) and outputs[1].shape == (2,)
    plain = UNet(depth=3, base_width=4).train()(x)  # off: the plain pair, no third item
    assert [o.shape for o in plain] == [(2, 1, 32, 48), (2,)]
    with pytest.raises(ValueError, match=r"model.deep_supervision must be between 0 and model.depth - 1 = 2"):
        UNet(depth=3, base_width=4, deep_supervision=3)


def test_deep_supervision_loss_scores_each_level_against_the_mask_coverage():
    assert deep_supervision_weights(0) == [1.0]
    assert deep_supervision_weights(2) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    net = UNet(depth=3, base_width=4, deep_supervision=2).train()
    target = torch.zeros(2, 1, 32, 48)
    target[0, :, 8:21, 10:30] = 1  # odd edges: the coarse targets hold fractional coverage
    mask, presence, coarse = net(torch.randn(2, 1, 32, 48))
    loss, parts = segmentation_loss(mask, presence, target, LossParams(), coarse)
    plain, plain_parts = segmentation_loss(mask, presence, target, LossParams())
    assert "deep_supervision_loss" not in plain_parts
    # The full-size parts are reported as without the option; the total reweighs them with the coarse levels.
    assert parts["dice_loss"] == plain_parts["dice_loss"] and parts["bce_loss"] == plain_parts["bce_loss"]
    half = F.avg_pool2d(target, 2)
    assert 0 < half[half > 0].min() < 1
    expected_coarse = sum(w * float((soft_dice_loss(c, t) + F.binary_cross_entropy_with_logits(c, t)).detach())
                          for w, c, t in zip([2 / 7, 1 / 7], coarse, [half, F.avg_pool2d(target, 4)]))
    assert parts["deep_supervision_loss"] == pytest.approx(expected_coarse, rel=1e-5)
    full = parts["dice_loss"] + parts["bce_loss"]
    assert float(loss.detach()) == pytest.approx(4 / 7 * full + expected_coarse + 0.5 * parts["presence_loss"], rel=1e-5)
    loss.backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in net.aux_heads)
