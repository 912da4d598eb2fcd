"""Numerics of a run, decided once: the compute dtype (config ``precision``), handed to autocast, the
FSDP mixed-precision policy, the loader's view dtype and the evaluations; and whether kernels
must be deterministic (``configure_determinism``)."""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["PRECISIONS", "resolve_compute_dtype", "autocast", "configure_determinism"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``precision`` (auto | bf16 | fp16 | fp32) on ``device`` -> the dtype matmuls run in.

    auto: bf16 on CUDA, fp32 elsewhere (CPU autocast to bf16 is slower than fp32 on most CPUs)."""
    device = torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}") from None


def autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (a no-op context for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def configure_determinism(enabled: bool) -> None:
    """``deterministic: true``: deterministic algorithms everywhere (an op without one raises),
    cuBLAS with a fixed workspace, cuDNN without autotuning. Call before the first CUDA kernel
    (cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when its handle is created). Our Triton kernels are
    deterministic either way (no atomics). Off: cuDNN autotunes (the official ``benchmark=True``)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
