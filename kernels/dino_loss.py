"""Fused DINO loss: teacher softmax + cross-entropy over all (teacher, student) view pairs.

Math (DESIGN.md, "Algebra the fused loss can use"). Rows are stacked view-major:
student row ``v*B + b`` is view ``v`` (of V = ncrops) of image ``b``; teacher row ``i*B + b``
is global view ``i`` (of G = n_global). With ``x = s / tau_s`` and
``p_i = softmax((t_i - C) / tau_t)``, the teacher views paired with student view v are
``T_v = {i < G : i != v}`` and

    loss = scale * sum_{v,b} ( |T_v| * lse(x_{v,b}) - <P_{v,b}, x_{v,b}> ),   P_{v,b} = sum_{i in T_v} p_{i,b}
    dloss/ds_{v,b} = scale * ( |T_v| * softmax(x_{v,b}) - P_{v,b} ) / tau_s
    scale = 1 / (n_pairs * B),   n_pairs = sum_v |T_v| = G * (V - 1)

which equals the official ``DINOLoss`` (mean over batch of -sum_k p log_softmax, averaged
over pairs). The B x V x K student softmax is never stored.

Kernels (all accumulate in fp32, offsets in int64):
  1. ``_dino_teacher_stats_kernel``   one program per teacher row: online max / sum of
     exp((t - C) / tau_t) over K blocks -> row max m and 1 / sum.       read  G*B*K*et
  2. ``_dino_teacher_probs_kernel``   one program per (K block, row block): p = exp(x - m) / sum
     stored in fp32, and column sums of t (for the center) per row block, reduced by torch
     afterwards in a fixed order (deterministic, no atomics).            read  G*B*K*et, write G*B*K*4
  3. ``_dino_student_kernel``         one program per student row (image-major order), two
     sweeps over K: sweep 1 online max / sum of exp(x); sweep 2 softmax, P_v (masked loads of
     the teacher probabilities of the other global views, so |T_v| is 1 or 2 for G = 2), the
     gradient (stored in the input dtype) and <P_v, x>.
                                   read 2*V*B*K*es + n_pairs*B*K*4 (before L2 reuse), write V*B*K*es
  backward: grad *= grad_output in place.                  read V*B*K*es, write V*B*K*es
Bytes floor of the whole op (what the benchmark's GB/s uses): read every student and teacher
logit once and write every student gradient once = (2*V*B*K*es + G*B*K*et) bytes. The extra
student sweep, the second teacher read and the fp32 probabilities are what this design pays on
top (the probabilities of one image are re-read by its V student rows; programs run image-major so
that these re-reads can hit in L2).

The forward writes the gradient; backward only multiplies it by grad_output (in place; done
even when grad_output is 1, since checking would be a host sync).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["fused_dino_loss", "DINOLossFunction", "dino_teacher_forward", "dino_student_forward"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK_K = 4096  # largest K block of the row sweeps on GPU: 16 fp32 values per thread at 8 warps
_MAX_BLOCK_K_INTERPRET = 16384  # the CPU interpreter pays per block op, not per element: fewer, larger blocks


@triton.jit
def _dino_teacher_stats_kernel(
    T_ptr, T_stride,  # (G*B, K) teacher logits, fp32 / fp16 / bf16
    C_ptr,  # (K,) fp32 center
    Max_ptr, InvSum_ptr,  # (G*B,) fp32 outputs
    K, inv_tau_t,
    BLOCK_K: tl.constexpr,
):
    """Per teacher row: m = max_k x_k and 1 / sum_k exp(x_k - m), x = (t - C) / tau_t."""
    row = tl.program_id(0).to(tl.int64)
    t_row = T_ptr + row * T_stride
    offs = tl.arange(0, BLOCK_K)
    # 1. online max / sum over K blocks; masked lanes are -inf so they add exp(-inf) = 0
    m = float("-inf")
    d = 0.0
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = k < K
        t = tl.load(t_row + k, mask=mask, other=float("-inf")).to(tl.float32)
        c = tl.load(C_ptr + k, mask=mask, other=0.0)
        x = (t - c) * inv_tau_t
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # 2. store max and 1/sum (not lse: exp(x - lse) would lose ~ulp(lse) relative precision)
    tl.store(Max_ptr + row, m)
    tl.store(InvSum_ptr + row, 1.0 / d)


@triton.jit
def _dino_teacher_probs_kernel(
    T_ptr, T_stride,  # (R, K) teacher logits, R = G*B
    C_ptr,  # (K,) fp32 center
    Max_ptr, InvSum_ptr,  # (R,) fp32 from the stats kernel
    P_ptr, P_stride,  # (R, K) fp32 output probabilities
    Part_ptr,  # (n_row_blocks, K) fp32 output: column sums of t per row block
    R, K, rows_per_prog, inv_tau_t,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """p = exp(x - m) / sum for a (rows_per_prog, BLOCK_K) slab; column sums of t over the slab."""
    pid_k = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    c = tl.load(C_ptr + k, mask=k_mask, other=0.0)
    col = tl.zeros([BLOCK_K], dtype=tl.float32)
    r_start = pid_r * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_R):
        # 1. load a (BLOCK_R, BLOCK_K) tile of logits and its rows' statistics
        r = r_start + r0 + tl.arange(0, BLOCK_R)
        r_mask = r < R
        mask = r_mask[:, None] & k_mask[None, :]
        t = tl.load(T_ptr + r[:, None] * T_stride + k[None, :], mask=mask, other=0.0).to(tl.float32)
        m = tl.load(Max_ptr + r, mask=r_mask, other=0.0)
        inv_d = tl.load(InvSum_ptr + r, mask=r_mask, other=0.0)
        # 2. probabilities, stored in fp32 for the student sweep
        p = tl.exp((t - c[None, :]) * inv_tau_t - m[:, None]) * inv_d[:, None]
        tl.store(P_ptr + r[:, None] * P_stride + k[None, :], p, mask=mask)
        # 3. column sums for the center (masked lanes loaded as 0)
        col += tl.sum(t, axis=0)
    tl.store(Part_ptr + pid_r * K + k, col, mask=k_mask)


@triton.jit
def _dino_student_kernel(
    S_ptr, S_stride,  # (V*B, K) student logits
    P_ptr, P_stride,  # (G*B, K) fp32 teacher probabilities
    G_ptr, G_stride,  # (V*B, K) gradient output, student dtype (may alias S_ptr)
    Loss_ptr,  # (V*B,) fp32 output: unscaled loss of each student row
    B, V, K, inv_tau_s, grad_scale,
    N_GLOBAL: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """Per student row: |T_v| * lse(x) - <P_v, x> and grad = scale * (|T_v| softmax(x) - P_v) / tau_s."""
    # image-major program order: the V programs of one image run together, so the teacher
    # probabilities of that image are read from DRAM once and then hit in L2
    pid = tl.program_id(0).to(tl.int64)
    b = pid // V
    v = pid % V
    row = v * B + b
    s_row = S_ptr + row * S_stride
    g_row = G_ptr + row * G_stride
    offs = tl.arange(0, BLOCK_K)
    # global views pair with the other G-1 globals, local views with all G
    n_teacher = N_GLOBAL - (v < N_GLOBAL).to(tl.float32)
    # 1. sweep 1: online max / sum of exp(x), x = s / tau_s
    m = float("-inf")
    d = 0.0
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = k < K
        x = tl.load(s_row + k, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau_s
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    inv_d = 1.0 / d
    # 2. sweep 2: P_v, <P_v, x> and the gradient
    dot = 0.0
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = k < K
        x = tl.load(s_row + k, mask=mask, other=0.0).to(tl.float32) * inv_tau_s
        pv = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in tl.static_range(N_GLOBAL):
            # the own view (i == v) is masked off: no memory traffic, adds 0
            pv += tl.load(P_ptr + (i * B + b) * P_stride + k, mask=mask & (v != i), other=0.0)
        dot += tl.sum(pv * x, axis=0)
        if WRITE_GRAD:
            softmax = tl.exp(x - m) * inv_d
            g = (n_teacher * softmax - pv) * (inv_tau_s * grad_scale)
            tl.store(g_row + k, g.to(G_ptr.dtype.element_ty), mask=mask)
    # 3. row loss; lse = m + log(sum)
    tl.store(Loss_ptr + row, n_teacher * (m + tl.log(d)) - dot)


# ----------------------------------------------------------------------------- launchers


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests replace it with a NaN fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pick_block_k(k: int, block_k: int | None, device: torch.device, gpu_cap: int = _MAX_BLOCK_K) -> int:
    if block_k is not None:
        if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1 or block_k & (block_k - 1):
            raise ValueError(f"block_k must be a positive power of two, got {block_k!r}")
        return block_k
    cap = gpu_cap if device.type == "cuda" else _MAX_BLOCK_K_INTERPRET
    return min(triton.next_power_of_2(k), cap)


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _check_2d_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, K), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _count(name: str, value: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def dino_teacher_forward(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float,
                         block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities softmax((t - C) / tau_t) (R, K) fp32 and column sums of t (K,) fp32.

    Reads the teacher logits twice (stats, then probabilities + column sums)."""
    _check_2d_float("teacher_output", teacher_output)
    rows, k = teacher_output.shape
    if center.numel() != k:
        raise ValueError(f"center has {center.numel()} elements, expected K = {k} (shape (1, K) or (K,))")
    if center.device != teacher_output.device:
        raise ValueError(f"center is on {center.device}, teacher_output on {teacher_output.device}")
    if not center.is_floating_point():
        raise TypeError(f"center must be a floating tensor, got {center.dtype}")
    inv_tau_t = 1.0 / _positive("teacher_temp", teacher_temp)
    t = teacher_output.detach().contiguous()
    c = center.detach().reshape(-1).to(torch.float32).contiguous()
    dev = t.device
    row_max = _empty((rows,), torch.float32, dev)
    row_inv_sum = _empty((rows,), torch.float32, dev)
    block = _pick_block_k(k, block_k, dev)
    _dino_teacher_stats_kernel[(rows,)](t, t.stride(0), c, row_max, row_inv_sum, k, inv_tau_t,
                                        BLOCK_K=block, num_warps=_num_warps(block))

    block_kc = _pick_block_k(k, block_k, dev, gpu_cap=512)
    block_r = 4
    n_kb = triton.cdiv(k, block_kc)
    if dev.type == "cuda":
        # enough (K block, row block) programs to fill the GPU a few times over
        target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
        n_rb = max(1, min(triton.cdiv(rows, block_r), triton.cdiv(target, n_kb)))
    else:
        n_rb = 1  # interpreter: fewer, larger programs run faster
    rows_per_prog = triton.cdiv(triton.cdiv(rows, n_rb), block_r) * block_r
    n_rb = triton.cdiv(rows, rows_per_prog)
    probs = _empty((rows, k), torch.float32, dev)
    partial = _empty((n_rb, k), torch.float32, dev)
    _dino_teacher_probs_kernel[(n_kb, n_rb)](t, t.stride(0), c, row_max, row_inv_sum, probs, probs.stride(0),
                                             partial, rows, k, rows_per_prog, inv_tau_t,
                                             BLOCK_R=block_r, BLOCK_K=block_kc, num_warps=4)
    col_sum = partial[0] if n_rb == 1 else partial.sum(dim=0)  # fixed order: deterministic
    return probs, col_sum


def dino_student_forward(student_output: torch.Tensor, probs: torch.Tensor, student_temp: float, ncrops: int,
                         n_global: int = 2, write_grad: bool = True, inplace: bool = False,
                         block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss (0-d fp32) and its gradient wrt ``student_output`` (student dtype, or None).

    ``probs`` (n_global*B, K) fp32 from :func:`dino_teacher_forward`. With ``inplace`` the
    gradient overwrites the (contiguous) student logits."""
    _check_2d_float("student_output", student_output)
    rows, k = student_output.shape
    if probs.dim() != 2 or probs.dtype != torch.float32 or probs.shape[1] != k or probs.shape[0] % n_global:
        raise ValueError(f"probs must be fp32 (n_global*B, K={k}) with n_global={n_global}, got "
                         f"{probs.dtype} {tuple(probs.shape)}")
    if probs.device != student_output.device:
        raise ValueError(f"probs is on {probs.device}, student_output on {student_output.device}")
    batch = probs.shape[0] // n_global
    if batch < 1 or rows != ncrops * batch:
        raise ValueError(f"student_output has {rows} rows, expected ncrops*B = {ncrops}*{batch}")
    probs = probs.contiguous()
    n_pairs = n_global * (ncrops - 1)
    s = student_output.detach().contiguous()
    dev = s.device
    grad = None
    if write_grad:
        grad = s if inplace else _empty((rows, k), s.dtype, dev)
    loss_rows = _empty((rows,), torch.float32, dev)
    block = _pick_block_k(k, block_k, dev)
    scale = 1.0 / (n_pairs * batch)
    _dino_student_kernel[(rows,)](s, s.stride(0), probs, probs.stride(0),
                                  grad if grad is not None else s, k if grad is None else grad.stride(0),
                                  loss_rows, batch, ncrops, k, 1.0 / _positive("student_temp", student_temp), scale,
                                  N_GLOBAL=n_global, BLOCK_K=block, WRITE_GRAD=write_grad,
                                  num_warps=_num_warps(block))
    # summed by torch on device: no host sync
    return loss_rows.sum() * scale, grad


@dataclass(frozen=True)
class _Config:
    """The non-tensor arguments of one fused call (keeps ``apply``'s signature short)."""
    student_temp: float
    teacher_temp: float
    ncrops: int
    n_global: int
    write_grad: bool
    inplace: bool
    block_k: int | None


class DINOLossFunction(torch.autograd.Function):
    """Forward computes loss, teacher column sums and the student gradient; backward scales it."""

    @staticmethod
    def forward(ctx, student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                cfg: _Config) -> tuple[torch.Tensor, torch.Tensor]:
        probs, col_sum = dino_teacher_forward(teacher_output, center, cfg.teacher_temp, cfg.block_k)
        loss, grad = dino_student_forward(student_output, probs, cfg.student_temp, cfg.ncrops, cfg.n_global,
                                          cfg.write_grad, cfg.inplace, cfg.block_k)
        ctx.grad = grad  # an intermediate, not an input/output: kept as an attribute, freed in backward
        ctx.mark_non_differentiable(col_sum)
        return loss, col_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_col_sum: torch.Tensor | None):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("fused_dino_loss: backward can run once per forward (the stored gradient is "
                               "scaled in place); recompute the loss instead of retain_graph=True")
        ctx.grad = None
        # in place: saves a V*B*K buffer; multiplying unconditionally avoids a host sync on grad_loss == 1
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None


def fused_dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                    student_temp: float, teacher_temp: float, ncrops: int, n_global: int = 2, *,
                    inplace: bool = False, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DINO loss over all (teacher view, other student view) pairs.

    Args:
        student_output: (ncrops*B, K) logits, views stacked along dim 0 (official chunk layout);
            float32 / float16 / bfloat16. Gets the gradient.
        teacher_output: (n_global*B, K) logits of the global views; no gradient.
        center: (1, K) or (K,) teacher center.
        student_temp, teacher_temp: positive temperatures (Python numbers).
        ncrops: V, number of student views (>= 2); n_global: G, teacher views (1 <= G <= V).
        inplace: write the gradient over ``student_output`` (only if the caller no longer needs it).
        block_k: K block of the row sweeps (power of two); default picked from K.

    Returns:
        (loss, teacher_col_sum): 0-d fp32 loss with autograd to ``student_output`` (backward may
        run once), and (K,) fp32 column sums of ``teacher_output`` for the center update.
    """
    _check_2d_float("student_output", student_output)
    _check_2d_float("teacher_output", teacher_output)
    ncrops, n_global = _count("ncrops", ncrops), _count("n_global", n_global)
    if ncrops < 2:
        raise ValueError(f"ncrops must be >= 2, got {ncrops}")
    if not 1 <= n_global <= ncrops:
        raise ValueError(f"n_global must be in [1, ncrops={ncrops}], got {n_global}")
    if student_output.device != teacher_output.device:
        raise ValueError(f"student_output is on {student_output.device}, teacher_output on {teacher_output.device}")
    (s_rows, k), (t_rows, k_t) = student_output.shape, teacher_output.shape
    if k != k_t:
        raise ValueError(f"student_output has K = {k} columns, teacher_output {k_t}")
    if k < 1 or t_rows < n_global or t_rows % n_global:
        raise ValueError(f"teacher_output has shape {(t_rows, k_t)}: expected (n_global*B, K) with "
                         f"n_global = {n_global}, B >= 1, K >= 1")
    batch = t_rows // n_global
    if s_rows != ncrops * batch:
        raise ValueError(f"student_output has {s_rows} rows, expected ncrops*B = {ncrops}*{batch} = "
                         f"{ncrops * batch} (B from teacher_output's {t_rows} rows / n_global = {n_global})")
    write_grad = student_output.requires_grad and torch.is_grad_enabled()
    cfg = _Config(float(student_temp), float(teacher_temp), ncrops, n_global, write_grad, inplace, block_k)
    return DINOLossFunction.apply(student_output, teacher_output, center, cfg)
