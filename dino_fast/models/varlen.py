"""Packed sequences and the attention kernels that take a packed row whole.

All crops of a multi-crop step go back to back into one token row ``(T, ...)``; token ``t``
of sequence ``i`` attends only to the tokens of sequence ``i`` (block-diagonal attention).
``PackedSeqlens`` describes the row once per forward and caches, per device, what each kernel
wants, so every block of the ViT reuses it:

- ``cu_seqlens`` / ``max_seqlen`` for ``torch.nn.attention.varlen.varlen_attn`` (flash or
  cuDNN with cumulative offsets, torch >= 2.10): ONE call per block for all resolutions;
- a FlexAttention ``BlockMask`` (``flex_block_mask``), built from the lengths directly, so the
  ``T x T`` mask is never materialised (``create_block_mask`` would evaluate it: 2.4 GB at
  ViT-S/16, batch 64, 2 x 224 + 10 x 96);
- an xformers ``BlockDiagonalMask`` (``to_xformers``).

Neither varlen nor flex runs a backward on CPU, so each has a CPU twin here, written from the
math with the kernel's exact signature (``varlen_attn_reference``, ``flex_attention_reference``):
tests swap the twin in through ``get_varlen_attn`` / ``get_flex_attention`` and so exercise the
packing, the offsets and the block mask on CPU.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Callable, Iterable

import torch

__all__ = ["PackedSeqlens", "flex_attention_reference", "get_flex_attention", "get_varlen_attn", "import_xformers",
           "varlen_attention", "varlen_attn_reference"]

FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile; the block mask is built for it


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device`` without a host sync: a pageable H2D copy waits for the whole
    stream, a pinned non-blocking one does not (the caching host allocator keeps the pinned
    buffer alive until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    if torch.compiler.is_compiling():  # pin_memory would break the graph; inductor makes it a constant
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _XformersLoadWarning(logging.Filter):
    """Drops the warning xformers logs at import when its C++/CUDA extension does not load (6 lines
    "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions...", logger "xformers", from
    ``xformers/_cpp_lib.py``): the start-up ``attention:`` line says it in one
    (``attention.xformers_build_problem``: the torch and python it was built for, ours). Any other
    xformers record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "_cpp_lib" and record.levelno == logging.WARNING
                    and record.getMessage().startswith("WARNING[XFORMERS]: "))


def import_xformers(module: str = "xformers") -> Any:
    """``importlib.import_module(module)`` (xformers or one of its modules) without xformers'
    import-time extension warning (:class:`_XformersLoadWarning`); import errors propagate."""
    logger = logging.getLogger("xformers")
    quiet = _XformersLoadWarning()
    logger.addFilter(quiet)
    try:
        return importlib.import_module(module)
    finally:
        logger.removeFilter(quiet)


def _xops() -> Any:
    """xformers.ops, imported on first use (importing it is slow; its load warning is folded into
    the start-up line: :func:`import_xformers`)."""
    try:
        return import_xformers("xformers.ops")
    except Exception as e:  # ImportError, or a broken build raising something else
        raise ImportError(f"the 'xformers' attention backend needs xformers: {e}") from e


class PackedSeqlens:
    """Lengths of the sequences packed back to back into one row ``(1, T, D)``.

    Tokens of sequence ``i`` attend only to tokens of sequence ``i``. Build it once per
    forward: the kernel inputs derived from it (cu_seqlens, flex block mask, xformers bias)
    are cached on it, per device, so every block reuses them.
    """

    def __init__(self, seqlens: Iterable[int]) -> None:
        self.seqlens: tuple[int, ...] = tuple(int(n) for n in seqlens)
        if not self.seqlens or min(self.seqlens) < 1:
            raise ValueError(f"seqlens must be a non-empty list of positive lengths, got {self.seqlens[:8]}...")
        self.total = sum(self.seqlens)
        self.max_seqlen = max(self.seqlens)
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
        self._cache: dict[tuple[str, Any], Any] = {}

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

    def _cached(self, kind: str, device: torch.device, build: Callable[[], Any]) -> Any:
        key = (kind, torch.device(device))
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def cu_seqlens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 ``(num_seqs + 1,)`` start offsets and the total: ``[0, n0, n0 + n1, ..., T]``,
        on ``device`` (varlen's ``cu_seq_q`` / ``cu_seq_k``). Built once per device."""
        def build() -> torch.Tensor:
            cu = torch.zeros(self.num_seqs + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(self.seqlens, dtype=torch.int32).cumsum(0)
            return _to_device(cu, torch.device(device))
        return self._cached("cu_seqlens", device, build)

    def seq_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 ``(T,)``: the sequence index of every token (flex's mask_mod reads it)."""
        def build() -> torch.Tensor:
            ids = torch.repeat_interleave(torch.arange(self.num_seqs, dtype=torch.int32),
                                          torch.tensor(self.seqlens))
            return _to_device(ids, torch.device(device))
        return self._cached("seq_ids", device, build)

    def flex_block_mask(self, device: torch.device | str = "cpu", block_size: int = FLEX_BLOCK_SIZE) -> Any:
        """FlexAttention ``BlockMask`` of the block-diagonal pattern (built once per device).

        Tile (i, j) of ``block_size`` tokens is *full* when both tiles lie inside one sequence
        (no mask_mod needed), *partial* when some sequence spans both, else skipped. Sequences
        are contiguous, so tiles i and j share a sequence iff their [first, last] sequence-id
        ranges overlap: O((T / block)^2) booleans, never O(T^2).
        """
        def build() -> Any:
            from torch.nn.attention.flex_attention import BlockMask

            dev = torch.device(device)
            ids = torch.repeat_interleave(torch.arange(self.num_seqs), torch.tensor(self.seqlens))  # (T,) host
            starts = torch.arange(0, self.total, block_size)
            first, last = ids[starts], ids[(starts + block_size).clamp(max=self.total) - 1]  # (nb,)
            touch = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])  # (nb, nb)
            # A short tail tile stays partial: the kernel's bounds check then never meets a "full" tile
            # that runs past T.
            whole = (first == last) & (starts + block_size <= self.total)
            full = whole[:, None] & whole[None, :] & (first[:, None] == first[None, :])
            partial = touch & ~full
            kv_num, kv_idx = _dense_to_ordered(partial[None, None])
            full_num, full_idx = _dense_to_ordered(full[None, None])
            seq_ids = self.seq_ids(dev)

            def same_sequence(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                              kv_idx: torch.Tensor) -> torch.Tensor:
                return seq_ids[q_idx] == seq_ids[kv_idx]

            return BlockMask.from_kv_blocks(
                _to_device(kv_num, dev), _to_device(kv_idx, dev), _to_device(full_num, dev),
                _to_device(full_idx, dev), BLOCK_SIZE=block_size, mask_mod=same_sequence,
                seq_lengths=(self.total, self.total))
        return self._cached(f"flex{block_size}", device, build)

    def to_xformers(self, device: torch.device) -> Any:
        """The equivalent xformers ``BlockDiagonalMask`` (built once, then reused)."""
        def build() -> Any:
            _xops()
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask

            return BlockDiagonalMask.from_seqlens(list(self.seqlens), device=device)
        return self._cached("xformers", device, build)

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


def _dense_to_ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean tile mask (..., R, C) -> (count (..., R), column indices (..., R, C)) int32, the
    allowed columns first (the layout ``BlockMask.from_kv_blocks`` takes)."""
    dense = dense.to(torch.int32)
    return dense.sum(-1, dtype=torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)


# --- varlen (torch.nn.attention.varlen) ------------------------------------------------------
_VARLEN: dict[str, Any] = {}  # filled once by _load_varlen(); a plain dict so torch.compile reads it


def _load_varlen() -> dict[str, Any]:
    """{"fn": torch's varlen_attn or None, "scale": whether it takes ``scale=``, "error": why not}.
    Imported on first use: the module costs ~1 s and only CUDA runs need it. torch 2.10's
    varlen_attn has no ``scale`` argument."""
    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN.update(fn=None, scale=False,
                           error=f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)")
        else:
            _VARLEN.update(fn=varlen_attn, scale="scale" in inspect.signature(varlen_attn).parameters, error=None)
    return _VARLEN


@torch.compiler.assume_constant_result
def _have_varlen() -> bool:
    # A constant to torch.compile: the import runs eagerly, never traced, and fills _VARLEN.
    return _load_varlen()["fn"] is not None


def get_varlen_attn(device: torch.device) -> Callable[..., torch.Tensor] | None:
    """torch's ``varlen_attn`` when this torch has it and ``device`` is CUDA, else None.
    Tests patch this to return :func:`varlen_attn_reference`."""
    return _VARLEN["fn"] if device.type == "cuda" and _have_varlen() else None


def varlen_attention(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> torch.Tensor:
    """Block-diagonal attention of packed ``(T, H, Dh)`` q/k/v through a varlen-signature ``fn``.

    q/k/v must be contiguous: cuDNN's varlen path in some torch versions computes the ragged
    offsets as ``cu_seqlens * H * Dh``, i.e. assumes a packed (T, H, Dh) layout. ``Attention``
    projects them contiguous (no copy here); a strided caller's tensors are copied."""
    kw: dict[str, Any] = {}
    default_scale = q.shape[-1] ** -0.5
    if fn is _VARLEN.get("fn") and not _VARLEN["scale"]:  # _VARLEN is filled: fn came from get_varlen_attn
        if abs(scale - default_scale) > 1e-12 * default_scale:  # torch 2.10: fold the scale into q
            q = q * (scale / default_scale)
    else:
        kw["scale"] = scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def varlen_attn_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                          cu_seq_k: torch.Tensor | None, max_q: int, max_k: int, *,
                          scale: float | None = None, **unused: Any) -> torch.Tensor:
    """CPU twin of ``torch.nn.attention.varlen.varlen_attn``, written from the math: the same
    arguments, softmax(q k^T * scale) v per segment ``[cu[i], cu[i+1])``; ``(T, H, Dh)`` out.

    Checks the contract the flash kernel relies on but does not check: int32 offsets from 0 to
    T, non-decreasing, ``max_q`` / ``max_k`` at least every segment's length (a short max makes
    flash skip tokens silently)."""
    if unused:
        raise TypeError(f"varlen_attn_reference: unsupported arguments {sorted(unused)}")
    cu_seq_k = cu_seq_q if cu_seq_k is None else cu_seq_k
    for name, cu, t in (("cu_seq_q", cu_seq_q, query.shape[0]), ("cu_seq_k", cu_seq_k, key.shape[0])):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != query.device:
            raise ValueError(f"{name} must be int32 (S + 1,) on {query.device}, got {cu.dtype} {tuple(cu.shape)} "
                             f"on {cu.device}")
    bq, bk = cu_seq_q.tolist(), cu_seq_k.tolist()
    if len(bq) != len(bk) or bq[0] != 0 or bk[0] != 0 or bq[-1] != query.shape[0] or bk[-1] != key.shape[0]:
        raise ValueError(f"offsets must run from 0 to T: cu_seq_q {bq[:3]}..{bq[-1:]}, cu_seq_k {bk[:3]}..{bk[-1:]}")
    lq = [b - a for a, b in zip(bq[:-1], bq[1:])]
    lk = [b - a for a, b in zip(bk[:-1], bk[1:])]
    if min(lq + lk) < 0 or max(lq) > max_q or max(lk) > max_k:
        raise ValueError(f"bad segments: lengths q {lq[:8]}.., k {lk[:8]}.., max_q {max_q}, max_k {max_k}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for (q0, q1), (k0, k1) in zip(zip(bq[:-1], bq[1:]), zip(bk[:-1], bk[1:])):
        q, k, v = (t.transpose(0, 1) for t in (query[q0:q1], key[k0:k1], value[k0:k1]))  # (H, n, Dh)
        outs.append((((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outs)


# --- FlexAttention ---------------------------------------------------------------------------
_FLEX: dict[str, Any] = {}  # filled once by _load_flex(); a plain dict so torch.compile reads it


def _load_flex() -> dict[str, Any]:
    """{"fn": eager flex_attention or None, "compiled": its torch.compile wrapper, "error": why not}.
    The wrapper is made once (lazily compiled on first call, then per new shape only); eager flex
    on CUDA is a slow reference path, not a kernel."""
    if not _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:
            _FLEX.update(fn=None, compiled=None, error=f"torch {torch.__version__} has no FlexAttention")
        else:
            _FLEX.update(fn=flex_attention, compiled=torch.compile(flex_attention, dynamic=False), error=None)
    return _FLEX


@torch.compiler.assume_constant_result
def _have_flex() -> bool:
    # A constant to torch.compile: the import runs eagerly, never traced, and fills _FLEX.
    return _load_flex()["fn"] is not None


def get_flex_attention(device: torch.device) -> Callable[..., torch.Tensor] | None:
    """``flex_attention`` for ``device``: compiled on CUDA, eager on CPU (forward only: torch
    has no CPU flex backward). None without FlexAttention. Tests patch this to return
    :func:`flex_attention_reference`."""
    if not _have_flex():
        return None
    return _FLEX["compiled"] if device.type == "cuda" else _FLEX["fn"]


def _tiles_to_tokens(num: torch.Tensor, idx: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]
                     ) -> torch.Tensor:
    """Ordered tile lists (..., R) / (..., R, C) -> boolean token mask (..., Q_LEN, KV_LEN)."""
    ncols = -(-shape[1] // block[1])
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    tiles = torch.zeros(*idx.shape[:-1], ncols + 1, dtype=torch.bool, device=idx.device)
    tiles.scatter_(-1, torch.where(valid, idx, ncols).long(), True)
    tok = tiles[..., :ncols].repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    return tok[..., :shape[0], :shape[1]]


def flex_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             score_mod: Any = None, block_mask: Any = None, scale: float | None = None,
                             **unused: Any) -> torch.Tensor:
    """CPU twin of ``flex_attention`` (no score_mod) written from the math: expands
    ``block_mask`` to a token mask (full tiles allowed, partial tiles through its mask_mod,
    others masked) and runs softmax(q k^T * scale) v; ``(B, H, N, Dh)`` in and out."""
    if score_mod is not None or unused:
        raise TypeError("flex_attention_reference takes no score_mod or extra options")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query * scale) @ key.transpose(-2, -1)  # (B, H, N, N)
    if block_mask is not None:
        shape = (query.shape[-2], key.shape[-2])
        if tuple(block_mask.seq_lengths) != shape:
            raise ValueError(f"block mask is for {tuple(block_mask.seq_lengths)} tokens, inputs have {shape}")
        block = tuple(block_mask.BLOCK_SIZE)
        allowed = _tiles_to_tokens(block_mask.kv_num_blocks, block_mask.kv_indices, block, shape)
        q_idx = torch.arange(shape[0], device=query.device)[:, None]
        kv_idx = torch.arange(shape[1], device=query.device)[None, :]
        zero = torch.zeros((), dtype=torch.long, device=query.device)
        allowed = allowed & block_mask.mask_mod(zero, zero, q_idx, kv_idx)
        if block_mask.full_kv_num_blocks is not None:
            allowed = allowed | _tiles_to_tokens(block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                                                 block, shape)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(-1) @ value
