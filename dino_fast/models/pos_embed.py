"""Position-embedding interpolation exactly as the official DINO ``vision_transformer.py``.

Official DINO resizes the learned square grid with bicubic ``F.interpolate`` driven by a
``scale_factor`` (not a target ``size``) of ``(h0 + 0.1) / sqrt(N)``; the +0.1 keeps the
floored output size from landing one short through floating-point error
(facebookresearch/dino#8). PyTorch maps output to input coordinates with the given
scale factor, so this is *not* the same as ``size=(h0, w0)``: matching it is what lets
official checkpoints see the same embeddings at 96-px local crops as in the official code.

We apply that resize as two matmuls with fixed interpolation matrices (``resize_matrix``),
one per axis: bicubic interpolation is separable and linear in the grid, so
``out = A_h @ grid @ A_w^T`` gives F.interpolate's values (within fp32 rounding). Why not
F.interpolate itself: its CUDA backward (``upsample_bicubic2d_backward``) accumulates with
atomics and ``torch.use_deterministic_algorithms(True)`` refuses it, so every
``--deterministic`` run with local crops raised at its first backward. A matmul's backward
is a matmul: deterministic, and cheaper than the scatter.
"""
from __future__ import annotations

import math

import torch

__all__ = ["interpolate_pos_encoding", "resize_matrix"]

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (Keys' cubic convolution with a = -0.75)

# (n_in, n_out, device, dtype) -> (n_out, n_in) matrix: a few small constant tensors per run
# (one per crop size and axis), so each step reuses them instead of rebuilding ~20 tiny ops.
_MATRICES: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
_MAX_MATRICES = 64


def _cubic_weights(n_in: int, n_out: int, scale_factor: float, device: torch.device, dtype: torch.dtype
                   ) -> torch.Tensor:
    """The (n_out, n_in) matrix of PyTorch's bicubic resize along one axis (align_corners False,
    ``scale_factor`` given): output ``o`` reads input coordinate ``(o + 0.5) / scale_factor - 0.5``,
    four taps at ``floor - 1 .. floor + 2`` clamped to the border, Keys weights with a = -0.75.

    Written from ATen's ``UpSample.h`` step for step, in the same precision (fp32, fp64 for
    fp64 input), so the taps and weights are the kernel's own."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # 1. source coordinate: scale = 1 / scale_factor rounded to acc (compute_scales_value)
    scale = torch.tensor(1.0 / scale_factor, dtype=acc, device=device)
    src = scale * (torch.arange(n_out, dtype=acc, device=device) + 0.5) - 0.5  # (n_out,)
    # 2. guard_index_and_lambda: base tap and fraction
    base = torch.floor(src).clamp(max=n_in - 1)
    t = (src - base).clamp(0.0, 1.0)  # (n_out,)
    # 3. get_cubic_upsample_coefficients (cubic_convolution1 / 2)
    a = _CUBIC_A

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    coeffs = torch.stack((far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)), dim=1)  # (n_out, 4)
    # 4. taps clamped to [0, n_in - 1] (upsample_get_value_bounded); border taps add up
    taps = (base.long()[:, None] + torch.arange(-1, 3, device=device)).clamp(0, n_in - 1)  # (n_out, 4)
    onehot = taps[:, :, None] == torch.arange(n_in, device=device)  # (n_out, 4, n_in)
    return (coeffs[:, :, None] * onehot).sum(1).to(dtype)  # (n_out, n_in)


def resize_matrix(n_in: int, n_out: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in) matrix of the official resize along one axis (scale factor
    ``(n_out + 0.1) / n_in``), built once per (n_in, n_out, device, dtype) outside torch.compile."""
    device = torch.device(device)
    scale_factor = (n_out + 0.1) / n_in
    if torch.compiler.is_compiling():  # traced into the graph: constant, folded or fused by the compiler
        return _cubic_weights(n_in, n_out, scale_factor, device, dtype)
    key = (n_in, n_out, device, dtype)
    m = _MATRICES.get(key)
    if m is None:
        # A plain tensor whatever mode the caller runs in: one made under inference_mode could not
        # be saved for a later backward.
        with torch.inference_mode(False), torch.no_grad():
            m = _cubic_weights(n_in, n_out, scale_factor, device, dtype)
        # Never keep a fake or traced tensor (a FakeTensorMode trace builds fakes here).
        if type(m) is torch.Tensor and not m.is_meta and len(_MATRICES) < _MAX_MATRICES:
            _MATRICES[key] = m
    return m


def interpolate_pos_encoding(pos_embed: torch.Tensor, npatch_h: int, npatch_w: int) -> torch.Tensor:
    """Position embedding for a ``npatch_h x npatch_w`` patch grid.

    Args:
        pos_embed: ``(1, 1 + N, D)`` learned embedding: class token first, then a square
            ``sqrt(N) x sqrt(N)`` grid in row-major order.
        npatch_h, npatch_w: patch grid of the input (image height / patch, width / patch).

    Returns:
        ``(1, 1 + npatch_h * npatch_w, D)`` in ``pos_embed``'s dtype: the class-token embedding
        unchanged, followed by the bicubically resized grid (no antialias), equal to official
        ``F.interpolate(scale_factor=(h + 0.1) / sqrt(N), mode="bicubic")`` within fp32
        rounding. ``pos_embed`` itself when the grid matches.

    The official code returns the stored embedding when ``npatch == N and w == h`` in
    pixels; with the grid as the only input we return it when ``npatch_h == npatch_w ==
    sqrt(N)`` (the two differ only for non-square pixel sizes that floor to the stored grid).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, 1 + N, D), got {tuple(pos_embed.shape)}")
    if npatch_h < 1 or npatch_w < 1:
        raise ValueError(f"patch grid must be at least 1x1, got {npatch_h}x{npatch_w}")
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if side * side != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if npatch_h == side and npatch_w == side:
        return pos_embed
    # the official code asserts that the floored size is the grid (ATen floors size * scale_factor)
    for npatch in (npatch_h, npatch_w):
        if math.floor(side * ((npatch + 0.1) / math.sqrt(n))) != npatch:
            raise RuntimeError(f"interpolated grid side {math.floor(side * ((npatch + 0.1) / math.sqrt(n)))} "
                               f"!= {npatch}")
    dim = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].view(side, side, dim)  # (side, side, D)
    a_h = resize_matrix(side, npatch_h, pos_embed.device, pos_embed.dtype)  # (h, side)
    a_w = resize_matrix(side, npatch_w, pos_embed.device, pos_embed.dtype)  # (w, side)
    # The values stay in pos_embed's dtype, as F.interpolate's (autocast would run these in bf16).
    with torch.autocast(pos_embed.device.type, enabled=False):
        rows = (a_h @ grid.reshape(side, side * dim)).view(npatch_h, side, dim)  # (h, side, D)
        patch_pos_embed = torch.matmul(a_w, rows)  # (h, w, D)
    return torch.cat((pos_embed[:, :1], patch_pos_embed.reshape(1, npatch_h * npatch_w, dim)), dim=1)
