"""Attention backends vs timm's own Attention, packed (block-diagonal) attention vs per-sequence
attention, and input checks. CPU fp32 here; xformers cases run only on CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention

from dino_fast.models import Attention, PackedSeqlens, set_attn_backend, xformers_usable
from tests.helpers import assert_close, requires_cuda

FP32 = dict(rtol=1e-5, atol=1e-5)
pytestmark = pytest.mark.usefixtures("no_tf32")  # tight fp32 tolerances


def _pair(dim: int, heads: int, seed: int, device: torch.device, **kw) -> tuple[Attention, TimmAttention]:
    """Our Attention and timm's, same random weights (biases too, so they are not all zero)."""
    torch.manual_seed(seed)
    ref = TimmAttention(dim, num_heads=heads, qkv_bias=True, **kw).to(device)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = Attention(dim, num_heads=heads, qkv_bias=True, **kw).to(device)
    ours.load_state_dict(ref.state_dict())
    ref.fused_attn = False  # timm's explicit-softmax path as the reference
    return ours, ref


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
@pytest.mark.parametrize("dim,heads,n,qk_norm", [(64, 4, 17, False), (48, 3, 50, True), (96, 2, 1, False)])
def test_backend_matches_timm(backend, dim, heads, n, qk_norm, device):
    norm = torch.nn.LayerNorm if qk_norm else None
    ours, ref = _pair(dim, heads, seed=n + dim, device=device, qk_norm=qk_norm, norm_layer=norm)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.backend = backend
    x = torch.randn(3, n, dim, device=device, requires_grad=True)
    out, expected = ours(x), ref(x)
    assert_close(out, expected, name=f"{backend} out", **FP32)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(expected, x, g)
    assert_close(gx, gx_ref, name=f"{backend} dx", **FP32)


def _per_sequence(attn: Attention, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Reference for packed attention: every sequence attended on its own."""
    return torch.cat([attn(part) for part in x.split(seqlens, dim=1)], dim=1)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("seqlens", [[5, 5, 3, 7, 7, 7, 1], [9], [4, 2, 4, 2]])
def test_packed_equals_per_sequence(backend, seqlens, device):
    ours, _ = _pair(32, 2, seed=len(seqlens), device=device)
    ours.backend = backend
    seqs = PackedSeqlens(seqlens)
    x = torch.randn(1, sum(seqlens), 32, device=device, requires_grad=True)
    out = ours(x, attn_mask=seqs)
    expected = _per_sequence(ours, x, seqlens)
    assert_close(out, expected, name="packed vs per-sequence", **FP32)
    # The dense block-diagonal boolean mask is the same attention again.
    assert_close(out, ours(x, attn_mask=seqs.dense_mask(device)), name="packed vs dense mask", **FP32)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *ours.parameters()], g)
    grads_ref = torch.autograd.grad(expected, [x, *ours.parameters()], g)
    for (name, _), a, b in zip([("x", None), *ours.named_parameters()], grads, grads_ref):
        assert_close(a, b, name=f"grad {name}", **FP32)


def test_packed_seqlens_runs_and_cls():
    seqs = PackedSeqlens([3, 3, 2, 3])
    assert seqs.total == 11 and seqs.num_seqs == 4
    assert seqs.runs == [(0, 0, 2, 3), (6, 2, 1, 2), (8, 3, 1, 3)]
    x = torch.randn(1, 11, 5)
    assert_close(seqs.cls_tokens(x), x[0, [0, 3, 6, 8]], name="cls rows")
    mask = seqs.dense_mask()
    assert mask.shape == (11, 11) and mask[0, 2] and not mask[0, 3] and mask[7, 6] and not mask[8, 7]
    with pytest.raises(ValueError, match="positive"):
        PackedSeqlens([3, 0])
    with pytest.raises(ValueError, match="shape"):
        seqs.cls_tokens(torch.randn(1, 10, 5))


def test_packed_seqlens_from_xformers_mask():
    pytest.importorskip("xformers.ops")
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    seqs = PackedSeqlens.from_any(BlockDiagonalMask.from_seqlens([4, 1, 6], device=torch.device("cpu")))
    assert seqs.seqlens == (4, 1, 6)


def test_attention_probs_rows_sum_to_one(device):
    ours, ref = _pair(40, 5, seed=3, device=device)
    x = torch.randn(2, 13, 40, device=device)
    probs = ours.attention_probs(x)
    assert probs.shape == (2, 5, 13, 13)
    assert_close(probs.sum(-1), torch.ones(2, 5, 13, device=device), name="row sums", **FP32)
    q, k, _ = ref.qkv(x).reshape(2, 13, 3, 5, 8).permute(2, 0, 3, 1, 4)
    assert_close(probs, F.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1), name="probs", **FP32)


def test_bad_inputs_raise(device):
    ours, _ = _pair(16, 2, seed=0, device=device)
    with pytest.raises(ValueError, match="unknown attention backend"):
        Attention(16, num_heads=2, backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attn_backend(ours, "nope")
    with pytest.raises(ValueError, match="no dino_fast Attention"):
        set_attn_backend(torch.nn.Linear(2, 2), "sdpa")
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        ours(torch.randn(4, 16, device=device))
    with pytest.raises(ValueError, match="batch dim 1"):
        ours(torch.randn(2, 6, 16, device=device), attn_mask=PackedSeqlens([3, 3]))
    with pytest.raises(ValueError, match="sum to 7"):
        ours(torch.randn(1, 6, 16, device=device), attn_mask=PackedSeqlens([3, 4]))
    with pytest.raises(TypeError, match="packed sequence lengths"):
        ours(torch.randn(1, 6, 16, device=device), attn_mask=[3, 3])
    if device.type == "cpu":
        ours.backend = "xformers"
        with pytest.raises(ValueError, match="needs CUDA"):
            ours(torch.randn(1, 6, 16))


def test_auto_is_sdpa_on_cpu():
    ours, _ = _pair(16, 2, seed=0, device=torch.device("cpu"))
    qkv = torch.randn(1, 4, 3, 2, 8)
    assert ours._resolve(qkv, None, False) == "sdpa"
    assert ours._resolve(qkv.bfloat16(), PackedSeqlens([2, 2]), False) == "sdpa"


class _FakeXops:
    """Stand-in for xformers.ops written from xformers' documented contract: (B, N, H, Dh)
    tensors, an AttentionBias materialised to an additive (B, H, N, N) mask. Lets the CPU run
    check our glue (layout, scale, mask hand-over) of the xformers branch."""

    calls = 0

    @classmethod
    def memory_efficient_attention(cls, q, k, v, attn_bias=None, p=0.0, scale=None):
        cls.calls += 1
        assert q.shape == k.shape == v.shape and q.dim() == 4 and p == 0.0
        B, N, H, Dh = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
        logits = q @ k.transpose(-2, -1) * (scale if scale is not None else Dh ** -0.5)
        if attn_bias is not None:
            logits = logits + attn_bias.materialize((B, H, N, N), dtype=q.dtype, device=q.device)
        return (logits.softmax(-1) @ v).transpose(1, 2)  # (B, N, H, Dh)


@pytest.mark.parametrize("seqlens", [None, [4, 4, 9, 1, 1]])
def test_xformers_branch_glue_on_cpu(seqlens, monkeypatch):
    pytest.importorskip("xformers.ops")
    import dino_fast.models.attention as attention_mod

    monkeypatch.setattr(attention_mod, "_xops", lambda: _FakeXops)
    monkeypatch.setattr(Attention, "_resolve", lambda self, qkv, mask, causal: self.backend)
    ours, _ = _pair(48, 3, seed=5, device=torch.device("cpu"))
    n = sum(seqlens) if seqlens else 11
    x = torch.randn(1 if seqlens else 2, n, 48)
    mask = PackedSeqlens(seqlens) if seqlens else None
    ours.backend = "sdpa"
    expected = ours(x, attn_mask=mask)
    ours.backend = "xformers"
    _FakeXops.calls = 0
    out = ours(x, attn_mask=mask)
    assert _FakeXops.calls == 1
    assert_close(out, expected, name="xformers branch", **FP32)


# --- CUDA + xformers ------------------------------------------------------------------------
def _need_xformers() -> None:
    if not xformers_usable(torch.cuda.current_device()):
        pytest.skip("xformers attention kernels are not usable on this GPU / build")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_xformers_matches_sdpa_cuda(dtype):
    _need_xformers()
    ours, _ = _pair(384, 6, seed=1, device=torch.device("cuda"))
    ours = ours.to(dtype)
    x = torch.randn(4, 197, 384, device="cuda", dtype=dtype, requires_grad=True)
    outs, grads = {}, {}
    for backend in ("sdpa", "xformers"):
        ours.backend = backend
        outs[backend] = ours(x)
        (grads[backend],) = torch.autograd.grad(outs[backend], x, torch.ones_like(outs[backend]))
    assert_close(outs["xformers"], outs["sdpa"], dtype=dtype, name="xformers vs sdpa")
    assert_close(grads["xformers"], grads["sdpa"], dtype=dtype, atol=5e-2, name="xformers vs sdpa dx")


@requires_cuda
def test_xformers_packed_cuda():
    _need_xformers()
    ours, _ = _pair(384, 6, seed=2, device=torch.device("cuda"))
    ours = ours.to(torch.bfloat16)
    ours.backend = "xformers"
    seqlens = [197, 197, 37, 37, 37, 50]
    x = torch.randn(1, sum(seqlens), 384, device="cuda", dtype=torch.bfloat16)
    out = ours(x, attn_mask=PackedSeqlens(seqlens))
    ours.backend = "sdpa"
    assert_close(out, _per_sequence(ours, x, seqlens), dtype=torch.bfloat16, name="xformers packed")
