"""The one place dino_fast reaches its Triton kernels (``dino_fast.kernels``).

Imports are lazy so that ``import dino_fast`` works where Triton is missing, and
so that ``TRITON_INTERPRET=1`` set by a caller (tests, CPU users) is seen when the
kernels are first compiled.

Each kernel is a torch custom op (``OP_NAMES``, registered when its kernel module is imported:
:func:`load_ops`) with a fake implementation and, for the losses, an autograd formula: the
wrappers below trace through torch.compile without a graph break and run under FakeTensorMode.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

__all__ = ["OP_NAMES", "has_triton", "load_ops", "triton_usable", "fused_dino_loss", "fused_dino_loss_from_probs",
           "fused_dino_head_loss", "dino_loss_floor_bytes", "multi_tensor_ema_"]

OP_NAMES = ("dino_fast::dino_loss", "dino_fast::dino_head_loss", "dino_fast::scale_", "dino_fast::ema_")


def has_triton() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def load_ops() -> tuple[str, ...]:
    """Import every kernel module, registering the custom ops; returns their names. The wrappers
    import their module on first use, so only code that reaches ``torch.ops.dino_fast`` directly
    (opcheck, export) needs this."""
    import dino_fast.kernels.dino_head_loss  # noqa: F401  (imports dino_loss and grad_scale)
    import dino_fast.kernels.ema  # noqa: F401

    return OP_NAMES


def triton_usable(device: torch.device | str) -> bool:
    """True when Triton kernels can run on tensors of ``device``: CUDA, or the
    Triton interpreter (``TRITON_INTERPRET=1``) for CPU tensors."""
    if not has_triton():
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                    student_temp: float, teacher_temp: float, ncrops: int, n_global: int = 2, *,
                    inplace: bool = False, block_k: int | None = None,
                    split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, teacher column sums); see :func:`dino_fast.kernels.dino_loss.fused_dino_loss`."""
    from dino_fast.kernels.dino_loss import fused_dino_loss as _f

    return _f(student_output, teacher_output, center, student_temp, teacher_temp, ncrops, n_global,
              inplace=inplace, block_k=block_k, split_k=split_k)


def fused_dino_loss_from_probs(student_output: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                               ncrops: int, n_global: int = 2, *, inplace: bool = False,
                               block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """Loss with given teacher probabilities; see :func:`dino_fast.kernels.dino_loss.fused_dino_loss_from_probs`."""
    from dino_fast.kernels.dino_loss import fused_dino_loss_from_probs as _f

    return _f(student_output, teacher_probs, student_temp, ncrops, n_global, inplace=inplace, block_k=block_k,
              split_k=split_k)


def fused_dino_head_loss(student_feats: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor,
                         center: torch.Tensor | None, student_temp: float, teacher_temp: float, ncrops: int,
                         n_global: int = 2, *, chunk_images: int | None = None,
                         compute_dtype: torch.dtype | None = None, block_k: int | None = None,
                         split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last layer + loss without the logits; see :func:`dino_fast.kernels.dino_head_loss.fused_dino_head_loss`."""
    from dino_fast.kernels.dino_head_loss import fused_dino_head_loss as _f

    return _f(student_feats, weight, teacher, center, student_temp, teacher_temp, ncrops, n_global,
              chunk_images=chunk_images, compute_dtype=compute_dtype, block_k=block_k, split_k=split_k)


def dino_loss_floor_bytes(batch: int, ncrops: int, k: int, student_dtype: torch.dtype,
                          teacher_dtype: torch.dtype | None = None, n_global: int = 2) -> int:
    """Bytes floor of the fused loss; see :func:`dino_fast.kernels.dino_loss.dino_loss_floor_bytes`."""
    from dino_fast.kernels.dino_loss import dino_loss_floor_bytes as _f

    return _f(batch, ncrops, k, student_dtype, teacher_dtype, n_global)


def multi_tensor_ema_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                      momentum: float | torch.Tensor, *, copies: Sequence[torch.Tensor] = (),
                      cache: dict | None = None, chunk: int | None = None, block: int | None = None) -> None:
    """In-place teacher EMA, and the compute-dtype ``copies`` of the first ``len(copies)`` teacher
    tensors written in the same pass; see :func:`dino_fast.kernels.ema.multi_tensor_ema_` (its
    chunk/block defaults when None)."""
    from dino_fast.kernels.ema import multi_tensor_ema_ as _f

    sizes = {name: value for name, value in (("chunk", chunk), ("block", block)) if value is not None}
    _f(teacher, student, momentum, copies=copies, cache=cache, **sizes)
