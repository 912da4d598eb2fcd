"""Position-embedding interpolation exactly as the official DINO ``vision_transformer.py``.

Official DINO resizes the learned square grid with bicubic ``F.interpolate`` driven by a
``scale_factor`` (not a target ``size``) of ``(h0 + 0.1) / sqrt(N)``; the +0.1 keeps the
floored output size from landing one short through floating-point error
(facebookresearch/dino#8). PyTorch maps output to input coordinates with the given
scale factor, so this is *not* the same as ``size=(h0, w0)``: matching it is what lets
official checkpoints see the same embeddings at 96-px local crops as in the official code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["interpolate_pos_encoding"]


def interpolate_pos_encoding(pos_embed: torch.Tensor, npatch_h: int, npatch_w: int) -> torch.Tensor:
    """Position embedding for a ``npatch_h x npatch_w`` patch grid.

    Args:
        pos_embed: ``(1, 1 + N, D)`` learned embedding: class token first, then a square
            ``sqrt(N) x sqrt(N)`` grid in row-major order.
        npatch_h, npatch_w: patch grid of the input (image height / patch, width / patch).

    Returns:
        ``(1, 1 + npatch_h * npatch_w, D)``: the class-token embedding unchanged, followed by
        the bicubically resized grid (no antialias). ``pos_embed`` itself when the grid matches.

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
    dim = pos_embed.shape[-1]
    class_pos_embed = pos_embed[:, 0]  # (1, D)
    patch_pos_embed = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, side, side)
    h0, w0 = npatch_h + 0.1, npatch_w + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed,
        scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)),
        mode="bicubic",
    )
    if patch_pos_embed.shape[-2:] != (npatch_h, npatch_w):  # the official code asserts the same
        raise RuntimeError(f"interpolated grid {tuple(patch_pos_embed.shape[-2:])} != ({npatch_h}, {npatch_w})")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, h*w, D)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)
