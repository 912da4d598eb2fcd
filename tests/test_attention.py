"""Attention backends vs timm's own Attention and vs the math backend, packed (block-diagonal)
attention vs per-sequence attention, the packed-row metadata (cu_seqlens, flex block mask), the
"auto" choice, and input checks.

varlen and flex have no CPU backward, so on CPU (and in the fp32 cases on CUDA) they run through
their CPU twins (``dino_fast.models.varlen``: same arguments, the math per segment / per tile),
which exercises our packing, offsets and block mask; the real kernels run in the CUDA tests.
"""
from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch.utils._python_dispatch import TorchDispatchMode

import dino_fast.models.attention as attention_mod
import dino_fast.models.varlen as varlen_mod
from dino_fast.models import Attention, PackedSeqlens, set_attn_backend, xformers_usable
from tests.helpers import assert_close, requires_cuda

pytestmark = pytest.mark.usefixtures("no_tf32")  # tight fp32 tolerances

# fp32 (rtol, atol) of a backend vs the plain-matmul reference, by (device type, backend); None =
# any other backend. CPU kernels and the twins (plain matmuls; no TF32 under no_tf32) agree to
# ~1e-6. CUDA SDPA's fp32 kernels are not fp32-faithful: an H200 gave |dx - ref| = 6.5e-5 on
# values ~1e-2 (test_backend_matches_timm[96-2-1-False-sdpa], 2026-12-04), i.e. TF32 level.
FP32_TOL: dict[tuple[str, str | None], tuple[float, float]] = {
    ("cpu", None): (1e-5, 1e-5),
    ("cuda", None): (1e-5, 1e-5),
    ("cuda", "sdpa"): (1e-2, 2e-4),
    ("cuda", "auto"): (1e-2, 2e-4),  # "auto" runs sdpa for fp32 input
}
# bf16 kernels vs sdpa in bf16 (both round to bf16; backward sums differ in order).
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
BF16_GRAD_TOL = dict(rtol=5e-2, atol=5e-2)


def fp32_tol(device: torch.device, backend: str) -> dict[str, float]:
    """The fp32 tolerance of ``backend`` on ``device`` (table above) as assert_close kwargs."""
    rtol, atol = FP32_TOL.get((device.type, backend), FP32_TOL[(device.type, None)])
    return dict(rtol=rtol, atol=atol)


def use_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the varlen and flex backends to their CPU twins (any device, any dtype)."""
    monkeypatch.setattr(varlen_mod, "get_varlen_attn", lambda device: varlen_mod.varlen_attn_reference)
    monkeypatch.setattr(varlen_mod, "get_flex_attention", lambda device: varlen_mod.flex_attention_reference)


@pytest.fixture
def twins(monkeypatch):
    use_twins(monkeypatch)


# --- varlen_attn as an opaque op: what Dynamo and a dispatch mode see of the real kernel -------
# The twin above is Python (per-segment loops, .tolist()); torch.compile and op counters must
# instead meet one op with varlen_attn's signature, as on CUDA. Forward and backward run the twin.
@torch.library.custom_op("dino_fast_tests::varlen_attn", mutates_args=())
def _standin_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_q: torch.Tensor,
                    cu_seq_k: torch.Tensor, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    return varlen_mod.varlen_attn_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)


@_standin_varlen.register_fake
def _(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale):
    return torch.empty_like(q)


@torch.library.custom_op("dino_fast_tests::varlen_attn_backward", mutates_args=())
def _standin_varlen_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seq_q: torch.Tensor, cu_seq_k: torch.Tensor, max_q: int, max_k: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # autograd is off inside a custom op: the attention backward written out, per segment
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bq, bk = cu_seq_q.tolist(), cu_seq_k.tolist()
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        qs, ks, vs, go = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1], grad[q0:q1]))  # (H, n, Dh)
        p = ((qs * scale) @ ks.transpose(-2, -1)).softmax(-1)  # (H, nq, nk)
        dp = go @ vs.transpose(-2, -1)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[q0:q1] = (scale * ds @ ks).transpose(0, 1)
        dk[k0:k1] = (scale * ds.transpose(-2, -1) @ qs).transpose(0, 1)
        dv[k0:k1] = (p.transpose(-2, -1) @ go).transpose(0, 1)
    return dq, dk, dv


@_standin_varlen_backward.register_fake
def _(grad, q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _standin_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.args = inputs[5:]


def _standin_grad(ctx, grad):
    dq, dk, dv = _standin_varlen_backward(grad, *ctx.saved_tensors, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_standin_varlen.register_autograd(_standin_grad, setup_context=_standin_setup)


def varlen_standin(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    """A stand-in for ``torch.nn.attention.varlen.varlen_attn`` (same call) that runs on CPU as one
    custom op with a fake implementation, so torch.compile traces it as it does the kernel."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _standin_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)


def use_varlen_standin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the varlen backend to :func:`varlen_standin` (one opaque op per call)."""
    monkeypatch.setattr(varlen_mod, "get_varlen_attn", lambda device: varlen_standin)


class OpCounter(TorchDispatchMode):
    """aten ops dispatched inside the context, by name (a custom op counts once, not its body)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


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


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto", "varlen", "flex"])
@pytest.mark.parametrize("dim,heads,n,qk_norm", [(64, 4, 17, False), (48, 3, 50, True), (96, 2, 1, False),
                                                 (40, 5, 7, False)])
def test_backend_matches_timm(backend, dim, heads, n, qk_norm, device, twins):
    norm = torch.nn.LayerNorm if qk_norm else None
    ours, ref = _pair(dim, heads, seed=n + dim, device=device, qk_norm=qk_norm, norm_layer=norm)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.backend = backend
    x = torch.randn(3, n, dim, device=device, requires_grad=True)
    out, expected = ours(x), ref(x)
    tol = fp32_tol(device, backend)
    assert_close(out, expected, name=f"{backend} out", **tol)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(expected, x, g)
    assert_close(gx, gx_ref, name=f"{backend} dx", **tol)


def _math_per_sequence(attn: Attention, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Reference for packed attention: every sequence attended on its own by the math backend."""
    ref = copy.deepcopy(attn)
    ref.backend = "math"
    return torch.cat([ref(part) for part in x.split(seqlens, dim=1)], dim=1), ref


# Several "resolutions" in one row, odd lengths, a length-1 sequence, one sequence alone.
SEQLENS = [[5, 5, 3, 7, 7, 7, 1], [9], [4, 2, 4, 2], [17, 17, 5, 5, 5, 5, 2]]


@pytest.mark.parametrize("backend", ["sdpa", "math", "varlen", "flex"])
@pytest.mark.parametrize("seqlens", SEQLENS)
def test_packed_equals_per_sequence(backend, seqlens, device, twins):
    ours, _ = _pair(32, 2, seed=len(seqlens) + sum(seqlens), device=device)
    ours.backend = backend
    seqs = PackedSeqlens(seqlens)
    x = torch.randn(1, sum(seqlens), 32, device=device, requires_grad=True)
    out = ours(x, attn_mask=seqs)
    expected, ref = _math_per_sequence(ours, x, seqlens)
    tol = fp32_tol(device, backend)
    assert_close(out, expected, name=f"{backend} packed vs per-sequence math", **tol)
    # The dense block-diagonal boolean mask is the same attention again.
    assert_close(out, ref(x, attn_mask=seqs.dense_mask(device)), name="packed vs dense mask", **tol)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *ours.parameters()], g)
    grads_ref = torch.autograd.grad(expected, [x, *ref.parameters()], g)
    for (name, _), a, b in zip([("x", None), *ours.named_parameters()], grads, grads_ref):
        assert_close(a, b, name=f"{backend} grad {name}", **tol)


@pytest.mark.parametrize("seqlens", [[5, 5, 3, 7, 1], None])
def test_varlen_qkv_reach_the_kernel_without_copies(seqlens, monkeypatch):
    """The varlen kernels read contiguous (T, H, Dh) q/k/v. Slices of one fused qkv output are
    strided and took a copy each (3 per block, and their gradients); three GEMMs on the row
    blocks of the fused weight write them contiguous: no copy or clone in the forward, and the
    same values as sdpa."""
    use_varlen_standin(monkeypatch)
    ours, _ = _pair(48, 3, seed=9, device=torch.device("cpu"))
    ours.backend = "varlen"
    seqs = None if seqlens is None else PackedSeqlens(seqlens)
    if seqs is not None:
        seqs.cu_seqlens("cpu")  # built once per forward, before the blocks (DinoViT)
    x = torch.randn(1 if seqlens else 3, sum(seqlens) if seqlens else 6, 48, requires_grad=True)
    counter = OpCounter()
    with counter:
        out = ours(x, attn_mask=seqs)
    copies = {op: n for op, n in counter.counts.items() if op in ("copy_", "clone", "contiguous")}
    assert counter.counts["varlen_attn"] == 1 and not copies, f"copies in the forward: {copies}"
    reference = copy.deepcopy(ours)
    reference.backend = "sdpa"
    assert_close(out, reference(x, attn_mask=seqs), name="varlen (stand-in) vs sdpa", rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *ours.parameters()], g)
    grads_ref = torch.autograd.grad(reference(x, attn_mask=seqs), [x, *reference.parameters()], g)
    for (name, _), a, b in zip([("x", None), *ours.named_parameters()], grads, grads_ref):
        assert_close(a, b, name=f"varlen grad {name}", rtol=1e-5, atol=1e-5)


# --- the twins themselves, checked against an independent formulation ----------------------
def _dense_reference(q, k, v, seqs: PackedSeqlens, scale: float) -> torch.Tensor:
    """softmax over the whole row with the (T, T) block-diagonal mask; q/k/v (T, H, Dh)."""
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (H, T, Dh)
    logits = (q @ k.transpose(-2, -1) * scale).masked_fill(~seqs.dense_mask(q.device), float("-inf"))
    return (logits.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("seqlens,heads,head_dim", [([5, 5, 3, 7, 7, 7, 1], 2, 8), ([1], 1, 4),
                                                    ([17, 17, 5, 5, 5, 5, 2], 3, 16)])
def test_varlen_twin_matches_dense_mask(seqlens, heads, head_dim, device):
    torch.manual_seed(sum(seqlens) + heads)
    seqs = PackedSeqlens(seqlens)
    q, k, v = (torch.randn(seqs.total, heads, head_dim, device=device, requires_grad=True) for _ in range(3))
    scale = 0.3
    cu = seqs.cu_seqlens(device)
    out = varlen_mod.varlen_attn_reference(q, k, v, cu, cu, seqs.max_seqlen, seqs.max_seqlen, scale=scale)
    expected = _dense_reference(q, k, v, seqs, scale)
    assert_close(out, expected, name="varlen twin", **fp32_tol(device, "varlen"))
    g = torch.randn_like(out)
    for a, b, name in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(expected, [q, k, v], g), "qkv"):
        assert_close(a, b, name=f"varlen twin d{name}", **fp32_tol(device, "varlen"))


@pytest.mark.parametrize("takes_scale", [True, False])
def test_varlen_call_passes_the_scale(takes_scale, monkeypatch):
    """torch 2.10's varlen_attn has no ``scale``: a non-default scale is then folded into q."""
    def no_scale_kernel(q, k, v, cu_q, cu_k, max_q, max_k):  # the torch 2.10 signature
        return varlen_mod.varlen_attn_reference(q, k, v, cu_q, cu_k, max_q, max_k)

    kernel = varlen_mod.varlen_attn_reference if takes_scale else no_scale_kernel
    monkeypatch.setitem(varlen_mod._VARLEN, "fn", kernel)
    monkeypatch.setitem(varlen_mod._VARLEN, "scale", takes_scale)
    monkeypatch.setitem(varlen_mod._VARLEN, "error", None)
    torch.manual_seed(3)
    seqs = PackedSeqlens([4, 7, 7, 2])
    q, k, v = (torch.randn(seqs.total, 2, 8) for _ in range(3))
    out = varlen_mod.varlen_attention(kernel, q, k, v, seqs.cu_seqlens(), seqs.max_seqlen, scale=0.3)
    assert_close(out, _dense_reference(q, k, v, seqs, 0.3), name=f"scale 0.3 (takes_scale={takes_scale})",
                 rtol=1e-5, atol=1e-5)


def test_varlen_twin_checks_the_kernel_contract():
    seqs = PackedSeqlens([3, 5])
    q = torch.randn(8, 1, 4)
    cu = seqs.cu_seqlens()
    with pytest.raises(ValueError, match="int32"):
        varlen_mod.varlen_attn_reference(q, q, q, cu.long(), cu.long(), 5, 5)
    with pytest.raises(ValueError, match="max_q"):
        varlen_mod.varlen_attn_reference(q, q, q, cu, cu, 4, 5)  # a short max_q drops tokens in flash
    with pytest.raises(ValueError, match="0 to T"):
        varlen_mod.varlen_attn_reference(q[:7], q[:7], q[:7], cu, cu, 5, 5)


@pytest.mark.parametrize("seqlens,block", [([5, 5, 3, 7, 7, 7, 1], 4), ([9], 4), ([17, 17, 5, 5, 5, 5, 2], 8),
                                           ([30, 2, 2, 30], 16), ([3, 3], 128)])
def test_flex_block_mask_matches_torch_create_block_mask(seqlens, block):
    from torch.nn.attention.flex_attention import create_block_mask

    seqs = PackedSeqlens(seqlens)
    mine = seqs.flex_block_mask("cpu", block_size=block)
    ids = seqs.seq_ids()
    ref = create_block_mask(lambda b, h, q, kv: ids[q] == ids[kv], 1, 1, seqs.total, seqs.total, device="cpu",
                            BLOCK_SIZE=block)
    assert torch.equal(mine.to_dense(), ref.to_dense()), "tiles that are visited"
    shape, bs = (seqs.total, seqs.total), (block, block)
    full = varlen_mod._tiles_to_tokens(mine.full_kv_num_blocks, mine.full_kv_indices, bs, shape)
    full_ref = varlen_mod._tiles_to_tokens(ref.full_kv_num_blocks, ref.full_kv_indices, bs, shape)
    assert torch.equal(full, full_ref), "tiles that skip the mask_mod"
    assert not (full & ~seqs.dense_mask()).any(), "a full tile must lie inside one sequence"


@pytest.mark.parametrize("seqlens", SEQLENS)
def test_flex_twin_matches_dense_mask(seqlens, device):
    torch.manual_seed(len(seqlens))
    seqs = PackedSeqlens(seqlens)
    q, k, v = (torch.randn(1, 2, seqs.total, 8, device=device, requires_grad=True) for _ in range(3))
    out = varlen_mod.flex_attention_reference(q, k, v, block_mask=seqs.flex_block_mask(device, block_size=4),
                                              scale=0.5)
    expected = _dense_reference(*(t[0].transpose(0, 1) for t in (q, k, v)), seqs, 0.5).transpose(0, 1)[None]
    assert_close(out, expected, name="flex twin", **fp32_tol(device, "flex"))
    g = torch.randn_like(out)
    for a, b, name in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(expected, [q, k, v], g), "qkv"):
        assert_close(a, b, name=f"flex twin d{name}", **fp32_tol(device, "flex"))


@pytest.mark.parametrize("seqlens", [[5, 5, 3, 7, 7, 7, 1], [130, 2, 140]])
def test_flex_real_forward_on_cpu(seqlens):
    """The real (eager) flex_attention takes our block mask: CPU runs its forward, not backward."""
    ours, _ = _pair(32, 2, seed=7, device=torch.device("cpu"))
    ours.backend = "flex"
    x = torch.randn(1, sum(seqlens), 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile")  # eager flex is the point here
        out = ours(x, attn_mask=PackedSeqlens(seqlens))
    with torch.no_grad():
        expected, _ = _math_per_sequence(ours, x, seqlens)
    assert_close(out, expected, name="real flex (eager, CPU)", rtol=1e-5, atol=1e-5)


# --- packed-row metadata -------------------------------------------------------------------
def test_packed_seqlens_runs_and_cls():
    seqs = PackedSeqlens([3, 3, 2, 3])
    assert seqs.total == 11 and seqs.num_seqs == 4 and seqs.max_seqlen == 3
    assert seqs.runs == [(0, 0, 2, 3), (6, 2, 1, 2), (8, 3, 1, 3)]
    x = torch.randn(1, 11, 5)
    assert_close(seqs.cls_tokens(x), x[0, [0, 3, 6, 8]], name="cls rows")
    mask = seqs.dense_mask()
    assert mask.shape == (11, 11) and mask[0, 2] and not mask[0, 3] and mask[7, 6] and not mask[8, 7]
    with pytest.raises(ValueError, match="positive"):
        PackedSeqlens([3, 0])
    with pytest.raises(ValueError, match="shape"):
        seqs.cls_tokens(torch.randn(1, 10, 5))


def test_cu_seqlens_built_once_per_device(device):
    seqs = PackedSeqlens([197, 197, 37, 37, 37, 50])
    cu = seqs.cu_seqlens(device)
    assert cu.dtype == torch.int32 and cu.device.type == device.type
    assert cu.tolist() == [0, 197, 394, 431, 468, 505, 555] and seqs.max_seqlen == 197
    assert seqs.cu_seqlens(device) is cu, "one tensor per device, reused by every block"
    assert seqs.seq_ids(device).tolist() == [i for i, n in enumerate(seqs.seqlens) for _ in range(n)]
    assert seqs.flex_block_mask(device) is seqs.flex_block_mask(device)


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
    assert_close(probs.sum(-1), torch.ones(2, 5, 13, device=device), name="row sums", **fp32_tol(device, "math"))
    q, k, _ = ref.qkv(x).reshape(2, 13, 3, 5, 8).permute(2, 0, 3, 1, 4)
    assert_close(probs, F.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1), name="probs",
                 **fp32_tol(device, "math"))


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
    for backend in ("varlen", "flex", "xformers"):
        ours.backend = backend
        with pytest.raises(ValueError, match="dense tensor mask"):
            ours(torch.randn(1, 6, 16, device=device), is_causal=True)
    if device.type == "cpu":
        for backend in ("xformers", "varlen"):
            ours.backend = backend
            with pytest.raises(ValueError, match="needs CUDA"):
                ours(torch.randn(1, 6, 16))
    if device.type == "cuda":
        ours.backend = "varlen"
        with pytest.raises(ValueError, match="fp16/bf16"):
            ours(torch.randn(1, 6, 16, device=device))


@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_no_attention_dropout_on_varlen_and_flex(backend, twins):
    ours = Attention(16, num_heads=2, attn_drop=0.1, backend=backend).train()
    with pytest.raises(ValueError, match="no attention dropout"):
        ours(torch.randn(1, 6, 16), attn_mask=PackedSeqlens([3, 3]))
    ours.eval()  # dropout off: runs
    assert ours(torch.randn(1, 6, 16), attn_mask=PackedSeqlens([3, 3])).shape == (1, 6, 16)


# --- which kernel "auto" runs --------------------------------------------------------------
def test_auto_on_cpu_is_sdpa_in_fp32_and_math_in_bf16():
    ours, _ = _pair(16, 2, seed=0, device=torch.device("cpu"))
    qkv = torch.randn(1, 4, 3, 2, 8)
    assert ours._resolve(qkv, None, False) == "sdpa"
    assert ours._resolve(qkv.bfloat16(), PackedSeqlens([2, 2]), False) == "math"  # see test_auto_on_cpu_follows_the_dtype


def _fake_probes(monkeypatch, varlen: str = "", xformers: str = "", flex: str = "") -> None:
    for name, problem in (("varlen", varlen), ("xformers", xformers), ("flex", flex)):
        monkeypatch.setattr(attention_mod, f"{name}_problem", lambda i, p=problem: p)


@pytest.mark.parametrize("problems,dtype,head_dim,dropout,expected", [
    ({}, torch.bfloat16, 64, False, "varlen"),
    ({"varlen": "no varlen here"}, torch.bfloat16, 64, False, "xformers"),
    ({"varlen": "x", "xformers": "built for torch 2.10"}, torch.float16, 64, False, "flex"),
    ({"varlen": "x", "xformers": "x", "flex": "x"}, torch.bfloat16, 64, False, "sdpa"),
    ({}, torch.float32, 64, False, "flex"),   # varlen and xformers need fp16/bf16
    ({}, torch.bfloat16, 12, False, "xformers"),  # flash needs head_dim % 8 == 0
    ({}, torch.bfloat16, 64, True, "xformers"),   # varlen and flex have no attention dropout
    ({"xformers": "x"}, torch.bfloat16, 64, True, "sdpa"),
])
def test_auto_order_on_cuda(problems, dtype, head_dim, dropout, expected, monkeypatch):
    """The documented order, with the kernel probes replaced (no GPU needed)."""
    _fake_probes(monkeypatch, **problems)
    cuda = torch.device("cuda", 0)
    backend, why = attention_mod.auto_backend(cuda, dtype, head_dim, packed=True, dropout=dropout)
    assert backend == expected, why
    for name in ("varlen", "xformers", "flex"):
        if ("varlen", "xformers", "flex", "sdpa").index(name) < ("varlen", "xformers", "flex", "sdpa").index(expected):
            assert f"{name}:" in why, f"skipping {name} must say why: {why!r}"
    for problem in problems.values():
        if expected == "sdpa":
            assert problem in why
    assert attention_mod.auto_backend(cuda, dtype, head_dim, packed=False)[0] == "sdpa"


@pytest.mark.parametrize("dtype,expected", [(torch.float32, "sdpa"), (torch.bfloat16, "math"),
                                            (torch.float16, "math")])
def test_auto_on_cpu_follows_the_dtype(dtype, expected):
    """CPU: sdpa in fp32; math in half precision, where torch's CPU flash kernel (what sdpa picks) is the
    slow one. The module runs the kernel auto names: no flash op in bf16, the math path's exact output."""
    cpu = torch.device("cpu")
    assert attention_mod.auto_backend(cpu, dtype, 64, packed=True)[0] == expected
    assert attention_mod.auto_backend(cpu, dtype, 64, packed=False)[0] == expected
    attn, _ = _pair(48, 3, seed=5, device=cpu)
    attn = attn.to(dtype)
    assert attn.resolve_backend(cpu, dtype, packed=False) == expected
    assert attn.resolve_backend(cpu, dtype, packed=False, dense=True) == "sdpa"  # a dense mask: sdpa as before
    x = torch.randn(4, 9, 48, generator=torch.Generator().manual_seed(6)).to(dtype)
    counter = OpCounter()
    with counter:
        out = attn(x)
    flash = any("flash" in name for name in counter.counts)
    assert flash == (expected == "sdpa"), dict(counter.counts)
    set_attn_backend(attn, expected)
    assert torch.equal(out, attn(x))
    assert f"per-resolution -> {expected}" in attention_mod.describe_attention("cpu", dtype)


def test_describe_attention_is_one_line():
    line = attention_mod.describe_attention("cpu", torch.float32)
    assert "\n" not in line and "sdpa" in line and "cpu" in line and torch.__version__ in line
    assert "xformers:" in line


def test_xformers_build_problem_names_the_versions():
    """An xformers wheel built for another torch imports but has no kernels: say which torch."""
    problem = attention_mod.xformers_build_problem()
    if problem in ("", "not installed"):
        pytest.skip(f"xformers here is {'usable' if not problem else 'not installed'}")
    assert "built for torch" in problem and torch.__version__ in problem, problem


def test_auto_resolution_is_constant_under_compile():
    """The model is torch.compile'd: resolving "auto" must not break the graph or trace a probe."""
    ours, _ = _pair(16, 2, seed=4, device=torch.device("cpu"))
    seqs = PackedSeqlens([2, 5, 5])
    x = torch.randn(1, 12, 16)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    assert_close(compiled(x, attn_mask=seqs), ours(x, attn_mask=seqs), name="compiled", rtol=1e-5, atol=1e-5)
    name = torch.compile(lambda t: t + len(attention_mod._auto_name("cpu", 0, torch.bfloat16, 64, True, False)),
                         backend="eager", fullgraph=True)(torch.zeros(1))
    assert name.item() == len("sdpa")


def test_auto_on_cuda_is_a_compile_constant(monkeypatch):
    """The CUDA choice runs the probes eagerly at trace time (faked here), not inside the graph."""
    _fake_probes(monkeypatch, varlen="not here")
    monkeypatch.setattr(attention_mod, "_PROBES", {})
    pick = torch.compile(lambda t: t + len(attention_mod._auto_name("cuda", 0, torch.bfloat16, 64, True, False)),
                         backend="eager", fullgraph=True)
    try:
        assert pick(torch.zeros(1)).item() == len("xformers")
    finally:
        torch._dynamo.reset()


# --- xformers branch glue on CPU ------------------------------------------------------------
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
    monkeypatch.setattr(attention_mod, "_xops", lambda: _FakeXops)
    monkeypatch.setattr(Attention, "resolve_backend", lambda self, device, dtype, packed, dense=False: self.backend)
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
    assert_close(out, expected, name="xformers branch", rtol=1e-5, atol=1e-5)


# --- CUDA: the real kernels, bf16 ----------------------------------------------------------
def _need(backend: str) -> None:
    problem = getattr(attention_mod, f"{backend}_problem")(torch.cuda.current_device())
    if problem:
        pytest.skip(f"{backend} is not usable here: {problem}")


@requires_cuda
@pytest.mark.parametrize("backend", ["varlen", "flex", "xformers"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_sdpa_cuda(backend, dtype):
    """Ordinary batch: the kernel vs sdpa in the same dtype, forward and dx."""
    _need(backend)
    ours, _ = _pair(384, 6, seed=1, device=torch.device("cuda"))
    ours = ours.to(dtype)
    x = torch.randn(4, 197, 384, device="cuda", dtype=dtype, requires_grad=True)
    outs, grads = {}, {}
    for b in ("sdpa", backend):
        ours.backend = b
        outs[b] = ours(x)
        (grads[b],) = torch.autograd.grad(outs[b], x, torch.ones_like(outs[b]))
    assert_close(outs[backend], outs["sdpa"], dtype=dtype, name=f"{backend} vs sdpa", **BF16_TOL)
    assert_close(grads[backend], grads["sdpa"], dtype=dtype, name=f"{backend} vs sdpa dx", **BF16_GRAD_TOL)


@requires_cuda
@pytest.mark.parametrize("backend", ["varlen", "flex", "xformers"])
@pytest.mark.parametrize("seqlens", [[197, 197, 37, 37, 37, 50], [1, 130, 255, 3]])
def test_kernel_packed_cuda(backend, seqlens):
    """Packed row on the real kernel vs per-sequence sdpa, bf16, forward and grads of x and qkv."""
    _need(backend)
    ours, _ = _pair(384, 6, seed=2, device=torch.device("cuda"))
    ours = ours.to(torch.bfloat16)
    x = torch.randn(1, sum(seqlens), 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ours.backend = backend
    out = ours(x, attn_mask=PackedSeqlens(seqlens))
    ours.backend = "sdpa"
    expected = torch.cat([ours(part) for part in x.split(seqlens, dim=1)], dim=1)
    assert_close(out, expected, dtype=torch.bfloat16, name=f"{backend} packed", **BF16_TOL)
    g = torch.randn_like(out)
    w = ours.qkv.weight
    for a, b, name in zip(torch.autograd.grad(out, [x, w], g), torch.autograd.grad(expected, [x, w], g),
                          ("dx", "dW_qkv")):
        assert_close(a, b, dtype=torch.bfloat16, name=f"{backend} packed {name}", **BF16_GRAD_TOL)


@requires_cuda
def test_auto_picks_a_working_kernel_cuda():
    ours, _ = _pair(384, 6, seed=3, device=torch.device("cuda"))
    qkv = torch.zeros(1, 8, 3, 6, 64, device="cuda", dtype=torch.bfloat16)
    picked = ours._resolve(qkv, PackedSeqlens([4, 4]), False)
    line = attention_mod.describe_attention("cuda", torch.bfloat16)
    assert f"-> {picked}" in line, line
    assert xformers_usable(torch.cuda.current_device()) == (attention_mod.xformers_problem(
        torch.cuda.current_device()) == "")
