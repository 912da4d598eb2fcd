"""Numerics of a run, decided once: the compute dtype (config ``precision``), handed to autocast, the
FSDP mixed-precision policy, the loader's view dtype and the evaluations; and whether kernels
must be deterministic (``configure_determinism``)."""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["PRECISIONS", "cpu_has_amx_bf16", "resolve_compute_dtype", "autocast", "configure_determinism"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_amx_bf16() -> bool:
    """True when this CPU has AMX-BF16 tile units (Intel Xeon 4th generation, Sapphire Rapids, and later), as
    torch's own CPU capability query (``torch.cpu.get_capabilities``, cpuinfo) reports it; False where that
    query is missing or fails."""
    query = getattr(torch.cpu, "get_capabilities", None)
    try:
        return bool(query is not None and query().get("amx_bf16", False))
    except Exception:  # noqa: BLE001 - an unknown CPU is treated as one without AMX
        return False


def resolve_compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``precision`` (auto | bf16 | fp16 | fp32) on ``device`` -> the dtype matmuls run in.

    auto: bf16 on CUDA and on CPUs with AMX-BF16 (:func:`cpu_has_amx_bf16`), fp32 on other CPUs. With AMX the
    matmuls run on the tile units: the tiny_imagenet_sk step ran 1.5-1.9x faster in bf16 than in fp32 (2 Xeon
    cores, math attention: bench/results/train_tiny_imagenet_sk-cpu-2026-12-06) and its loss followed the
    fp32 run's to 1e-4 over 156 steps. Without AMX fp32 stays: with the AVX2 kernels the same bf16 step
    took 30x the fp32 one."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_amx_bf16()):
            return torch.bfloat16
        return torch.float32
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
