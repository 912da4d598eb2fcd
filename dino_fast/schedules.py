"""Per-step schedules of the official recipe: learning rate (linear warm-up then
cosine), weight decay (cosine), teacher momentum (cosine to 1).

Values are plain Python floats indexed by the global step, computed once on the host
(numpy), so reading one never syncs a device.
"""
from __future__ import annotations

import numpy as np

__all__ = ["cosine_scheduler", "Schedules"]


def cosine_scheduler(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0,
                     start_warmup_value: float = 0.0) -> np.ndarray:
    """Official DINO ``utils.cosine_scheduler`` expressed in steps.

    ``warmup_steps`` values rise linearly from ``start_warmup_value`` to ``base_value``; the
    remaining ``total_steps - warmup_steps`` follow a half cosine from ``base_value`` to
    ``final_value`` (the last step lands exactly on ``final_value``)."""
    if total_steps <= 0:
        raise ValueError(f"cosine_scheduler: total_steps must be > 0, got {total_steps}")
    warmup_steps = min(int(warmup_steps), total_steps)
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps) if warmup_steps > 0 else np.array([])
    iters = np.arange(total_steps - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters) - 1, 1)))
    if len(iters) == 1:
        cosine = np.array([final_value])
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total_steps
    return schedule


class Schedules:
    """The three per-step schedules of a run, built from the config and the step count."""

    def __init__(self, base_lr: float, min_lr: float, weight_decay: float, weight_decay_end: float,
                 momentum_teacher: float, total_steps: int, warmup_steps: int) -> None:
        self.total_steps = total_steps
        self.lr = cosine_scheduler(base_lr, min_lr, total_steps, warmup_steps)
        self.wd = cosine_scheduler(weight_decay, weight_decay_end, total_steps)
        self.momentum = cosine_scheduler(momentum_teacher, 1.0, total_steps)

    def at(self, step: int) -> tuple[float, float, float]:
        """(lr, weight decay, teacher momentum) at ``step``; past the end, the last values."""
        i = min(step, self.total_steps - 1)
        return float(self.lr[i]), float(self.wd[i]), float(self.momentum[i])
