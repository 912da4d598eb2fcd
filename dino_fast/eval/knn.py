"""Weighted k-NN classification on frozen, l2-normalised features (DINO paper, sec. 4.1).

Each test feature votes with its k most similar train features (cosine similarity), each
vote weighted by exp(similarity / T); top-1/top-5 are read off the summed votes per class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["knn_classifier", "knn_eval"]


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


def knn_eval(backbone: torch.nn.Module, train_root: str | Path, val_root: str | Path, image_size: int,
             ks: Sequence[int] = (20,), T: float = 0.07, batch_size: int = 128, num_workers: int = 2,
             device: torch.device | str | None = None, cache_dir: str | Path | None = None,
             progress: bool = False) -> dict[int, tuple[float, float]]:
    """Extract CLS features of ``backbone`` on two labeled ImageFolder trees and run k-NN for each k.

    Images are resized to ``image_size * 256/224`` then center-cropped to ``image_size`` (the
    official 256 -> 224 evaluation transform, scaled). Returns {k: (top1, top5)}."""
    from dino_fast.data.folder import ImageFolderDataset
    from dino_fast.eval.features import eval_transform, extract_features

    device = torch.device(device) if device else next(backbone.parameters()).device
    transform = eval_transform(resize=int(round(image_size * 256 / 224)), crop=image_size)
    feats = {}
    for split, root in (("train", train_root), ("val", val_root)):
        ds = ImageFolderDataset(root, transform=transform)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        cache = Path(cache_dir) / f"features-{split}.pt" if cache_dir else None
        feats[split] = extract_features(backbone, loader, device, cache_path=cache, progress=progress)
    (tr_f, tr_l), (va_f, va_l) = feats["train"], feats["val"]
    num_classes = int(max(tr_l.max(), va_l.max())) + 1
    return {k: knn_classifier(tr_f, tr_l, va_f, va_l, k=k, T=T, num_classes=num_classes) for k in ks}
