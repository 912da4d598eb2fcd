"""The run plan: how long a run is and every per-step value of its schedules, derived once from
the config and the data size, and replaced whole (never edited) when a time budget has timed a
step. Saved with the checkpoint, so a resumed budget run keeps the size it was given.

``TimeBudget`` sizes a plan to ``time_budget_min``: the first steps (worker start-up, first
allocations) are not timed, then steps are timed for 5 % of the budget (at most a minute, at least
7 steps) so that data-loader stalls average out; the remaining budget divided by the steady
per-step time gives the number of steps. Time comes from the caller (``observe(step, seconds)``),
so the sizing is a pure function of the step times it is shown (tests drive it with a fake clock).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dino_fast.schedules import cosine_schedule_steps

__all__ = ["RunPlan", "StepValues", "TimeBudget"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepValues:
    """What the schedules give one optimizer step."""
    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    epoch: int


@dataclass(frozen=True)
class RunPlan:
    """Length and schedules of a run, in optimizer steps. Build with :meth:`from_config`."""

    niter_per_epoch: int
    """Optimizer steps per epoch (loader batches // accum_steps)."""
    epochs: int
    warmup_epochs: int
    warmup_teacher_temp_epochs: int
    base_lr: float
    """lr x global batch / 256 (the official linear scaling rule)."""
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    stop_step: int
    """The run ends here: ``total_steps``, or earlier with ``max_steps``."""
    budget_sized: bool = False
    """True once a time budget has sized the plan (it is then kept on resume)."""

    # -- derived ------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """Steps the schedules span: whole epochs (official), or exactly the budget once sized."""
        return self.stop_step if self.budget_sized else self.epochs * self.niter_per_epoch

    def _schedules(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        cached = self.__dict__.get("_cache")
        if cached is None:
            # the official utils.cosine_scheduler, counted in steps (equal for whole epochs)
            n, e, total = self.niter_per_epoch, self.epochs, self.total_steps
            lr = cosine_schedule_steps(self.base_lr, self.min_lr, total, min(total, self.warmup_epochs * n))
            wd = cosine_schedule_steps(self.weight_decay, self.weight_decay_end, total)
            momentum = cosine_schedule_steps(self.momentum_teacher, 1.0, total)
            # official DINOLoss.teacher_temp_schedule: per epoch
            w = self.warmup_teacher_temp_epochs
            temp = np.concatenate((np.linspace(self.warmup_teacher_temp, self.teacher_temp, w),
                                   np.ones(e - w) * self.teacher_temp))
            cached = (lr, wd, momentum, temp)
            object.__setattr__(self, "_cache", cached)  # a cache of derived values, not state
        return cached

    def at(self, step: int) -> StepValues:
        """Schedule values of optimizer step ``step`` (past the end: the last values)."""
        lr, wd, momentum, temp = self._schedules()
        i = min(max(step, 0), self.total_steps - 1)
        epoch = step // self.niter_per_epoch
        return StepValues(float(lr[i]), float(wd[i]), float(momentum[i]), float(temp[min(epoch, len(temp) - 1)]),
                          epoch)

    # -- building -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, niter_per_epoch: int, world_size: int = 1) -> "RunPlan":
        """The plan of ``cfg`` (official names) for ``niter_per_epoch`` optimizer steps per epoch."""
        if niter_per_epoch < 1:
            raise ValueError(f"niter_per_epoch must be >= 1, got {niter_per_epoch}")
        batch = cfg.batch_size_per_gpu * cfg.accum_steps * world_size
        total = cfg.epochs * niter_per_epoch
        return cls(niter_per_epoch=niter_per_epoch, epochs=cfg.epochs,
                   warmup_epochs=min(cfg.warmup_epochs, cfg.epochs),
                   warmup_teacher_temp_epochs=min(cfg.warmup_teacher_temp_epochs, cfg.epochs),
                   base_lr=cfg.lr * batch / 256.0, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                   weight_decay_end=cfg.weight_decay_end, momentum_teacher=cfg.momentum_teacher,
                   warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
                   stop_step=min(total, cfg.max_steps) if cfg.max_steps else total)

    def sized(self, steps: int) -> "RunPlan":
        """This plan stretched or shrunk so that its schedules end after ``steps`` steps (the last epoch
        may be partial); warm-ups scale with the epochs."""
        epochs = max(1, -(-steps // self.niter_per_epoch))
        scale = epochs / self.epochs
        return dataclasses.replace(
            self, epochs=epochs, stop_step=steps, budget_sized=True,
            warmup_epochs=min(epochs, int(round(self.warmup_epochs * scale))),
            warmup_teacher_temp_epochs=min(epochs, int(round(self.warmup_teacher_temp_epochs * scale))))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunPlan":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


class TimeBudget:
    """Sizes a :class:`RunPlan` to ``minutes`` of training time, once.

    Call :meth:`observe` after every optimizer step with the step count and the training seconds
    spent so far (logging, k-NN and checkpoints excluded); it returns the sized plan once, at
    the end of the timing window, and None otherwise. ``agree`` maps a local float to the value
    every rank uses (the max over ranks under torchrun), so all ranks size the same run.
    """

    WARMUP_STEPS = 3
    MIN_STEPS = 10
    FRACTION = 0.05
    MAX_WINDOW_S = 60.0

    def __init__(self, minutes: float, agree: Callable[[float], float] = lambda x: x) -> None:
        if minutes <= 0:
            raise ValueError(f"time budget must be > 0 minutes, got {minutes}")
        self.budget_s = 60.0 * minutes
        self.agree = agree
        self._warm_s: float | None = None
        self._start_step: int | None = None
        self._final_step: int | None = None
        self.done = False

    def observe(self, step: int, train_s: float, plan: RunPlan) -> RunPlan | None:
        """``step`` optimizer steps done after ``train_s`` seconds of training."""
        if self.done:
            return None
        if self._start_step is None:  # the first call fixes where this run (or resume) started
            self._start_step = step - 1
        done_here = step - self._start_step
        if done_here == self.WARMUP_STEPS:
            self._warm_s = train_s
        elif done_here == self.MIN_STEPS and self._warm_s is not None:
            # how many steps the timing window takes: decided once, the same on every rank
            window_s = min(self.MAX_WINDOW_S, self.FRACTION * self.budget_s)
            est = self.agree(train_s - self._warm_s) / (done_here - self.WARMUP_STEPS)
            timed_steps = max(done_here, self.WARMUP_STEPS + math.ceil(window_s / max(est, 1e-9)))
            self._final_step = self._start_step + timed_steps
        if self._final_step is not None and step >= self._final_step:
            self.done = True
            timed = step - self._start_step - self.WARMUP_STEPS
            return self.size(plan, step, train_s, train_s - self._warm_s, timed)
        return None

    def size(self, plan: RunPlan, step: int, elapsed_s: float, timed_s: float, timed_steps: int) -> RunPlan:
        """The plan that ends when the budget does: the steady per-step time is ``timed_s /
        timed_steps``, and ``elapsed_s`` of the budget is already spent at ``step``."""
        per_step = self.agree(timed_s) / timed_steps
        left_s = self.budget_s - self.agree(elapsed_s)
        steps = max(step + 1, step + int(left_s / per_step))
        sized = plan.sized(steps)
        log.info("time budget %.1f min at %.3f s/step: %d steps, %d epochs", self.budget_s / 60, per_step, steps,
                 sized.epochs)
        return sized
