"""The DINO multi-crop augmentation recipe: the official constants (``main_dino.py:
DataAugmentationDINO``, ``utils.py``), in one place, read by both back-ends (the torchvision
transforms and the DALI loader).

Each view::

    RandomResizedCrop (bicubic) -> flip -> ColorJitter p=JITTER_P -> grayscale -> GaussianBlur -> solarize
    -> ImageNet normalize

with per-view blur / solarize probabilities (global 1, global 2, every local view).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["FLIP_P", "JITTER_P", "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE", "GRAYSCALE_P", "BLUR_SIGMA",
           "BLUR_P", "SOLARIZE_P", "SOLARIZE_THRESHOLD", "CROP_RATIO", "GLOBAL_CROPS_SCALE", "LOCAL_CROPS_SCALE",
           "IMAGENET_MEAN", "IMAGENET_STD", "LUMA", "DECISIONS", "ViewRecipe", "view_recipes"]

FLIP_P = 0.5
JITTER_P = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1  # ColorJitter(0.4, 0.4, 0.2, 0.1)
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)  # utils.GaussianBlur(radius_min, radius_max)
BLUR_P = (1.0, 0.1, 0.5)  # global 1, global 2, each local view
SOLARIZE_P = (0.0, 0.2, 0.0)  # global 1, global 2, each local view
SOLARIZE_THRESHOLD = 128  # ImageOps.solarize default: x >= 128 -> 255 - x
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range
GLOBAL_CROPS_SCALE = (0.4, 1.0)  # main_dino.py defaults
LOCAL_CROPS_SCALE = (0.05, 0.4)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Rec.601 luma: torchvision's rgb_to_grayscale and PIL's convert("L"); the contrast centre and grayscale.
LUMA = (0.299, 0.587, 0.114)

# The decisions every view draws, in the order they are applied.
DECISIONS = ("flip", "color_jitter", "grayscale", "blur", "solarize")


@dataclass(frozen=True)
class ViewRecipe:
    """One view's crop and the probability of each decision."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    flip_p: float = FLIP_P
    jitter_p: float = JITTER_P
    grayscale_p: float = GRAYSCALE_P


def view_recipes(global_crops_scale: Sequence[float], local_crops_scale: Sequence[float], local_crops_number: int,
                 global_crops_size: int, local_crops_size: int) -> tuple[ViewRecipe, ...]:
    """The recipe of each of the ``2 + local_crops_number`` views, in output order (globals first)."""
    g, loc = tuple(global_crops_scale), tuple(local_crops_scale)
    return ((ViewRecipe(global_crops_size, g, BLUR_P[0], SOLARIZE_P[0]),
             ViewRecipe(global_crops_size, g, BLUR_P[1], SOLARIZE_P[1]))
            + (ViewRecipe(local_crops_size, loc, BLUR_P[2], SOLARIZE_P[2]),) * local_crops_number)
