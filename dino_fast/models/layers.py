"""Two ViT layers with what timm's lack for a fast DINO step: stochastic depth whose rate is a
tensor, and a LayerNorm that keeps a bf16 residual stream in bf16.

``DropPath``: timm's draws one keep/drop per sample, scaled by 1 / keep_prob; ours draws the
same (per sample, or per packed *sequence*: every image view of a packed row is one sample)
but holds the keep probability in a non-persistent buffer. torch.compile specialises on a
Python float attribute, so twelve blocks with twelve rates were twelve graphs (the recompile
limit is 8: the last student blocks ran eager); a buffer is a graph input, one graph for all.

``LayerNorm``: under autocast, torch runs ``layer_norm`` in fp32 and returns fp32, so one
norm turns a bf16 residual stream back to fp32 (and every add, norm and saved activation
after it moves 4-byte values). With ``keep_dtype`` a bf16/fp16 input comes out in its own
dtype; the kernel still accumulates mean and variance in fp32 (torch's layer_norm does for
half inputs). Same parameters and state-dict keys as ``nn.LayerNorm``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .varlen import PackedSeqlens

__all__ = ["DropPath", "LayerNorm"]

_HALF = (torch.float16, torch.bfloat16)


class DropPath(nn.Module):
    """Stochastic depth (timm / official DINO ``DropPath``): in training, each sample's branch is
    kept with probability ``1 - drop_prob`` and scaled by ``1 / (1 - drop_prob)``, else zeroed.

    ``forward(x)``: one draw per row of dim 0. ``forward(x, seqs)`` with a packed ``(1, T, D)``
    row: one draw per sequence of ``seqs`` (a ``PackedSeqlens``), applied to all its tokens."""

    def __init__(self, drop_prob: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)  # for repr and introspection only: forward reads the buffer
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob, dtype=torch.float32, device=device),
                             persistent=False)

    def keep_mask(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n,) in ``like``'s dtype and device: 0 (dropped) or 1 / keep_prob (kept)."""
        keep = like.new_empty(n).bernoulli_(self.keep_prob)  # one draw per sample, p from the buffer
        return keep.div_(self.keep_prob)

    def forward(self, x: torch.Tensor, seqs: PackedSeqlens | None = None) -> torch.Tensor:
        if not self.training:
            return x
        if seqs is None:
            return x * self.keep_mask(x.shape[0], x).view(-1, *(1,) * (x.dim() - 1))
        keep = self.keep_mask(seqs.num_seqs, x)  # (S,)
        # each run of c equal-length sequences: its c draws repeated over their n tokens each
        per_token = torch.cat([keep[s0:s0 + c, None].expand(c, n).reshape(c * n) for _, s0, c, n in seqs.runs])
        return x * per_token[None, :, None]  # (1, T, D)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and keys); ``keep_dtype=True`` returns a bf16/fp16
    input's dtype instead of autocast's fp32 (statistics still in fp32, see the module docstring).
    Other inputs, or ``keep_dtype=False``, run ``nn.LayerNorm`` unchanged."""

    def __init__(self, *args, keep_dtype: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_dtype = keep_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.keep_dtype and x.dtype in _HALF):
            return super().forward(x)
        # Autocast off: it would cast x to fp32 and save that fp32 copy for backward. The affine
        # parameters go to x's dtype as autocast does for a linear's weight (CUDA's layer_norm
        # takes one dtype for input and weight).
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", keep_dtype=True" if self.keep_dtype else "")
