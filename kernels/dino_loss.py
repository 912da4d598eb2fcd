"""Fused DINO loss, split over K: teacher softmax + cross-entropy over all (teacher, student) view pairs.

Math (DESIGN.md, "Algebra the fused loss can use"). Student row ``v*B + b`` is view v (of V =
ncrops) of image b; teacher row ``i*B + b`` is global view i (of G = n_global). With x = s / tau_s,
p_i = softmax((t_i - C) / tau_t) (or given probabilities, e.g. Sinkhorn-Knopp's), T_v = {i < G,
i != v}, P_{v,b} = sum_{i in T_v} p_{i,b}, scale = 1 / (n_pairs * B), n_pairs = G * (V - 1):

    loss = scale * sum_{v,b} ( |T_v| * lse(x_{v,b}) - <P_{v,b}, x_{v,b}> )        (= the official DINOLoss)
    dloss/ds_{v,b} = scale * ( |T_v| * softmax(x_{v,b}) - P_{v,b} ) / tau_s

K is split into n_split = cdiv(K, split_k) column ranges, one per program; a row's softmax comes
from its per-range partials (m_c, d_c) = (max, sum exp(x - m_c)): M = max_c m_c,
D = sum_c d_c exp(m_c - M), lse = M + log D. Kernels (fp32 accumulation, int64 offsets):
  1. ``_dino_row_stats_kernel``  grid (n_split, row blocks): (m_c, d_c) of x = (a - C) / tau; for
     the teacher also its column sums per row block (center update; summed afterwards in a fixed
     order, no atomics). Teacher: read G*B*K*et; student: read V*B*K*es.
  2. ``_dino_grad_kernel``  grid (n_split, B): per (range, image), the G teacher probabilities of a
     K block are rebuilt in registers (one exp per teacher element, shared by the V rows) and the
     image's V student rows swept: gradient (student dtype, may overwrite the logits) and partial
     loss -<P_v, x_v> (+ |T_v| lse_v in range 0).        read V*B*K*es + G*B*K*et, write V*B*K*es
  3. backward: ``grad_scale.scale_`` multiplies the gradient by grad_output read on the device; when it
     is 1 (``loss.backward()``) no memory is touched, and there is no host sync.
No B x V x K buffer other than the gradient; the rest is O((V + G) * B * n_split).

Bytes floor of forward + backward (the benchmark's GB/s and % of floor; the one formula is
:func:`dino_loss_floor_bytes`): read every student and teacher logit once, write every student
gradient once = 2*V*B*K*es + G*B*K*et. This design moves 3*V*B*K*es + 2*G*B*K*et (the student is
read twice: a gradient needs its row's lse first), a ceiling of (2S + T) / (3S + 2T) of the floor
(~65 % at V=12, G=2, bf16).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .grad_scale import scale_

__all__ = ["fused_dino_loss", "fused_dino_loss_from_probs", "dino_loss_floor_bytes", "dino_teacher_stats",
           "dino_student_forward", "TeacherStats"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET_BLOCK_K = 16384  # the CPU interpreter pays per block op, not per element: few, large blocks
_SPLIT_ALIGN = 1024  # GPU column ranges are multiples of this (and of every tuned BLOCK_K that divides it)
_MIN_SPLIT = 2048  # below this a range is too short to amortise loading its row's statistics
_PROGRAMS_PER_SM = 8  # enough programs in flight per SM to cover DRAM latency


@triton.jit
def _dino_row_stats_kernel(
    X_ptr, X_stride,  # (R, K) logits, fp32 / fp16 / bf16
    C_ptr,  # (K,) fp32 center (read when HAS_CENTER)
    Max_ptr, Sum_ptr, Stat_stride,  # (R, n_split) fp32 outputs: max and sum of exp(x - max) per range
    Part_ptr, Part_stride,  # (n_row_blocks, K) fp32 output: column sums of the logits (when COL_SUM)
    R, K, split_k, inv_tau,
    HAS_CENTER: tl.constexpr, COL_SUM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per (row, K range): m = max x, d = sum exp(x - m), x = (a - C) * inv_tau; column sums of a."""
    pid_k = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    offs = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, split_k, BLOCK_K):
        # 1. a (BLOCK_R, BLOCK_K) tile; masked lanes load 0 (neutral for the column sums)
        k = pid_k * split_k + k0 + offs
        k_mask = (k < K) & (k0 + offs < split_k)
        mask = r_mask[:, None] & k_mask[None, :]
        a = tl.load(X_ptr + r[:, None] * X_stride + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_CENTER:
            c = tl.load(C_ptr + k, mask=k_mask, other=0.0)
            x = (a - c[None, :]) * inv_tau
        else:
            x = a * inv_tau
        # 2. online max / sum; columns outside the range are -inf (add exp(-inf) = 0). Rows past R
        #    keep finite values and are never stored. The range's first block always has a column < K.
        x = tl.where(k_mask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        # 3. column sums of this row block: each (row block, column) is written once
        if COL_SUM:
            tl.store(Part_ptr + pid_r * Part_stride + k, tl.sum(a, axis=0), mask=k_mask)
    tl.store(Max_ptr + r * Stat_stride + pid_k, m, mask=r_mask)
    tl.store(Sum_ptr + r * Stat_stride + pid_k, d, mask=r_mask)


@triton.jit
def _combine_stats(Max_ptr, Sum_ptr, row, Stat_stride, n_split, NS_PAD: tl.constexpr):
    """(M, 1/D) of one row from its per-range partials (masked ranges: m = -inf, d = 0)."""
    cs = tl.arange(0, NS_PAD)
    ms = tl.load(Max_ptr + row * Stat_stride + cs, mask=cs < n_split, other=float("-inf"))
    ds = tl.load(Sum_ptr + row * Stat_stride + cs, mask=cs < n_split, other=0.0)
    big_m = tl.max(ms, axis=0)
    return big_m, 1.0 / tl.sum(ds * tl.exp(ms - big_m), axis=0)


@triton.jit
def _dino_grad_kernel(
    S_ptr, S_stride,  # (V*B, K) student logits
    SMax_ptr, SSum_ptr, SStat_stride,  # (V*B, n_split_s) student partial stats
    T_ptr, T_stride,  # teacher logits, or fp32 probabilities when TEACHER_PROBS; row i*T_rows + T_off + b
    C_ptr,  # (K,) fp32 center
    TMax_ptr, TSum_ptr, TStat_stride,  # teacher partial stats, rows as T
    G_ptr, G_stride,  # (V*B, K) gradient output, student dtype (may alias S_ptr)
    Loss_ptr, Loss_stride,  # (B, n_split) fp32 output: partial loss per (image, range), unscaled
    B, V, K, split_k, T_rows, T_off, n_split_s, n_split_t, inv_tau_s, inv_tau_t, grad_scale,
    N_GLOBAL: tl.constexpr, G_PAD: tl.constexpr, NS_S_PAD: tl.constexpr, NS_T_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, TEACHER_PROBS: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """Per (K range, image): P_v, -<P_v, x_v> and grad_v = scale * (|T_v| softmax(x_v) - P_v) / tau_s."""
    pid_k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    gi = tl.arange(0, G_PAD)
    g_mask = gi < N_GLOBAL
    t_row = tl.minimum(gi, N_GLOBAL - 1).to(tl.int64) * T_rows + T_off + b  # pad rows alias a real one
    # 1. combined statistics of the image's G teacher rows (no softmax needed for given probabilities)
    if not TEACHER_PROBS:
        cs = tl.arange(0, NS_T_PAD)
        st_off = t_row[:, None] * TStat_stride + cs[None, :]
        st_mask = (cs < n_split_t)[None, :]
        tms = tl.load(TMax_ptr + st_off, mask=st_mask, other=float("-inf"))
        t_max = tl.max(tms, axis=1)
        t_inv = 1.0 / tl.sum(tl.load(TSum_ptr + st_off, mask=st_mask, other=0.0) * tl.exp(tms - t_max[:, None]),
                             axis=1)
    offs = tl.arange(0, BLOCK_K)
    loss = 0.0
    for k0 in range(0, split_k, BLOCK_K):
        k = pid_k * split_k + k0 + offs
        k_mask = (k < K) & (k0 + offs < split_k)
        tk_mask = g_mask[:, None] & k_mask[None, :]
        # 2. the G teacher probabilities of this block, kept in registers for all V student rows
        t = tl.load(T_ptr + t_row[:, None] * T_stride + k[None, :], mask=tk_mask, other=0.0).to(tl.float32)
        if TEACHER_PROBS:
            p = t
        else:
            c = tl.load(C_ptr + k, mask=k_mask, other=0.0)
            p = tl.exp((t - c[None, :]) * inv_tau_t - t_max[:, None]) * t_inv[:, None]
            p = tl.where(tk_mask, p, 0.0)
        for v in range(V):
            # 3. P_v sums the other views' probabilities (the own view i == v is left out)
            pv = tl.sum(tl.where(gi[:, None] != v, p, 0.0), axis=0)
            row = v * B + b
            x = tl.load(S_ptr + row * S_stride + k, mask=k_mask, other=0.0).to(tl.float32) * inv_tau_s
            loss -= tl.sum(pv * x, axis=0)
            if WRITE_GRAD:
                # 4. softmax from the row's combined statistics (a few floats, cached)
                s_max, s_inv = _combine_stats(SMax_ptr, SSum_ptr, row, SStat_stride, n_split_s, NS_S_PAD)
                n_teacher = tl.where(v < N_GLOBAL, N_GLOBAL - 1.0, N_GLOBAL * 1.0)
                g = (n_teacher * tl.exp(x - s_max) * s_inv - pv) * (inv_tau_s * grad_scale)
                tl.store(G_ptr + row * G_stride + k, g.to(G_ptr.dtype.element_ty), mask=k_mask)
    # 5. range 0 adds |T_v| * lse_v of the image's V rows
    if pid_k == 0:
        for v in range(V):
            s_max, s_inv = _combine_stats(SMax_ptr, SSum_ptr, v * B + b, SStat_stride, n_split_s, NS_S_PAD)
            loss += tl.where(v < N_GLOBAL, N_GLOBAL - 1.0, N_GLOBAL * 1.0) * (s_max - tl.log(s_inv))
    tl.store(Loss_ptr + b * Loss_stride + pid_k, loss)


# ----------------------------------------------------------------------------- tuning (GPU only)

def _prune(configs, named_args, **kwargs):
    """Blocks no longer than the range; multi-row tiles of at most 4096 elements on 8 warps (larger
    ones need > 128 registers per thread on sm_90, by ptxas)."""
    split_k = kwargs.get("split_k", named_args.get("split_k"))
    block_r = kwargs.get("BLOCK_R", 1)
    keep = [c for c in configs if c.kwargs["BLOCK_K"] <= split_k
            and (block_r == 1 or (c.kwargs["BLOCK_K"] * block_r <= 4096 and c.num_warps == 8))]
    return keep or [min(configs, key=lambda c: (c.kwargs["BLOCK_K"], -c.num_warps))]


def _tuned(kernel, pairs: list[tuple[int, int]], key: list[str], **kw):
    """Autotuned over (BLOCK_K, num_warps) pairs, none above ~100 registers per thread on sm_90 (ptxas);
    keyed on ``key`` and, by Triton, the tensors' dtypes; results also cached on disk."""
    return triton.autotune([triton.Config({"BLOCK_K": bk}, num_warps=w) for bk, w in pairs], key=key,
                           prune_configs_by={"early_config_prune": _prune}, cache_results=True, **kw)(kernel)


# row stats: keyed on K, the range length and the rows per tile (teacher and student tiles differ)
_row_stats_tuned = _tuned(_dino_row_stats_kernel, [(512, 4), (512, 8), (1024, 4), (1024, 8), (2048, 8), (4096, 8),
                                                   (8192, 16)], ["K", "split_k", "BLOCK_R"])
# grad: no (512, 4), it spills on sm_90 (bench/aot_compile.py). Two tuners: only the in-place call (G aliases
# S) needs each trial's overwritten logits restored, which clones G inside every timed call.
_GRAD_CONFIGS = [(1024, 4), (1024, 8), (2048, 8), (4096, 16)]
_grad_tuned = _tuned(_dino_grad_kernel, _GRAD_CONFIGS, ["K", "split_k", "V"])
_grad_tuned_inplace = _tuned(_dino_grad_kernel, _GRAD_CONFIGS, ["K", "split_k", "V"], restore_value=["G_ptr"])


# ----------------------------------------------------------------------------- launchers

def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests replace it with a NaN fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class _Plan:
    """Columns per program and K block of one launch; ``tuned``: let triton.autotune pick BLOCK_K."""
    split_k: int
    block_k: int
    tuned: bool

    def n_split(self, k: int) -> int:
        return triton.cdiv(k, self.split_k)


def _plan(k: int, units: int, device: torch.device, block_k: int | None, split_k: int | None) -> _Plan:
    """``units`` programs per column range (row blocks or images). GPU: ranges sized so that the
    grid fills every SM ~8 times; BLOCK_K autotuned unless given. Interpreter: one range, few blocks."""
    if block_k is not None and (isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1
                                or block_k & (block_k - 1)):
        raise ValueError(f"block_k must be a positive power of two, got {block_k!r}")
    if split_k is not None:
        if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
            raise ValueError(f"split_k must be a positive integer, got {split_k!r}")
        return _Plan(split_k, block_k or min(triton.next_power_of_2(split_k), _INTERPRET_BLOCK_K), False)
    if device.type != "cuda":
        block = block_k or min(triton.next_power_of_2(k), _INTERPRET_BLOCK_K)
        return _Plan(triton.cdiv(k, block) * block, block, False)
    target = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    n_split = max(1, min(triton.cdiv(target, units), k // _MIN_SPLIT))
    split = triton.cdiv(triton.cdiv(k, n_split), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return _Plan(split, block_k or 0, block_k is None)


def _launch(kernel, tuned, plan: _Plan, grid, *args, **meta) -> None:
    if plan.tuned:
        tuned[grid](*args, **meta)
    else:
        kernel[grid](*args, BLOCK_K=plan.block_k, num_warps=8 if plan.block_k >= 2048 else 4, **meta)


def _pad(n: int) -> int:  # a power-of-two tile length >= n (>= 2)
    return max(2, triton.next_power_of_2(n))


def _check_2d_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, K), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _inverse(name: str, value: float) -> float:
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return 1.0 / float(value)


@dataclass(frozen=True)
class TeacherStats:
    """Per-range softmax partials of the centered teacher logits, their column sums, the center."""
    max: torch.Tensor  # (G*B, n_split) fp32
    sum: torch.Tensor  # (G*B, n_split) fp32
    col_sum: torch.Tensor  # (K,) fp32
    center: torch.Tensor  # (K,) fp32, contiguous
    inv_tau: float


def _row_stats(x: torch.Tensor, inv_tau: float, plan: _Plan, center: torch.Tensor | None = None,
               block_r: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    rows, k = x.shape
    n_split, n_rb = plan.n_split(k), triton.cdiv(rows, block_r)
    stat_max = _empty((rows, n_split), torch.float32, x.device)
    stat_sum = _empty((rows, n_split), torch.float32, x.device)
    part = _empty((n_rb, k), torch.float32, x.device) if center is not None else None
    _launch(_dino_row_stats_kernel, _row_stats_tuned, plan, (n_split, n_rb), x, x.stride(0),
            center if center is not None else stat_max, stat_max, stat_sum, n_split,
            part if part is not None else stat_max, k, rows, k, plan.split_k, inv_tau,
            HAS_CENTER=center is not None, COL_SUM=center is not None, BLOCK_R=block_r)
    col_sum = None if part is None else part[0] if n_rb == 1 else part.sum(dim=0)  # fixed order: deterministic
    return stat_max, stat_sum, col_sum


def dino_teacher_stats(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float, *,
                       block_k: int | None = None, split_k: int | None = None) -> TeacherStats:
    """One read of the teacher logits: softmax partials of (t - C) / tau_t and column sums of t."""
    _check_2d_float("teacher_output", teacher_output)
    rows, k = teacher_output.shape
    if not isinstance(center, torch.Tensor) or center.numel() != k or not center.is_floating_point():
        raise ValueError(f"center must be a float tensor of K = {k} elements ((1, K) or (K,)), got "
                         f"{getattr(center, 'dtype', None)} {tuple(getattr(center, 'shape', ()))}")
    if center.device != teacher_output.device:
        raise ValueError(f"center is on {center.device}, teacher_output on {teacher_output.device}")
    inv_tau = _inverse("teacher_temp", teacher_temp)
    block_r = 8 if teacher_output.is_cuda else 16  # rows per program: fewer column-sum partials
    plan = _plan(k, triton.cdiv(rows, block_r), teacher_output.device, block_k, split_k)
    c = center.detach().reshape(-1).to(torch.float32).contiguous()
    stat_max, stat_sum, col_sum = _row_stats(teacher_output.detach().contiguous(), inv_tau, plan, c, block_r)
    return TeacherStats(stat_max, stat_sum, col_sum, c, inv_tau)


def dino_student_forward(student_output: torch.Tensor, teacher: torch.Tensor, stats: TeacherStats | None,
                         student_temp: float, ncrops: int, n_global: int = 2, *, teacher_offset: int = 0,
                         write_grad: bool = True, inplace: bool = False, block_k: int | None = None,
                         split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unscaled partial losses (B, n_split) fp32 and the gradient wrt ``student_output`` (or None).

    ``teacher``: (n_global*B_t, K) logits with their ``stats`` (:func:`dino_teacher_stats`), or fp32
    probabilities (``stats`` None). The B student images are teacher images ``teacher_offset``
    onwards (B_t >= B: the fused head runs on chunks of images). Loss = partials.sum() /
    (n_pairs * B_t); the gradient carries that scale. ``inplace``: written over the logits."""
    _check_2d_float("student_output", student_output)
    rows, k = student_output.shape
    batch, t_batch = rows // ncrops, teacher.shape[0] // n_global
    if rows % ncrops or teacher.shape[1] != k or teacher.shape[0] % n_global or teacher_offset + batch > t_batch:
        raise ValueError(f"student_output {tuple(student_output.shape)} (ncrops = {ncrops}) does not match images "
                         f"{teacher_offset}.. of teacher {tuple(teacher.shape)} (n_global = {n_global})")
    if stats is None and teacher.dtype != torch.float32:
        raise TypeError(f"teacher probabilities must be float32, got {teacher.dtype}")
    inv_tau_s = _inverse("student_temp", student_temp)
    s, t, dev = student_output.detach().contiguous(), teacher.detach().contiguous(), student_output.device
    s_max, s_sum, _ = _row_stats(s, inv_tau_s, _plan(k, rows, dev, block_k, split_k))  # the loss needs lse too
    plan = _plan(k, batch, dev, block_k, split_k)
    grad = (s if inplace else _empty((rows, k), s.dtype, dev)) if write_grad else None
    loss = _empty((batch, plan.n_split(k)), torch.float32, dev)
    n_split_t = 1 if stats is None else stats.max.shape[1]
    _launch(_dino_grad_kernel, _grad_tuned_inplace if grad is s else _grad_tuned, plan, (plan.n_split(k), batch),
            s, s.stride(0), s_max, s_sum, s_max.stride(0), t, t.stride(0), t if stats is None else stats.center,
            t if stats is None else stats.max, t if stats is None else stats.sum, n_split_t,
            s if grad is None else grad, k, loss, loss.stride(0),
            batch, ncrops, k, plan.split_k, t_batch, teacher_offset, s_max.shape[1], n_split_t,
            inv_tau_s, 1.0 if stats is None else stats.inv_tau, 1.0 / (n_global * (ncrops - 1) * t_batch),
            N_GLOBAL=n_global, G_PAD=_pad(n_global), NS_S_PAD=_pad(s_max.shape[1]), NS_T_PAD=_pad(n_split_t),
            TEACHER_PROBS=stats is None, WRITE_GRAD=write_grad)
    return loss, grad


# ----------------------------------------------------------------------------- the op: dino_fast::dino_loss
# A torch custom op with a fake implementation and an autograd formula: torch.compile traces
# through it (no graph break), FakeTensorMode propagates its shapes without running a kernel.
# An output the call does not make is a (0,) tensor (a custom op returns tensors, never None).

def _dino_loss_impl(student_output, teacher, center, student_temp, teacher_temp, ncrops, n_global, write_grad,
                    inplace, block_k, split_k):
    """(0-d loss, teacher column sums, gradient). ``teacher``: logits, or fp32 probabilities (``center``
    None). ``inplace``: the gradient goes over contiguous logits (an undeclared write: eager only)."""
    kw = dict(block_k=block_k, split_k=split_k)
    stats = None if center is None else dino_teacher_stats(teacher, center, teacher_temp, **kw)
    parts, grad = dino_student_forward(student_output, teacher, stats, student_temp, ncrops, n_global,
                                       write_grad=write_grad, inplace=inplace, **kw)
    loss = parts.sum() * (1.0 / (n_global * (ncrops - 1) * (student_output.shape[0] // ncrops)))  # no host sync
    col_sum = teacher.new_empty((0,), dtype=torch.float32) if stats is None else stats.col_sum
    own_grad = write_grad and not (inplace and student_output.is_contiguous())  # else the logits hold it
    return loss, col_sum, grad if own_grad else student_output.new_empty(0)


_dino_loss_op = torch.library.custom_op("dino_fast::dino_loss", _dino_loss_impl, mutates_args=(), schema=(
    "(Tensor student_output, Tensor teacher, Tensor? center, float student_temp, float teacher_temp, int ncrops, "
    "int n_global, bool write_grad, bool inplace, int? block_k, int? split_k) -> (Tensor, Tensor, Tensor)"))


@_dino_loss_op.register_fake
def _(student_output, teacher, center, student_temp, teacher_temp, ncrops, n_global, write_grad, inplace, *_):
    own_grad = write_grad and not (inplace and student_output.is_contiguous())
    return (student_output.new_empty((), dtype=torch.float32),
            teacher.new_empty((0 if center is None else teacher.shape[1],), dtype=torch.float32),
            student_output.new_empty(student_output.shape if own_grad else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    student_output, write_grad, grad = inputs[0], inputs[7], output[2]  # grad: (0,) when the logits hold it
    ctx.grad = (grad if grad.numel() else student_output.detach()) if write_grad else None  # freed in backward
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss: torch.Tensor, _grad_col_sum: torch.Tensor, _grad_grad: torch.Tensor):
    grad, ctx.grad = ctx.grad, None
    if grad is None:
        raise RuntimeError("fused_dino_loss: backward can run once per forward (the stored gradient is "
                           "scaled in place); recompute the loss instead of retain_graph=True")
    return (scale_(grad, grad_loss),) + (None,) * 10


_dino_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_layout(student_output: torch.Tensor, teacher: torch.Tensor, ncrops: int, n_global: int) -> None:
    _check_2d_float("student_output", student_output)
    _check_2d_float("teacher_output", teacher)
    if ncrops < 2 or not 1 <= n_global <= ncrops:
        raise ValueError(f"need ncrops >= 2 and 1 <= n_global <= ncrops, got ncrops={ncrops}, n_global={n_global}")
    if student_output.device != teacher.device:
        raise ValueError(f"student_output is on {student_output.device}, teacher_output on {teacher.device}")
    (s_rows, k), (t_rows, k_t) = student_output.shape, teacher.shape
    if k != k_t:
        raise ValueError(f"student_output has K = {k} columns, teacher_output {k_t}")
    if k < 1 or t_rows < n_global or t_rows % n_global:
        raise ValueError(f"teacher_output has shape {(t_rows, k_t)}: expected (n_global*B, K) with "
                         f"n_global = {n_global}, B >= 1, K >= 1")
    if s_rows != ncrops * (t_rows // n_global):
        raise ValueError(f"student_output has {s_rows} rows, expected ncrops*B = {ncrops}*{t_rows // n_global} "
                         f"(B from teacher_output's {t_rows} rows / n_global = {n_global})")


def _call_op(student_output, teacher, center, student_temp, teacher_temp, ncrops, n_global, inplace, block_k, split_k):
    ncrops, n_global = operator.index(ncrops), operator.index(n_global)
    _check_layout(student_output, teacher, ncrops, n_global)
    write_grad = student_output.requires_grad and torch.is_grad_enabled()
    inplace = inplace and not torch.compiler.is_compiling()  # a compiled graph must see no undeclared write
    return torch.ops.dino_fast.dino_loss(student_output, teacher, center, float(student_temp), float(teacher_temp),
                                         ncrops, n_global, write_grad, inplace, block_k, split_k)


def fused_dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                    student_temp: float, teacher_temp: float, ncrops: int, n_global: int = 2, *,
                    inplace: bool = False, block_k: int | None = None,
                    split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DINO loss over all (teacher view, other student view) pairs.

    Args:
        student_output: (ncrops*B, K) fp32/fp16/bf16 logits, views stacked along dim 0 (official
            layout); gets the gradient. teacher_output: (n_global*B, K) logits, no gradient.
        center: (1, K) or (K,); student_temp, teacher_temp: positive Python numbers.
        ncrops: V, student views (>= 2); n_global: G, teacher views (1 <= G <= V).
        inplace: write the gradient over ``student_output`` (only if the caller no longer needs it).
        block_k: K block (power of two), default autotuned on GPU. split_k: columns per program
            (cdiv(K, split_k) programs per row), default sized to fill the GPU (one range on CPU).

    Returns:
        (loss, teacher_col_sum): 0-d fp32 loss with autograd to ``student_output`` (backward may
        run once), and (K,) fp32 column sums of ``teacher_output`` for the center update.
    """
    loss, col_sum, _ = _call_op(student_output, teacher_output, center, student_temp, teacher_temp, ncrops, n_global,
                                inplace, block_k, split_k)
    return loss, col_sum


def fused_dino_loss_from_probs(student_output: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                               ncrops: int, n_global: int = 2, *, inplace: bool = False, block_k: int | None = None,
                               split_k: int | None = None) -> torch.Tensor:
    """As :func:`fused_dino_loss` with the teacher probabilities given: (n_global*B, K) fp32 rows
    (e.g. Sinkhorn-Knopp's); no softmax, no column sums. Returns the 0-d fp32 loss."""
    return _call_op(student_output, teacher_probs.to(torch.float32), None, student_temp, 1.0, ncrops, n_global, inplace,
                    block_k, split_k)[0]


def dino_loss_floor_bytes(batch: int, ncrops: int, k: int, student_dtype: torch.dtype,
                          teacher_dtype: torch.dtype | None = None, n_global: int = 2) -> int:
    """Bytes floor of one forward + backward: read student and teacher logits once, write the
    student gradient once = 2*V*B*K*es + G*B*K*et (the module docstring's formula)."""
    es, et = student_dtype.itemsize, (teacher_dtype or student_dtype).itemsize
    return 2 * ncrops * batch * k * es + n_global * batch * k * et
