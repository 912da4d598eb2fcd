"""The linear layer of the linear probe and its file: the official ``eval_linear.py``
``LinearClassifier`` (keys ``linear.weight`` / ``linear.bias``), top-k counts, and the checkpoint
``dino-fast linear`` writes (``linear.pth``) or an official one (``module.linear.*``) read back.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dino_fast.errors import CheckpointError

__all__ = ["LinearClassifier", "accuracy", "save_linear_checkpoint", "load_linear_classifier"]


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
    ``eval_linear.py`` checkpoint / released ``*_linearweights.pth``: ``state_dict`` with
    ``module.linear.*`` keys), read safely; :class:`CheckpointError` (one line) otherwise."""
    from dino_fast.safe_load import torch_load_safe

    if not Path(path).is_file():
        raise CheckpointError(f"linear classifier {path}: file not found")
    try:
        blob = torch_load_safe(path)
    except Exception as e:
        raise CheckpointError(f"linear classifier {path}: unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a linear-probe checkpoint (no 'state_dict' entry)")
    sd = {k.removeprefix("module."): v for k, v in blob["state_dict"].items()}
    if set(sd) != {"linear.weight", "linear.bias"}:
        raise CheckpointError(f"{path}: expected keys linear.weight/linear.bias, got {sorted(sd)}")
    num_labels, dim = sd["linear.weight"].shape
    clf = LinearClassifier(dim, num_labels)
    clf.load_state_dict(sd)
    return clf
