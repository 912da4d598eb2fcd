"""Multi-head self-attention with swappable backends, a drop-in ``attn_layer`` for timm ViTs.

``Attention`` subclasses timm's ``Attention``, so its parameters (``qkv``, ``proj``,
``q_norm``/``k_norm``, ``norm``, ``gate``) and state-dict keys are timm's own, which are also
the official DINO keys (``attn.qkv.*``, ``attn.proj.*``). Only ``forward`` changes: the kernel
is picked per module by its ``backend`` attribute (see ``BACKENDS``).

Packed sequences (all crops of a step in one row, batch dim 1) are described by
``PackedSeqlens``; it becomes an xformers ``BlockDiagonalMask`` on the xformers backend. On
sdpa / math the packed row is split into runs of equal-length segments, each run reshaped to
an ordinary ``(count, length)`` batch and attended without any mask, which is exactly
block-diagonal attention with no ``T x T`` mask in memory.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as _TimmAttention

__all__ = ["BACKENDS", "Attention", "PackedSeqlens", "set_attn_backend", "xformers_usable"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers", "math")
"""auto: xformers when it runs on this GPU and q is fp16/bf16 on CUDA, else sdpa.
sdpa: ``F.scaled_dot_product_attention``. xformers: ``memory_efficient_attention`` (CUDA).
math: explicit softmax (reference; also what ``attention_probs`` uses)."""


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


def _xops() -> Any:
    """xformers.ops, imported on first use (importing it is slow and warns on CPU-only installs)."""
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a broken build raising something else
        raise ImportError(f"the 'xformers' attention backend needs xformers: {e}") from e
    return xops


@functools.lru_cache(maxsize=None)
def xformers_usable(device_index: int = 0) -> bool:
    """True when xformers imports AND its attention kernels run on CUDA device ``device_index``.

    Probed once per device with a tiny block-diagonal call: an xformers wheel built for
    another torch imports fine but has no kernels, and "auto" must then fall back to sdpa.
    """
    if not torch.cuda.is_available():
        return False
    try:
        xops = _xops()
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        dev = torch.device("cuda", device_index)
        q = torch.zeros(1, 8, 1, 64, device=dev, dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q, attn_bias=BlockDiagonalMask.from_seqlens([4, 4], device=dev))
        return True
    except Exception as e:
        log.warning("xformers attention is not usable on cuda:%d (%s); 'auto' attention uses sdpa",
                    device_index, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False


class PackedSeqlens:
    """Lengths of the sequences packed back to back into one row ``(1, T, D)``.

    Tokens of sequence ``i`` attend only to tokens of sequence ``i`` (block-diagonal
    attention). Build it once per forward; the xformers mask it converts to is cached on it
    so every block reuses the same one.
    """

    def __init__(self, seqlens: Iterable[int]) -> None:
        self.seqlens: tuple[int, ...] = tuple(int(n) for n in seqlens)
        if not self.seqlens or min(self.seqlens) < 1:
            raise ValueError(f"seqlens must be a non-empty list of positive lengths, got {self.seqlens[:8]}...")
        self.total = sum(self.seqlens)
        # Runs of consecutive equal lengths: (token_start, seq_start, count, length).
        runs: list[tuple[int, int, int, int]] = []
        tok = 0
        for i, n in enumerate(self.seqlens):
            if runs and runs[-1][3] == n:
                t0, s0, c, _ = runs[-1]
                runs[-1] = (t0, s0, c + 1, n)
            else:
                runs.append((tok, i, 1, n))
            tok += n
        self.runs = runs
        self._xformers_bias: Any = None

    @classmethod
    def from_any(cls, bias: Any) -> "PackedSeqlens":
        """From a ``PackedSeqlens`` or an xformers ``BlockDiagonalMask`` (self-attention)."""
        if isinstance(bias, cls):
            return bias
        q_info = getattr(bias, "q_seqinfo", None)
        k_info = getattr(bias, "k_seqinfo", None)
        if q_info is None or k_info is None or type(bias).__name__ != "BlockDiagonalMask":
            raise TypeError(f"cannot read packed sequence lengths from {type(bias).__name__}; "
                            "pass a PackedSeqlens or an xformers BlockDiagonalMask")
        starts = list(q_info.seqstart_py)
        if starts != list(k_info.seqstart_py):
            raise ValueError("BlockDiagonalMask with different query and key segments is not self-attention")
        return cls(b - a for a, b in zip(starts[:-1], starts[1:]))

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens)

    def to_xformers(self, device: torch.device) -> Any:
        """The equivalent xformers ``BlockDiagonalMask`` (built once, then reused)."""
        if self._xformers_bias is None:
            _xops()
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask

            self._xformers_bias = BlockDiagonalMask.from_seqlens(list(self.seqlens), device=device)
        return self._xformers_bias

    def dense_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean ``(T, T)`` mask, True where attention is allowed (for references and tests)."""
        seq_id = torch.repeat_interleave(torch.arange(self.num_seqs, device=device),
                                         torch.tensor(self.seqlens, device=device))
        return seq_id[:, None] == seq_id[None, :]

    def cls_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """First token of every sequence of a packed ``(1, T, D)`` tensor -> ``(num_seqs, D)``."""
        if x.shape[:2] != (1, self.total):
            raise ValueError(f"packed tensor must have shape (1, {self.total}, D), got {tuple(x.shape)}")
        return torch.cat([x[0, t0:t0 + c * n].view(c, n, -1)[:, 0] for t0, _, c, n in self.runs])

    def __repr__(self) -> str:
        return f"PackedSeqlens(num_seqs={self.num_seqs}, total={self.total}, runs={[(c, n) for *_, c, n in self.runs]})"


def _is_packed(attn_mask: Any) -> bool:
    return attn_mask is not None and not isinstance(attn_mask, torch.Tensor)


class Attention(_TimmAttention):
    """timm ``Attention`` (same constructor, parameters and keys) with a ``backend`` switch.

    ``forward(x, attn_mask=None, is_causal=False)`` as timm's, where ``attn_mask`` may also be
    a ``PackedSeqlens`` or an xformers ``BlockDiagonalMask`` for a packed ``(1, T, C)`` input.
    Dense tensor masks and ``is_causal`` run on sdpa/math only.
    """

    def __init__(self, dim: int, num_heads: int = 8, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(dim, num_heads, *args, **kwargs)
        self.backend = _check_backend(backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def _resolve(self, qkv: torch.Tensor, attn_mask: Any, is_causal: bool) -> str:
        backend = _check_backend(self.backend)
        dense = isinstance(attn_mask, torch.Tensor) or is_causal
        if backend == "auto":
            use_xf = (qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16) and not dense
                      and xformers_usable(qkv.device.index if qkv.device.index is not None
                                          else torch.cuda.current_device()))
            return "xformers" if use_xf else "sdpa"
        if backend == "xformers":
            if not qkv.is_cuda:
                raise ValueError(f"the xformers attention backend needs CUDA tensors, got device {qkv.device}; "
                                 "use backend 'sdpa' or 'auto'")
            if dense:
                raise ValueError("the xformers backend takes no dense tensor mask or is_causal here; use 'sdpa'")
        return backend

    def _qk_norm(self, q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Under autocast a LayerNorm q/k-norm returns fp32 while v stays bf16; kernels want one dtype.
        return self.q_norm(q).to(dtype), self.k_norm(k).to(dtype)

    def _attend(self, qkv: torch.Tensor, backend: str, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """sdpa / math attention of one ordinary batch. qkv: (B, N, 3, H, Dh) -> (B, N, H * Dh)."""
        B, N = qkv.shape[:2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
        q, k = self._qk_norm(q, k, v.dtype)
        drop = self.attn_drop.p if self.training else 0.0
        if backend == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal)
        else:
            attn = self._probs(q, k, attn_mask, is_causal)
            x = self.attn_drop(attn) @ v
        return x.transpose(1, 2).reshape(B, N, self.attn_dim)

    def _probs(self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        """softmax(q k^T * scale + mask) in the math of the original ViT: (B, H, N, N)."""
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            n = attn.shape[-1]
            attn = attn.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=attn.device).tril(), float("-inf"))
        if attn_mask is not None:
            attn = (attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                    else attn + attn_mask)
        return attn.softmax(dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"Attention expects (B, N, C) tokens, got shape {tuple(x.shape)}")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        backend = self._resolve(qkv, attn_mask, is_causal)
        seqs = None
        if _is_packed(attn_mask):
            if B != 1:
                raise ValueError(f"a packed attention bias needs batch dim 1, got input of shape {tuple(x.shape)}")
            seqs = PackedSeqlens.from_any(attn_mask)
            if seqs.total != N:
                raise ValueError(f"packed seqlens sum to {seqs.total} but the input has {N} tokens")

        if backend == "xformers":
            xops = _xops()
            q, k, v = qkv.unbind(2)  # (B, N, H, Dh): xformers' layout, no transpose needed
            q, k = self._qk_norm(q, k, v.dtype)
            bias = attn_mask.to_xformers(x.device) if isinstance(attn_mask, PackedSeqlens) else attn_mask
            x = xops.memory_efficient_attention(q, k, v, attn_bias=bias,
                                                p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
            x = x.reshape(B, N, self.attn_dim)
        elif seqs is not None:
            # One ordinary batch per run of equal-length sequences == block-diagonal attention.
            x = torch.cat([self._attend(qkv[0, t0:t0 + c * n].view(c, n, 3, self.num_heads, self.head_dim),
                                        backend).reshape(1, c * n, self.attn_dim)
                           for t0, _, c, n in seqs.runs], dim=1)
        else:
            x = self._attend(qkv, backend, attn_mask, is_causal)

        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``(B, H, N, N)`` of input tokens ``(B, N, C)`` (math backend,
        no dropout): what official DINO's ``get_last_selfattention`` visualises."""
        B, N, _ = x.shape
        q, k, _v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        return self._probs(q, k, None, False)


def set_attn_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every ``Attention`` in ``model``; returns ``model``."""
    _check_backend(backend)
    found = False
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} holds no dino_fast Attention module to switch")
    return model
