"""Schedules against the official DINO definitions, every value: lr / wd / teacher momentum
(``utils.cosine_scheduler``) and the teacher temperature (``main_dino.DINOLoss``).

The references below are copied from facebookresearch/dino (utils.py, main_dino.py) and
share no code with dino_fast.
"""
import numpy as np
import pytest

from dino_fast.dino_loss import DINOLoss
from dino_fast.config import TrainConfig
from dino_fast.plan import RunPlan
from dino_fast.schedules import cosine_schedule_steps, cosine_scheduler


# ----------------------------------------------------------------------------- official code
def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.py, verbatim."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)

    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))

    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def official_teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """facebookresearch/dino main_dino.py DINOLoss.__init__, verbatim."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp,
                    teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
    ))


# (epochs, niter_per_ep, warmup_epochs): odd sizes, warm-up of 0, 1 and most epochs, one
# iteration per epoch, a cosine part of a single step.
GRID = [(1, 1, 0), (2, 1, 1), (3, 7, 1), (5, 13, 2), (10, 3, 9), (7, 1, 0), (100, 5, 10), (4, 17, 3), (9, 2, 0)]


def _exact(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual - expected)
    worst = int(diff.argmax())
    # same formula in float64: equal to the last bit (allow 1 ulp for a different op order)
    assert np.allclose(actual, expected, rtol=1e-15, atol=0), (
        f"{what}: worst at step {worst}: {actual[worst]!r} vs official {expected[worst]!r}")


# ----------------------------------------------------------------------------- lr / wd / momentum
@pytest.mark.parametrize("epochs,niter,warmup", GRID)
def test_cosine_scheduler_is_official(epochs, niter, warmup):
    for base, final, start in ((5e-4 * 3, 1e-6, 0), (0.04, 0.4, 0), (0.996, 1, 0), (2.0, 0.5, 0.25)):
        ref = official_cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=start)
        _exact(cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=start), ref,
               f"cosine_scheduler({base}, {final}, {epochs}, {niter}, {warmup}, {start})")
        _exact(cosine_schedule_steps(base, final, epochs * niter, warmup * niter, start), ref,
               f"cosine_schedule_steps({base}, {final}, {epochs * niter}, {warmup * niter}, {start})")


@pytest.mark.parametrize("epochs,niter,warmup", GRID)
def test_run_schedules_are_official(epochs, niter, warmup):
    """The trainer's schedules (the run plan) = official lr_schedule, wd_schedule, momentum_schedule
    and DINOLoss.teacher_temp_schedule, with the official linear scaling of the lr (batch 64 x 2 ranks)."""
    cfg = TrainConfig(epochs=epochs, warmup_epochs=warmup, batch_size_per_gpu=64, teacher_temp=0.07,
                      warmup_teacher_temp_epochs=min(3, epochs))
    plan = RunPlan.from_config(cfg, niter, world_size=2)
    base_lr = cfg.lr * 64 * 2 / 256.0
    lr = official_cosine_scheduler(base_lr, cfg.min_lr, epochs, niter, warmup_epochs=warmup)
    wd = official_cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, epochs, niter)
    momentum = official_cosine_scheduler(cfg.momentum_teacher, 1, epochs, niter)
    temp = official_teacher_temp_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp, min(3, epochs), epochs)
    got = [plan.at(step) for step in range(epochs * niter)]
    _exact([v.lr for v in got], lr, "lr")
    _exact([v.wd for v in got], wd, "wd")
    _exact([v.momentum for v in got], momentum, "momentum")
    _exact([v.teacher_temp for v in got], np.repeat(temp, niter), "teacher_temp")
    assert all(v.momentum < 1.0 for v in got), "the official teacher momentum never reaches 1"
    past, last = plan.at(epochs * niter + 5), plan.at(epochs * niter - 1)  # past the end: the last values
    assert (past.lr, past.wd, past.momentum, past.teacher_temp) == (last.lr, last.wd, last.momentum, last.teacher_temp)


@pytest.mark.parametrize("total,warmup", [(37, 0), (37, 36), (11, 4), (1, 1), (2, 1), (6, 6)])
def test_step_schedule_at_any_length(total, warmup):
    """Step counts that are no whole number of epochs (time-budgeted runs): the official
    formula with epochs=total, niter_per_ep=1."""
    _exact(cosine_schedule_steps(0.3, 0.01, total, warmup, 0.05),
           official_cosine_scheduler(0.3, 0.01, total, 1, warmup_epochs=warmup, start_warmup_value=0.05),
           f"steps({total}, {warmup})")


def test_bad_lengths():
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule_steps(1, 0, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule_steps(1, 0, 5, 6)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule_steps(1, 0, 5, -1)
    with pytest.raises(ValueError, match="epochs"):
        cosine_scheduler(1, 0, 0, 10)


# ----------------------------------------------------------------------------- teacher temperature
@pytest.mark.parametrize("warmup_temp,temp,warmup_epochs,nepochs",
                         [(0.04, 0.07, 30, 100), (0.04, 0.04, 0, 1), (0.04, 0.07, 3, 3), (0.02, 0.065, 7, 13),
                          (0.04, 0.07, 1, 5), (0.05, 0.03, 4, 9)])
def test_teacher_temp_schedule_is_official(warmup_temp, temp, warmup_epochs, nepochs):
    loss = DINOLoss(16, 4, warmup_temp, temp, warmup_epochs, nepochs, impl="torch")
    ref = official_teacher_temp_schedule(warmup_temp, temp, warmup_epochs, nepochs)
    _exact(loss.teacher_temp_schedule, ref, "teacher_temp_schedule")
    _exact([loss.teacher_temp_at(e) for e in range(nepochs)], ref, "teacher_temp_at")
