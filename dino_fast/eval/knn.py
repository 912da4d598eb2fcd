"""Weighted k-NN classification on frozen, l2-normalised features (DINO paper, sec. 4.1).

Each test feature votes with its k most similar train features (cosine similarity), each
vote weighted by exp(similarity / T); top-1/top-5 are read off the summed votes per class.

Train and val classes are matched by folder NAME (see
:func:`~dino_fast.eval.features.match_classes`): differing class folders are an error
unless ``allow_class_mismatch``, and a single class is an error.

Command line: ``dino-fast knn`` (:func:`main`), the official ``eval_knn.py`` flags.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from dino_fast.errors import ConfigError

__all__ = ["knn_classifier", "knn_datasets", "knn_eval", "build_parser", "main"]

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int = 20, T: float = 0.07, num_classes: int | None = None,
                   chunk: int = 512) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of the official weighted k-NN.

    Features are l2-normalised here (idempotent if they already are). Shapes: train (N, D),
    test (M, D); labels int64 (N,), (M,)."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"knn: features must be (N, D) and (M, D) with the same D, got "
                         f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if len(train_labels) != len(train_features) or len(test_labels) != len(test_features):
        raise ValueError("knn: one label per feature row is required")
    k = min(k, len(train_features))
    num_classes = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.to(train.device)
    top1 = top5 = 0
    for i in range(0, len(test), chunk):
        sim = test[i:i + chunk] @ train.T  # (m, N)
        dist, idx = sim.topk(k, dim=1)  # (m, k)
        neighbours = train_labels[idx]  # (m, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, neighbours, (dist / T).exp())
        pred = votes.argsort(dim=1, descending=True)  # (m, C)
        correct = pred == test_labels[i:i + chunk].to(pred.device).view(-1, 1)
        top1 += int(correct[:, :1].sum())
        top5 += int(correct[:, :min(5, k, num_classes)].sum())
    n = len(test)
    return 100.0 * top1 / n, 100.0 * top5 / n


def _check_knn_args(ks: Sequence[int], T: float, image_size: int, batch_size: int) -> None:
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if not ks or bad:
        raise ConfigError(f"knn: every k (--nb_knn) must be an int >= 1, got {list(ks)}")
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ConfigError(f"knn: temperature must be a positive finite number, got {T}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"knn: image_size must be a positive int, got {image_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"knn: batch_size must be a positive int, got {batch_size!r}")


def knn_datasets(train_root: str | Path, val_root: str | Path, image_size: int,
                 allow_class_mismatch: bool = False) -> tuple[Any, Any]:
    """The two labeled ImageFolder datasets with the evaluation transform (resize to
    ``image_size * 256/224``, center crop ``image_size``: the official 256 -> 224, scaled),
    classes checked and matched by name (:func:`~dino_fast.eval.features.match_classes`).
    Raises :class:`~dino_fast.errors.DataError` naming the folder or the classes."""
    from dino_fast.data.folder import ImageFolderDataset
    from dino_fast.eval.features import eval_transform, match_classes

    transform = eval_transform(resize=int(round(image_size * 256 / 224)), crop=image_size)
    train_set = ImageFolderDataset(train_root, transform=transform)
    val_set = ImageFolderDataset(val_root, transform=transform)
    match_classes(train_set, val_set, allow_class_mismatch, what="k-NN")
    return train_set, val_set


def _knn_on_datasets(backbone: torch.nn.Module, train_set: Any, val_set: Any, ks: Sequence[int], T: float,
                     batch_size: int, num_workers: int, device: torch.device,
                     cache_dir: str | Path | None, progress: bool) -> dict[int, tuple[float, float]]:
    from dino_fast.eval.features import extract_features

    feats = {}
    for split, ds in (("train", train_set), ("val", val_set)):
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        cache = Path(cache_dir) / f"features-{split}.pt" if cache_dir else None
        feats[split] = extract_features(backbone, loader, device, cache_path=cache, progress=progress)
    (tr_f, tr_l), (va_f, va_l) = feats["train"], feats["val"]
    num_classes = len(train_set.classes)  # val labels are train indices (match_classes)
    return {k: knn_classifier(tr_f, tr_l, va_f, va_l, k=k, T=T, num_classes=num_classes) for k in ks}


def knn_eval(backbone: torch.nn.Module, train_root: str | Path, val_root: str | Path, image_size: int,
             ks: Sequence[int] = (20,), T: float = 0.07, batch_size: int = 128, num_workers: int = 2,
             device: torch.device | str | None = None, cache_dir: str | Path | None = None,
             progress: bool = False, allow_class_mismatch: bool = False) -> dict[int, tuple[float, float]]:
    """Extract CLS features of ``backbone`` on two labeled ImageFolder trees and run k-NN for each k.

    See :func:`knn_datasets` for the transform and the class check (by name; one class or
    differing classes raise :class:`~dino_fast.errors.DataError` unless
    ``allow_class_mismatch``, which drops val images of classes absent from train).
    Returns {k: (top1, top5)} in percent."""
    ks = list(ks)
    _check_knn_args(ks, T, image_size, batch_size)
    if cache_dir is not None:
        from dino_fast.runlock import check_output_dir

        check_output_dir(cache_dir)
    train_set, val_set = knn_datasets(train_root, val_root, image_size, allow_class_mismatch)
    device = torch.device(device) if device else next(backbone.parameters()).device
    return _knn_on_datasets(backbone, train_set, val_set, ks, T, batch_size, num_workers, device, cache_dir,
                            progress)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``dino-fast knn`` (official eval_knn.py names)."""
    p = parser or argparse.ArgumentParser("dino-fast knn", description=__doc__.splitlines()[0],
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_weights", required=True, help="checkpoint: dino_fast, official DINO or timm")
    p.add_argument("--checkpoint_key", default="teacher", help="which model of a training checkpoint")
    p.add_argument("--data_path", default=None,
                   help="folder with train/ and val/ ImageFolder trees (official); or give --train_path and --val_path")
    p.add_argument("--train_path", default=None, help="train ImageFolder tree (instead of --data_path)")
    p.add_argument("--val_path", default=None, help="val ImageFolder tree (instead of --data_path)")
    p.add_argument("--allow_class_mismatch", action="store_true",
                   help="score val against train even when their class folders differ: labels matched by name, "
                        "val images of classes absent from train dropped with a warning")
    p.add_argument("--image_size", type=int, default=224, help="center crop; images resized to size * 256/224 first")
    p.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200], help="values of k")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    p.add_argument("--batch_size", type=int, default=128, help="images per forward during feature extraction")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--cache_dir", default=None, help="cache extracted features here and reuse them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbone runs")
    return p


def _split_paths(args: argparse.Namespace) -> tuple[str, str]:
    if args.data_path is not None:
        if args.train_path is not None or args.val_path is not None:
            raise ConfigError("knn: give either --data_path D (meaning D/train and D/val) or --train_path and "
                              "--val_path, not both")
        return os.path.join(args.data_path, "train"), os.path.join(args.data_path, "val")
    if args.train_path is None or args.val_path is None:
        missing = " and ".join(f for f, v in (("--train_path", args.train_path), ("--val_path", args.val_path))
                               if v is None)
        raise ConfigError(f"knn: {missing} missing: give --data_path D (meaning D/train and D/val) or both "
                          f"--train_path and --val_path")
    return args.train_path, args.val_path


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of ``dino-fast knn``: check the flags and the two folders (classes by name),
    load the weights, print a markdown table of top-1 / top-5 per k. Returns 0; user mistakes
    raise :class:`~dino_fast.errors.DinoFastError` subclasses (one line from the CLI)."""
    from dino_fast.eval.features import resolve_device
    from dino_fast.pretrained import load_pretrained
    from dino_fast.runlock import check_output_dir

    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    train_path, val_path = _split_paths(args)
    _check_knn_args(args.nb_knn, args.temperature, args.image_size, args.batch_size)
    if args.num_workers < 0:
        raise ConfigError(f"knn: num_workers must be >= 0, got {args.num_workers}")
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir)
    device = resolve_device(args.device)
    # Data first: a wrong folder is reported before a large checkpoint is read.
    train_set, val_set = knn_datasets(train_path, val_path, args.image_size, args.allow_class_mismatch)
    model = load_pretrained(args.pretrained_weights, key=args.checkpoint_key).to(device)
    log.info("k-NN: %d train / %d val images, %d classes", len(train_set), len(val_set), len(train_set.classes))
    res = _knn_on_datasets(model, train_set, val_set, args.nb_knn, args.temperature, args.batch_size,
                           args.num_workers, device, args.cache_dir, progress=True)
    print("| k | top-1 | top-5 |\n|---|---|---|")
    for k, (t1, t5) in res.items():
        print(f"| {k} | {t1:.2f} | {t5:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
