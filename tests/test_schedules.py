"""Schedules' endpoints and shape, optimizer groups, gradient clipping, last-layer freezing."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from dino_fast.optim import build_optimizer, cancel_last_layer_gradients_, clip_gradients_, param_groups, set_schedule_
from dino_fast.schedules import Schedules, cosine_scheduler


@pytest.mark.parametrize("total,warmup", [(100, 10), (37, 0), (5, 5), (1, 0), (7, 3)])
def test_cosine_endpoints(total, warmup):
    base, final, start = 0.5, 0.01, 0.0
    s = cosine_scheduler(base, final, total, warmup, start)
    assert len(s) == total
    if warmup:
        assert s[0] == pytest.approx(start)
        assert s[warmup - 1] == pytest.approx(base)
        assert np.all(np.diff(s[:warmup]) >= 0)
    if total > warmup:
        assert s[-1] == pytest.approx(final)
        if total - warmup > 1:
            assert s[warmup] == pytest.approx(base)
        assert np.all(np.diff(s[warmup:]) <= 1e-12)  # decreasing cosine


def test_cosine_midpoint_is_mean():
    s = cosine_scheduler(1.0, 0.0, 101)
    assert s[50] == pytest.approx(0.5)


def test_schedules_momentum_to_one_and_lr_warmup():
    sch = Schedules(base_lr=1e-3, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996,
                    total_steps=50, warmup_steps=10)
    assert sch.at(0)[0] == 0.0
    assert sch.at(9)[0] == pytest.approx(1e-3)
    lr, wd, m = sch.at(49)
    assert (lr, wd, m) == (pytest.approx(1e-6), pytest.approx(0.4), pytest.approx(1.0))
    assert sch.at(0)[1:] == (pytest.approx(0.04), pytest.approx(0.996))
    assert sch.at(10_000) == sch.at(49)  # past the end: last values


def test_bad_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        cosine_scheduler(1, 0, 0)


def _toy():
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def test_param_groups_no_decay_on_bias_and_norm():
    m = _toy()
    decay, no_decay = param_groups(m)
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[2].weight)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(m)
    set_schedule_(opt, 0.1, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_clip_gradients_per_parameter():
    torch.manual_seed(0)
    m = _toy()
    m(torch.randn(5, 4)).pow(2).sum().mul(100).backward()
    before = [p.grad.norm().item() for p in m.parameters()]
    norms = clip_gradients_(m, 1.0)
    after = [p.grad.norm().item() for p in m.parameters()]
    for b, a, n in zip(before, after, norms.tolist()):
        assert n == pytest.approx(b, rel=1e-5)
        expected = b * min(1.0, 1.0 / (b + 1e-6))  # official: scale by clip / (norm + 1e-6) when < 1
        assert a == pytest.approx(expected, rel=1e-5)
    assert clip_gradients_(m, 0) is None


def test_cancel_last_layer():
    m = nn.Module()
    m.body = nn.Linear(2, 2)
    m.last_layer = nn.Linear(2, 2)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients_(m, epoch=1, freeze_last_layer=1)
    assert m.last_layer.weight.grad is not None
    cancel_last_layer_gradients_(m, epoch=0, freeze_last_layer=1)
    assert m.last_layer.weight.grad is None and m.body.weight.grad is not None
    assert math.isfinite(m.body.weight.grad.sum().item())
