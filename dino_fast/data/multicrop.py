"""``DINOMultiCrop``: the official DINO multi-crop recipe as one public object, for use outside the trainer
(what lightly users reach for as ``DINOTransform``).

One object holds the recipe (global / local crop scales and sizes, the number of local crops; the
per-view probabilities and colour strengths are the constants of :mod:`dino_fast.data.recipe`), and
both back-ends are built from it::

    crops = DINOMultiCrop()                                   # the official defaults: 2 x 224 + 8 x 96
    views = crops(pil_image)                                  # torchvision: list of 10 (3, H, W) fp32 tensors
    dataset = crops.dataset("imagenet/train")                 # (views, label) samples, folder or shards
    loader = crops.dali_loader("imagenet/train", batch_size=64, device="gpu")  # ([10 x (B, 3, H, W)], labels)

The trainer builds its loader the same way (:class:`~dino_fast.data.build.TrainData`), so the recipe a
user holds is the one a training run applies.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from PIL import Image

from dino_fast.data import recipe
from dino_fast.data.recipe import ViewRecipe, view_recipes
from dino_fast.data.transforms import DataAugmentationDINO

__all__ = ["DINOMultiCrop"]


class DINOMultiCrop:
    """The DINO multi-crop augmentation (``main_dino.py: DataAugmentationDINO`` recipe): 2 global views of
    ``global_crops_size`` from ``global_crops_scale`` of the image area, ``local_crops_number`` local views
    of ``local_crops_size`` from ``local_crops_scale``; each view flipped, colour-jittered, grayscaled,
    blurred and (global view 2) solarized with the official probabilities, then ImageNet-normalized.

    ``__call__(pil_image)`` -> list of ``2 + local_crops_number`` float32 ``(3, size, size)`` tensors
    (globals first). :meth:`dali_loader` gives the same recipe as batches from NVIDIA DALI.
    """

    def __init__(self, global_crops_scale: Sequence[float] = recipe.GLOBAL_CROPS_SCALE,
                 local_crops_scale: Sequence[float] = recipe.LOCAL_CROPS_SCALE, local_crops_number: int = 8,
                 global_crops_size: int = 224, local_crops_size: int = 96) -> None:
        # Validates every argument (one clear ValueError), and is the torchvision transform itself.
        self.torchvision = DataAugmentationDINO(global_crops_scale, local_crops_scale, local_crops_number,
                                                global_crops_size, local_crops_size)
        self.global_crops_scale = self.torchvision.global_crops_scale
        self.local_crops_scale = self.torchvision.local_crops_scale
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size

    @classmethod
    def from_config(cls, cfg: Any) -> "DINOMultiCrop":
        """The recipe of a training config (official names)."""
        return cls(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number, cfg.global_crops_size,
                   cfg.local_crops_size)

    @property
    def num_views(self) -> int:
        return 2 + self.local_crops_number

    @property
    def views(self) -> tuple[ViewRecipe, ...]:
        """Each view's size, scale and probabilities, in output order (what both back-ends read)."""
        return view_recipes(self.global_crops_scale, self.local_crops_scale, self.local_crops_number,
                            self.global_crops_size, self.local_crops_size)

    def kwargs(self) -> dict[str, Any]:
        """The recipe as keyword arguments (official names)."""
        return dict(global_crops_scale=self.global_crops_scale, local_crops_scale=self.local_crops_scale,
                    local_crops_number=self.local_crops_number, global_crops_size=self.global_crops_size,
                    local_crops_size=self.local_crops_size)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return self.torchvision(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.kwargs().items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DINOMultiCrop) and self.kwargs() == other.kwargs()

    def dataset(self, data_path: str | os.PathLike) -> Any:
        """``(views, label)`` samples of an image folder or a ``dino-fast pack`` shard folder (torchvision side;
        batch them with :func:`~dino_fast.data.folder.collate_views`)."""
        from dino_fast.data.shards import open_dataset

        return open_dataset(data_path, transform=self)

    def dali_loader(self, data_path: str | os.PathLike, batch_size: int, **kwargs: Any) -> Any:
        """A :class:`~dino_fast.data.dali.DALIMultiCropLoader` of this recipe over ``data_path`` (folder or
        shards); ``kwargs``: its other arguments (``device``, ``seed``, ``shard_id``, ``num_shards``, ``dtype``...)."""
        from dino_fast.data.dali import DALIMultiCropLoader

        return DALIMultiCropLoader(data_path, batch_size, **self.kwargs(), **kwargs)
