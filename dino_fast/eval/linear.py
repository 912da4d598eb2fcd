"""Linear probe on frozen features, the official DINO recipe (``eval_linear.py``).

Features: CLS tokens of the last ``n_last_blocks`` blocks concatenated (n = 4 for
ViT-S/16 in the paper), optionally with the averaged patch tokens
(``avgpool_patchtokens``, used with n = 1 for ViT-B). Classifier: one Linear
layer, weight ~ N(0, 0.01^2), zero bias. Optimizer: SGD momentum 0.9, weight
decay 0, lr scaled by batch / 256, cosine annealing to 0 over the epochs
(stepped once per epoch). Reported: top-1 / top-5 of the last epoch and the best
top-1 over the evaluations, as the official script prints.

Two ways to train: on cached features (:func:`run_linear_probe`, fast, one
deterministic view per image) or on the fly (:func:`run_linear_probe_online`,
the official way, with random-resized-crop + flip augmentation each epoch).

Train and val classes are matched by folder NAME (differing classes are an error unless
``--allow_class_mismatch``; one class is an error).

``dino-fast linear`` (:func:`main`) takes ``eval_linear.py`` command lines unchanged: every
official flag with its official type and default (``--evaluate``, ``--val_freq``,
``--num_labels``, ``--avgpool_patchtokens true``). What differs: the default mode trains on
cached center-crop features (``--mode online`` is the official augmented recipe); the official
default ``--n_last_blocks 4`` is capped at a shallower backbone's depth; the architecture is read
off the weights; ``--evaluate`` reads a local classifier (``--linear_weights``), nothing is
downloaded; one process (``--dist_url`` / ``--local_rank`` accepted and ignored).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dino_fast.errors import ConfigError, DataError
from dino_fast.precision import autocast, resolve_compute_dtype
from dino_fast.eval.features import (IMAGENET_MEAN, IMAGENET_STD, backbone_features, eval_transform, extract_features,
                                     match_classes, resolve_device, resolve_n_last_blocks)
from dino_fast.eval.linear_classifier import (LinearClassifier, accuracy, load_linear_classifier,
                                              save_linear_checkpoint)

__all__ = ["LinearClassifier", "run_linear_probe", "run_linear_probe_online", "accuracy", "save_linear_checkpoint",
           "load_linear_classifier", "build_parser", "main"]

log = logging.getLogger(__name__)


def _check_feats(feats: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if not isinstance(feats, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: features and labels must be tensors, got {type(feats).__name__}, "
                        f"{type(labels).__name__}")
    if feats.ndim != 2:
        raise ValueError(f"{name}: features must be (N, F), got shape {tuple(feats.shape)}")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{name}: labels must be (N,) with N = {feats.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name}: labels must be integer class indices, got {labels.dtype}")
    if not feats.dtype.is_floating_point:
        raise TypeError(f"{name}: features must be floating point, got {feats.dtype}")
    if feats.shape[0] == 0:
        raise ValueError(f"{name}: no samples")


def _fit(classifier: LinearClassifier, train_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
         val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], epochs: int, lr_scaled: float,
         device: torch.device, val_freq: int, progress: bool) -> dict[str, Any]:
    """The official training loop: SGD(momentum .9, wd 0) + per-epoch cosine lr; validation at
    epochs 0, val_freq, 2 val_freq, ... and the last (official ``epoch % val_freq == 0``)."""
    if isinstance(val_freq, bool) or not isinstance(val_freq, int) or val_freq < 1:
        raise ConfigError(f"linear probe: val_freq must be an int >= 1, got {val_freq!r}")
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr_scaled, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    history: list[dict[str, Any]] = []
    best = {"top1": -1.0, "epoch": -1}
    last: dict[str, float] = {}
    from tqdm import tqdm

    for epoch in tqdm(range(epochs), desc="linear", disable=not progress, leave=False):
        classifier.train()
        epoch_lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device)
        n_seen = 0
        for x, y in train_epoch(epoch):
            loss = F.cross_entropy(classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]  # on device: no per-step host sync
            n_seen += y.shape[0]
        scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, "lr": epoch_lr, "train_loss": (loss_sum / max(n_seen, 1)).item()}
        if epoch % val_freq == 0 or epoch == epochs - 1:
            last = _evaluate(classifier, val_batches())
            record.update(last)
            if last["top1"] > best["top1"]:
                best = {"top1": last["top1"], "epoch": epoch}
        history.append(record)
        log.info("linear probe epoch %d: %s", epoch, record)
    return {"top1": last["top1"], "top5": last["top5"], "val_loss": last["loss"], "best_top1": best["top1"],
            "best_epoch": best["epoch"], "history": history}


def _finish(result: dict[str, Any], classifier: LinearClassifier, lr_scaled: float, batch_size: int, epochs: int,
            output_path: str | os.PathLike | None) -> dict[str, Any]:
    """Add the lr and classifier to ``result`` and, when asked, save the linear layer's checkpoint."""
    result.update(lr=lr_scaled, classifier=classifier, checkpoint=None)
    if output_path is not None:
        result["checkpoint"] = save_linear_checkpoint(
            output_path, classifier, {"epoch": epochs, "best_acc": result["best_top1"], "top1": result["top1"],
                                      "top5": result["top5"], "lr": lr_scaled, "batch_size": batch_size})
    return result


@torch.no_grad()
def _evaluate(classifier: LinearClassifier, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over all batches."""
    classifier.eval()
    c1 = c5 = loss_sum = None
    n = 0
    for x, y in batches:
        logits = classifier(x)
        a1, a5 = accuracy(logits, y, (1, 5))
        l = F.cross_entropy(logits, y, reduction="sum")
        c1, c5, loss_sum = (a1, a5, l) if c1 is None else (c1 + a1, c5 + a5, loss_sum + l)
        n += y.shape[0]
    if n == 0:
        raise ValueError("linear probe: the validation set is empty")
    return {"top1": 100.0 * c1.item() / n, "top5": 100.0 * c5.item() / n, "loss": loss_sum.item() / n}


def _scaled_lr(lr: float, batch_size: int) -> float:
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"linear probe: lr must be a positive finite number, got {lr}")
    if batch_size <= 0:
        raise ConfigError(f"linear probe: batch_size must be positive, got {batch_size}")
    return lr * batch_size / 256.0


def run_linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                     val_labels: torch.Tensor, epochs: int = 100, lr: float = 1e-3, batch_size: int = 1024,
                     num_classes: int | None = None, device: torch.device | str | None = None, seed: int = 0,
                     output_path: str | os.PathLike | None = None, val_freq: int = 1,
                     progress: bool = False) -> dict[str, Any]:
    """Train the official linear classifier on cached frozen features and evaluate it.

    ``lr`` is the base rate for a batch of 256 (the official default 1e-3 with 8 x
    128 = 1024 images); the rate used is ``lr * batch_size / 256``. Returns
    ``{"top1", "top5", "val_loss", "best_top1", "best_epoch", "history", "lr",
    "classifier", "checkpoint"}`` (accuracies in percent, of the last epoch and
    the best evaluated one). With ``output_path`` the trained layer is saved
    there atomically (see :func:`save_linear_checkpoint`). Fewer than 2 classes in
    the train labels raise :class:`~dino_fast.errors.DataError`."""
    _check_feats(train_feats, train_labels, "train")
    _check_feats(val_feats, val_labels, "val")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"linear probe: train features have {train_feats.shape[1]} channels, val {val_feats.shape[1]}")
    if epochs <= 0:
        raise ConfigError(f"linear probe: epochs must be positive, got {epochs}")
    lr_scaled = _scaled_lr(lr, batch_size)
    n_max = int(max(train_labels.max(), val_labels.max())) + 1
    if int(min(train_labels.min(), val_labels.min())) < 0:
        raise ValueError("linear probe: labels must be >= 0")
    num_classes = n_max if num_classes is None else num_classes
    if num_classes < n_max:
        raise ValueError(f"linear probe: num_classes={num_classes} but labels go up to {n_max - 1}")
    if num_classes < 2 or train_labels.unique().numel() < 2:
        raise DataError(f"linear probe: the train labels hold one class ({int(train_labels[0])}) of {num_classes}; a "
                        f"classifier trained on one class scores 100% and means nothing: it needs at least 2 classes")
    device = torch.device(device) if device is not None else train_feats.device
    torch.manual_seed(seed)  # the classifier init
    classifier = LinearClassifier(train_feats.shape[1], num_classes).to(device)
    xs, ys = train_feats.to(device, torch.float32), train_labels.to(device, torch.long)
    xv, yv = val_feats.to(device, torch.float32), val_labels.to(device, torch.long)
    gen = torch.Generator().manual_seed(seed)

    def train_epoch(epoch: int):
        perm = torch.randperm(xs.shape[0], generator=gen).to(device)
        # drop_last=False: the official loader keeps the last partial batch of the train set too
        for i in range(0, xs.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            yield xs[idx], ys[idx]

    def val_batches():
        for i in range(0, xv.shape[0], batch_size):
            yield xv[i:i + batch_size], yv[i:i + batch_size]

    result = _fit(classifier, train_epoch, val_batches, epochs, lr_scaled, device, val_freq, progress)
    return _finish(result, classifier, lr_scaled, batch_size, epochs, output_path)


def run_linear_probe_online(model: nn.Module, train_loader: Iterable, val_loader: Iterable, epochs: int = 100,
                            lr: float = 1e-3, n_last_blocks: int | None = None, avgpool: bool = False,
                            device: torch.device | str = "cpu", seed: int = 0, num_classes: int | None = None,
                            output_path: str | os.PathLike | None = None, val_freq: int = 1,
                            progress: bool = False, compute_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The official way: features of freshly augmented batches each epoch (frozen
    ``model`` in ``compute_dtype``: None means ``precision auto``: bf16 on CUDA and AMX CPUs, fp32 elsewhere), the same
    classifier and schedule as :func:`run_linear_probe`. The lr is scaled by
    ``train_loader.batch_size``. ``n_last_blocks=None`` means min(4, depth); a value above the
    depth raises :class:`~dino_fast.errors.ConfigError`; a convnet gives its pooled features
    (``n_last_blocks`` / ``avgpool`` do not apply, as in the official script)."""
    device = torch.device(device)
    batch_size = getattr(train_loader, "batch_size", None)
    if not batch_size:
        raise ValueError("run_linear_probe_online: train_loader needs a batch_size (for the lr scaling)")
    lr_scaled = _scaled_lr(lr, batch_size)
    if num_classes is None:
        classes = getattr(getattr(train_loader, "dataset", None), "classes", None)
        if classes is None:
            raise ValueError("run_linear_probe_online: pass num_classes (the train dataset has no .classes)")
        num_classes = len(classes)
    if num_classes < 2:
        raise DataError(f"linear probe: {num_classes} class; a classifier on one class means nothing: it needs at "
                        f"least 2 classes")
    vit = hasattr(model, "blocks")
    n_last_blocks, avgpool = (resolve_n_last_blocks(model, n_last_blocks), avgpool) if vit else (None, False)
    model.eval().requires_grad_(False)
    compute_dtype = resolve_compute_dtype("auto", device) if compute_dtype is None else compute_dtype

    @torch.no_grad()
    def feats(images: torch.Tensor) -> torch.Tensor:
        with autocast(compute_dtype, device):
            return backbone_features(model, images.to(device, non_blocking=True), n_last_blocks, avgpool).float()

    def batches(loader: Iterable):
        for images, y in loader:
            yield feats(images), torch.as_tensor(y).to(device, torch.long)

    first_images, _ = next(iter(val_loader))
    dim = feats(first_images[:1]).shape[1]
    torch.manual_seed(seed)
    classifier = LinearClassifier(dim, num_classes).to(device)
    result = _fit(classifier, lambda epoch: batches(train_loader), lambda: batches(val_loader), epochs, lr_scaled,
                  device, val_freq, progress)
    return _finish(result, classifier, lr_scaled, batch_size, epochs, output_path)


_SCRIPT = "eval_linear.py"
_OFFICIAL_N_LAST_BLOCKS = 4


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``dino-fast linear``: every official eval_linear.py flag (marked in -h), then ours."""
    from dino_fast.eval.flags import add_distributed_flags, add_model_flags, add_precision_flag, bool_flag, official

    p = parser or argparse.ArgumentParser("dino-fast linear", description=__doc__.splitlines()[0],
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o = p.add_argument_group("official eval_linear.py flags")
    o.add_argument("--n_last_blocks", default=_OFFICIAL_N_LAST_BLOCKS, type=int,
                   help=official("CLS tokens of the last n blocks (4 for ViT-S, 1 for ViT-B in the paper); the "
                                 "default 4 is capped at a shallower backbone's depth", _SCRIPT))
    o.add_argument("--avgpool_patchtokens", default=False, type=bool_flag,
                   help=official("add the averaged patch tokens (true for ViT-B in the paper)", _SCRIPT))
    add_model_flags(o, _SCRIPT)
    o.add_argument("--pretrained_weights", default="", type=str,
                   help=official("backbone weights (any layout load_pretrained reads; nothing is downloaded)",
                                 _SCRIPT))
    o.add_argument("--epochs", default=100, type=int, help=official("training epochs of the linear layer", _SCRIPT))
    o.add_argument("--lr", default=0.001, type=float, help=official("base lr for a batch of 256", _SCRIPT))
    o.add_argument("--batch_size_per_gpu", "--batch_size", dest="batch_size_per_gpu", default=128, type=int,
                   help=official("images per step (one process: the whole batch)", _SCRIPT))
    add_distributed_flags(o, _SCRIPT)
    o.add_argument("--data_path", default="/path/to/imagenet/", type=str,
                   help=official("folder with train/ and val/ ImageFolder trees", _SCRIPT))
    o.add_argument("--num_workers", default=10, type=int, help=official("DataLoader worker processes", _SCRIPT))
    o.add_argument("--val_freq", default=1, type=int,
                   help=official("validate at epochs 0, f, 2f, ... and the last", _SCRIPT))
    o.add_argument("--output_dir", default=".", help=official("linear.pth and the feature caches go here", _SCRIPT))
    o.add_argument("--num_labels", default=1000, type=int,
                   help=official("outputs of the linear layer (at least the number of train classes)", _SCRIPT))
    o.add_argument("--evaluate", dest="evaluate", action="store_true",
                   help=official("only evaluate the classifier of --linear_weights on the val set", _SCRIPT))
    p.add_argument("--linear_weights", default=None,
                   help="the classifier --evaluate reads (ours or an official eval_linear.py / released "
                        "*_linearweights.pth file); default <output_dir>/linear.pth")
    p.add_argument("--allow_class_mismatch", action="store_true",
                   help="train/val class folders may differ: labels matched by name, val images of classes absent "
                        "from train dropped with a warning")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the center crop")
    p.add_argument("--crop", type=int, default=224, help="center / random-resized crop size")
    p.add_argument("--mode", choices=("cached", "online"), default="cached",
                   help="cached: one center crop per image, features computed once; online: official augmentation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbone runs")
    add_precision_flag(p)
    p.add_argument("--seed", type=int, default=0, help="classifier init and shuffling")
    p.add_argument("--no_cache", action="store_true", help="do not read or write the feature cache (cached mode)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size_per_gpu", "resize", "crop", "val_freq", "num_labels"):
        if getattr(args, name) < 1:
            raise ConfigError(f"linear: --{name} must be >= 1, got {getattr(args, name)}")
    if args.crop > args.resize:
        raise ConfigError(f"linear: --crop {args.crop} is larger than --resize {args.resize}")
    if args.num_workers < 0:
        raise ConfigError(f"linear: --num_workers must be >= 0, got {args.num_workers}")
    _scaled_lr(args.lr, args.batch_size_per_gpu)
    if not args.pretrained_weights:
        raise ConfigError("linear: --pretrained_weights is needed (the official script would download the released "
                          "weights; dino_fast never downloads)")


def _features_of(model: nn.Module, args: argparse.Namespace) -> tuple[int | None, bool]:
    """(n_last_blocks, avgpool) of the official feature layout: a ViT's, or (None, False) for a
    convnet's pooled features (the official script ignores both flags there)."""
    if not hasattr(model, "blocks"):
        return None, False
    # the official default 4 is capped at the depth (min(4, depth)); an explicit other value is checked
    n = None if args.n_last_blocks == _OFFICIAL_N_LAST_BLOCKS else args.n_last_blocks
    return resolve_n_last_blocks(model, n), args.avgpool_patchtokens


def _evaluate_only(args: argparse.Namespace, model: nn.Module, val_set: Any, loader_kw: dict[str, Any],
                   device: torch.device, compute_dtype: torch.dtype) -> int:
    """``--evaluate``: the classifier of ``--linear_weights`` on the val set (official: the released one)."""
    from torch.utils.data import DataLoader

    path = Path(args.linear_weights or Path(args.output_dir) / "linear.pth")
    classifier = load_linear_classifier(path).to(device)
    n_last_blocks, avgpool = _features_of(model, args)
    feats, labels = extract_features(model, DataLoader(val_set, shuffle=False, **loader_kw), device,
                                     n_last_blocks=n_last_blocks, avgpool=avgpool, compute_dtype=compute_dtype)
    if feats.shape[1] != classifier.linear.in_features:
        raise ConfigError(f"linear --evaluate: {path} takes {classifier.linear.in_features} features, the backbone "
                          f"gives {feats.shape[1]} (--n_last_blocks {n_last_blocks}, --avgpool_patchtokens {avgpool})")
    if int(labels.max()) >= classifier.num_labels:
        raise ConfigError(f"linear --evaluate: {path} has {classifier.num_labels} outputs, the val set "
                          f"{len(val_set.classes)} classes")
    stats = _evaluate(classifier, [(feats.to(device), labels.to(device))])
    print(f"Accuracy of the network on the {len(val_set)} test images: {stats['top1']:.1f}% "
          f"(top-5 {stats['top5']:.1f}%, {path})")
    return 0


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of ``dino-fast linear``: load weights, build the ImageFolder train/val sets,
    train the probe, save ``linear.pth`` in ``--output_dir`` (or, with ``--evaluate``, score a
    saved classifier). Returns the exit status (0). Every check (flags, output folder, folders and
    their classes, weights, n_last_blocks) runs before anything is written; user mistakes raise
    :class:`~dino_fast.errors.DinoFastError` subclasses (one line from the CLI)."""
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from dino_fast.data.folder import ImageFolderDataset
    from dino_fast.eval.flags import check_arch, check_single_process
    from dino_fast.pretrained import load_pretrained
    from dino_fast.runlock import check_output_dir

    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    check_single_process(args, "linear")
    _check_args(args)
    device = resolve_device(args.device)
    compute_dtype = resolve_compute_dtype(args.precision, device)
    val_tf = eval_transform(args.resize, args.crop)
    loader_kw = dict(batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                     pin_memory=device.type == "cuda")
    if args.evaluate:
        val_set = ImageFolderDataset(os.path.join(args.data_path, "val"), transform=val_tf)
        model = load_pretrained(args.pretrained_weights, key=args.checkpoint_key).to(device)
        check_arch(model, args.arch, args.patch_size, "linear")
        return _evaluate_only(args, model, val_set, loader_kw, device, compute_dtype)
    out = check_output_dir(args.output_dir)
    train_tf = val_tf if args.mode == "cached" else transforms.Compose([  # official eval_linear.py augmentation
        transforms.RandomResizedCrop(args.crop),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    train_set = ImageFolderDataset(os.path.join(args.data_path, "train"), transform=train_tf)
    val_set = ImageFolderDataset(os.path.join(args.data_path, "val"), transform=val_tf)
    match_classes(train_set, val_set, args.allow_class_mismatch, what="linear probe")
    if args.num_labels < len(train_set.classes):
        raise ConfigError(f"linear: --num_labels {args.num_labels} but {train_set.root} has {len(train_set.classes)} "
                          f"classes: pass --num_labels {len(train_set.classes)} or more")
    model = load_pretrained(args.pretrained_weights, key=args.checkpoint_key).to(device)
    check_arch(model, args.arch, args.patch_size, "linear")
    n_last_blocks, avgpool = _features_of(model, args)
    log.info("linear probe: %d train / %d val images, %d classes (%d outputs), %s", len(train_set), len(val_set),
             len(train_set.classes), args.num_labels, "pooled features" if n_last_blocks is None else
             f"features of the last {n_last_blocks} block(s)" + (" + averaged patch tokens" if avgpool else ""))
    common = dict(epochs=args.epochs, lr=args.lr, num_classes=args.num_labels, device=device, seed=args.seed,
                  output_path=out / "linear.pth", val_freq=args.val_freq, progress=True)
    if args.mode == "cached":
        cache = (lambda split: None) if args.no_cache else (lambda split: out / f"features_{split}.pt")
        kw = dict(device=device, n_last_blocks=n_last_blocks, avgpool=avgpool, compute_dtype=compute_dtype)
        tr = extract_features(model, DataLoader(train_set, shuffle=False, **loader_kw), cache_path=cache("train"), **kw)
        va = extract_features(model, DataLoader(val_set, shuffle=False, **loader_kw), cache_path=cache("val"), **kw)
        result = run_linear_probe(*tr, *va, batch_size=args.batch_size_per_gpu, **common)
    else:
        torch.manual_seed(args.seed)
        result = run_linear_probe_online(
            model, DataLoader(train_set, shuffle=True, drop_last=False, **loader_kw),
            DataLoader(val_set, shuffle=False, **loader_kw), n_last_blocks=n_last_blocks, avgpool=avgpool,
            compute_dtype=compute_dtype, **common)
    print(f"linear probe: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"best top-1 {result['best_top1']:.2f}% (epoch {result['best_epoch']})  -> {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
