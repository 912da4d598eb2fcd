"""The compute dtype of a run, decided once (config ``precision``) and handed to autocast, the
FSDP mixed-precision policy, the loader's view dtype and the evaluations."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["compute_dtype", "autocast"]


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``precision`` (auto | bf16 | fp16 | fp32) on ``device`` -> the dtype matmuls run in.

    auto: bf16 on CUDA, fp32 elsewhere (CPU autocast to bf16 is slower than fp32 on most CPUs)."""
    device = torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    except KeyError:
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}") from None


def autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (a no-op context for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
