"""Two ViT layers with what timm's lack for a fast DINO step: stochastic depth whose rate is a
tensor, and a LayerNorm that keeps a bf16 residual stream in bf16; and two autograd functions that
recompute, in backward, the activations a block can rebuild cheaply instead of keeping them.

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

``norm_linears`` and ``act_linear`` (``DinoViT(recompute_norm_gelu=True)``): a transformer
block saves for backward the input of each LayerNorm, the LayerNorm's output (the input of
the linears after it), the GELU's input and the GELU's output (the input of fc2): 1 + 1 + 1 + 1 +
4 + 4 of its 16 stream-widths per token. ``norm_linears(x, norm, linears)`` saves only ``x`` and
rebuilds ``norm(x)`` in backward; ``act_linear(h, act, fc2)`` saves only ``h`` and rebuilds
``act(h)``: 10 of 16 are kept. The cost: one more LayerNorm forward per norm and one more GELU per
block in backward (elementwise: about 0.2 % of a ViT-S step's FLOPs, but a read of x / h and a
write of the rebuilt tensor, ~10 stream-widths of memory traffic per token and block). The
forward runs the same ops in the same dtypes as the modules (LayerNorm with autocast off and its
affine parameters in the input's dtype, linears and activation under the caller's autocast), so
outputs are bit for bit the modules'; gradients are the same formulas (up to summation order).
Backward uses aten's own ``native_layer_norm_backward`` / ``gelu_backward``, never a nested
autograd call (so it also runs in the fake-CUDA trace of tests/preflight).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .varlen import PackedSeqlens

__all__ = ["DropPath", "LayerNorm", "act_linear", "norm_linears", "recomputable_norm"]

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


# --- recompute instead of save (see the module docstring) ----------------------------------------
def recomputable_norm(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`norm_linears` reproduces ``norm(x)``: a LayerNorm over the last dim that runs
    in ``x``'s dtype (``keep_dtype`` with a half input under autocast; without autocast, parameters
    of ``x``'s dtype), where autocast's own layer_norm policy (fp32 on CUDA) plays no part."""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return getattr(norm, "keep_dtype", False) and x.dtype in _HALF
    return norm.weight is None or norm.weight.dtype == x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _ln(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """(y, mean, rstd) of LayerNorm.forward on x: autocast off, affine parameters in x's dtype."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.native_layer_norm(x, x.shape[-1:], _cast(weight, x.dtype), _cast(bias, x.dtype), eps)


def _linear_backward(g: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """(grad input, grad weight, grad bias) of F.linear(inp, weight, bias), in g's dtype (the
    weight cast to it as autocast did): the formulas of aten's mm / addmm backward."""
    g2, in2 = g.reshape(-1, g.shape[-1]), inp.reshape(-1, inp.shape[-1])
    grad_in = (g2 @ weight.to(g.dtype)).view(inp.shape)
    return grad_in, (in2.t() @ g2).t(), g2.sum(0) if has_bias else None


# Function inputs: the tensors first, None left out, then one non-tensor spec. (The fake-CUDA
# trace's backward pairs a Function's gradients with its tensor inputs in order, as the engine
# does for tensor inputs; a None or a number among them would shift the pairs.)
def _present(tensors: list[torch.Tensor | None]) -> tuple[list[torch.Tensor], tuple[bool, ...]]:
    return [t for t in tensors if t is not None], tuple(t is not None for t in tensors)


def _restore(present: list[torch.Tensor], which: tuple[bool, ...]) -> list[torch.Tensor | None]:
    it = iter(present)
    return [next(it) if here else None for here in which]


class _NormLinears(torch.autograd.Function):
    """outs[i] = F.linear(norm(x), W_i, b_i), saving x (not norm(x)) for backward."""

    @staticmethod
    def forward(ctx, x, *args):  # noqa: ANN001  (args: norm weight, norm bias, W_1..n, b_1..n present; spec)
        *present, (eps, n, which) = args
        norm_w, norm_b, *wb = _restore(present, which)
        y = _ln(x, norm_w, norm_b, eps)[0]
        outs = tuple(F.linear(y, w, b) for w, b in zip(wb[:n], wb[n:]))  # under the caller's autocast
        ctx.eps, ctx.n, ctx.which = eps, n, which
        ctx.save_for_backward(x, *present)
        return outs

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001
        x, *present = ctx.saved_tensors
        norm_w, norm_b, *wb = _restore(present, ctx.which)
        weights, biases = wb[:ctx.n], wb[ctx.n:]
        with torch.autocast(x.device.type, enabled=False):
            y, mean, rstd = _ln(x, norm_w, norm_b, ctx.eps)  # 1. rebuild norm(x)
            grad_y, grad_w, grad_b = None, [], []
            for g, w, b in zip(grads, weights, biases):  # 2. each linear, in the dtype it ran in
                gi, gw, gb = (None,) * 3 if g is None else _linear_backward(g, y.to(g.dtype), w, b is not None)
                if gi is not None:
                    grad_y = gi if grad_y is None else grad_y + gi
                grad_w.append(gw)
                grad_b.append(gb)
            mask = [ctx.needs_input_grad[0], norm_w is not None, norm_b is not None]
            gx, gnw, gnb = torch.ops.aten.native_layer_norm_backward(  # 3. the norm
                grad_y.to(y.dtype), x, x.shape[-1:], mean, rstd, _cast(norm_w, x.dtype), _cast(norm_b, x.dtype), mask)
        grads_in = [gnw, gnb, *grad_w, *grad_b]
        return gx, *(g for g, here in zip(grads_in, ctx.which) if here), None


def norm_linears(x: torch.Tensor, norm: nn.LayerNorm, weights: list[torch.Tensor],
                 biases: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    """``tuple(F.linear(norm(x), w, b) for w, b in zip(weights, biases))``, keeping ``x`` instead
    of ``norm(x)`` for backward (check :func:`recomputable_norm` first)."""
    present, which = _present([norm.weight, norm.bias, *weights, *biases])
    return _NormLinears.apply(x, *present, (norm.eps, len(weights), which))


class _ActLinear(torch.autograd.Function):
    """F.linear(act(h), W, b) with act a GELU, saving h (not act(h)) for backward."""

    @staticmethod
    def forward(ctx, h, weight, *args):  # noqa: ANN001  (args: the bias if any; spec)
        *bias, approximate = args
        bias = bias[0] if bias else None
        a = F.gelu(h, approximate=approximate)  # under the caller's autocast, as nn.GELU
        ctx.approximate, ctx.act_dtype = approximate, a.dtype
        ctx.save_for_backward(h, weight, bias)
        return F.linear(a, weight, bias)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        h, weight, bias = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            hc = h.to(ctx.act_dtype)
            a = F.gelu(hc, approximate=ctx.approximate)  # 1. rebuild act(h)
            grad_a, grad_w, grad_b = _linear_backward(g, a.to(g.dtype), weight, bias is not None)  # 2. the linear
            grad_h = torch.ops.aten.gelu_backward(grad_a.to(hc.dtype), hc, approximate=ctx.approximate)  # 3. act
        return grad_h.to(h.dtype), grad_w, *([grad_b] if bias is not None else []), None


def act_linear(h: torch.Tensor, act: nn.GELU, linear: nn.Linear) -> torch.Tensor:
    """``linear(act(h))``, keeping ``h`` instead of ``act(h)`` for backward."""
    return _ActLinear.apply(h, linear.weight, *([linear.bias] if linear.bias is not None else []), act.approximate)
