"""The run plan (length + schedules, replaced whole) and the time budget that sizes it, driven
by given step times: the same verdict on any machine."""
import pytest

from dino_fast.config import TrainConfig
from dino_fast.plan import RunPlan, TimeBudget
from dino_fast.schedules import cosine_schedule_steps


def _plan(**kw) -> RunPlan:
    return RunPlan.from_config(TrainConfig(**{"epochs": 50, "warmup_epochs": 10, "warmup_teacher_temp_epochs": 20,
                                              **kw}), niter_per_epoch=5)


def _drive(budget: TimeBudget, plan: RunPlan, step_s: list[float]) -> tuple[int, RunPlan | None]:
    """Feed step times until the budget sizes the plan; returns (step, sized plan)."""
    t = 0.0
    for step, dt in enumerate(step_s, start=1):
        t += dt
        sized = budget.observe(step, t, plan)
        if sized is not None:
            return step, sized
    return len(step_s), None


def test_steady_steps_and_time_spent():
    """Steps 4..10 take 2 s (warm-up steps take 10 s each and are not timed); 30 s + 14 s spent by
    step 10 of a 60 s budget: 8 more steps fit, 18 in all: 4 epochs of 5, warm-ups scaled."""
    plan = _plan()
    step, sized = _drive(TimeBudget(1.0), plan, [10.0] * 3 + [2.0] * 20)
    assert step == 10 and sized.stop_step == 18 and sized.total_steps == 18 and sized.budget_sized
    assert (sized.epochs, sized.warmup_epochs, sized.warmup_teacher_temp_epochs) == (4, 1, 2)
    lr = cosine_schedule_steps(plan.base_lr, plan.min_lr, 18, 5)
    assert [sized.at(i).lr for i in range(18)] == pytest.approx(list(lr), rel=1e-12)
    assert plan.stop_step == 250 and not plan.budget_sized  # the old plan is untouched


def test_window_grows_with_the_budget():
    """A 20-minute budget times 5 % of it (60 s): at 1 s per step, steps 4..63."""
    step, sized = _drive(TimeBudget(20.0), _plan(), [1.0] * 100)
    assert step == 63 and sized.stop_step == 1200


def test_over_budget_still_takes_one_more_step():
    step, sized = _drive(TimeBudget(0.1), _plan(), [2.0] * 20)
    assert sized.stop_step == step + 1


def test_agree_takes_the_slowest_rank():
    """Every rank sizes the same run: the max of the ranks' times (here the other rank is 2x slower)."""
    step, sized = _drive(TimeBudget(1.0, agree=lambda x: 2 * x), _plan(), [1.0] * 20)
    assert sized.stop_step == 10 + int((60 - 20) / 2)


def test_plan_round_trips_and_sizing_keeps_the_rest():
    plan = _plan(max_steps=7)
    assert plan.stop_step == 7 and RunPlan.from_dict(plan.to_dict()) == plan
    sized = plan.sized(12)
    assert sized.base_lr == plan.base_lr and sized.niter_per_epoch == 5 and sized.stop_step == 12


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="> 0"):
        TimeBudget(0)
