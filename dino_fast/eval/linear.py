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
``--allow_class_mismatch``; one class is an error); ``--n_last_blocks`` defaults to
min(4, depth) of the backbone.
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
from dino_fast.eval.features import (IMAGENET_MEAN, IMAGENET_STD, backbone_features, eval_transform, extract_features,
                                     match_classes, resolve_device, resolve_n_last_blocks)

__all__ = ["LinearClassifier", "run_linear_probe", "run_linear_probe_online", "accuracy", "save_linear_checkpoint",
           "load_linear_classifier", "build_parser", "main"]

log = logging.getLogger(__name__)


class LinearClassifier(nn.Module):
    """The official linear layer on frozen features (keys ``linear.weight``/``linear.bias``)."""

    def __init__(self, dim: int, num_labels: int = 1000) -> None:
        super().__init__()
        if dim <= 0 or num_labels <= 0:
            raise ValueError(f"LinearClassifier: dim and num_labels must be positive, got {dim}, {num_labels}")
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # (B, num_labels)


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Number of correct predictions within the top-k for each k (k capped at the class count);
    tensors on the logits' device, so that accumulating them costs no host sync."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    correct = pred.eq(target[:, None])
    return [correct[:, :min(k, maxk)].any(dim=1).sum() for k in topk]


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


def save_linear_checkpoint(path: str | os.PathLike, classifier: LinearClassifier, extra: dict[str, Any]) -> Path:
    """Write ``{"state_dict", "num_labels", "dim", **extra}`` with torch.save,
    atomically (tmp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"state_dict": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
            "num_labels": classifier.num_labels, "dim": classifier.linear.in_features, **extra}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_linear_classifier(path: str | os.PathLike) -> LinearClassifier:
    """Load a classifier saved by :func:`save_linear_checkpoint` (or an official
    ``eval_linear.py`` checkpoint: ``state_dict`` with ``module.linear.*`` keys)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ValueError(f"{path}: not a linear-probe checkpoint (no 'state_dict' entry)")
    sd = {k.removeprefix("module."): v for k, v in blob["state_dict"].items()}
    if set(sd) != {"linear.weight", "linear.bias"}:
        raise ValueError(f"{path}: expected keys linear.weight/linear.bias, got {sorted(sd)}")
    num_labels, dim = sd["linear.weight"].shape
    clf = LinearClassifier(dim, num_labels)
    clf.load_state_dict(sd)
    return clf


def _fit(classifier: LinearClassifier, train_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
         val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], epochs: int, lr_scaled: float,
         device: torch.device, val_every: int, progress: bool) -> dict[str, Any]:
    """The official training loop: SGD(momentum .9, wd 0) + per-epoch cosine lr."""
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
        if (epoch + 1) % val_every == 0 or epoch == epochs - 1:
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
                     output_path: str | os.PathLike | None = None, val_every: int = 1,
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

    result = _fit(classifier, train_epoch, val_batches, epochs, lr_scaled, device, val_every, progress)
    return _finish(result, classifier, lr_scaled, batch_size, epochs, output_path)


def run_linear_probe_online(model: nn.Module, train_loader: Iterable, val_loader: Iterable, epochs: int = 100,
                            lr: float = 1e-3, n_last_blocks: int | None = None, avgpool: bool = False,
                            device: torch.device | str = "cpu", seed: int = 0, num_classes: int | None = None,
                            output_path: str | os.PathLike | None = None, val_every: int = 1,
                            progress: bool = False) -> dict[str, Any]:
    """The official way: features of freshly augmented batches each epoch (frozen
    ``model``, bf16 autocast on CUDA), the same classifier and schedule as
    :func:`run_linear_probe`. The lr is scaled by ``train_loader.batch_size``.
    ``n_last_blocks=None`` means min(4, depth); a value above the depth raises
    :class:`~dino_fast.errors.ConfigError`."""
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
    n_last_blocks = resolve_n_last_blocks(model, n_last_blocks)
    model.eval().requires_grad_(False)
    amp = device.type == "cuda"

    @torch.no_grad()
    def feats(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            return backbone_features(model, images.to(device, non_blocking=True), n_last_blocks, avgpool).float()

    def batches(loader: Iterable):
        for images, y in loader:
            yield feats(images), torch.as_tensor(y).to(device, torch.long)

    first_images, _ = next(iter(val_loader))
    dim = feats(first_images[:1]).shape[1]
    torch.manual_seed(seed)
    classifier = LinearClassifier(dim, num_classes).to(device)
    result = _fit(classifier, lambda epoch: batches(train_loader), lambda: batches(val_loader), epochs, lr_scaled,
                  device, val_every, progress)
    return _finish(result, classifier, lr_scaled, batch_size, epochs, output_path)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``dino-fast linear`` (official eval_linear.py names where they exist)."""
    p = parser or argparse.ArgumentParser("dino-fast linear", description=__doc__.splitlines()[0],
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_weights", required=True, help="checkpoint or backbone weights (see load_pretrained)")
    p.add_argument("--checkpoint_key", default="teacher", help="which model of a training checkpoint")
    p.add_argument("--arch", default=None, help="vit_tiny | vit_small | vit_base (inferred when omitted)")
    p.add_argument("--patch_size", type=int, default=None, help="inferred when omitted")
    p.add_argument("--data_path", required=True, help="folder with train/ and val/ ImageFolder trees")
    p.add_argument("--allow_class_mismatch", action="store_true",
                   help="train/val class folders may differ: labels matched by name, val images of classes absent "
                        "from train dropped with a warning")
    p.add_argument("--n_last_blocks", type=int, default=None,
                   help="CLS tokens of the last n blocks; None: min(4, depth) (official: 4 for ViT-S, 1 for ViT-B)")
    p.add_argument("--avgpool_patchtokens", action="store_true", help="add averaged patch tokens (official ViT-B)")
    p.add_argument("--epochs", type=int, default=100, help="training epochs of the linear layer")
    p.add_argument("--lr", type=float, default=1e-3, help="base lr for a batch of 256")
    p.add_argument("--batch_size", type=int, default=1024, help="total batch (official: 8 GPUs x 128)")
    p.add_argument("--num_workers", type=int, default=8, help="DataLoader worker processes")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the center crop")
    p.add_argument("--crop", type=int, default=224, help="center / random-resized crop size")
    p.add_argument("--mode", choices=("cached", "online"), default="cached",
                   help="cached: one center crop per image, features computed once; online: official augmentation")
    p.add_argument("--output_dir", default="./output_linear", help="linear.pth and the feature caches go here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbone runs")
    p.add_argument("--seed", type=int, default=0, help="classifier init and shuffling")
    p.add_argument("--no_cache", action="store_true", help="do not read or write the feature cache (cached mode)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "resize", "crop"):
        if getattr(args, name) < 1:
            raise ConfigError(f"linear: --{name} must be >= 1, got {getattr(args, name)}")
    if args.crop > args.resize:
        raise ConfigError(f"linear: --crop {args.crop} is larger than --resize {args.resize}")
    if args.num_workers < 0:
        raise ConfigError(f"linear: --num_workers must be >= 0, got {args.num_workers}")
    _scaled_lr(args.lr, args.batch_size)


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of ``dino-fast linear``: load weights, build the ImageFolder
    train/val sets, train the probe, save ``linear.pth`` in ``--output_dir``.
    Returns the exit status (0). Every check (flags, output folder, folders and their
    classes, weights, n_last_blocks) runs before anything is written; user mistakes raise
    :class:`~dino_fast.errors.DinoFastError` subclasses (one line from the CLI)."""
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from dino_fast.data.folder import ImageFolderDataset
    from dino_fast.pretrained import load_pretrained
    from dino_fast.runlock import check_output_dir

    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    _check_args(args)
    device = resolve_device(args.device)
    out = check_output_dir(args.output_dir)
    val_tf = eval_transform(args.resize, args.crop)
    if args.mode == "cached":
        train_tf = val_tf
    else:
        train_tf = transforms.Compose([  # official eval_linear.py train augmentation
            transforms.RandomResizedCrop(args.crop),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
    train_set = ImageFolderDataset(os.path.join(args.data_path, "train"), transform=train_tf)
    val_set = ImageFolderDataset(os.path.join(args.data_path, "val"), transform=val_tf)
    match_classes(train_set, val_set, args.allow_class_mismatch, what="linear probe")
    model = load_pretrained(args.pretrained_weights, key=args.checkpoint_key, arch=args.arch,
                            patch_size=args.patch_size).to(device)
    n_last_blocks = resolve_n_last_blocks(model, args.n_last_blocks)
    log.info("linear probe: %d train / %d val images, %d classes, features of the last %d block(s)%s",
             len(train_set), len(val_set), len(train_set.classes), n_last_blocks,
             " + averaged patch tokens" if args.avgpool_patchtokens else "")
    loader_kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    if args.mode == "cached":
        cache = (lambda split: None) if args.no_cache else (lambda split: out / f"features_{split}.pt")
        kw = dict(device=device, n_last_blocks=n_last_blocks, avgpool=args.avgpool_patchtokens)
        tr = extract_features(model, DataLoader(train_set, shuffle=False, **loader_kw), cache_path=cache("train"), **kw)
        va = extract_features(model, DataLoader(val_set, shuffle=False, **loader_kw), cache_path=cache("val"), **kw)
        result = run_linear_probe(*tr, *va, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                  num_classes=len(train_set.classes), device=device, seed=args.seed,
                                  output_path=out / "linear.pth", progress=True)
    else:
        torch.manual_seed(args.seed)
        result = run_linear_probe_online(
            model, DataLoader(train_set, shuffle=True, drop_last=False, **loader_kw),
            DataLoader(val_set, shuffle=False, **loader_kw), epochs=args.epochs, lr=args.lr,
            n_last_blocks=n_last_blocks, avgpool=args.avgpool_patchtokens, device=device, seed=args.seed,
            num_classes=len(train_set.classes), output_path=out / "linear.pth", progress=True)
    print(f"linear probe: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"best top-1 {result['best_top1']:.2f}% (epoch {result['best_epoch']})  -> {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
