"""DINO loss: reference vs an independent per-pair loop, the split-K fused kernels vs reference
(loss, student gradient, teacher statistics and column sums), the device-side backward scale,
Sinkhorn-Knopp centering (vs the paper's definition, on 1 and 2 gloo ranks, fused vs reference),
center update, the DINOLoss module both ways, input validation and state dicts. On CPU the
kernels run through the Triton interpreter."""
from __future__ import annotations

import socket
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.center import sinkhorn_knopp_teacher
from dino_fast.dino_loss import DINOLoss, dino_loss_from_probs_reference, dino_loss_reference
from tests.helpers import POISON, TOL, assert_close, dinov2_sinkhorn, requires_cuda

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

SHAPES = [  # (B, V, K, block_k, split_k, G): K not a multiple of block or range, tiny, odd B, many ranges
    (2, 2, 1000, None, None, 2),
    (2, 3, 1000, 128, 256, 2),
    (3, 6, 4097, None, 1024, 2),
    (1, 3, 4097, 1024, 2048, 2),
    (2, 3, 7, None, None, 2),
    (2, 3, 7, 2, 4, 2),
    (1, 2, 1, None, None, 2),
    (3, 5, 333, 64, 100, 2),  # range neither a power of two nor a multiple of the block
    (2, 2, 65536, None, None, 2),
    (1, 6, 65536, 4096, 8192, 2),
    (2, 3, 300, 64, 128, 1),  # other numbers of global views
    (2, 5, 300, 64, 128, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(SHAPES)), ids=[str(shape) for shape in SHAPES])
def test_fused_matches_reference(case, dtype, device, poisoned):
    batch, ncrops, k, block_k, split_k, n_global = SHAPES[case]
    teacher_temp = (0.04, 0.07)[(case + (dtype == torch.bfloat16)) % 2]  # both temperatures per dtype and shape kind
    _seed("fused", batch, ncrops, k, block_k, split_k, teacher_temp, dtype)
    s, t, c = _inputs(batch, ncrops, k, dtype, device, n_global)
    loss, col_sum = dl.fused_dino_loss(s, t, c, 0.1, teacher_temp, ncrops, n_global, block_k=block_k,
                                       split_k=split_k)
    loss.backward()
    grad, s.grad = s.grad, None
    ref = dino_loss_reference(s, t, c, 0.1, teacher_temp, ncrops, n_global)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype and not col_sum.requires_grad
    # both compute in fp32 from the same (possibly bf16) values: fp32 tolerance for the loss
    assert_close(loss, ref, torch.float32, name="loss")
    assert_close(grad, s.grad, dtype, atol=_grad_atol(dtype, s.grad.float()), name="student grad")
    assert_close(col_sum, t.double().sum(0), torch.float32, atol=1e-5, name="teacher column sum")


def test_fused_fp16_noncontiguous_scaled_grad(device, poisoned):
    """fp16 input, logits that are a column slice (non-contiguous), grad_output != 1."""
    _seed("fp16")
    k, batch, ncrops = 777, 2, 4
    wide = torch.randn(ncrops * batch, k + 5, device=device).half().requires_grad_()
    s = wide[:, 2:2 + k]
    t = torch.randn(2 * batch, k + 3, device=device).half()[:, 1:1 + k]
    c = 0.1 * torch.randn(k, device=device)  # (K,) center is accepted too
    loss, col_sum = dl.fused_dino_loss(s, t, c, 0.1, 0.04, ncrops, split_k=256)
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
    loss, _ = dl.fused_dino_loss(logits, t, c, 0.1, 0.04, 3, inplace=True, block_k=64, split_k=192)
    loss.backward()
    assert_close(loss, ref, name="inplace loss")
    assert_close(logits.grad, s.grad, atol=_grad_atol(torch.float32, s.grad), name="inplace grad")
    assert_close(buffer, s.grad, atol=_grad_atol(torch.float32, s.grad), name="logits buffer holds the grad")
    loss, _ = dl.fused_dino_loss(logits, t, c, 0.1, 0.04, 3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once"):
        loss.backward()


@pytest.mark.parametrize("rows,k,block_k,split_k", [(1, 5, None, None), (19, 1000, 64, 192), (65, 4097, 512, 1024)])
def test_teacher_stats_partials(rows, k, block_k, split_k, device, poisoned):
    """Each range's (max, sum exp) equals torch's on that slice of the centered logits; the
    column sums (several row blocks) are bitwise the same on a second run (no atomics)."""
    _seed("stats", rows, k, split_k)
    t = torch.randn(rows, k, device=device)
    c = torch.randn(k, device=device)
    stats = dl.dino_teacher_stats(t, c, 0.05, block_k=block_k, split_k=split_k)
    x = ((t.double() - c.double()) / 0.05).split(split_k or k, dim=1)
    expected_max = torch.stack([xc.max(dim=1).values for xc in x], dim=1)
    expected_sum = torch.stack([torch.exp(xc - xc.max(dim=1, keepdim=True).values).sum(1) for xc in x], dim=1)
    assert_close(stats.max, expected_max, name="range max")
    assert_close(stats.sum, expected_sum, name="range sum")
    assert_close(stats.col_sum, t.double().sum(0), atol=1e-5, name="column sums")
    assert torch.equal(stats.col_sum, dl.dino_teacher_stats(t, c, 0.05, block_k=block_k, split_k=split_k).col_sum)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_scale_kernel(scale, device):
    """x *= scale, the scale read on the device (a NaN element stays NaN either way)."""
    _seed("scale", scale)
    x = torch.randn(70001, device=device)
    x[5] = float("nan")
    expected = x * scale
    dl.scale_(x, torch.tensor(scale, device=device))
    assert torch.equal(x[:5], expected[:5]) and torch.equal(x[6:], expected[6:]) and x[5].isnan()


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
    assert loss.grad_fn is not None and "dino_fast_dino_loss" in type(loss.grad_fn).__name__  # the custom op ran


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


@pytest.mark.parametrize("part_name", ["dino_loss", "loss"], ids=["current", "before-the-rename"])
def test_checkpoint_part_resumes_under_either_name(tmp_path, part_name):
    """The run's DINO loss is the Stateful part "dino_loss"; checkpoints written while it was
    "loss" still resume (Checkpointer.load) and export (consolidate) its center."""
    from dino_fast.checkpoint import Checkpointer, consolidate
    from dino_fast.config import TrainConfig
    from dino_fast.objective import Objective
    from dino_fast.plan import RunPlan
    from dino_fast.state import TrainState

    cfg = TrainConfig(out_dim=40, local_crops_number=2)
    plan = RunPlan.from_config(cfg, 5, 1)
    cpu = torch.device("cpu")
    saved = Objective(cfg, cpu)
    assert list(saved.parts()) == ["dino_loss"] and saved.parts()["dino_loss"] is saved.dino_loss
    saved.dino_loss.center.normal_()
    path = Checkpointer(tmp_path).save({part_name: saved.dino_loss, "train": TrainState(cfg.to_dict(), plan, 0)}, 3)
    resumed = Objective(cfg, cpu)
    Checkpointer(tmp_path).load(path, {**resumed.parts(), "train": TrainState(cfg.to_dict(), plan, 0)})
    assert torch.equal(resumed.dino_loss.center, saved.dino_loss.center)
    assert torch.equal(consolidate(path)["dino_loss"]["center"], saved.dino_loss.center)


@requires_cuda
@pytest.mark.parametrize("dtype,k,inplace", [(torch.float32, 65536, False), (torch.bfloat16, 40000, True)],
                         ids=["fp32", "bf16-inplace"])
def test_fused_training_size_cuda(dtype, k, inplace, poisoned):
    """A training-like size: many programs, several teacher row blocks, autotuned blocks. In place
    at a K not tuned before: the tuner's trial runs must restore the logits they overwrite."""
    _seed("cuda-size", dtype)
    batch, ncrops = 32, 10
    s, t, c = _inputs(batch, ncrops, k, dtype, torch.device("cuda"))
    logits = s.detach().clone().requires_grad_()
    loss, col_sum = dl.fused_dino_loss(logits, t, c, 0.1, 0.04, ncrops, inplace=inplace)
    loss.backward()
    grad = logits.grad
    ref = dino_loss_reference(s, t, c, 0.1, 0.04, ncrops)
    ref.backward()
    assert_close(loss, ref, torch.float32, name="loss")
    assert_close(grad, s.grad, dtype, atol=_grad_atol(dtype, s.grad.float()), name="student grad")
    assert_close(col_sum, t.double().sum(0), torch.float32, atol=1e-4, name="teacher column sum")


# ----------------------------------------------------------------------------- (g) Sinkhorn-Knopp centering


def _sinkhorn_paper(t: torch.Tensor, tau: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2 / SwAV's definition in float64 loops: Q = exp(t / tau)^T (K x B), total 1, then rows
    to 1/K and columns to 1/B alternately; return B * Q^T (no max subtraction)."""
    q = torch.exp(t.double() / tau).t().clone()
    n_proto, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        for k in range(n_proto):
            q[k] = q[k] / q[k].sum() / n_proto
        for b in range(n_samples):
            q[:, b] = q[:, b] / q[:, b].sum() / n_samples
    return (q * n_samples).t()


@pytest.mark.parametrize("rows,k,tau", [(2, 3, 0.5), (6, 17, 0.07), (9, 40, 0.04)])
def test_sinkhorn_matches_paper_definition(rows, k, tau):
    """Values, and the marginals of the transport plan; large logits (exp(t / tau) overflows fp32)
    give the float64 plan."""
    _seed("sk", rows, k, tau)
    t = 0.1 * torch.randn(rows, k)  # small enough that exp(t / tau) is finite in the plain form
    q = sinkhorn_knopp_teacher(t, tau)
    assert q.dtype == torch.float32 and q.shape == (rows, k)
    assert_close(q, _sinkhorn_paper(t, tau), name="Sinkhorn-Knopp plan")
    assert_close(q.sum(dim=1), torch.ones(rows), name="each sample's probabilities sum to 1")
    # the last step normalises samples; prototypes come out near 1/K of the mass (exactly only in the limit)
    assert_close(q.sum(dim=0), torch.full((k,), rows / k), rtol=0.5, atol=0, name="prototype mass")
    many = sinkhorn_knopp_teacher(t, tau, n_iterations=200)
    assert_close(many.sum(dim=0), torch.full((k,), rows / k), rtol=1e-4, atol=0, name="prototype mass, converged")
    large = 100.0 * t
    assert_close(sinkhorn_knopp_teacher(large, tau), sinkhorn_knopp_teacher(large.double(), tau), atol=1e-6,
                 name="large logits: fp32 vs fp64 plan")


@pytest.mark.parametrize("caller,rows,k", [("dino", 6, 65), ("dino", 2, 4097), ("ibot", 37, 17), ("ibot", 1, 9)])
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["plain", "fp32-overflow"])
def test_one_sinkhorn_equals_dinov2_for_both_callers(caller, rows, k, scale):
    """The one Sinkhorn-Knopp (log domain, max-shifted) gives DINOv2's values for the DINO head's
    teacher rows and for iBOT's masked patches (B = its own count, the patch count). DINOv2's
    code runs in float64 as the reference: at scale 3, t / tau passes 88 and its fp32 exp
    overflows (inf / inf), which ours does not (an fp32 result equal to the float64 plan)."""
    _seed("sk-dinov2", caller, rows, k, scale)
    tau = 0.04
    t = scale * torch.randn(rows, k)  # (2B, K) teacher rows or (M, K) masked patches
    n_samples = torch.tensor(float(rows), dtype=torch.float64) if caller == "ibot" else rows * 1
    expected = dinov2_sinkhorn(t.double(), tau, n_samples)
    got = sinkhorn_knopp_teacher(t, tau)
    assert got.dtype == torch.float32 and torch.isfinite(expected).all()
    assert_close(got, expected, torch.float32, atol=1e-6, name=f"{caller} plan vs DINOv2")
    if scale > 1:
        assert not torch.isfinite(dinov2_sinkhorn(t, tau, n_samples)).all()  # DINOv2 in fp32


def test_sinkhorn_zero_columns_stay_finite():
    """A sample far below every prototype's best: DINOv2's exp underflows its whole column to 0
    (0/0); ours puts its mass on its best prototypes, and a rank without rows gives (0, K)."""
    t = torch.randn(5, 12)
    t[2] -= 60.0  # exp((t - max) / 0.04) = exp(-1500): 0 in any float
    q = sinkhorn_knopp_teacher(t, 0.04)
    assert torch.isfinite(q).all()
    assert_close(q.sum(dim=1), torch.ones(5), name="rows sum to 1")
    assert sinkhorn_knopp_teacher(torch.zeros(0, 12), 0.04).shape == (0, 12)


def _sinkhorn_rank(rank: int, world: int, port: int, teacher: torch.Tensor, student: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (as DataLoader workers)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n_global, ncrops = 2, student.shape[0] * 2 // teacher.shape[0]
        per = teacher.shape[0] // n_global // world  # images per rank, each rank holds all views of its images
        k = teacher.shape[1]
        mine_t = teacher.view(n_global, -1, k)[:, rank * per:(rank + 1) * per].reshape(-1, k)
        mine_s = student.view(ncrops, -1, k)[:, rank * per:(rank + 1) * per].reshape(-1, k)
        module = DINOLoss(teacher.shape[1], ncrops, 0.04, 0.04, 0, 1, impl="torch", centering="sinkhorn_knopp")
        torch.save({"q": sinkhorn_knopp_teacher(mine_t, 0.05), "loss": module(mine_s, mine_t, 0, teacher_temp=0.05)},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sinkhorn_two_ranks_equal_one(tmp_path):
    """Half the images on each of 2 gloo ranks: each rank's plan is its rows of the full-batch plan,
    and the mean of the ranks' losses is the one-process loss."""
    _seed("sk-dist")
    batch, ncrops, k = 4, 3, 30
    teacher = torch.randn(2 * batch, k)
    student = torch.randn(ncrops * batch, k)
    # fork: the children share the imported modules (spawn would re-import torch and dino_fast in each)
    mp.start_processes(_sinkhorn_rank, args=(2, _free_port(), teacher, student, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    full_q = sinkhorn_knopp_teacher(teacher, 0.05).view(2, batch, k)
    module = DINOLoss(k, ncrops, 0.04, 0.04, 0, 1, impl="torch", centering="sinkhorn_knopp")
    full_loss = module(student, teacher, 0, teacher_temp=0.05)
    losses = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        expected = full_q[:, rank * batch // 2:(rank + 1) * batch // 2].reshape(-1, k)
        assert_close(got["q"], expected, name=f"rank {rank} plan")
        losses.append(got["loss"])
    assert_close(sum(losses) / 2, full_loss, name="loss over ranks")


@pytest.mark.parametrize("batch,ncrops,k,split_k", [(1, 2, 33, None), (3, 4, 1000, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_from_probs_matches_reference(batch, ncrops, k, split_k, dtype, device, poisoned):
    _seed("probs", batch, ncrops, k, dtype)
    s, t, _ = _inputs(batch, ncrops, k, dtype, device)
    probs = sinkhorn_knopp_teacher(t, 0.04)
    loss = dl.fused_dino_loss_from_probs(s, probs, 0.1, ncrops, split_k=split_k)
    loss.backward()
    grad, s.grad = s.grad, None
    ref = dino_loss_from_probs_reference(s, probs, 0.1, ncrops)
    ref.backward()
    assert_close(loss, ref, torch.float32, name="loss")
    assert_close(grad, s.grad, dtype, atol=_grad_atol(dtype, s.grad.float()), name="student grad")


def test_module_sinkhorn_triton_vs_torch(device, poisoned):
    _seed("module-sk")
    fused, plain = _module_pair(500, 4, device, centering="sinkhorn_knopp")
    s, t, _ = _inputs(3, 4, 500, torch.float32, device)
    losses, grads = [], []
    for module in (fused, plain):
        loss = module(s, t, 1)
        loss.backward()
        losses.append(loss.detach())
        grads.append(s.grad)
        s.grad = None
    assert_close(losses[0], losses[1], name="loss")
    assert_close(grads[0], grads[1], atol=_grad_atol(torch.float32, grads[1]), name="grad")
    assert_close(losses[1], dino_loss_from_probs_reference(s, sinkhorn_knopp_teacher(t, plain.teacher_temp_at(1)),
                                                           0.1, 4), name="module = reference on the plan")
    assert float(fused.center.abs().sum()) == 0 == float(plain.center.abs().sum())  # no center with SK
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(10, 3, 0.04, 0.07, 2, 4, centering="sinkhorn")

