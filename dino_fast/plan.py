"""The run plan: how long a run is and every per-step value of its schedules, derived once from
the config and the data size, and replaced whole (never edited) when a time budget re-sizes it.
Saved with the checkpoint, so a resumed run keeps its size and its re-sizes.

The schedules are the official per-step arrays (``utils.cosine_scheduler`` over ``epochs x
niter_per_epoch`` steps; the teacher temperature per epoch). A plan maps each optimizer step to a
*position* along them: step i is position i, until a time budget re-sizes the run at step s to end
at step S; from there the positions left, from step s's own to the last one, are spread evenly
over steps s .. S-1. Every schedule therefore goes on from the value it has at s (no jump in lr,
weight decay, momentum or teacher temperature) and reaches its final value at the run's last step,
however often the run is re-sized. Between two array entries the values are interpolated.

``TimeBudget`` sizes a plan to ``time_budget_min`` of training time, several times: after the first
steps (worker start-up and first allocations are not timed) it times 5 % of the budget (at most a
minute, at least 7 steps) and sizes the run from the median step time; then it re-sizes at 10 %,
20 %, ... 90 %, 95 % and 98 % of the budget from the median step time since the last re-size, so a
machine that slows down or speeds up still ends the run when the budget does. Time comes from the
caller (``observe(step, seconds)``): the sizing is a pure function of the step times it is shown.
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
    """Epochs the schedules are laid over (the config's ``epochs``)."""
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
    """The run ends here: ``total_steps``, earlier with ``max_steps``, or where a time budget put it."""
    budget_sized: bool = False
    """True once a time budget has sized the plan."""
    anchors: tuple[tuple[int, float], ...] = ()
    """(step, schedule position) where a time budget re-sized the run, in order (see the module doc)."""

    # -- derived ------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """Steps the schedules' arrays span: ``epochs x niter_per_epoch`` (official)."""
        return self.epochs * self.niter_per_epoch

    @property
    def run_epochs(self) -> int:
        """Epochs of data the run goes through (the last one may be partial)."""
        return -(-self.stop_step // self.niter_per_epoch)

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

    def position(self, step: int) -> float:
        """Where along the schedules' arrays step ``step`` is (in [0, total_steps - 1])."""
        last = float(self.total_steps - 1)
        if not self.anchors or step < self.anchors[0][0]:
            return min(float(max(step, 0)), last)
        for (s0, v0), (s1, v1) in zip(self.anchors, self.anchors[1:]):
            if s0 <= step < s1:
                return v0 + (step - s0) * (v1 - v0) / (s1 - s0)
        s0, v0 = self.anchors[-1]
        if self.stop_step - 1 <= s0:
            return last
        return min(last, v0 + (step - s0) * (last - v0) / (self.stop_step - 1 - s0))

    def at(self, step: int) -> StepValues:
        """Schedule values of optimizer step ``step`` (past the end: the last values). ``epoch`` is the
        epoch of data (``step // niter_per_epoch``); the teacher temperature follows the position."""
        lr, wd, momentum, temp = self._schedules()
        pos = self.position(step)
        i = int(pos)
        frac = pos - i
        j = min(i + 1, self.total_steps - 1)

        def value(a: np.ndarray) -> float:
            return float(a[i]) if frac == 0.0 else float(a[i] * (1.0 - frac) + a[j] * frac)

        return StepValues(value(lr), value(wd), value(momentum), float(temp[min(i // self.niter_per_epoch,
                                                                               len(temp) - 1)]),
                          step // self.niter_per_epoch)

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

    def resized(self, step: int, stop_step: int) -> "RunPlan":
        """This plan ending at ``stop_step`` instead, re-sized after ``step`` steps: the schedules go on
        from where step ``step`` is and reach their final values at step ``stop_step - 1``."""
        if stop_step <= step:
            raise ValueError(f"a plan re-sized at step {step} must end after it, got stop_step {stop_step}")
        anchors = tuple(a for a in self.anchors if a[0] < step) + ((step, self.position(step)),)
        return dataclasses.replace(self, stop_step=stop_step, budget_sized=True, anchors=anchors)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["anchors"] = [list(a) for a in self.anchors]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunPlan":
        values = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        values["anchors"] = tuple((int(s), float(v)) for s, v in d.get("anchors", ()))
        if d.get("budget_sized") and "anchors" not in d:  # saved before re-sizing kept positions
            values["anchors"] = ((0, 0.0),)  # its schedules spanned exactly its steps
        return cls(**values)


class TimeBudget:
    """Sizes a :class:`RunPlan` to ``minutes`` of training time, and re-sizes it as the run goes.

    Call :meth:`observe` after every optimizer step with the step count and the training seconds
    spent so far (logging, k-NN and checkpoints excluded); it returns a re-sized plan when it
    re-sizes, None otherwise. When to re-size is decided in steps from values all ranks agree on
    (``agree`` maps a local float to the value every rank uses: the max over ranks under torchrun),
    so every rank takes the same decisions at the same steps.
    """

    WARMUP_STEPS = 3
    MIN_STEPS = 10
    FRACTION = 0.05
    MAX_WINDOW_S = 60.0
    RESIZE_AT = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)

    def __init__(self, minutes: float, agree: Callable[[float], float] = lambda x: x) -> None:
        if minutes <= 0:
            raise ValueError(f"time budget must be > 0 minutes, got {minutes}")
        self.budget_s = 60.0 * minutes
        self.agree = agree
        self._start_step: int | None = None
        self._prev_s: float | None = None
        self._times: list[float] = []  # step times since the last re-size (warm-up steps left out)
        self._next_step: int | None = None  # where the next decision falls
        self.resizes = 0

    def observe(self, step: int, train_s: float, plan: RunPlan) -> RunPlan | None:
        """``step`` optimizer steps done after ``train_s`` seconds of training."""
        if self._start_step is None:  # the first call fixes where this run (or resume) started
            self._start_step = step - 1
        done_here = step - self._start_step
        if self._prev_s is not None and done_here > self.WARMUP_STEPS:
            self._times.append(train_s - self._prev_s)
        self._prev_s = train_s
        if self._next_step is None:
            if done_here < self.MIN_STEPS:
                return None
            # the first timing window: 5 % of the budget, at least MIN_STEPS steps; the same on every rank
            window_s = min(self.MAX_WINDOW_S, self.FRACTION * self.budget_s)
            est = self.agree(float(np.median(self._times))) if self._times else 0.0
            self._next_step = self._start_step + max(done_here, self.WARMUP_STEPS + math.ceil(window_s / max(est, 1e-9)))
        if step < self._next_step or step >= plan.stop_step:
            return None
        return self._resize(plan, step, train_s)

    def _resize(self, plan: RunPlan, step: int, train_s: float) -> RunPlan | None:
        per_step = self.agree(float(np.median(self._times))) if self._times else 0.0
        elapsed = self.agree(train_s)
        self._times = []
        steps_left = int((self.budget_s - elapsed) / max(per_step, 1e-9))
        stop = max(step + 1, step + steps_left)
        # the next decision: where the next fraction of the budget is reached at this speed
        upcoming = [f * self.budget_s for f in self.RESIZE_AT if f * self.budget_s > elapsed]
        self._next_step = (step + max(1, math.ceil((upcoming[0] - elapsed) / max(per_step, 1e-9)))
                           if upcoming else stop)
        if stop == plan.stop_step and plan.budget_sized:
            return None
        self.resizes += 1
        log.info("time budget %.1f min: %.1f s spent at step %d, %.3f s/step (median): %s %d steps (%d epochs of "
                 "data)", self.budget_s / 60, elapsed, step, per_step, "sized to" if self.resizes == 1 else
                 "re-sized to", stop, -(-stop // plan.niter_per_epoch))
        return plan.resized(step, stop)
