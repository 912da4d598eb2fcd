"""The one place dino_fast reaches its Triton kernels (``dino_fast.kernels``).

Imports are lazy so that ``import dino_fast`` works where Triton is missing, and
so that ``TRITON_INTERPRET=1`` set by a caller (tests, CPU users) is seen when the
kernels are first compiled.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["has_triton", "triton_usable", "fused_dino_loss", "multi_tensor_ema_"]


def has_triton() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device | str) -> bool:
    """True when Triton kernels can run on tensors of ``device``: CUDA, or the
    Triton interpreter (``TRITON_INTERPRET=1``) for CPU tensors."""
    if not has_triton():
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_dino_loss(*args, **kwargs):
    """See :func:`dino_fast.kernels.dino_loss.fused_dino_loss`."""
    from dino_fast.kernels.dino_loss import fused_dino_loss as _f

    return _f(*args, **kwargs)


def multi_tensor_ema_(*args, **kwargs):
    """See :func:`dino_fast.kernels.ema.multi_tensor_ema_`."""
    from dino_fast.kernels.ema import multi_tensor_ema_ as _f

    return _f(*args, **kwargs)
