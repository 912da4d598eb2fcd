"""DINO loss: reference vs an independent per-pair loop, fused Triton kernel vs reference
(loss, student gradient, teacher column sums), center update, the DINOLoss module both ways,
input validation and state dicts. On CPU the kernels run through the Triton interpreter."""
from __future__ import annotations

import zlib

import pytest
import torch

from dino_fast.loss import DINOLoss, dino_loss_reference
from tests.helpers import POISON, TOL, assert_close, requires_cuda

dl = pytest.importorskip("dino_fast.kernels.dino_loss")


def _seed(*case) -> None:
    """A fresh, reproducible seed per parametrized case (crc32: Python's str hash is salted)."""
    torch.manual_seed(zlib.crc32(repr(case).encode()))


def _inputs(batch: int, ncrops: int, k: int, dtype: torch.dtype, device: torch.device, n_global: int = 2):
    student = torch.randn(ncrops * batch, k, device=device).to(dtype).requires_grad_()
    teacher = torch.randn(n_global * batch, k, device=device).to(dtype)
    center = 0.1 * torch.randn(1, k, device=device)
    return student, teacher, center


def _grad_atol(dtype: torch.dtype, g_ref: torch.Tensor) -> float:
    """Softmax gradients carry an absolute error relative to their largest entry (rounding of
    x = s / tau near the row max), so the absolute tolerance scales with max |g|."""
    return TOL[dtype][1] * max(1.0, float(g_ref.abs().max()))


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the fused op allocates for a kernel to write starts as NaN."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, POISON, dtype=dtype, device=device)

    monkeypatch.setattr(dl, "_empty", nan_empty)


# ----------------------------------------------------------------------------- (a) reference


def _independent_loss(s, t, c, tau_s, tau_t, ncrops, n_global):
    """Per pair, per image, written from the formula (float64), independent of dino_loss_reference."""
    batch = t.shape[0] // n_global
    c = c.reshape(-1)
    terms = []
    for i in range(n_global):
        for v in range(ncrops):
            if v == i:
                continue
            per_image = []
            for b in range(batch):
                z = (t[i * batch + b] - c) / tau_t
                q = torch.exp(z - z.max())
                q = q / q.sum()
                x = s[v * batch + b] / tau_s
                log_p = x - x.max() - torch.log(torch.exp(x - x.max()).sum())
                per_image.append(-(q * log_p).sum())
            terms.append(sum(per_image) / batch)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("batch,ncrops,k,n_global", [(1, 2, 5, 2), (3, 4, 33, 2), (2, 10, 100, 2),
                                                     (2, 3, 17, 1), (2, 5, 64, 3)])
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_reference_matches_per_pair_loop(batch, ncrops, k, n_global, teacher_temp):
    _seed("ref", batch, ncrops, k, n_global, teacher_temp)
    s, t, c = _inputs(batch, ncrops, k, torch.float32, torch.device("cpu"), n_global)
    loss = dino_loss_reference(s, t, c, 0.1, teacher_temp, ncrops, n_global)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    expected = _independent_loss(s64, t.double(), c.double(), 0.1, teacher_temp, ncrops, n_global)
    expected.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, expected, torch.float32, name="reference loss")
    assert_close(s.grad, s64.grad, torch.float32, atol=_grad_atol(torch.float32, s64.grad), name="reference grad")


# ----------------------------------------------------------------------------- (b) fused vs reference

SHAPES = [  # (B, V, K, block_k): K not a block multiple, tiny, odd B, forced small blocks
    (2, 2, 1000, None),
    (2, 3, 1000, 128),
    (3, 6, 4097, None),
    (1, 3, 4097, 1024),
    (2, 3, 7, None),
    (1, 2, 1, None),
    (2, 2, 65536, None),
    (1, 6, 65536, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
@pytest.mark.parametrize("batch,ncrops,k,block_k", SHAPES)
def test_fused_matches_reference(batch, ncrops, k, block_k, teacher_temp, dtype, device, poisoned):
    _seed("fused", batch, ncrops, k, block_k, teacher_temp, dtype)
    s, t, c = _inputs(batch, ncrops, k, dtype, device)
    loss, col_sum = dl.fused_dino_loss(s, t, c, 0.1, teacher_temp, ncrops, block_k=block_k)
    loss.backward()
    grad, s.grad = s.grad, None
    ref = dino_loss_reference(s, t, c, 0.1, teacher_temp, ncrops)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype and not col_sum.requires_grad
    # both compute in fp32 from the same (possibly bf16) values: fp32 tolerance for the loss
    assert_close(loss, ref, torch.float32, name="loss")
    assert_close(grad, s.grad, dtype, atol=_grad_atol(dtype, s.grad.float()), name="student grad")
    assert_close(col_sum, t.double().sum(0), torch.float32, atol=1e-5, name="teacher column sum")


@pytest.mark.parametrize("n_global,ncrops", [(1, 3), (3, 5)])
def test_fused_other_global_counts(n_global, ncrops, device, poisoned):
    _seed("globals", n_global, ncrops)
    s, t, c = _inputs(2, ncrops, 300, torch.float32, device, n_global)
    loss, _ = dl.fused_dino_loss(s, t, c, 0.1, 0.05, ncrops, n_global, block_k=128)
    loss.backward()
    grad, s.grad = s.grad, None
    ref = dino_loss_reference(s, t, c, 0.1, 0.05, ncrops, n_global)
    ref.backward()
    assert_close(loss, ref, name="loss")
    assert_close(grad, s.grad, atol=_grad_atol(torch.float32, s.grad), name="student grad")


def test_fused_fp16_noncontiguous_scaled_grad(device, poisoned):
    """fp16 input, logits that are a column slice (non-contiguous), grad_output != 1."""
    _seed("fp16")
    k, batch, ncrops = 777, 2, 4
    wide = torch.randn(ncrops * batch, k + 5, device=device).half().requires_grad_()
    s = wide[:, 2:2 + k]
    t = torch.randn(2 * batch, k + 3, device=device).half()[:, 1:1 + k]
    c = 0.1 * torch.randn(k, device=device)  # (K,) center is accepted too
    loss, col_sum = dl.fused_dino_loss(s, t, c, 0.1, 0.04, ncrops)
    (3.0 * loss).backward()
    grad, wide.grad = wide.grad, None
    ref = dino_loss_reference(s, t, c, 0.1, 0.04, ncrops)
    (3.0 * ref).backward()
    assert_close(loss, ref, torch.float32, name="loss")
    assert_close(grad, wide.grad, torch.float16, atol=_grad_atol(torch.float16, wide.grad.float()), name="grad")
    assert_close(col_sum, t.double().sum(0), torch.float32, atol=1e-5, name="teacher column sum")


def test_fused_inplace_and_no_grad(device):
    _seed("inplace")
    s, t, c = _inputs(2, 3, 500, torch.float32, device)
    ref = dino_loss_reference(s, t, c, 0.1, 0.04, 3)
    ref.backward()
    # no grad wanted: loss only, the student logits stay untouched
    with torch.no_grad():
        loss_ng, _ = dl.fused_dino_loss(s, t, c, 0.1, 0.04, 3)
    assert not loss_ng.requires_grad
    assert_close(loss_ng, ref, name="no-grad loss")
    # inplace: the gradient overwrites the logits buffer
    logits = s.detach().clone().requires_grad_()
    buffer = logits.data
    loss, _ = dl.fused_dino_loss(logits, t, c, 0.1, 0.04, 3, inplace=True, block_k=64)
    loss.backward()
    assert_close(loss, ref, name="inplace loss")
    assert_close(logits.grad, s.grad, atol=_grad_atol(torch.float32, s.grad), name="inplace grad")
    assert_close(buffer, s.grad, atol=_grad_atol(torch.float32, s.grad), name="logits buffer holds the grad")


def test_fused_backward_twice_raises(device):
    _seed("twice")
    s, t, c = _inputs(1, 2, 64, torch.float32, device)
    loss, _ = dl.fused_dino_loss(s, t, c, 0.1, 0.04, 2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once"):
        loss.backward()


def test_teacher_column_sum_deterministic(device):
    _seed("det")
    t = torch.randn(64, 3001, device=device)
    c = torch.zeros(3001, device=device)
    _, a = dl.dino_teacher_forward(t, c, 0.04)
    _, b = dl.dino_teacher_forward(t, c, 0.04)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- (c), (d) module and center


def _module_pair(k: int, ncrops: int, device: torch.device, **kwargs):
    args = dict(out_dim=k, ncrops=ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp_epochs=3, nepochs=5, **kwargs)
    return DINOLoss(impl="triton", **args).to(device), DINOLoss(impl="torch", **args).to(device)


def test_center_update_fused_torch_formula(device, poisoned):
    _seed("center")
    k, batch, ncrops = 1000, 3, 4
    fused, plain = _module_pair(k, ncrops, device, center_momentum=0.8)
    start = torch.randn(1, k, device=device)
    fused.center.copy_(start)
    plain.center.copy_(start)
    s, t, _ = _inputs(batch, ncrops, k, torch.float32, device)
    fused(s, t, 0)
    plain(s, t, 0)
    expected = start.double() * 0.8 + t.double().mean(0, keepdim=True) * (1 - 0.8)
    assert_close(fused.center, expected, name="center (fused)")
    assert_close(plain.center, expected, name="center (torch)")
    assert_close(fused.center, plain.center, name="center fused vs torch")


def test_module_triton_vs_torch_three_steps(device, poisoned):
    """Three training-like steps through a linear head: center evolves, warm-up temperatures."""
    _seed("module")
    k, dim, batch, ncrops = 2000, 16, 2, 4
    fused, plain = _module_pair(k, ncrops, device)
    head = torch.nn.Linear(dim, k).to(device)
    for epoch in range(3):
        x = torch.randn(ncrops * batch, dim, device=device)
        teacher = head(x[: 2 * batch]).detach() + 0.5 * torch.randn(2 * batch, k, device=device)
        losses, grads = [], []
        for module in (fused, plain):
            head.zero_grad()
            loss = module(head(x), teacher, epoch)
            loss.backward()
            losses.append(loss.detach())
            grads.append(head.weight.grad.clone())
        assert_close(losses[0], losses[1], name=f"loss epoch {epoch}")
        assert_close(grads[0], grads[1], atol=_grad_atol(torch.float32, grads[1]), name=f"weight grad epoch {epoch}")
        assert_close(fused.center, plain.center, name=f"center epoch {epoch}")
    assert float(plain.center.abs().sum()) > 0  # the center did move


def test_teacher_temp_schedule():
    warm, final, n_warm, n_epochs = 0.04, 0.07, 4, 10
    module = DINOLoss(8, 3, warm, final, n_warm, n_epochs)
    assert len(module.teacher_temp_schedule) == n_epochs
    for epoch in range(n_epochs + 3):
        expected = warm + (final - warm) * epoch / (n_warm - 1) if epoch < n_warm else final
        assert module.teacher_temp_at(epoch) == pytest.approx(expected, rel=1e-12)
        if epoch < n_epochs:
            assert module.teacher_temp_schedule[epoch] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="epoch"):
        module.teacher_temp_at(-1)


def test_auto_impl_uses_torch_on_cpu(monkeypatch):
    module = DINOLoss(8, 3, 0.04, 0.07, 2, 4)
    calls = []
    monkeypatch.setattr("dino_fast.ops.fused_dino_loss", lambda *a, **kw: calls.append(1))
    s, t, c = _inputs(1, 3, 8, torch.float32, torch.device("cpu"))
    module(s, t, 0)
    assert calls == []


@requires_cuda
def test_auto_impl_uses_triton_on_cuda():
    module = DINOLoss(4097, 3, 0.04, 0.07, 2, 4).cuda()
    _seed("auto-cuda")
    s, t, _ = _inputs(2, 3, 4097, torch.bfloat16, torch.device("cuda"))
    loss = module(s, t, 1)
    assert loss.grad_fn is not None and "DINOLossFunction" in type(loss.grad_fn).__name__


# ----------------------------------------------------------------------------- (e), (f) validation, state


def _bad_cases():
    s = torch.randn(6, 10)
    t = torch.randn(4, 10)
    c = torch.zeros(1, 10)
    return [
        ((s[0], t, c), ValueError, "2-D"),
        ((s, t[:, :9], c), ValueError, "columns|K = "),
        ((s[:5], t, c), ValueError, "rows"),
        ((s, t[:3], c), ValueError, "teacher_output"),
        ((s.long(), t, c), TypeError, "float"),
        ((s, t.to("meta"), c), ValueError, "device|on meta"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_inputs_raise(case):
    args, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        dino_loss_reference(*args, 0.1, 0.04, 3)
    with pytest.raises(exc, match=match):
        dl.fused_dino_loss(*args, 0.1, 0.04, 3)
    module = DINOLoss(10, 3, 0.04, 0.07, 2, 4, impl="torch")
    with pytest.raises(exc, match=match):
        module(args[0], args[1], 0)


def test_bad_arguments_raise():
    s, t, c = torch.randn(6, 10), torch.randn(4, 10), torch.zeros(1, 10)
    with pytest.raises(ValueError, match="center"):
        dl.fused_dino_loss(s, t, torch.zeros(1, 9), 0.1, 0.04, 3)
    with pytest.raises(ValueError, match="teacher_temp"):
        dl.fused_dino_loss(s, t, c, 0.1, 0.0, 3)
    with pytest.raises(ValueError, match="ncrops"):
        dl.fused_dino_loss(s[:2], t[:2], c, 0.1, 0.04, 1)
    with pytest.raises(ValueError, match="block_k"):
        dl.fused_dino_loss(s, t, c, 0.1, 0.04, 3, block_k=100)
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(12, 3, 0.04, 0.07, 2, 4)(s, t, 0)
    with pytest.raises(ValueError, match="impl"):
        DINOLoss(10, 3, 0.04, 0.07, 2, 4, impl="cuda")
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        DINOLoss(10, 3, 0.04, 0.07, 5, 4)
    with pytest.raises(TypeError):
        DINOLoss(10, 3, 0.04, 0.07, 2, 4)(s, t, 1.5)


def test_state_dict_has_official_center():
    module = DINOLoss(32, 4, 0.04, 0.07, 3, 10)
    state = module.state_dict()
    assert list(state) == ["center"] and state["center"].shape == (1, 32)
    official = {"center": torch.randn(1, 32)}  # what the official checkpoint's "dino_loss" entry holds
    module.load_state_dict(official)
    assert torch.equal(module.center, official["center"])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_training_size_cuda(dtype, poisoned):
    """A training-like size: many programs, several teacher row blocks, default blocks."""
    _seed("cuda-size", dtype)
    batch, ncrops, k = 32, 10, 65536
    s, t, c = _inputs(batch, ncrops, k, dtype, torch.device("cuda"))
    loss, col_sum = dl.fused_dino_loss(s, t, c, 0.1, 0.04, ncrops)
    loss.backward()
    grad, s.grad = s.grad, None
    ref = dino_loss_reference(s, t, c, 0.1, 0.04, ncrops)
    ref.backward()
    assert_close(loss, ref, torch.float32, name="loss")
    assert_close(grad, s.grad, dtype, atol=_grad_atol(dtype, s.grad.float()), name="student grad")
    assert_close(col_sum, t.double().sum(0), torch.float32, atol=1e-4, name="teacher column sum")
