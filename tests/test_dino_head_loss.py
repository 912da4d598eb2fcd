"""Head's last layer fused with the DINO loss (kernels/dino_head_loss.py, dino_fast/dino_head_loss.py)
vs the reference on ``last_layer(feats)``: loss, gradients to the features and to weight_v /
weight_g, teacher column sums; chunks of images (uneven last chunk), split K, B = 1, V = 2,
Sinkhorn-Knopp probabilities, bf16 autocast; ``DINOHead(fused_loss=True)`` + ``DINOHeadLoss``
vs the plain head and ``DINOLoss``, with norm_last_layer and freeze_last_layer; the one switch
(``loss_impl: fused_head``). On CPU the kernels run through the Triton interpreter."""
from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
import torch.nn.functional as F

from dino_fast.center import sinkhorn_knopp_teacher
from dino_fast.dino_head_loss import DINOHeadLoss
from dino_fast.dino_loss import DINOLoss, dino_loss_from_probs_reference, dino_loss_reference
from dino_fast.models.head import DINOHead, WeightNormLinear
from dino_fast.optim import cancel_last_layer_gradients_
from tests.helpers import POISON, TOL, assert_close, requires_cuda

dl = pytest.importorskip("dino_fast.kernels.dino_loss")
hl = pytest.importorskip("dino_fast.kernels.dino_head_loss")


def _seed(*case) -> None:
    torch.manual_seed(zlib.crc32(repr(case).encode()))


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the fused path allocates (kernel outputs, logits chunk, gradients) starts as NaN."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, POISON, dtype=dtype, device=device)

    monkeypatch.setattr(dl, "_empty", nan_empty)


def _atol(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Gradients are sums of many products: absolute error relative to the largest entry."""
    return TOL[dtype][1] * max(1.0, float(ref.abs().max())) if dtype != torch.float32 else 1e-5 * float(ref.abs().max())


def _case(batch: int, ncrops: int, k: int, dim: int, device: torch.device, train_g: bool):
    layer = WeightNormLinear(dim, k).to(device)
    with torch.no_grad():
        layer.weight_g.mul_(1.0 + 0.5 * torch.rand(k, 1, device=device))  # not all 1: exercises the norm
    layer.weight_g.requires_grad_(train_g)
    feats = F.normalize(torch.randn(ncrops * batch, dim, device=device), dim=-1).requires_grad_()
    teacher = 3.0 * torch.randn(2 * batch, k, device=device)
    center = 0.1 * torch.randn(1, k, device=device)
    return layer, feats, teacher, center


def _grads(layer: WeightNormLinear, feats: torch.Tensor) -> list[torch.Tensor | None]:
    out = [feats.grad, layer.weight_v.grad, layer.weight_g.grad]
    feats.grad = None
    layer.zero_grad(set_to_none=True)
    return out


SHAPES = [  # (B, V, K, D, chunk_images, block_k, split_k)
    (1, 2, 33, 8, None, None, None),
    (3, 4, 1000, 16, 2, 128, 256),  # uneven chunks, K not a multiple of the block or range
    (2, 3, 4097, 32, 1, None, 1024),
    (4, 6, 300, 16, 3, 64, None),
]


@pytest.mark.parametrize("train_g", [False, True], ids=["norm_last_layer", "trainable_g"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("case", range(len(SHAPES)), ids=[str(s) for s in SHAPES])
def test_fused_head_matches_reference(case, dtype, train_g, device, poisoned, no_tf32):
    batch, ncrops, k, dim, chunk, block_k, split_k = SHAPES[case]
    _seed("head", case, dtype, train_g)
    layer, feats, teacher, center = _case(batch, ncrops, k, dim, device, train_g)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    with autocast:
        loss, col_sum = hl.fused_dino_head_loss(feats, layer.weight, teacher, center, 0.1, 0.04, ncrops,
                                                chunk_images=chunk, block_k=block_k, split_k=split_k)
    (2.0 * loss).backward()
    got = _grads(layer, feats)
    with autocast:
        ref = dino_loss_reference(layer(feats), teacher, center, 0.1, 0.04, ncrops)
    (2.0 * ref).backward()
    expected = _grads(layer, feats)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, torch.float32 if dtype == torch.float32 else dtype, name="loss")
    assert_close(col_sum, teacher.double().sum(0), atol=1e-4, name="teacher column sums")
    for name, g, e in zip(("feats", "weight_v", "weight_g"), got, expected):
        if e is None:
            assert g is None, f"{name} got a gradient but is frozen"
            continue
        assert g.dtype == e.dtype, f"{name}: grad dtype {g.dtype} != {e.dtype}"
        assert_close(g, e, dtype, atol=_atol(dtype, e), name=f"grad {name}")
    assert (got[2] is None) == (not train_g)


def test_fused_head_sinkhorn_probs(device, poisoned):
    _seed("head-sk")
    batch, ncrops, k = 3, 4, 500
    layer, feats, teacher, _ = _case(batch, ncrops, k, 16, device, train_g=True)
    probs = sinkhorn_knopp_teacher(teacher, 0.05)
    loss, col_sum = hl.fused_dino_head_loss(feats, layer.weight, probs, None, 0.1, 0.05, ncrops, chunk_images=2,
                                            split_k=128)
    loss.backward()
    got = _grads(layer, feats)
    ref = dino_loss_from_probs_reference(layer(feats), probs, 0.1, ncrops)
    ref.backward()
    expected = _grads(layer, feats)
    assert col_sum is None
    assert_close(loss, ref, name="loss")
    for name, g, e in zip(("feats", "weight_v", "weight_g"), got, expected):
        assert_close(g, e, atol=_atol(torch.float32, e), name=f"grad {name}")


def test_fused_head_no_grad_and_backward_once(device):
    _seed("head-misc")
    layer, feats, teacher, center = _case(2, 3, 200, 8, device, train_g=False)
    ref = dino_loss_reference(layer(feats), teacher, center, 0.1, 0.04, 3)
    with torch.no_grad():
        loss, _ = hl.fused_dino_head_loss(feats, layer.weight, teacher, center, 0.1, 0.04, 3)
    assert not loss.requires_grad
    assert_close(loss, ref, name="no-grad loss")
    loss, _ = hl.fused_dino_head_loss(feats, layer.weight, teacher, center, 0.1, 0.04, 3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run once"):
        loss.backward()
    with pytest.raises(ValueError, match="features"):
        hl.fused_dino_head_loss(feats[:, :4], layer.weight, teacher, center, 0.1, 0.04, 3)
    with pytest.raises(ValueError, match="rows"):
        hl.fused_dino_head_loss(feats[:4], layer.weight, teacher, center, 0.1, 0.04, 3)
    with pytest.raises(ValueError, match="chunk_images"):
        hl.fused_dino_head_loss(feats, layer.weight, teacher, center, 0.1, 0.04, 3, chunk_images=0)


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_module_fused_vs_plain(norm_last_layer, centering, device, poisoned):
    """Two training-like steps: DINOHead(fused_loss=True) + DINOHeadLoss equals the plain
    head + DINOLoss (every head parameter's gradient, loss, center); epoch 0 with freeze_last_layer
    drops the last layer's gradients in both."""
    _seed("head-module", norm_last_layer, centering)
    k, in_dim, batch, ncrops = 700, 24, 2, 4
    kw = dict(in_dim=in_dim, out_dim=k, norm_last_layer=norm_last_layer, hidden_dim=32, bottleneck_dim=16)
    fused_head, plain_head = DINOHead(fused_loss=True, **kw).to(device), DINOHead(**kw).to(device)
    plain_head.load_state_dict(fused_head.state_dict())
    assert list(fused_head.state_dict()) == list(plain_head.state_dict())
    loss_kw = dict(out_dim=k, ncrops=ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                   warmup_teacher_temp_epochs=2, nepochs=3, centering=centering)
    fused_loss = DINOHeadLoss(impl="triton", **loss_kw).to(device)
    plain_loss = DINOLoss(impl="torch", **loss_kw).to(device)
    for epoch in range(2):
        x = torch.randn(ncrops * batch, in_dim, device=device)
        teacher = 3.0 * torch.randn(2 * batch, k, device=device)
        feats = fused_head(x)
        assert feats.shape == (ncrops * batch, 16)
        fused_value = fused_loss(feats, fused_head.last_layer, teacher, epoch)
        plain_value = plain_loss(plain_head(x), teacher, epoch)
        for head, value in ((fused_head, fused_value), (plain_head, plain_value)):
            head.zero_grad(set_to_none=True)
            value.backward()
            cancel_last_layer_gradients_(head, epoch, freeze_last_layer=1)
        assert_close(fused_value, plain_value, name=f"loss epoch {epoch}")
        assert_close(fused_loss.center, plain_loss.center, name=f"center epoch {epoch}")
        for (name, p), q in zip(fused_head.named_parameters(), plain_head.parameters()):
            if q.grad is None:
                assert p.grad is None, f"{name}: fused path has a gradient the plain one does not (epoch {epoch})"
                continue
            assert_close(p.grad, q.grad, atol=_atol(torch.float32, q.grad), name=f"{name} grad epoch {epoch}")
        frozen = fused_head.last_layer.weight_v.grad is None
        assert frozen == (epoch == 0), "freeze_last_layer: no last-layer gradient in epoch 0 only"
    assert torch.equal(fused_head.logits(x), plain_head(x))


def test_head_loss_torch_impl_is_reference():
    """impl='torch' (and CPU 'auto') runs the reference on last_layer(feats)."""
    _seed("head-torch")
    layer, feats, teacher, _ = _case(2, 3, 50, 8, torch.device("cpu"), train_g=False)
    module = DINOHeadLoss(50, 3, 0.04, 0.07, 2, 4, impl="auto")
    ref_module = DINOLoss(50, 3, 0.04, 0.07, 2, 4, impl="torch")
    assert_close(module(feats, layer, teacher, 1), ref_module(layer(feats), teacher, 1))
    assert_close(module.center, ref_module.center, name="center")
    with pytest.raises(TypeError, match="last_layer"):
        module(feats, torch.nn.Linear(8, 50), teacher, 1)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_head_loss_is_a_dino_loss_part(impl, device, poisoned):
    """Same state dict as DINOLoss (the official ``{"center": (1, K)}``), a deferred center that
    flushes like DINOLoss's, and, built as the trainer builds it (no schedule), the step's
    teacher_temp only."""
    _seed("head-part", impl)
    k, batch, ncrops = 300, 2, 3
    layer, _, _, _ = _case(batch, ncrops, k, 8, device, train_g=False)
    fused = DINOHeadLoss(k, ncrops, impl=impl).to(device)
    plain = DINOLoss(k, ncrops, impl="torch").to(device)
    assert list(fused.state_dict()) == ["center"] and fused.state_dict()["center"].shape == (1, k)
    for _ in range(2):  # two micro-batches, one center step
        feats = F.normalize(torch.randn(ncrops * batch, 8, device=device), dim=-1)
        teacher = 3.0 * torch.randn(2 * batch, k, device=device)
        got = fused(feats, layer, teacher, 0, teacher_temp=0.05, update_center=False)
        expected = plain(layer(feats), teacher, 0, teacher_temp=0.05, update_center=False)
        assert_close(got, expected, name="loss")
        assert torch.count_nonzero(fused.center) == 0
    fused.flush_center()
    plain.flush_center()
    assert torch.count_nonzero(fused.center) > 0
    assert_close(fused.center, plain.center, name="center after the flush")
    with pytest.raises(ValueError, match="teacher_temp="):
        fused(feats, layer, teacher, 0)
    assert "head's last layer fused in" in fused.describe(device)


def test_fused_head_is_one_switch():
    """``loss_impl: fused_head`` is read in one place: the loss the run builds and the student
    head's ``fused_loss`` come from the same ``fuses_last_layer``."""
    from dino_fast.config import TrainConfig
    from dino_fast.dino_head_loss import LOSS_IMPLS, fuses_last_layer
    from dino_fast.dino_loss import IMPLS
    from dino_fast.models.build import build_models
    from dino_fast.objective import build_dino_loss

    assert LOSS_IMPLS == (*IMPLS, "fused_head")
    for impl in LOSS_IMPLS:
        cfg = TrainConfig(arch="vit_tiny", depth=1, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                          local_crops_number=2, loss_impl=impl)
        loss = build_dino_loss(cfg, torch.device("cpu"))
        student, teacher = build_models(cfg, torch.device("cpu"))
        assert isinstance(loss, DINOHeadLoss) == fuses_last_layer(impl) == (impl == "fused_head")
        assert student.head.fused_loss == fuses_last_layer(impl) and not teacher.head.fused_loss
        assert loss.impl == ("auto" if impl == "fused_head" else impl) and loss.teacher_temp_schedule is None


@requires_cuda
def test_fused_head_training_size_cuda(poisoned):
    """A training-like size on the GPU: autotuned blocks, several chunks, bf16 autocast."""
    _seed("head-cuda")
    batch, ncrops, k, dim = 32, 10, 65536, 256
    device = torch.device("cuda")
    layer, feats, teacher, center = _case(batch, ncrops, k, dim, device, train_g=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = hl.fused_dino_head_loss(feats, layer.weight, teacher, center, 0.1, 0.04, ncrops, chunk_images=12)
    loss.backward()
    got = _grads(layer, feats)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = dino_loss_reference(layer(feats), teacher, center, 0.1, 0.04, ncrops)
    ref.backward()
    expected = _grads(layer, feats)
    assert_close(loss, ref, torch.bfloat16, name="loss")
    for name, g, e in zip(("feats", "weight_v"), got, expected):
        assert_close(g, e, torch.bfloat16, atol=_atol(torch.bfloat16, e), name=f"grad {name}")
