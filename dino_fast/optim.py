"""Optimizer construction and the gradient edits of the official recipe."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "clip_gradients_", "cancel_last_layer_gradients_", "set_schedule_"]


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: decayed weights, and biases/norm parameters (1-D) with no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_decay": True}]


def build_optimizer(model: nn.Module, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`param_groups`; lr and wd are set every step by the schedules.

    ``foreach`` keeps the update to a handful of kernels; ``fused`` is used on CUDA."""
    groups = param_groups(model)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=on_cuda or None, foreach=None if on_cuda else True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}: use adamw or sgd")


def set_schedule_(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Write this step's lr and weight decay (no decay stays 0 on its group)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        if not g.get("no_decay", False):
            g["weight_decay"] = wd


@torch.no_grad()
def clip_gradients_(model: nn.Module, clip: float) -> torch.Tensor | None:
    """Official DINO clipping: each parameter's gradient scaled to norm <= ``clip``.

    Done with foreach ops and no host sync (the official loop calls .item() per tensor).
    Returns the per-parameter norms (for logging) or None when there is nothing to clip."""
    if clip <= 0:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    grads_local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    norms = torch._foreach_norm(grads_local)
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads_local, scales)
    return torch.stack([n.float() for n in norms])


def cancel_last_layer_gradients_(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """During the first ``freeze_last_layer`` epochs the head's last layer is not updated."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
