"""Weighted k-NN classification on frozen, l2-normalised features (DINO paper, sec. 4.1).

Each test feature votes with its k most similar train features (cosine similarity), each
vote weighted by exp(similarity / T); top-1/top-5 are read off the summed votes per class.

Train and val classes are matched by folder NAME (see
:func:`~dino_fast.eval.features.match_classes`): differing class folders are an error
unless ``allow_class_mismatch``, and a single class is an error.

Command line: ``dino-fast knn`` (:func:`main`) takes ``eval_knn.py`` command lines unchanged:
every official flag with its official type and default (``--dump_features`` / ``--load_features``
write and read the official ``trainfeat.pth`` / ``testfeat.pth`` / ``trainlabels.pth`` /
``testlabels.pth``; ``--use_cuda`` keeps the features on the GPU for the vote). What differs: the
architecture is read off the weights (``--arch`` / ``--patch_size`` are checked, see
:func:`~dino_fast.eval.flags.check_arch`), nothing is downloaded (``--pretrained_weights`` is
needed unless ``--load_features``), one process on ``--device`` (``--dist_url`` / ``--local_rank``
accepted and ignored), and the result is a markdown table.
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

__all__ = ["knn_classifier", "knn_datasets", "knn_features", "knn_eval", "build_parser", "main", "FEATURE_FILES"]

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


def knn_features(backbone: torch.nn.Module, train_set: Any, val_set: Any, batch_size: int, num_workers: int,
                 device: torch.device, cache_dir: str | Path | None = None, progress: bool = False,
                 compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """``(train_features, test_features, train_labels, test_labels)`` as official ``eval_knn.py``'s
    ``extract_feature_pipeline`` returns them: l2-normalised CLS features (CPU, fp32) and int64
    labels. ``compute_dtype``: the backbone's compute dtype (None: ``precision auto``: bf16 on CUDA and AMX CPUs, fp32 elsewhere)."""
    from dino_fast.eval.features import extract_features

    out = {}
    for split, ds in (("train", train_set), ("val", val_set)):
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
        cache = Path(cache_dir) / f"features-{split}.pt" if cache_dir else None
        out[split] = extract_features(backbone, loader, device, cache_path=cache, progress=progress, compute_dtype=compute_dtype)
    (tr_f, tr_l), (va_f, va_l) = out["train"], out["val"]
    return F.normalize(tr_f, dim=1, p=2), F.normalize(va_f, dim=1, p=2), tr_l, va_l


def knn_eval(backbone: torch.nn.Module, train_root: str | Path, val_root: str | Path, image_size: int,
             ks: Sequence[int] = (20,), T: float = 0.07, batch_size: int = 128, num_workers: int = 2,
             device: torch.device | str | None = None, cache_dir: str | Path | None = None,
             progress: bool = False, allow_class_mismatch: bool = False,
             compute_dtype: torch.dtype | None = None) -> dict[int, tuple[float, float]]:
    """Extract CLS features of ``backbone`` on two labeled ImageFolder trees and run k-NN for each k.

    See :func:`knn_datasets` for the transform and the class check (by name; one class or
    differing classes raise :class:`~dino_fast.errors.DataError` unless
    ``allow_class_mismatch``, which drops val images of classes absent from train). ``compute_dtype``:
    the compute dtype of the forward (a training run passes its own; None: bf16 on CUDA, fp32
    elsewhere). Returns {k: (top1, top5)} in percent."""
    ks = list(ks)
    _check_knn_args(ks, T, image_size, batch_size)
    if cache_dir is not None:
        from dino_fast.runlock import check_output_dir

        check_output_dir(cache_dir)
    train_set, val_set = knn_datasets(train_root, val_root, image_size, allow_class_mismatch)
    device = torch.device(device) if device else next(backbone.parameters()).device
    tr_f, va_f, tr_l, va_l = knn_features(backbone, train_set, val_set, batch_size, num_workers, device, cache_dir,
                                          progress, compute_dtype)
    num_classes = len(train_set.classes)  # val labels are train indices (match_classes)
    return {k: knn_classifier(tr_f, tr_l, va_f, va_l, k=k, T=T, num_classes=num_classes) for k in ks}


# --------------------------------------------------------------------------- command line
FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")  # official names
_SCRIPT = "eval_knn.py"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``dino-fast knn``: every official eval_knn.py flag (marked in -h), then ours."""
    from dino_fast.eval.flags import add_distributed_flags, add_model_flags, add_precision_flag, bool_flag, official

    p = parser or argparse.ArgumentParser("dino-fast knn", description=__doc__.splitlines()[0],
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o = p.add_argument_group("official eval_knn.py flags")
    o.add_argument("--batch_size_per_gpu", "--batch_size", dest="batch_size_per_gpu", default=128, type=int,
                   help=official("images per forward during feature extraction", _SCRIPT))
    o.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help=official("values of k", _SCRIPT))
    o.add_argument("--temperature", default=0.07, type=float, help=official("vote weight exp(similarity / T)", _SCRIPT))
    o.add_argument("--pretrained_weights", default="", type=str,
                   help=official("weights: dino_fast checkpoint (file or folder), official DINO, released or timm; "
                                 "needed unless --load_features (nothing is downloaded)", _SCRIPT))
    o.add_argument("--use_cuda", default=True, type=bool_flag,
                   help=official("keep the features on the GPU for the vote (with --device cuda)", _SCRIPT))
    add_model_flags(o, _SCRIPT)
    o.add_argument("--dump_features", default=None,
                   help=official("write the official trainfeat/testfeat/trainlabels/testlabels.pth here", _SCRIPT))
    o.add_argument("--load_features", default=None,
                   help=official("read those four files from here instead of extracting features", _SCRIPT))
    o.add_argument("--num_workers", default=10, type=int, help=official("DataLoader worker processes", _SCRIPT))
    add_distributed_flags(o, _SCRIPT)
    o.add_argument("--data_path", default="/path/to/imagenet/", type=str,
                   help=official("folder with train/ and val/ ImageFolder trees; or --train_path and --val_path",
                                 _SCRIPT))
    p.add_argument("--train_path", default=None, help="train ImageFolder tree (instead of --data_path)")
    p.add_argument("--val_path", default=None, help="val ImageFolder tree (instead of --data_path)")
    p.add_argument("--allow_class_mismatch", action="store_true",
                   help="score val against train even when their class folders differ: labels matched by name, "
                        "val images of classes absent from train dropped with a warning")
    p.add_argument("--image_size", type=int, default=224, help="center crop; images resized to size * 256/224 first")
    p.add_argument("--cache_dir", default=None, help="cache extracted features here and reuse them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbone runs")
    add_precision_flag(p)
    return p


_OFFICIAL_DATA_PATH = "/path/to/imagenet/"


def _split_paths(args: argparse.Namespace) -> tuple[str, str]:
    given = args.data_path not in (None, _OFFICIAL_DATA_PATH)
    if args.train_path is None and args.val_path is None:
        return os.path.join(args.data_path, "train"), os.path.join(args.data_path, "val")
    if given:
        raise ConfigError("knn: give either --data_path D (meaning D/train and D/val) or --train_path and "
                          "--val_path, not both")
    if args.train_path is None or args.val_path is None:
        missing = " and ".join(f for f, v in (("--train_path", args.train_path), ("--val_path", args.val_path))
                               if v is None)
        raise ConfigError(f"knn: {missing} missing: give --data_path D (meaning D/train and D/val) or both "
                          f"--train_path and --val_path")
    return args.train_path, args.val_path


def _load_features(folder: str) -> tuple[torch.Tensor, ...]:
    """The four official feature files of ``--load_features``, read safely and checked."""
    from dino_fast.safe_load import torch_load_safe

    missing = [f for f in FEATURE_FILES if not (Path(folder) / f).is_file()]
    if missing:
        raise ConfigError(f"knn: --load_features {folder}: no {', '.join(missing)} there (written by "
                          f"--dump_features, official or ours)")
    try:
        tr_f, va_f, tr_l, va_l = (torch_load_safe(Path(folder) / f) for f in FEATURE_FILES)
    except Exception as e:
        raise ConfigError(f"knn: --load_features {folder}: unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not all(isinstance(t, torch.Tensor) for t in (tr_f, va_f, tr_l, va_l)) or tr_f.ndim != 2 or va_f.ndim != 2 \
            or tr_l.shape != tr_f.shape[:1] or va_l.shape != va_f.shape[:1] or tr_f.shape[1] != va_f.shape[1]:
        raise ConfigError(f"knn: --load_features {folder}: expected features (N, D), (M, D) and labels (N,), (M,)")
    return tr_f.float(), va_f.float(), tr_l.long(), va_l.long()


def _dump_features(folder: str, tensors: Sequence[torch.Tensor]) -> None:
    from dino_fast.checkpoint import atomic_torch_save

    for name, t in zip(FEATURE_FILES, tensors):
        atomic_torch_save(t.cpu(), Path(folder) / name)
    log.info("k-NN: features and labels written to %s (%s)", folder, ", ".join(FEATURE_FILES))


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of ``dino-fast knn``: check the flags and the two folders (classes by name),
    load the weights, print a markdown table of top-1 / top-5 per k. Returns 0; user mistakes
    raise :class:`~dino_fast.errors.DinoFastError` subclasses (one line from the CLI)."""
    from dino_fast.eval.features import resolve_device
    from dino_fast.eval.flags import check_arch, check_single_process
    from dino_fast.precision import resolve_compute_dtype
    from dino_fast.runlock import check_output_dir

    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    check_single_process(args, "knn")
    _check_knn_args(args.nb_knn, args.temperature, args.image_size, args.batch_size_per_gpu)
    if args.num_workers < 0:
        raise ConfigError(f"knn: num_workers must be >= 0, got {args.num_workers}")
    for folder in (args.cache_dir, args.dump_features):
        if folder is not None:
            check_output_dir(folder)
    device = resolve_device(args.device)
    if args.load_features:
        tr_f, va_f, tr_l, va_l = _load_features(args.load_features)
        num_classes = None
    else:
        if not args.pretrained_weights:
            raise ConfigError("knn: --pretrained_weights is needed (the official script would download the released "
                              "weights; dino_fast never downloads), or --load_features DIR")
        train_path, val_path = _split_paths(args)
        # Data first: a wrong folder is reported before a large checkpoint is read.
        train_set, val_set = knn_datasets(train_path, val_path, args.image_size, args.allow_class_mismatch)
        from dino_fast.pretrained import load_pretrained

        model = load_pretrained(args.pretrained_weights, key=args.checkpoint_key).to(device)
        check_arch(model, args.arch, args.patch_size, "knn")
        log.info("k-NN: %d train / %d val images, %d classes", len(train_set), len(val_set), len(train_set.classes))
        tr_f, va_f, tr_l, va_l = knn_features(model, train_set, val_set, args.batch_size_per_gpu, args.num_workers,
                                              device, args.cache_dir, True, resolve_compute_dtype(args.precision, device))
        num_classes = len(train_set.classes)
        if args.dump_features:
            _dump_features(args.dump_features, (tr_f, va_f, tr_l, va_l))
    if args.use_cuda and device.type == "cuda":  # official: the vote runs where the features are
        tr_f, va_f, tr_l, va_l = (t.to(device) for t in (tr_f, va_f, tr_l, va_l))
    print("| k | top-1 | top-5 |\n|---|---|---|")
    for k in args.nb_knn:
        t1, t5 = knn_classifier(tr_f, tr_l, va_f, va_l, k=k, T=args.temperature, num_classes=num_classes)
        print(f"| {k} | {t1:.2f} | {t5:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
