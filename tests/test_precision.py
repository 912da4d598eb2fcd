"""precision.resolve_compute_dtype: what ``auto`` means on each device, and the AMX-BF16 query it reads."""
from __future__ import annotations

import pytest
import torch

from dino_fast import precision
from dino_fast.precision import cpu_has_amx_bf16, resolve_compute_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # resolving only reads the device type: no GPU needed


def _capabilities(monkeypatch, caps):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)


@pytest.mark.parametrize("caps,expected", [
    ({"amx_bf16": True, "avx512_bf16": True}, torch.bfloat16),   # Sapphire Rapids and later
    ({"amx_bf16": False, "avx512_bf16": True}, torch.float32),   # bf16 vector instructions only: no tile unit
    ({"avx2": True}, torch.float32),                             # a CPU the query says nothing of AMX about
])
def test_auto_on_cpu_follows_amx(monkeypatch, caps, expected):
    _capabilities(monkeypatch, caps)
    assert resolve_compute_dtype("auto", CPU) == expected
    assert resolve_compute_dtype("auto", CUDA) == torch.bfloat16  # CUDA: bf16 whatever the host CPU
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert resolve_compute_dtype(name, CPU) == dtype  # an explicit choice is never overridden


def test_amx_query_missing_or_failing_means_no_amx(monkeypatch):
    def broken():
        raise RuntimeError("cpuinfo failed")

    _capabilities(monkeypatch, None)
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch without the query
    assert cpu_has_amx_bf16() is False and resolve_compute_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    assert cpu_has_amx_bf16() is False and resolve_compute_dtype("auto", CPU) == torch.float32


def test_unknown_precision_is_one_line():
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32"):
        resolve_compute_dtype("tf32", CPU)
    assert precision.PRECISIONS == ("auto", "bf16", "fp16", "fp32")
