"""Optimizer construction and the gradient edits of the official recipe.

``build_optimizer`` mirrors official ``main_dino.py``: ``torch.optim.AdamW(params_groups)``,
``torch.optim.SGD(params_groups, lr=0, momentum=0.9)`` or ``utils.LARS(params_groups)`` over
the two groups of ``utils.get_params_groups`` (decayed weights; biases and norms without decay).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["LARS", "OPTIMIZERS", "param_groups", "build_optimizer", "clip_gradients_", "cancel_last_layer_gradients_",
           "set_schedule_"]

OPTIMIZERS = ("adamw", "sgd", "lars")


def param_groups(model: nn.Module) -> list[dict]:
    """Official ``utils.get_params_groups``: decayed weights, then biases and 1-D (norm)
    parameters with no weight decay; frozen parameters left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_decay": True}]


class LARS(torch.optim.Optimizer):
    """Official DINO ``utils.LARS`` (from Barlow Twins), value for value.

    Per parameter ``p`` with gradient ``dp``: if ``p.ndim != 1`` (not a bias or norm weight),
    ``dp += weight_decay * p`` and ``dp *= eta * ||p|| / ||dp||`` (1 when either norm is 0);
    then ``mu = momentum * mu + dp`` and ``p -= lr * mu``. 1-D parameters get neither decay
    nor the trust ratio, whatever their group says. ``weight_decay_filter`` and
    ``lars_adaptation_filter`` are kept for the official group layout and, as there, unused.
    No host sync: the trust ratio stays on the device (``torch.where``)."""

    def __init__(self, params: Iterable[Any], lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 eta: float = 0.001, weight_decay_filter: Any = None, lars_adaptation_filter: Any = None) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(model: nn.Module, name: str = "adamw") -> torch.optim.Optimizer:
    """The official ``--optimizer`` over :func:`param_groups`; lr and wd are set every step by
    the schedules (:func:`set_schedule_`).

    ``adamw``: AdamW (official defaults, ``fused``: one kernel over all parameters on CUDA and on
    CPU, the same math as ``foreach`` to an ulp; on 2 CPU cores it takes the small preset's optimizer
    phase from 16 to 10 ms per step, ``bench/results/train_tiny_imagenet_sk_adamw*``);
    ``sgd``: ``SGD(groups, lr=0, momentum=0.9)``; ``lars``: :class:`LARS` (convnets, large batches)."""
    groups = param_groups(model)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def set_schedule_(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Write this step's lr and weight decay (no decay stays 0 on its group)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        if not g.get("no_decay", False):
            g["weight_decay"] = wd


@torch.no_grad()
def clip_gradients_(model: nn.Module, clip: float) -> list[torch.Tensor] | None:
    """Official DINO clipping: each parameter's gradient scaled to norm <= ``clip``.

    The official loop, per parameter: ``coef = clip / (norm + 1e-6)`` (a float over a tensor,
    which torch computes as ``reciprocal(norm + 1e-6) * clip``), then ``grad *= coef`` when
    ``coef < 1``. Here the same values from six foreach ops over all gradients (norm, add,
    reciprocal, mul, clamp_max at 1, mul: a factor of exactly 1 leaves a gradient unchanged, as
    the official branch does), so the launches do not grow with the parameter count, and no host
    sync (the official loop calls .item() per tensor).
    Sharded (FSDP2 ``DTensor``) gradients are clipped by the norm of the FULL parameter's
    gradient: the local squared norms of all of them are summed over the shard ranks in ONE
    all-reduce, then each shard is scaled by its parameter's factor.
    Safe after ``GradScaler.unscale_(optimizer)`` (the official fp16 order: unscale, clip,
    ``scaler.step``): it only rescales the already unscaled gradients in place; a step whose
    gradients hold inf/NaN is skipped by ``scaler.step`` from the inf check ``unscale_`` recorded.
    Returns the per-parameter norms (device tensors, for logging) or None when there is nothing
    to clip."""
    if clip <= 0:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(g, dtensor) for g in grads):
        norms = list(torch._foreach_norm(grads))
    else:
        norms = _full_norms(grads, dtensor)
        grads = [g.to_local() if isinstance(g, dtensor) else g for g in grads]
    coefs = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
    return norms


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
    """Official ``utils.cancel_gradients_last_layer``: during the first ``freeze_last_layer``
    epochs every parameter named ``*last_layer*`` loses its gradient (so it is not updated)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
