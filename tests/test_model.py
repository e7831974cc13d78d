import pytest
import torch

from pipeline.config import LossParams
from pipeline.losses import segmentation_loss, soft_dice_loss
from pipeline.model import ModelConfig, UNet, build_model


def test_unet_returns_mask_and_presence():
    net = UNet(depth=3, base_width=4)
    mask, presence = net(torch.randn(2, 1, 32, 48))
    assert mask.shape == (2, 1, 32, 48)
    assert presence.shape == (2,)


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
