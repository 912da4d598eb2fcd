"""DINO head's last layer fused with the DINO loss: the (V*B, K) student logits never exist whole.

The last layer is ``s = f @ W^T`` (f: (V*B, D) l2-normalised bottleneck features, W: (K, D) the
weight-normed prototypes, no bias). As in fused linear + cross-entropy for LLMs (Liger's
FusedLinearCrossEntropy), the forward runs over chunks of images (all V views of ``nb`` images:
rows are independent given the teacher, so a chunk needs no recomputation):

    for each chunk c of images:          s_c = f_c @ W^T                    (V*nb, K), compute dtype
        student pass of kernels/dino_loss.py on s_c (row statistics, then loss partials and
        dL/ds_c written over s_c in place, teacher probabilities rebuilt from the teacher's
        statistics of the whole batch)
        dL/df_c  = dL/ds_c @ W                                           (V*nb, D)
        dL/dW   += (dL/ds_c)^T @ f_c                                     (K, D), fp32 accumulation

so the forward already holds the gradients (like kernels/dino_loss.py, backward only scales
them by grad_output, on the device). Gradients reach the last layer's parameters through the
caller's differentiable ``W = g * v / ||v||`` (weight_g only when it requires grad), so
``norm_last_layer`` and ``freeze_last_layer`` behave as with the plain head.

Memory: one chunk of logits (``V*nb*K`` elements in the compute dtype) instead of the logits and
their gradient; plus the fp32 (K, D) weight-gradient accumulator and the (V*B, D) feature
gradient. FLOPs are the unfused head's (one forward and two backward matmuls).
"""
from __future__ import annotations

import torch
import triton

from . import dino_loss as _dl
from .grad_scale import scale_

__all__ = ["fused_dino_head_loss"]

_CHUNK_ELEMENTS = 1 << 26  # logits per chunk by default: 128 MB in bf16


def _chunk_images(batch: int, ncrops: int, k: int) -> int:
    """Images per chunk by default: equal chunks of at most ~_CHUNK_ELEMENTS logits."""
    return triton.cdiv(batch, triton.cdiv(batch, max(1, _CHUNK_ELEMENTS // (ncrops * k))))


def _accumulate_(acc: torch.Tensor, grad: torch.Tensor, feats: torch.Tensor, first: bool) -> None:
    """acc (+)= grad^T @ feats in fp32 (a bf16 product is rounded once per chunk, then added)."""
    if acc.dtype == grad.dtype:
        if first:
            torch.mm(grad.t(), feats, out=acc)
        else:
            acc.addmm_(grad.t(), feats)
    elif first:
        acc.copy_(torch.mm(grad.t(), feats))
    else:
        acc.add_(torch.mm(grad.t(), feats))


# ----------------------------------------------------------------------------- the op: dino_fast::dino_head_loss
# A torch custom op (fake implementation + autograd formula) like kernels/dino_loss.py's; outputs
# the call does not make are (0,) tensors.

def _dino_head_loss_impl(feats, weight, teacher, center, student_temp, teacher_temp, ncrops, n_global, chunk_images,
                         compute_dtype, grad_feats, grad_weight, block_k, split_k):
    """(0-d loss, teacher column sums, dL/dfeats (V*B, D) in the features' dtype, dL/dW (K, D) fp32).
    ``teacher`` is logits (``center`` a tensor) or fp32 probabilities (``center`` None)."""
    dev, cd, views, (rows, dim), k = feats.device, compute_dtype, ncrops, feats.shape, weight.shape[0]
    batch = rows // views
    # 1. teacher statistics of the whole batch: one read of the teacher logits (none for probabilities)
    stats = None if center is None else _dl.dino_teacher_stats(teacher, center, teacher_temp, block_k=block_k,
                                                               split_k=split_k)
    write_grad = grad_feats or grad_weight
    with torch.autocast(dev.type, enabled=False):
        f = feats.detach().to(cd).reshape(views, batch, dim)
        w = weight.detach().to(cd).contiguous()  # (K, D)
        grad_f = _dl._empty((views, batch, dim), feats.dtype, dev) if grad_feats else feats.new_empty(0)
        grad_w = _dl._empty((k, dim), torch.float32, dev) if grad_weight else feats.new_empty(0)
        logits_buf = _dl._empty((views * min(batch, chunk_images), k), cd, dev)
        total = None
        for b0 in range(0, batch, chunk_images):
            b1 = min(batch, b0 + chunk_images)
            f_c = f[:, b0:b1].reshape(views * (b1 - b0), dim)  # (V*nb, D), the chunk's rows view-major
            # 2. this chunk's logits
            logits = logits_buf[: f_c.shape[0]]
            torch.mm(f_c, w.t(), out=logits)
            # 3. loss partials and dL/ds written over the logits
            parts, g = _dl.dino_student_forward(logits, teacher, stats, student_temp, views, n_global,
                                                teacher_offset=b0, write_grad=write_grad, inplace=True,
                                                block_k=block_k, split_k=split_k)
            total = parts.sum() if total is None else total + parts.sum()
            # 4. back through the matmul, chunk by chunk
            if grad_feats:
                grad_f[:, b0:b1].copy_(torch.mm(g, w).reshape(views, b1 - b0, dim))
            if grad_weight:
                _accumulate_(grad_w, g, f_c, first=b0 == 0)
    loss = total * (1.0 / (n_global * (views - 1) * batch))
    col_sum = teacher.new_empty((0,), dtype=torch.float32) if stats is None else stats.col_sum
    return loss, col_sum, grad_f.reshape(rows, dim) if grad_feats else grad_f, grad_w


_dino_head_loss_op = torch.library.custom_op("dino_fast::dino_head_loss", _dino_head_loss_impl, mutates_args=(),
                                             schema=(
    "(Tensor student_feats, Tensor weight, Tensor teacher, Tensor? center, float student_temp, float teacher_temp, "
    "int ncrops, int n_global, int chunk_images, ScalarType compute_dtype, bool grad_feats, bool grad_weight, "
    "int? block_k, int? split_k) -> (Tensor, Tensor, Tensor, Tensor)"))


@_dino_head_loss_op.register_fake
def _(feats, weight, teacher, center, student_temp, teacher_temp, ncrops, n_global, chunk_images, compute_dtype,
      grad_feats, grad_weight, *_):
    return (feats.new_empty((), dtype=torch.float32),
            feats.new_empty((0 if center is None else weight.shape[0],), dtype=torch.float32),
            feats.new_empty(feats.shape if grad_feats else (0,)),
            feats.new_empty(weight.shape if grad_weight else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    # the gradients are intermediates: kept as attributes, freed in backward
    ctx.grads = (output[2] if inputs[10] else None, output[3] if inputs[11] else None)
    ctx.weight_dtype = inputs[1].dtype
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss: torch.Tensor, *_unused: torch.Tensor):
    if ctx.grads is None:
        raise RuntimeError("fused_dino_head_loss: backward can run once per forward (the stored gradients are "
                           "scaled in place); recompute the loss instead of retain_graph=True")
    (grad_f, grad_w), ctx.grads = ctx.grads, None
    grad_f = None if grad_f is None else scale_(grad_f, grad_loss)
    grad_w = None if grad_w is None else scale_(grad_w, grad_loss).to(ctx.weight_dtype)
    return (grad_f, grad_w) + (None,) * 12


_dino_head_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check(student_feats: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor, ncrops: int,
           n_global: int) -> int:
    for name, t in (("student_feats", student_feats), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in _dl._FLOAT_DTYPES:
            raise ValueError(f"{name} must be a 2-D float32/float16/bfloat16 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if student_feats.shape[1] != weight.shape[1]:
        raise ValueError(f"student_feats has {student_feats.shape[1]} features, weight (K, D) has "
                         f"D = {weight.shape[1]}")
    if not student_feats.device == weight.device == teacher.device:
        raise ValueError(f"student_feats on {student_feats.device}, weight on {weight.device}, "
                         f"teacher on {teacher.device}: all must share one device")
    if student_feats.shape[0] % ncrops:
        raise ValueError(f"student_feats has {student_feats.shape[0]} rows, not a multiple of ncrops = {ncrops}")
    # the (V*B, K) layout checks of the plain fused loss, on a stand-in of the logits' shape
    _dl._check_layout(student_feats.new_empty((1, 1)).expand(student_feats.shape[0], weight.shape[0]), teacher,
                      ncrops, n_global)
    return student_feats.shape[0] // ncrops


def fused_dino_head_loss(student_feats: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor,
                         center: torch.Tensor | None, student_temp: float, teacher_temp: float, ncrops: int,
                         n_global: int = 2, *, chunk_images: int | None = None,
                         compute_dtype: torch.dtype | None = None, block_k: int | None = None,
                         split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DINO loss of the logits ``student_feats @ weight.T`` without materialising them.

    Args:
        student_feats: (ncrops*B, D) l2-normalised bottleneck features, views stacked along dim 0.
        weight: (K, D) effective last-layer weight (``last_layer.weight``: differentiable, so the
            gradient reaches weight_v / weight_g through it).
        teacher: (n_global*B, K) teacher logits with ``center`` ((1, K) or (K,)), or fp32
            teacher probabilities (e.g. Sinkhorn-Knopp) with ``center=None``.
        chunk_images: images per chunk (all their views); default: ~2**26 logits per chunk.
        compute_dtype: dtype of the matmuls and logits; default the autocast dtype when autocast
            is on for the device, else the promoted dtype of the inputs.
        block_k, split_k: as :func:`dino_fast.kernels.dino_loss.fused_dino_loss`.

    Returns:
        (loss, teacher_col_sum): 0-d fp32 loss with autograd to ``student_feats`` and ``weight``
        (backward may run once), and the (K,) fp32 teacher column sums (None for probabilities).
    """
    batch = _check(student_feats, weight, teacher, ncrops, n_global)
    if center is None and teacher.dtype != torch.float32:
        raise TypeError(f"with center=None, teacher must hold fp32 probabilities, got {teacher.dtype}")
    if chunk_images is None:
        chunk_images = _chunk_images(batch, ncrops, weight.shape[0])
    elif isinstance(chunk_images, bool) or not isinstance(chunk_images, int) or chunk_images < 1:
        raise ValueError(f"chunk_images must be a positive integer, got {chunk_images!r}")
    if compute_dtype is None:
        dev = student_feats.device.type
        compute_dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                         else torch.promote_types(student_feats.dtype, weight.dtype))
    grad = torch.is_grad_enabled()
    loss, col_sum, _, _ = torch.ops.dino_fast.dino_head_loss(
        student_feats, weight, teacher, center, float(student_temp), float(teacher_temp), ncrops, n_global,
        chunk_images, compute_dtype, grad and student_feats.requires_grad, grad and weight.requires_grad, block_k,
        split_k)
    return loss, None if center is None else col_sum
