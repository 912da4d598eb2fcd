"""In-place multiply by a device scalar with no host sync: the backward of the fused losses, whose
forward already wrote the gradient (Liger's trick), scales it by ``grad_output``.

Math: x *= s, s read on the device; when s == 1 (``loss.backward()``) nothing is read or written.
Bytes floor: read + write x once (2 N e) when s != 1, zero otherwise. fp32 arithmetic, int64 offsets.

Registered as the torch custom op ``dino_fast::scale_`` (mutates ``x``; a fake implementation
that does nothing), so the fused losses' backward traces under torch.compile and FakeTensorMode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["scale_"]


@triton.jit
def _scale_kernel(X_ptr, Scale_ptr, N, BLOCK: tl.constexpr):
    """x *= scale in place, grid-stride; nothing is read or written when scale == 1."""
    pid = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    s = tl.load(Scale_ptr).to(tl.float32)
    if s != 1.0:
        for start in range(pid * BLOCK, N, n_prog * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < N
            x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(X_ptr + offs, (x * s).to(X_ptr.dtype.element_ty), mask=mask)


def _launch_scale(x: torch.Tensor, scale: torch.Tensor) -> None:
    block = 4096 if x.is_cuda else 1 << 16
    n_prog = triton.cdiv(x.numel(), block)
    if x.is_cuda:  # grid-stride: a few programs per SM, whatever the size
        n_prog = min(n_prog, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    _scale_kernel[(max(1, n_prog),)](x, scale.detach().reshape(1).contiguous(), x.numel(), BLOCK=block, num_warps=8)


@torch.library.custom_op("dino_fast::scale_", mutates_args=("x",), schema="(Tensor(a!) x, Tensor scale) -> ()")
def _scale_op(x: torch.Tensor, scale: torch.Tensor) -> None:
    _launch_scale(x, scale)


@_scale_op.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> None:
    return None


def scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x *= scale`` in place (contiguous x, 1-element device ``scale``) with no host sync;
    when scale == 1 the launch moves no data."""
    if not x.is_contiguous():
        raise ValueError("scale_ needs a contiguous tensor")
    if scale.numel() != 1:
        raise ValueError(f"scale_ needs a 1-element scale, got shape {tuple(scale.shape)}")
    torch.ops.dino_fast.scale_(x, scale)
    return x
