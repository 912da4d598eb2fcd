"""ImageFolder reader with one-line failures, corrupt-image skipping, and the multi-crop collate.

The train loader itself is built by :func:`dino_fast.data.build.build_train_data` (both back-ends).

Layout: ``root/<class>/**/<image>``; class names sorted -> labels 0..C-1 (as
torchvision's ImageFolder), listed by :func:`dino_fast.data.listing.list_folder` (symlink-safe,
cached index). Problems with the folder itself fail at construction with a :class:`DataError`
naming the path; an unreadable image inside an epoch is skipped (the next index is used
instead) and reported once with a warning.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dino_fast.data.listing import IMG_EXTENSIONS, CorruptImageWarning, list_folder, normalize_extensions
from dino_fast.errors import DataError

__all__ = ["DataError", "CorruptImageWarning", "ImageFolderDataset", "IMG_EXTENSIONS", "collate_views"]

# What PIL raises on truncated, random or otherwise undecodable files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageFolderDataset(Dataset):
    """Folder-per-class image dataset; ``__getitem__`` returns ``(transform(img), label)``.

    Images are decoded with PIL and converted to RGB (grayscale and palette files
    exist in real data). An undecodable file does not stop the epoch: the sample
    at the next index is returned instead, a :class:`CorruptImageWarning` names the
    file once, and the file is counted in :attr:`num_corrupt`.

    Attributes: ``root``, ``classes`` (sorted names), ``class_to_idx``, ``samples``
    (list of ``(path, label)``), ``targets`` (labels), ``skipped_links`` (links not followed).
    ``use_index=False`` always scans (no index read or written); ``rescan=True`` scans and
    rewrites the index.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS, *, use_index: bool = True, rescan: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        self.extensions = normalize_extensions(extensions)
        listing = list_folder(self.root, self.extensions, use_index=use_index, rescan=rescan)
        self.classes = listing.classes
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        self.skipped_links = listing.skipped
        exts = "/".join(self.extensions)
        if not any(listing.files):
            raise DataError(f"no images ({exts}) found under {self.root} in any of its {len(self.classes)} "
                            f"class folders")
        empty = [c for c, files in zip(self.classes, listing.files) if not files]
        if empty:
            more = f" (and {len(empty) - 1} other class folders)" if len(empty) > 1 else ""
            raise DataError(f"class folder '{empty[0]}' has no images ({exts}): {self.root / empty[0]}{more}")
        self.samples: list[tuple[str, int]] = listing.samples()
        self.targets = [label for _, label in self.samples]
        self._corrupt: set[str] = set()

    @property
    def num_corrupt(self) -> int:
        """Distinct unreadable files met so far by THIS process. With DataLoader
        workers each worker holds its own copy of the dataset, so the count lives
        per worker (and the main process's copy stays 0)."""
        return len(self._corrupt)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, classes={len(self.classes)}, "
                f"samples={len(self.samples)}, transform={self.transform!r})")

    @staticmethod
    def load_image(path: str) -> Image.Image:
        """Decode one file fully (so truncation errors surface here) as RGB."""
        with Image.open(path) as img:
            return img.convert("RGB")

    # The three ways to read sample k; a dataset over other storage (shards.ShardDataset) overrides them.
    def decode(self, k: int) -> Image.Image:
        """Sample ``k`` decoded as RGB (raises what PIL raises on a broken file)."""
        return self.load_image(self.samples[k][0])

    def read_bytes(self, k: int) -> np.ndarray:
        """Sample ``k``'s encoded bytes (uint8), for a decoder that is not PIL (DALI)."""
        return np.fromfile(self.samples[k][0], dtype=np.uint8)

    def describe(self, k: int) -> str:
        """Sample ``k`` named for a warning: its path."""
        return self.samples[k][0]

    def inspect(self, k: int, mode: str = "header") -> tuple[str | None, tuple[int, int] | None]:
        """(why sample ``k`` cannot be decoded or None, its (height, width)): :mod:`.dali_validate`."""
        from dino_fast.data.dali_validate import inspect_image_file

        return inspect_image_file(self.samples[k][0], mode)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of {n} samples")
        index %= n
        for step in range(n):
            k = (index + step) % n
            name, label = self.samples[k]
            try:
                img = self.decode(k)
            except _DECODE_ERRORS as e:
                if name not in self._corrupt:
                    self._corrupt.add(name)
                    warnings.warn(f"skipping unreadable image {self.describe(k)} ({type(e).__name__}: {e}); "
                                  f"the next sample is used instead", CorruptImageWarning, stacklevel=2)
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise DataError(f"no readable image in {self.root}: all {n} files failed to decode")


def collate_views(batch: Sequence[tuple[Sequence[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batch of ``(views, label)`` -> ``([V tensors (B, 3, H_v, W_v)], labels (B,))``.

    Views are stacked per view index, so each view's resolution may differ (global
    vs local crops) but must agree across the batch.
    """
    if not batch:
        raise ValueError("collate_views got an empty batch")
    first = batch[0][0]
    if not isinstance(first, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in first):
        raise TypeError("collate_views expects samples (list of view tensors, label), e.g. from "
                        f"DataAugmentationDINO; got a {type(first).__name__} as the first element")
    num_views = len(first)
    for views, _ in batch:
        if len(views) != num_views:
            raise ValueError(f"samples in one batch have different view counts: {num_views} and {len(views)}")
    views = [torch.stack([sample[0][v] for sample in batch]) for v in range(num_views)]
    labels = torch.tensor([int(sample[1]) for sample in batch], dtype=torch.long)
    return views, labels
