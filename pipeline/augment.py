"""Augmentation of frame and mask together (albumentations)."""

from __future__ import annotations

import albumentations as A
import cv2

from pipeline.config import AugmentParams


def training_transform(params: AugmentParams, seed: int) -> A.Compose:
    return A.Compose(
        [
            A.HorizontalFlip(p=params.hflip_p),
            A.Affine(
                translate_percent=(-params.shift_limit, params.shift_limit),
                scale=(1 - params.scale_limit, 1 + params.scale_limit),
                rotate=(-params.rotate_limit, params.rotate_limit),
                border_mode=cv2.BORDER_REFLECT_101,
                p=params.affine_p,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=params.brightness_contrast_p),
        ],
        seed=seed,
    )
