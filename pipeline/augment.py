"""Augmentation of frame and mask together (albumentations), each transform with its
probability from ``params.yaml`` (``train.augment``); a probability of 0 leaves it out.

No vertical flip: the vertical axis of a B-mode frame is depth (skin at the top), which a
flip would turn upside down.
"""

from __future__ import annotations

import albumentations as A
import cv2

from pipeline.config import AugmentParams


def training_transform(params: AugmentParams, seed: int) -> A.Compose:
    steps: list[A.BasicTransform] = [
        A.HorizontalFlip(p=params.hflip_p),
        A.Affine(
            translate_percent=(-params.shift_limit, params.shift_limit),
            scale=(1 - params.scale_limit, 1 + params.scale_limit),
            rotate=(-params.rotate_limit, params.rotate_limit),
            shear=(-params.shear_limit, params.shear_limit),
            border_mode=cv2.BORDER_REFLECT_101,
            p=params.affine_p,
        ),
    ]
    if params.elastic_p > 0:
        # alpha/sigma relative to the working size: gentle tissue deformation, not melting.
        steps.append(A.ElasticTransform(alpha=20, sigma=6, border_mode=cv2.BORDER_REFLECT_101, p=params.elastic_p))
    if params.grid_distortion_p > 0:
        steps.append(A.GridDistortion(num_steps=5, distort_limit=0.15, border_mode=cv2.BORDER_REFLECT_101,
                                      p=params.grid_distortion_p))
    steps.append(A.RandomBrightnessContrast(brightness_limit=params.brightness_limit,
                                            contrast_limit=params.contrast_limit, p=params.brightness_contrast_p))
    if params.gamma_p > 0:
        steps.append(A.RandomGamma(gamma_limit=params.gamma_limit, p=params.gamma_p))
    if params.speckle_p > 0:
        steps.append(A.MultiplicativeNoise(multiplier=(1 - params.speckle_limit, 1 + params.speckle_limit),
                                           elementwise=True, p=params.speckle_p))
    return A.Compose(steps, seed=seed)
