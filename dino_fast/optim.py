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
    Sharded (FSDP2 ``DTensor``) gradients are clipped by the norm of the FULL parameter's
    gradient: the local squared norms of all of them are summed over the shard ranks in ONE
    all-reduce, then each shard is scaled by its parameter's factor.
    Returns the per-parameter norms (for logging) or None when there is nothing to clip."""
    if clip <= 0:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(g, dtensor) for g in grads):
        norms = torch._foreach_norm(grads)
    else:
        norms = _full_norms(grads, dtensor)
        grads = [g.to_local() if isinstance(g, dtensor) else g for g in grads]
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
    return torch.stack([n.float() for n in norms])


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _full_norms(grads: list[torch.Tensor], dtensor: type) -> list[torch.Tensor]:
    """L2 norm of every full gradient, from local shards: one all-reduce of the stacked squares."""
    from torch.distributed.tensor import Shard

    sharded = [i for i, g in enumerate(grads) if isinstance(g, dtensor)]
    first = grads[sharded[0]]
    mesh, placements = first.device_mesh, first.placements
    if any(grads[i].device_mesh != mesh or grads[i].placements != placements for i in sharded):
        raise ValueError("clip_gradients_: sharded gradients on different meshes/placements are not supported")
    local = [g.to_local() if isinstance(g, dtensor) else g for g in grads]
    norms = list(torch._foreach_norm(local))
    squares = torch.stack([norms[i].float() for i in sharded]) ** 2  # (P_sharded,)
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard):  # replicated mesh dims already hold the whole sum
            torch.distributed.all_reduce(squares, group=mesh.get_group(dim))
    full = squares.sqrt()
    for j, i in enumerate(sharded):
        norms[i] = full[j].to(norms[i].dtype)
    return norms


def cancel_last_layer_gradients_(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """During the first ``freeze_last_layer`` epochs the head's last layer is not updated."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
