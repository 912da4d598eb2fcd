"""ImageFolder reader with one-line failures, corrupt-image skipping, and the multi-crop collate.

The train loader itself is built by :func:`dino_fast.data.build.build_train_data` (both back-ends).

Layout: ``root/<class>/**/<image>``; class names sorted -> labels 0..C-1 (as
torchvision's ImageFolder). Problems with the folder itself fail at construction
with a :class:`DataError` naming the path; an unreadable image inside an epoch is
skipped (the next index is used instead) and reported once with a warning.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from dino_fast.errors import DataError

__all__ = ["DataError", "CorruptImageWarning", "ImageFolderDataset", "IMG_EXTENSIONS", "collate_views"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# What PIL raises on truncated, random or otherwise undecodable files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class CorruptImageWarning(UserWarning):
    """An image could not be decoded and was replaced by another sample."""


def _normalize_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str) or not extensions or not all(isinstance(e, str) and e for e in extensions):
        raise TypeError(f"extensions must be a non-empty sequence of strings like ('.jpg', '.png'), got {extensions!r}")
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def _list_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under ``folder`` (recursive, symlinks followed, sorted, hidden entries skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath) / name)
    return found


class ImageFolderDataset(Dataset):
    """Folder-per-class image dataset; ``__getitem__`` returns ``(transform(img), label)``.

    Images are decoded with PIL and converted to RGB (grayscale and palette files
    exist in real data). An undecodable file does not stop the epoch: the sample
    at the next index is returned instead, a :class:`CorruptImageWarning` names the
    file once, and the file is counted in :attr:`num_corrupt`.

    Attributes: ``root``, ``classes`` (sorted names), ``class_to_idx``, ``samples``
    (list of ``(path, label)``), ``targets`` (labels).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        self.extensions = _normalize_extensions(extensions)
        if not self.root.exists():
            raise DataError(f"data folder not found: {self.root}")
        if not self.root.is_dir():
            raise DataError(f"data path is not a directory: {self.root}")
        self.classes = sorted(e.name for e in os.scandir(self.root)
                              if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"no class folders in {self.root} (expected {self.root}/<class>/<image>)")
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        per_class = {c: _list_images(self.root / c, self.extensions) for c in self.classes}
        exts = "/".join(self.extensions)
        if not any(per_class.values()):
            raise DataError(f"no images ({exts}) found under {self.root} in any of its {len(self.classes)} "
                            f"class folders")
        empty = [c for c in self.classes if not per_class[c]]
        if empty:
            more = f" (and {len(empty) - 1} other class folders)" if len(empty) > 1 else ""
            raise DataError(f"class folder '{empty[0]}' has no images ({exts}): {self.root / empty[0]}{more}")
        self.samples: list[tuple[str, int]] = [(str(p), self.class_to_idx[c]) for c in self.classes
                                               for p in per_class[c]]
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

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of {n} samples")
        index %= n
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            try:
                img = self.load_image(path)
            except _DECODE_ERRORS as e:
                if path not in self._corrupt:
                    self._corrupt.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e}); "
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
