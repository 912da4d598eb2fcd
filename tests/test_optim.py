"""Optimizers and gradient edits against the official DINO code (facebookresearch/dino
utils.py / main_dino.py), transcribed below independently of dino_fast: parameter groups,
AdamW / SGD / LARS steps, per-parameter clipping (also after GradScaler.unscale_), freezing
of the last layer."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dino_fast.models import DINOHead
from dino_fast.optim import (LARS, OPTIMIZERS, build_optimizer, cancel_last_layer_gradients_, clip_gradients_,
                             param_groups, set_schedule_)

from tests.helpers import assert_close


# ----------------------------------------------------------------------------- official code
class OfficialLARS(torch.optim.Optimizer):
    """facebookresearch/dino utils.LARS, verbatim."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        eta=eta, weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                dp = p.grad

                if dp is None:
                    continue

                if p.ndim != 1:
                    dp = dp.add(p, alpha=g['weight_decay'])

                if p.ndim != 1:
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0,
                                                (g['eta'] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)

                param_state = self.state[p]
                if 'mu' not in param_state:
                    param_state['mu'] = torch.zeros_like(p)
                mu = param_state['mu']
                mu.mul_(g['momentum']).add_(dp)

                p.add_(mu, alpha=-g['lr'])


def official_get_params_groups(model):
    regularized = []
    not_regularized = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # we do not regularize biases nor Norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def official_build_optimizer(model, name):
    """main_dino.py: the three --optimizer choices over get_params_groups(student)."""
    params_groups = official_get_params_groups(model)
    if name == "adamw":
        return torch.optim.AdamW(params_groups)  # to use with ViTs
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr is set by scheduler
    return OfficialLARS(params_groups)  # to use with convnet and large batches


def official_set_schedule(optimizer, lr, wd):
    """main_dino.py train_one_epoch: lr on every group, weight decay on the first only."""
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = lr
        if i == 0:  # only the first group is regularized
            param_group["weight_decay"] = wd


def official_clip_gradients(model, clip):
    norms = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def official_cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


# ----------------------------------------------------------------------------- models
class ConvNet(nn.Module):
    """Every parameter kind: 4-D conv, BatchNorm (1-D weight and bias), 2-D linear, a DINO head
    with a frozen weight_g (requires_grad False), a zero-initialised matrix (LARS's
    ||p|| = 0 branch) and a 0-D scalar (ndim != 1: in the decayed group, decayed and
    adapted by LARS). The ReLU sits between the conv and the BatchNorm so that the conv's bias has
    a gradient: under a train-mode BatchNorm it would be zero in exact arithmetic, and Adam would
    scale its rounding noise up to lr-sized steps, so an ulp anywhere (fused against foreach
    AdamW) would move it by 1e-3."""

    def __init__(self, out_dim: int = 9) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.proj = nn.Linear(5, 7)
        self.zero = nn.Parameter(torch.zeros(7, 7))
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.head = DINOHead(7, out_dim, hidden_dim=11, bottleneck_dim=6, norm_last_layer=True)

    def forward(self, x):
        x = self.bn(self.conv(x).relu()).mean(dim=(2, 3))  # (B, 5)
        x = self.proj(x)
        return self.head(self.gain * (x + x @ self.zero))


def _model(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet()


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 6, 5, generator=g)
    target = torch.randn(4, 9, generator=g)
    return (model(x) - target).pow(2).sum()


def _backward(model: nn.Module, seed: int, scale: float = 1.0) -> None:
    (_loss(model, seed) * scale).backward()


def _compare_models(ours: nn.Module, ref: nn.Module, what: str, **tol) -> None:
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(a, b, name=f"{what}: {name}", **tol)


# ----------------------------------------------------------------------------- groups
def test_param_groups_are_official():
    model = _model(0)
    ours, ref = param_groups(model), official_get_params_groups(model)
    assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in ref]
    assert ours[1]["weight_decay"] == ref[1]["weight_decay"] == 0.0 and "weight_decay" not in ours[0]
    frozen = model.head.last_layer.weight_g
    assert all(p is not frozen for g in ours for p in g["params"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_set_schedule_is_official(name):
    model = _model(1)
    opt, ref = build_optimizer(model, name), official_build_optimizer(model, name)
    set_schedule_(opt, 0.25, 0.125)
    official_set_schedule(ref, 0.25, 0.125)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == \
        [(g["lr"], g["weight_decay"]) for g in ref.param_groups]


def test_optimizer_hyper_parameters_are_official():
    model = _model(2)
    for name in OPTIMIZERS:
        ours, ref = build_optimizer(model, name), official_build_optimizer(model, name)
        assert type(ref).__name__.removeprefix("Official") == type(ours).__name__
        skip = {"params", "no_decay", "lr", "foreach", "fused"}  # lr is set by the schedule every step
        for g, h in zip(ours.param_groups, ref.param_groups):
            assert {k: v for k, v in g.items() if k not in skip} == {k: v for k, v in h.items() if k not in skip}
    with pytest.raises(ValueError, match="adamw, sgd, lars"):
        build_optimizer(model, "lamb")


# ----------------------------------------------------------------------------- steps
# (lr, wd) per step: warm-up-like small lr, wd 0 first (LARS's ||update|| = 0 branch on the
# zero matrix), then decay.
STEPS = [(0.0, 0.0), (0.05, 0.0), (0.3, 0.04), (1.2, 0.4), (0.7, 0.2)]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimizer_steps_equal_official(name, seed):
    ours_model = _model(seed)
    ref_model = copy.deepcopy(ours_model)
    ours, ref = build_optimizer(ours_model, name), official_build_optimizer(ref_model, name)
    for step, (lr, wd) in enumerate(STEPS):
        for model, opt, set_ in ((ours_model, ours, set_schedule_), (ref_model, ref, official_set_schedule)):
            opt.zero_grad(set_to_none=True)
            _backward(model, seed * 100 + step)
            if step == 1:  # the zero matrix gets no gradient: LARS sees ||p|| = 0 and ||dp|| = 0
                model.zero.grad.zero_()
            set_(opt, lr, wd)
            opt.step()
        _compare_models(ours_model, ref_model, f"{name} step {step}", rtol=1e-5, atol=1e-6)
    if name == "lars":
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            if p.requires_grad:
                assert_close(ours.state[p]["mu"], ref.state[q]["mu"], name="LARS momentum buffer")


def test_lars_skips_decay_and_adaptation_for_1d_params():
    """A bias: plain momentum SGD whatever the group's weight decay (official LARS)."""
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    w = nn.Parameter(torch.full((2, 2), 3.0))
    opt = LARS([{"params": [p, w], "weight_decay": 0.5}], lr=0.1)
    p.grad, w.grad = torch.tensor([0.5, 0.5]), torch.ones(2, 2)
    opt.step()
    assert_close(p.detach(), torch.tensor([1.0 - 0.05, -2.0 - 0.05]), name="bias after one LARS step")
    dp = torch.ones(2, 2) + 0.5 * 3.0  # decayed update, norm 5; ||w|| = 6
    q = 0.001 * 6.0 / 5.0
    assert_close(w.detach(), torch.full((2, 2), 3.0) - 0.1 * q * dp, name="matrix after one LARS step")


# ----------------------------------------------------------------------------- clip / freeze
@pytest.mark.parametrize("clip", [0.03, 0.3, 3.0, 1e6])
@pytest.mark.parametrize("seed", [3, 4])
def test_clip_gradients_equals_official(clip, seed):
    ours_model = _model(seed)
    ref_model = copy.deepcopy(ours_model)
    for m in (ours_model, ref_model):
        _backward(m, seed, scale=10.0)
    ours_model.proj.bias.grad = ref_model.proj.bias.grad = None  # parameters without gradient are skipped
    norms = clip_gradients_(ours_model, clip)
    ref_norms = official_clip_gradients(ref_model, clip)
    assert_close(torch.stack(norms), torch.tensor(ref_norms), name="per-parameter gradient norms")
    for (name, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert_close(a.grad, b.grad, name=f"clipped grad {name} (clip {clip})")
    assert clip_gradients_(ours_model, 0) is None  # --clip_grad 0 disables


class _Count(TorchDispatchMode):
    """The aten ops dispatched inside the block, by name (what a foreach op does inside is not seen)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_clip_gradients_dispatches_a_fixed_number_of_ops():
    """Issue 27: the clip was a Python list of per-parameter ops (~3 x 157 launches for ViT-S/16);
    foreach ops keep it at a handful whatever the parameter count."""
    counts = {}
    for width in (1, 8):
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(width * 5)])
        model(torch.randn(3, 4)).pow(2).sum().backward()
        with _Count() as c:
            clip_gradients_(model, 0.03)
        counts[width] = c.ops
    assert len(counts[1]) == len(counts[8]) <= 6, counts[8]


def test_adamw_is_fused_on_cpu():
    """Issue 31: on CPU, foreach AdamW runs its ~12 ops per group as loops over the parameters
    (14 ms per step for the small preset's 3.7 M parameters); the fused kernel is one op per group
    (2.2 ms). Its values equal the official AdamW's: test_optimizer_steps_equal_official."""
    model = _model(6)
    opt = build_optimizer(model, "adamw")
    _backward(model, 6)
    set_schedule_(opt, 0.1, 0.04)
    opt.step()  # builds the state
    with _Count() as c:
        opt.step()
    aten = [op for op in c.ops if op.startswith("aten.")]
    # per group: the step counters' increment and the kernel (foreach: add, mul, lerp, mul, addcmul, ...)
    assert aten == ["aten._foreach_add_", "aten._fused_adamw_"] * len(opt.param_groups), c.ops


def test_bench_adamw_run_key_switches_the_implementation():
    """bench_train's ``adamw=foreach`` run key (its ``before`` baseline) gives the trainer's AdamW the
    foreach implementation back; ``fused`` the trainer's own."""
    from types import SimpleNamespace

    from bench.train_preset import apply_run_keys, parse_variant

    name, over = parse_variant("old:adamw=foreach,threads=1")
    assert (name, over) == ("old", {"adamw": "foreach", "threads": 1})
    model = _model(7)
    trainer = SimpleNamespace(optimizer=build_optimizer(model, "adamw"), data=SimpleNamespace(loader=None))
    apply_run_keys(trainer, over)
    _backward(model, 7)
    with _Count() as c:
        trainer.optimizer.step()
    assert "aten._foreach_lerp_" in c.ops and "aten._fused_adamw_" not in c.ops, c.ops
    with pytest.raises(ValueError, match="adamw='apex': use fused or foreach"):
        apply_run_keys(trainer, {"adamw": "apex"})


@pytest.mark.parametrize("freeze_last_layer", [0, 1, 2])
@pytest.mark.parametrize("epoch", [0, 1, 2, 5])
def test_cancel_last_layer_equals_official(epoch, freeze_last_layer):
    model = _model(5)
    model.head.last_layer.weight_g.requires_grad = True  # norm_last_layer=False: weight_g trains too
    ref = copy.deepcopy(model)
    for m in (model, ref):
        _backward(m, 5)
    cancel_last_layer_gradients_(model, epoch, freeze_last_layer)
    official_cancel_gradients_last_layer(epoch, ref, freeze_last_layer)
    cancelled = [n for n, p in model.named_parameters() if p.grad is None]
    assert cancelled == [n for n, p in ref.named_parameters() if p.grad is None]
    assert bool(cancelled) == (epoch < freeze_last_layer)


# ----------------------------------------------------------------------------- fp16 scaler
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_clip_after_grad_scaler_unscale(name):
    """Official fp16 order: scale(loss).backward(); unscale_; clip; cancel; scaler.step;
    update. Same weights as the fp32 order; a step with an inf gradient is skipped."""
    ours_model = _model(6)
    ref_model = copy.deepcopy(ours_model)
    ours, ref = build_optimizer(ours_model, name), official_build_optimizer(ref_model, name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for step, (lr, wd) in enumerate(STEPS[2:]):
        set_schedule_(ours, lr, wd)
        official_set_schedule(ref, lr, wd)
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        scaler.scale(_loss(ours_model, 60 + step)).backward()
        scaler.unscale_(ours)
        clip_gradients_(ours_model, 0.3)
        cancel_last_layer_gradients_(ours_model, step, 1)
        scaler.step(ours)
        scaler.update()
        _backward(ref_model, 60 + step)
        official_clip_gradients(ref_model, 0.3)
        official_cancel_gradients_last_layer(step, ref_model, 1)
        ref.step()
        _compare_models(ours_model, ref_model, f"{name} fp16-scaler step {step}", rtol=1e-4, atol=1e-6)
    before = [p.detach().clone() for p in ours_model.parameters()]
    scale = scaler.get_scale()
    ours.zero_grad(set_to_none=True)
    scaler.scale(_loss(ours_model, 99)).backward()
    ours_model.proj.weight.grad[0, 0] = float("inf")  # an fp16 overflow
    scaler.unscale_(ours)
    clip_gradients_(ours_model, 0.3)
    scaler.step(ours)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, ours_model.parameters())), "overflow step was not skipped"
    assert scaler.get_scale() < scale
