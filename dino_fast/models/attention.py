"""Multi-head self-attention with swappable backends, a drop-in ``attn_layer`` for timm ViTs.

``Attention`` subclasses timm's ``Attention``, so its parameters (``qkv``, ``proj``,
``q_norm``/``k_norm``, ``norm``, ``gate``) and state-dict keys are timm's own, which are also
the official DINO keys (``attn.qkv.*``, ``attn.proj.*``). Only ``forward`` changes: the kernel
is picked per module by its ``backend`` attribute (see ``BACKENDS``).

Packed sequences (all crops of a step in one row, batch dim 1) are described by
``PackedSeqlens`` (``varlen.py``). How each backend attends a packed row:
  varlen    one ``torch.nn.attention.varlen.varlen_attn`` call over the whole row (cu_seqlens)
  xformers  one ``memory_efficient_attention`` call with a ``BlockDiagonalMask``
  flex      one compiled ``flex_attention`` call with a block-diagonal ``BlockMask``
  sdpa/math the row split into runs of equal-length sequences, each run an ordinary
            ``(count, length)`` batch without a mask: one call per run, no ``T x T`` mask.

"auto" picks, for q of dtype ``dtype`` on ``device`` (``auto_backend``; first that works):
  packed input on CUDA:  varlen (fp16/bf16, head_dim % 8 == 0 and <= 256, no attention
                         dropout, the kernel runs here) > xformers (fp16/bf16, its kernels load
                         and run here) > flex (no attention dropout, Triton) > sdpa by runs
  ordinary batch on CUDA, fp32 on CPU:  sdpa (it dispatches to flash / cuDNN by itself).
  bf16 / fp16 on CPU:  math. torch's CPU flash kernel, which sdpa picks there, took 222 ms of a
                         tiny_imagenet_sk step in bf16 (193 of them in its backward; 5 / 17 tokens
                         per view) where math's bmm + softmax took ~36 ms (2 Xeon cores, bench/results/
                         train_tiny_imagenet_sk_profile-cpu-2026-12-06); in fp32 sdpa is as fast or faster.
``describe_attention(device, dtype)`` says in one line which kernel "auto" runs and why.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as _TimmAttention

from . import varlen as _vl
from .varlen import PackedSeqlens, _xops

__all__ = ["BACKENDS", "Attention", "PackedSeqlens", "auto_backend", "describe_attention", "set_attn_backend",
           "xformers_usable"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "varlen", "flex", "xformers", "math")
"""auto: see the module docstring. sdpa: ``F.scaled_dot_product_attention``. varlen:
``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.10). flex: compiled
``flex_attention`` (CUDA; CPU forward only). xformers: ``memory_efficient_attention`` (CUDA).
math: explicit softmax (reference; also what ``attention_probs`` uses)."""

_HALF = (torch.float16, torch.bfloat16)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


# --- can a kernel run here? ------------------------------------------------------------------
# Each probe runs once per device, returns '' (usable) or one line saying why not, and is a
# constant to torch.compile (the forward is compiled; a probe must not be traced).
_PROBES: dict[tuple[str, int], str] = {}


def _probe(kind: str, device_index: int, check: Callable[[int], str]) -> str:
    key = (kind, device_index)
    if key not in _PROBES:
        try:
            with torch.enable_grad():
                _PROBES[key] = check(device_index)
        except Exception as e:  # a kernel that raises here would raise in training too
            _PROBES[key] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if _PROBES[key]:
            log.info("%s attention is not usable on cuda:%d: %s", kind, device_index, _PROBES[key])
    return _PROBES[key]


def _check_varlen(i: int) -> str:
    info = _vl._load_varlen()
    if info["error"]:
        return info["error"]
    major, minor = torch.cuda.get_device_capability(i)
    if major < 8:
        return f"flash attention needs sm80+, cuda:{i} is sm{major}{minor}"
    dev = torch.device("cuda", i)
    # Two calls: torch routes max_q <= 128 to flash and longer ones (sm90/100, recent cuDNN) to
    # cuDNN; 224-px crops (197 tokens) take the second path.
    for lengths in ((3, 5), (3, 197)):
        q = torch.zeros(sum(lengths), 1, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, lengths[0], sum(lengths)], device=dev, dtype=torch.int32)
        info["fn"](q, q, q, cu, cu, max(lengths), max(lengths)).sum().backward()
    return ""


def xformers_build_problem() -> str:
    """'' when xformers imports with its C++/CUDA kernels loaded; else why not, naming the torch
    and python it was built for (from its ``cpp_lib.json`` build metadata) next to ours."""
    spec = importlib.util.find_spec("xformers")
    if spec is None:
        return "not installed"
    try:
        xformers = _vl.import_xformers()  # its own 6-line load warning folded into this line
    except Exception as e:
        return f"import failed: {(str(e).splitlines() or [type(e).__name__])[0]}"
    if getattr(xformers, "_has_cpp_library", True):
        return ""
    meta: dict[str, Any] = {}
    exc = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    build = getattr(exc, "build_info", None)
    if build is not None:
        meta = dict(getattr(build, "metadata", {}).get("version", {}))
    elif spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "cpp_lib.json")
        try:
            with open(path) as fp:
                meta = json.load(fp).get("version", {})
        except (OSError, ValueError):
            pass
    ver = getattr(xformers, "__version__", "?")
    if not meta:
        return f"xformers {ver}: C++/CUDA kernels did not load ({type(exc).__name__ if exc else 'no build info'})"
    return (f"xformers {ver} built for torch {meta.get('torch')}, python {meta.get('python')}; "
            f"you have torch {torch.__version__}, python {platform.python_version()}")


def _check_xformers(i: int) -> str:
    problem = xformers_build_problem()
    if problem:
        return problem
    xops = _xops()
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    dev = torch.device("cuda", i)
    q = torch.zeros(1, 8, 1, 64, device=dev, dtype=torch.bfloat16)
    xops.memory_efficient_attention(q, q, q, attn_bias=BlockDiagonalMask.from_seqlens([4, 4], device=dev))
    return ""


def _check_flex(i: int) -> str:
    info = _vl._load_flex()
    if info["error"]:
        return info["error"]
    from torch.utils._triton import has_triton

    if not has_triton():
        return "compiled FlexAttention needs Triton for this GPU"
    major, minor = torch.cuda.get_device_capability(i)
    return "" if major >= 8 else f"FlexAttention kernels need sm80+, cuda:{i} is sm{major}{minor}"


@torch.compiler.assume_constant_result
def varlen_problem(device_index: int) -> str:
    """'' when torch's varlen flash attention runs (forward + backward) on ``cuda:device_index``."""
    return _probe("varlen", device_index, _check_varlen)


@torch.compiler.assume_constant_result
def xformers_problem(device_index: int) -> str:
    """'' when xformers' attention kernels run on ``cuda:device_index``; else why not."""
    return _probe("xformers", device_index, _check_xformers)


@torch.compiler.assume_constant_result
def flex_problem(device_index: int) -> str:
    """'' when compiled FlexAttention can run on ``cuda:device_index`` (not compiled by the probe)."""
    return _probe("flex", device_index, _check_flex)


def xformers_usable(device_index: int = 0) -> bool:
    """True when xformers imports AND its attention kernels run on CUDA device ``device_index``."""
    return torch.cuda.is_available() and xformers_problem(device_index) == ""


def auto_backend(device: torch.device, dtype: torch.dtype, head_dim: int, packed: bool,
                 dropout: bool = False) -> tuple[str, str]:
    """(backend "auto" runs, why the faster ones were skipped) for q of ``dtype`` on ``device``;
    the order is in the module docstring. ``dropout``: attention dropout active (training)."""
    if device.type != "cuda":
        if dtype in _HALF:  # the CPU flash kernel is the slow one in half precision (module docstring)
            return "math", (f"{device.type}: varlen, xformers and flex kernels need CUDA; sdpa's CPU flash kernel is "
                            f"slower than math in {str(dtype).replace('torch.', '')}")
        return "sdpa", f"{device.type}: varlen, xformers and flex kernels need CUDA"
    if not packed:
        return "sdpa", ""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    half = dtype in _HALF
    # Each check is a lambda so a kernel is probed only when every faster one was skipped.
    candidates: tuple[tuple[str, Callable[[], Any]], ...] = (
        ("varlen", lambda: (not half and f"needs fp16/bf16, q is {dtype}")
         or (not (head_dim % 8 == 0 and head_dim <= 256) and f"head_dim {head_dim} is not a multiple of 8 <= 256")
         or (dropout and "has no attention dropout") or varlen_problem(idx)),
        ("xformers", lambda: (not half and f"needs fp16/bf16, q is {dtype}") or xformers_problem(idx)),
        ("flex", lambda: (dropout and "has no attention dropout") or flex_problem(idx)),
    )
    skipped = []
    for name, check in candidates:
        problem = check()
        if not problem:
            return name, "; ".join(skipped)
        skipped.append(f"{name}: {problem}")
    return "sdpa", "; ".join(skipped)


@torch.compiler.assume_constant_result
def _auto_name(device_type: str, device_index: int, dtype: torch.dtype, head_dim: int, packed: bool,
               dropout: bool) -> str:
    """``auto_backend``'s choice as a constant to torch.compile (probes are never traced)."""
    return auto_backend(torch.device(device_type, device_index), dtype, head_dim, packed, dropout)[0]


def describe_attention(device: torch.device | str, dtype: torch.dtype, head_dim: int = 64) -> str:
    """One line: which kernel backend "auto" runs for packed and for per-resolution input on
    ``device`` at ``dtype`` (the compute dtype, e.g. bf16 under autocast), and why. Probes the
    kernels once (a tiny call each); log it at start-up."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    packed, why = auto_backend(dev, dtype, head_dim, packed=True)
    plain, _ = auto_backend(dev, dtype, head_dim, packed=False)
    where = str(dev)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        where += f" ({torch.cuda.get_device_name(dev)}, sm{major}{minor})"
    packed_desc = {"varlen": "varlen (one flash/cuDNN call per block over all crops)",
                   "xformers": "xformers (one call per block, BlockDiagonalMask)",
                   "flex": "flex (one compiled FlexAttention call per block, block mask)",
                   "sdpa": "sdpa by equal-length runs (one call per resolution per block)",
                   "math": "math by equal-length runs (explicit softmax, one call per resolution per block)"}[packed]
    line = (f"attention 'auto' on {where}, {str(dtype).replace('torch.', '')}, head_dim {head_dim}, torch "
            f"{torch.__version__}: packed multi-crop -> {packed_desc}{f' [{why}]' if why else ''}; "
            f"per-resolution -> {plain}")
    if "xformers:" not in why and packed != "xformers":
        problem = xformers_build_problem()
        line += f"; xformers: {problem or 'loads'}"
    return line


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

    def _dropout_active(self) -> bool:
        return self.training and self.attn_drop.p > 0.0

    def resolve_backend(self, device: torch.device, dtype: torch.dtype, packed: bool,
                        dense: bool = False) -> str:
        """The backend this module runs for q of ``dtype`` on ``device`` ("auto" resolved);
        raises ValueError when an explicitly chosen backend cannot take this input."""
        backend = _check_backend(self.backend)
        if backend == "auto":
            if dense or (device.type != "cuda" and dtype not in _HALF):
                return "sdpa"
            if device.type != "cuda":
                return "math"  # auto_backend's CPU choice in half precision
            return _auto_name(device.type, device.index, dtype, self.head_dim, packed, self._dropout_active())
        if backend in ("xformers", "varlen", "flex") and dense:
            raise ValueError(f"the {backend} backend takes no dense tensor mask or is_causal here; use 'sdpa'")
        if backend == "xformers" and device.type != "cuda":
            raise ValueError(f"the xformers attention backend needs CUDA tensors, got device {device}; "
                             "use backend 'sdpa' or 'auto'")
        if backend in ("varlen", "flex"):
            if self._dropout_active():
                raise ValueError(f"the {backend} backend has no attention dropout (attn_drop p="
                                 f"{self.attn_drop.p}); use 'sdpa' or 'xformers'")
            get = _vl.get_varlen_attn if backend == "varlen" else _vl.get_flex_attention
            if get(device) is None:
                need = "CUDA and torch >= 2.10" if backend == "varlen" else "torch with FlexAttention"
                raise ValueError(f"the {backend} attention backend needs {need}, got device {device}, torch "
                                 f"{torch.__version__}; use backend 'sdpa' or 'auto'")
        return backend

    def _resolve(self, x: torch.Tensor, attn_mask: Any, is_causal: bool) -> str:
        """The backend for input ``x``, judged at the dtype q/k/v will have (autocast's, if on)."""
        dense = isinstance(attn_mask, torch.Tensor) or is_causal
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return self.resolve_backend(x.device, dtype, _is_packed(attn_mask), dense)

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

    def _varlen(self, x: torch.Tensor, seqs: PackedSeqlens | None) -> torch.Tensor:
        """One varlen call for the whole (B, N, C) input: the packed row's segments, or B segments
        of N tokens for an ordinary batch. -> (B, N, H * Dh).

        q, k and v come from three GEMMs on the row blocks of the fused ``qkv`` weight (same
        parameters and keys): each is then a contiguous (T, H, Dh) tensor, the layout the kernels
        read, where slices of one fused output would be strided views that need a copy each."""
        if torch.is_autocast_enabled(x.device.type):  # one cast for the three GEMMs (autocast would cast per GEMM)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        weights = self.qkv.weight.split(self.attn_dim)  # (attn_dim, C) x 3: views, one SplitBackward
        biases = (None,) * 3 if self.qkv.bias is None else self.qkv.bias.split(self.attn_dim)
        q, k, v = (F.linear(x, w, b) for w, b in zip(weights, biases))
        return self.varlen_qkv(q, k, v, seqs)

    def varlen_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqlens | None
                   ) -> torch.Tensor:
        """Attention of contiguous (B, N, H * Dh) q, k, v through one varlen call (the packed row's
        segments, or B segments of N tokens) -> (B, N, H * Dh), before ``norm`` and ``proj``."""
        B, N, _ = q.shape
        fn = _vl.get_varlen_attn(q.device)
        if fn is _vl._VARLEN.get("fn") and v.dtype not in _HALF:
            raise ValueError(f"the varlen backend (flash) needs fp16/bf16 q/k/v, got {v.dtype}; "
                             "use autocast, or backend 'sdpa' / 'auto'")
        q, k, v = (t.view(B * N, self.num_heads, self.head_dim) for t in (q, k, v))  # (T, H, Dh) each
        q, k = self._qk_norm(q, k, v.dtype)
        if seqs is None:  # built on device: no host copy per call
            cu, max_len = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device), N
        else:
            cu, max_len = seqs.cu_seqlens(q.device), seqs.max_seqlen
        out = _vl.varlen_attention(fn, q, k, v, cu, max_len, self.scale)  # (T, H, Dh)
        return out.reshape(B, N, self.attn_dim)

    def _flex(self, qkv: torch.Tensor, seqs: PackedSeqlens | None) -> torch.Tensor:
        """One flex_attention call; block-diagonal BlockMask for a packed row. -> (B, N, H * Dh)."""
        B, N = qkv.shape[:2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
        q, k = self._qk_norm(q, k, v.dtype)
        mask = None if seqs is None else seqs.flex_block_mask(qkv.device)
        x = _vl.get_flex_attention(qkv.device)(q, k, v, block_mask=mask, scale=self.scale)
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
        seqs = None
        if _is_packed(attn_mask):
            if B != 1:
                raise ValueError(f"a packed attention bias needs batch dim 1, got input of shape {tuple(x.shape)}")
            seqs = PackedSeqlens.from_any(attn_mask)
            if seqs.total != N:
                raise ValueError(f"packed seqlens sum to {seqs.total} but the input has {N} tokens")
        backend = self._resolve(x, attn_mask, is_causal)
        if backend != "varlen":  # varlen projects q, k, v itself (contiguous, no copies)
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)

        if backend == "varlen":
            x = self._varlen(x, seqs)
        elif backend == "flex":
            x = self._flex(qkv, seqs)
        elif backend == "xformers":
            xops = _xops()
            q, k, v = qkv.unbind(2)  # (B, N, H, Dh): xformers' layout, no transpose needed
            q, k = self._qk_norm(q, k, v.dtype)
            bias = seqs.to_xformers(x.device) if isinstance(attn_mask, PackedSeqlens) else attn_mask
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
