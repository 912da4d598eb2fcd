"""DINO multi-crop augmentation on PIL images (the torchvision baseline path).

The recipe is the official one (``main_dino.py: DataAugmentationDINO``; the constants live in
:mod:`dino_fast.data.recipe`, shared with the DALI loader): 2 global views + N local views, each

    RandomResizedCrop (bicubic) -> flip p=0.5 -> ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8
    -> grayscale p=0.2 -> GaussianBlur sigma ~ U(0.1, 2) with p = 1.0 | 0.1 | 0.5
    -> solarize (threshold 128) p=0.2 on global view 2 only -> ImageNet normalize.

Every view first draws all of its random decisions into a :class:`ViewParams`
record, then applies exactly that record. ``__call__(img, return_params=True)``
hands the records back, so tests read the very draws that drove the pixels.
All draws come from torch's global RNG (the official code mixes torch and Python
``random``); one ``torch.manual_seed`` therefore fixes every view, and DataLoader
workers, which seed torch per worker, stay deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter, ImageOps

from dino_fast.data import recipe
from dino_fast.data.recipe import DECISIONS, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DataAugmentationDINO", "ViewTransform", "ViewParams", "IMAGENET_MEAN", "IMAGENET_STD", "DECISIONS"]



@dataclass
class ViewParams:
    """The random draws of one view; :meth:`ViewTransform.apply` uses nothing else."""

    crop: tuple[int, int, int, int]
    """(top, left, height, width) of the crop in the source image."""
    applied: dict[str, bool] = field(default_factory=dict)
    """Which of ``flip, color_jitter, grayscale, blur, solarize`` were applied."""
    jitter_order: tuple[int, ...] = (0, 1, 2, 3)
    """Order of brightness(0), contrast(1), saturation(2), hue(3) adjustments."""
    jitter_factors: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)
    """(brightness, contrast, saturation, hue) factors."""
    blur_sigma: float = 0.0
    """Gaussian blur sigma (PIL radius), drawn in recipe.BLUR_SIGMA = [0.1, 2]."""


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max) of floats, got {scale!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1 (fraction of the image area), got {scale!r}")
    return lo, hi


def _check_size(name: str, size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"{name} must be a positive int (pixels), got {size!r}")
    return size


def _check_prob(name: str, p: float) -> float:
    if not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


class ViewTransform:
    """One view's pipeline: random resized crop to ``size`` then the DINO photometric ops.

    ``sample_params`` draws every decision of the view; ``apply`` executes a record.
    The probabilities are arguments so that one class serves global 1, global 2 and
    the local views (and tests can force an op on or off).
    """

    def __init__(self, size: int, scale: Sequence[float], *, flip_p: float = recipe.FLIP_P,
                 jitter_p: float = recipe.JITTER_P, grayscale_p: float = recipe.GRAYSCALE_P,
                 blur_p: float = recipe.BLUR_P[2], solarize_p: float = recipe.SOLARIZE_P[2]) -> None:
        self.size = _check_size("size", size)
        self.scale = _check_scale("scale", scale)
        self.prob = {
            "flip": _check_prob("flip_p", flip_p),
            "color_jitter": _check_prob("jitter_p", jitter_p),
            "grayscale": _check_prob("grayscale_p", grayscale_p),
            "blur": _check_prob("blur_p", blur_p),
            "solarize": _check_prob("solarize_p", solarize_p),
        }
        # torchvision's own range handling, e.g. brightness 0.4 -> [0.6, 1.4], hue 0.1 -> [-0.1, 0.1].
        self._jitter = T.ColorJitter(brightness=recipe.BRIGHTNESS, contrast=recipe.CONTRAST,
                                     saturation=recipe.SATURATION, hue=recipe.HUE)

    def __repr__(self) -> str:
        probs = ", ".join(f"{k}={v}" for k, v in self.prob.items())
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, {probs})"

    def sample_params(self, img: Image.Image) -> ViewParams:
        """Draw all random decisions of this view (torch global RNG).

        Every uniform is drawn whether or not its op fires, so forcing one decision
        in a record never shifts the draws of the others.
        """
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(recipe.CROP_RATIO))
        u = torch.rand(len(DECISIONS))  # one uniform per decision, in application order
        applied = {name: bool(u[k] < self.prob[name]) for k, name in enumerate(DECISIONS)}
        order, b, c, s, hue = T.ColorJitter.get_params(self._jitter.brightness, self._jitter.contrast,
                                                       self._jitter.saturation, self._jitter.hue)
        sigma = float(torch.empty(1).uniform_(*recipe.BLUR_SIGMA))
        return ViewParams(crop=(i, j, h, w), applied=applied, jitter_order=tuple(int(o) for o in order),
                          jitter_factors=(b, c, s, hue), blur_sigma=sigma)

    def apply_pil(self, img: Image.Image, params: ViewParams) -> Image.Image:
        """The augmented view as a PIL image (before ToTensor/normalize)."""
        i, j, h, w = params.crop
        img = F.resized_crop(img, i, j, h, w, [self.size, self.size], interpolation=T.InterpolationMode.BICUBIC)
        if params.applied["flip"]:
            img = F.hflip(img)
        if params.applied["color_jitter"]:
            b, c, s, hue = params.jitter_factors
            adjust = (lambda x: F.adjust_brightness(x, b), lambda x: F.adjust_contrast(x, c),
                      lambda x: F.adjust_saturation(x, s), lambda x: F.adjust_hue(x, hue))
            for k in params.jitter_order:
                img = adjust[k](img)
        if params.applied["grayscale"]:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if params.applied["blur"]:
            img = img.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
        if params.applied["solarize"]:
            img = ImageOps.solarize(img, threshold=recipe.SOLARIZE_THRESHOLD)
        return img

    def apply(self, img: Image.Image, params: ViewParams) -> torch.Tensor:
        """The augmented, normalized view: float32 (3, size, size)."""
        x = F.to_tensor(self.apply_pil(img, params))
        return F.normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.apply(img, self.sample_params(img))


class DataAugmentationDINO:
    """PIL image -> list of ``2 + local_crops_number`` normalized float32 CHW views.

    Views 0 and 1 are the global crops (``global_crops_size``), the rest local
    crops (``local_crops_size``). Same arguments and defaults as the official
    class, plus the two sizes.
    """

    def __init__(self, global_crops_scale: Sequence[float] = recipe.GLOBAL_CROPS_SCALE,
                 local_crops_scale: Sequence[float] = recipe.LOCAL_CROPS_SCALE, local_crops_number: int = 8,
                 global_crops_size: int = 224, local_crops_size: int = 96) -> None:
        if isinstance(local_crops_number, bool) or not isinstance(local_crops_number, int) or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be an int >= 0, got {local_crops_number!r}")
        _check_size("global_crops_size", global_crops_size)
        _check_size("local_crops_size", local_crops_size)
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        # Names as in the official code; one ViewRecipe each (the DALI loader reads the same list).
        g1, g2, *loc = recipe.view_recipes(self.global_crops_scale, self.local_crops_scale, 1, global_crops_size,
                                           local_crops_size)
        self.global_transfo1, self.global_transfo2, self.local_transfo = (
            ViewTransform(r.size, r.scale, flip_p=r.flip_p, jitter_p=r.jitter_p, grayscale_p=r.grayscale_p,
                          blur_p=r.blur_p, solarize_p=r.solarize_p) for r in (g1, g2, loc[0]))

    @property
    def num_views(self) -> int:
        return 2 + self.local_crops_number

    def view_transforms(self) -> list[ViewTransform]:
        """The pipeline of each view, in output order."""
        return [self.global_transfo1, self.global_transfo2] + [self.local_transfo] * self.local_crops_number

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
                f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
                f"global_crops_size={self.global_crops_size}, local_crops_size={self.local_crops_size})")

    def __call__(self, img: Image.Image, return_params: bool = False
                 ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[ViewParams]]:
        """Augment one image; with ``return_params`` also return each view's :class:`ViewParams`."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"DataAugmentationDINO expects a PIL.Image.Image, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")  # grayscale / palette / RGBA sources: 3 channels for ImageNet stats
        views, records = [], []
        for vt in self.view_transforms():
            p = vt.sample_params(img)
            views.append(vt.apply(img, p))
            records.append(p)
        return (views, records) if return_params else views
