"""The run plan (length + schedules, replaced whole) and the time budget that sizes and re-sizes it,
driven by given step times: the same verdict on any machine."""
import numpy as np
import pytest

from dino_fast.config import TrainConfig
from dino_fast.plan import RunPlan, TimeBudget
from dino_fast.schedules import cosine_scheduler


def _plan(**kw) -> RunPlan:
    return RunPlan.from_config(TrainConfig(**{"epochs": 50, "warmup_epochs": 10, "warmup_teacher_temp_epochs": 20,
                                              "warmup_teacher_temp": 0.01, **kw}), niter_per_epoch=5)


def _run(budget: TimeBudget, plan: RunPlan, step_time) -> tuple[float, RunPlan, list[int], list[RunPlan]]:
    """A run as the trainer drives it: step, observe, adopt a re-sized plan, until the plan's end.
    ``step_time(step, elapsed_s)`` gives each step's seconds. Returns (seconds spent, final plan,
    the steps where it was re-sized, the plan each step ran under)."""
    t, step, resized, used = 0.0, 0, [], []
    while step < plan.stop_step:
        used.append(plan)
        t += step_time(step, t)
        step += 1
        new = budget.observe(step, t, plan)
        if new is not None:
            plan = new
            resized.append(step)
    return t, plan, resized, used


def test_first_sizing_counts_the_time_spent():
    """Steps 4..10 take 2 s (warm-up steps take 10 s each and are not timed); 30 s + 14 s spent by
    step 10 of a 60 s budget: 8 more steps fit, 18 in all; later checks find nothing to change."""
    plan = _plan()
    t, final, resized, _ = _run(TimeBudget(1.0), plan, lambda i, t: 10.0 if i < 3 else 2.0)
    assert resized == [10] and final.stop_step == 18 and final.budget_sized and t == 60.0
    assert final.anchors == ((10, 10.0),)  # step 10 sits where the unsized plan had it
    assert plan.stop_step == 250 and not plan.budget_sized  # the old plan is untouched


def test_window_grows_with_the_budget():
    """A 20-minute budget times 5 % of it (60 s): at 1 s per step, steps 4..63, then 1200 steps."""
    t, final, resized, _ = _run(TimeBudget(20.0), _plan(epochs=400), lambda i, t: 1.0)
    assert resized[0] == 63 and final.stop_step == 1200 and t == 1200.0


@pytest.mark.parametrize("name,step_time", [
    ("first minute 2x slower", lambda i, t: 2.0 if t < 60 else 1.0),
    ("slowdown in the middle", lambda i, t: 1.0 if t < 600 else 1.6),
    ("speed-up at 30 %", lambda i, t: 1.5 if t < 360 else 0.7),
    ("noisy, with stalls", lambda i, t: 1.0 + 0.2 * np.sin(i) + (5.0 if i % 97 == 0 else 0.0)),
])
def test_budget_holds_whatever_the_machine_does(name, step_time):
    """Issue 31: a 20-minute budget ends within +-3 % of 20 minutes, its schedules end at their final
    values, and no re-size makes a schedule jump (each step's position along the schedules moves on
    by about the same amount: the re-sizes only spread what is left over the steps that are left)."""
    plan = _plan(epochs=400)
    t, final, resized, used = _run(TimeBudget(20.0), plan, step_time)
    assert abs(t - 1200.0) <= 0.03 * 1200.0, f"{name}: {t:.0f} s, re-sized at {resized}"
    assert len(resized) >= 2, name  # sized, then re-sized as the speed changed
    last = final.stop_step - 1
    lr, wd, momentum, temp = final._schedules()
    values = final.at(last)
    assert (values.lr, values.wd, values.momentum, values.teacher_temp) == \
        pytest.approx((lr[-1], wd[-1], momentum[-1], temp[-1]), rel=1e-12)
    positions = np.array([p.position(i) for i, p in enumerate(used)])
    steps = np.diff(positions)
    assert (steps > 0).all() and steps.max() <= 3.0 * np.median(steps), f"{name}: a jump at a re-size"
    lrs = np.array([p.at(i).lr for i, p in enumerate(used)])
    typical = np.abs(np.diff(lrs)).max()
    assert np.abs(np.diff(lrs))[np.array(resized[:-1]) - 1].max() <= typical  # no step of lr larger at re-sizes


def test_positions_are_the_official_arrays_until_a_resize():
    plan = _plan()
    lr = cosine_scheduler(plan.base_lr, plan.min_lr, 50, 5, warmup_epochs=10)
    assert [plan.at(i).lr for i in range(250)] == list(lr)  # exactly the official values
    resized = plan.resized(100, 130)
    assert [resized.at(i).lr for i in range(100)] == list(lr[:100])
    assert resized.at(129).lr == lr[-1] and resized.at(500).lr == lr[-1]
    again = resized.resized(115, 160)  # a second re-size keeps the first stretch as it was
    assert [again.at(i).lr for i in range(115)] == pytest.approx([resized.at(i).lr for i in range(115)], rel=1e-12)
    assert again.at(159).lr == lr[-1]


def test_over_budget_still_takes_one_more_step():
    t, final, resized, _ = _run(TimeBudget(0.1), _plan(), lambda i, t: 2.0)
    assert final.stop_step == resized[0] + 1


def test_agree_takes_the_slowest_rank():
    """Every rank sizes the same run: the max of the ranks' times (here the other rank is 2x slower)."""
    budget = TimeBudget(1.0, agree=lambda x: 2 * x)
    t, step, plan = 0.0, 0, _plan()
    while step < 10:
        t += 1.0
        step += 1
        new = budget.observe(step, t, plan)
    assert new.stop_step == 10 + int((60 - 20) / 2)


def test_plan_round_trips_with_its_resizes():
    plan = _plan(max_steps=7)
    assert plan.stop_step == 7 and RunPlan.from_dict(plan.to_dict()) == plan
    resized = plan.resized(3, 12).resized(6, 14)
    assert resized.anchors[0] == (3, 3.0) and len(resized.anchors) == 2
    assert RunPlan.from_dict(resized.to_dict()) == resized
    assert resized.base_lr == plan.base_lr and resized.niter_per_epoch == 5 and resized.stop_step == 14
    old = {k: v for k, v in resized.to_dict().items() if k != "anchors"}  # a plan saved before re-sizes kept positions
    assert RunPlan.from_dict(old).position(13) == plan.total_steps - 1


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="> 0"):
        TimeBudget(0)
