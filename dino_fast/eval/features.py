"""Frozen-backbone feature extraction for evaluation (k-NN, linear probe), with
an optional on-disk cache, and the deterministic evaluation transform.

Features follow the official DINO evaluation code (``eval_linear.py``): the CLS
token of the last block, or the CLS tokens of the last ``n_last_blocks`` blocks
concatenated, optionally with the average of the last block's patch tokens
(``avgpool_patchtokens``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from dino_fast.data.recipe import IMAGENET_MEAN, IMAGENET_STD  # the one definition
from dino_fast.errors import ConfigError, DataError
from dino_fast.precision import autocast, resolve_compute_dtype

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "backbone_features", "extract_features",
           "feature_cache_key", "weights_digest", "match_classes", "resolve_n_last_blocks", "resolve_device"]

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


def eval_transform(resize: int = 256, crop: int = 224):
    """The official deterministic evaluation transform: Resize(``resize``, bicubic)
    of the shorter side -> CenterCrop(``crop``) -> ToTensor -> ImageNet normalize.

    Smaller sizes (e.g. ``resize=36, crop=32``) suit small-image datasets."""
    from torchvision import transforms

    if not (isinstance(resize, int) and isinstance(crop, int)) or resize <= 0 or crop <= 0:
        raise ValueError(f"eval_transform: resize and crop must be positive ints, got resize={resize!r}, crop={crop!r}")
    if crop > resize:
        raise ValueError(f"eval_transform: crop ({crop}) is larger than the resized shorter side ({resize})")
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def backbone_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int | None = None,
                      avgpool: bool = False) -> torch.Tensor:
    """Frozen features of one batch, as the official ``eval_linear.py`` builds them.

    ``n_last_blocks=None`` and ``avgpool=False``: ``model(images)``, the normed CLS
    token (B, D). Otherwise the CLS tokens of the last ``n`` blocks (each normed)
    concatenated (B, n*D); with ``avgpool`` the mean of the last block's patch
    tokens is added (B, (n+1)*D). For n == 1 the official code interleaves CLS and
    average channel by channel ([cls_0, avg_0, cls_1, avg_1, ...]); that order is
    kept so that the official released linear heads load. (The official code
    cannot combine avgpool with n > 1; here the average is then appended.)"""
    if n_last_blocks is None and not avgpool:
        return model(images)
    n = 1 if n_last_blocks is None else int(n_last_blocks)
    if n < 1:
        raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    if not hasattr(model, "get_intermediate_layers"):
        raise TypeError(f"{type(model).__name__} has no get_intermediate_layers(); n_last_blocks/avgpool need a ViT backbone")
    layers = model.get_intermediate_layers(images, n)  # n x (B, N, D), each normed
    out = torch.cat([x[:, 0] for x in layers], dim=-1)  # (B, n*D)
    if avgpool:
        avg = layers[-1][:, 1:].mean(dim=1)  # (B, D)
        if n == 1:
            out = torch.stack((out, avg), dim=-1).reshape(out.shape[0], -1)  # official interleaved order
        else:
            out = torch.cat((out, avg), dim=-1)
    return out


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... +{len(names) - limit} more' if len(names) > limit else ''}]"


def match_classes(train_set: Any, val_set: Any, allow_mismatch: bool = False, what: str = "evaluation") -> list[str]:
    """Check that two labeled folder datasets (``classes``, ``class_to_idx``, ``samples``,
    ``targets``, ``root``: :class:`~dino_fast.data.folder.ImageFolderDataset`) can be scored
    against each other, matching classes by NAME, not by index.

    Raises :class:`DataError` when the train set has fewer than 2 classes (a k-NN or a linear
    probe on one class scores 100 % and means nothing) and, unless ``allow_mismatch``, when
    the class names differ (naming the classes only in train and only in val).

    With ``allow_mismatch`` the val set is relabeled IN PLACE to the train set's indices:
    images of val classes absent from train are dropped (they could never be predicted, and
    scoring them as wrong would mix "unknown class" into the accuracy) with a warning that
    names them; train classes absent from val stay as candidates. Returns the dropped val
    class names. Raises :class:`DataError` when no val class is a train class."""
    train_classes, val_classes = list(train_set.classes), list(val_set.classes)
    train_root, val_root = getattr(train_set, "root", "train"), getattr(val_set, "root", "val")
    if len(train_classes) < 2:
        raise DataError(f"{what}: {train_root} has only one class folder ({_names(train_classes)}); classifying "
                        f"into one class always scores 100% and means nothing: it needs at least 2 classes")
    if train_classes == val_classes:
        return []
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    if not allow_mismatch:
        diff = ", ".join(f"only in {split} {_names(names)}" for split, names in (("train", only_train),
                                                                                ("val", only_val)) if names)
        raise DataError(f"{what}: the class folders of {train_root} and {val_root} differ (labels are matched by "
                        f"folder name): {diff}; make them the same, or pass --allow_class_mismatch to drop val "
                        f"images of classes not in train")
    to_train = {k: train_set.class_to_idx[c] for k, c in enumerate(val_classes) if c in train_set.class_to_idx}
    if not to_train:
        raise DataError(f"{what}: no class folder of {val_root} is a class of {train_root} (train classes "
                        f"{_names(train_classes)}, val classes {_names(val_classes)})")
    kept = [(p, to_train[y]) for p, y in val_set.samples if y in to_train]
    n_dropped = len(val_set.samples) - len(kept)
    val_set.samples = kept
    val_set.targets = [y for _, y in kept]
    val_set.classes = train_classes
    val_set.class_to_idx = dict(train_set.class_to_idx)
    if only_val:
        log.warning("%s: --allow_class_mismatch: dropped %d val images of %d classes not in train %s; scoring %d "
                    "val images", what, n_dropped, len(only_val), _names(only_val), len(kept))
    if only_train:
        log.info("%s: %d train classes have no val images: %s", what, len(only_train), _names(only_train))
    return only_val


def resolve_n_last_blocks(model: nn.Module, n_last_blocks: int | None) -> int:
    """``None`` -> min(4, depth) (the official 4, capped for shallow backbones); an explicit
    value must lie in 1..depth, else :class:`ConfigError` naming the depth."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"n_last_blocks needs a ViT backbone with .blocks, got {type(model).__name__}")
    depth = len(blocks)
    if n_last_blocks is None:
        return min(4, depth)
    if isinstance(n_last_blocks, bool) or not isinstance(n_last_blocks, int) or not 1 <= n_last_blocks <= depth:
        raise ConfigError(f"n_last_blocks={n_last_blocks!r} but the backbone has {depth} blocks: choose 1..{depth} "
                          f"(default min(4, depth) = {min(4, depth)})")
    return n_last_blocks


def resolve_device(name: str | torch.device) -> torch.device:
    """``--device`` as a torch.device; :class:`ConfigError` for a malformed name or a CUDA
    device this machine does not have."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def weights_digest(model: nn.Module) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dataset_identity(dataset: Any) -> dict[str, Any]:
    """What identifies a dataset's content for the cache: its file list (with
    labels) when it exposes one (ImageFolder ``samples``/``imgs``, or ``files``),
    its transform's repr, its class and length."""
    files = None
    for attr in ("samples", "imgs", "files"):
        if hasattr(dataset, attr):
            files = [list(s) if isinstance(s, tuple) else s for s in getattr(dataset, attr)]
            files = [[str(x) for x in s] if isinstance(s, list) else str(s) for s in files]
            break
    if files is None:
        log.warning("feature cache: %s exposes no file list (samples/imgs/files); the cache key uses its "
                    "class, length and repr only", type(dataset).__name__)
    return {
        "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "len": len(dataset) if hasattr(dataset, "__len__") else None,
        "files": files,
        "transform": repr(getattr(dataset, "transform", None)),
        "repr": None if files is not None else repr(dataset),
    }


def feature_cache_key(model: nn.Module, loader: Iterable, options: dict[str, Any]) -> str:
    """Hash of the model weights, the dataset (file list, transform) and the options."""
    dataset = getattr(loader, "dataset", None)
    ident = {
        "version": _CACHE_VERSION,
        "weights": weights_digest(model),
        "dataset": _dataset_identity(dataset) if dataset is not None else repr(loader),
        "options": options,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _load_cache(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt cache is recomputed, not fatal
        log.warning("feature cache %s unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None
    if not isinstance(blob, dict) or blob.get("key") != key:
        log.info("feature cache %s is stale (weights, data, transform or options changed); recomputing", path)
        return None
    log.info("feature cache hit: %s", path)
    return blob["features"], blob["labels"]


def _save_cache(path: Path, key: str, features: torch.Tensor, labels: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save({"key": key, "features": features, "labels": labels}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device | str,
                     n_last_blocks: int | None = None, avgpool: bool = False,
                     cache_path: str | os.PathLike | None = None, compute_dtype: torch.dtype | None = None,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every batch ``(images, labels)`` of ``loader``.

    Returns ``(features (N, F) float32, labels (N,) int64)`` on the CPU, in loader
    order. ``compute_dtype`` is the compute dtype (a training run passes its own): None means
    ``precision.resolve_compute_dtype("auto", device)`` (bf16 autocast on CUDA and on AMX CPUs, fp32 elsewhere);
    ``torch.float32`` disables autocast. With ``cache_path`` the
    result is stored there and reused while the model weights, the dataset's file
    list and transform, and these options are unchanged (the loader must then be
    deterministic: no random augmentation, no shuffling)."""
    device = torch.device(device)
    if compute_dtype is None:
        compute_dtype = resolve_compute_dtype("auto", device)
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"extract_features: dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    options = {"n_last_blocks": n_last_blocks, "avgpool": bool(avgpool), "dtype": str(compute_dtype),
               "device_type": device.type}
    key = None
    if cache_path is not None:
        cache_path = Path(cache_path)
        key = feature_cache_key(model, loader, options)
        hit = _load_cache(cache_path, key)
        if hit is not None:
            return hit

    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        from tqdm import tqdm

        it = tqdm(loader, desc="features", disable=not progress, leave=False)
        for batch in it:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise TypeError("extract_features: the loader must yield (images, labels) batches, got "
                                f"{type(batch).__name__}")
            images, target = batch[0], batch[1]
            images = images.to(device, non_blocking=True)
            with autocast(compute_dtype, device):
                f = backbone_features(model, images, n_last_blocks, avgpool)
            # Host copy per batch: a dataset's features (ImageNet: millions x n*D) would not
            # fit next to the model in GPU memory; evaluation is not the training hot loop.
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(target).to(dtype=torch.long).cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    features = torch.cat(feats)
    all_labels = torch.cat(labels)
    if cache_path is not None:
        _save_cache(cache_path, key, features, all_labels)
    return features, all_labels
