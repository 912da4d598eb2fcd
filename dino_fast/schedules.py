"""Per-step schedules of the official recipe: learning rate (linear warm-up then
cosine), weight decay (cosine), teacher momentum (cosine towards 1).

Values are plain Python floats indexed by the global step, computed once on the host
(numpy), so reading one never syncs a device.

Both entry points are the official DINO ``utils.cosine_scheduler`` formula:
:func:`cosine_scheduler` has its signature (epochs x iterations per epoch),
:func:`cosine_schedule_steps` takes step counts (what a time-budgeted run, whose length is
not a whole number of epochs, needs). The cosine runs over ``n = total - warmup`` steps as
``base + ... cos(pi * i / n)`` for ``i < n``: it stops one step short of ``final_value``, so
the teacher momentum never reaches exactly 1.
"""
from __future__ import annotations

import numpy as np

__all__ = ["cosine_scheduler", "cosine_schedule_steps"]


def cosine_schedule_steps(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0,
                          start_warmup_value: float = 0.0) -> np.ndarray:
    """Official ``utils.cosine_scheduler`` in steps: ``(total_steps,)`` float64 values.

    ``warmup_steps`` values ``np.linspace(start_warmup_value, base_value, warmup_steps)``, then
    ``final + 0.5 (base - final) (1 + cos(pi i / n))`` for ``i = 0 .. n-1``,
    ``n = total_steps - warmup_steps``. ``cosine_scheduler(b, f, E, N, W, s)`` equals
    ``cosine_schedule_steps(b, f, E * N, W * N, s)`` element for element."""
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    if total_steps <= 0:
        raise ValueError(f"cosine_schedule_steps: total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"cosine_schedule_steps: warmup_steps must be in [0, total_steps={total_steps}], "
                         f"got {warmup_steps}")
    warmup = np.array([])
    if warmup_steps > 0:
        warmup = np.linspace(start_warmup_value, base_value, warmup_steps)
    iters = np.arange(total_steps - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total_steps
    return schedule


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Official DINO ``utils.cosine_scheduler`` (same signature): ``(epochs * niter_per_ep,)`` values,
    ``warmup_epochs * niter_per_ep`` of linear warm-up then the cosine."""
    if epochs <= 0 or niter_per_ep <= 0:
        raise ValueError(f"cosine_scheduler: epochs ({epochs}) and niter_per_ep ({niter_per_ep}) must be > 0")
    return cosine_schedule_steps(base_value, final_value, epochs * niter_per_ep,
                                 warmup_epochs * niter_per_ep, start_warmup_value)
