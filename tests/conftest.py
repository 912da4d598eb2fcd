"""Test-wide setup: Triton kernels run through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is
set here, before test modules import dino_fast.kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def no_tf32():
    """Real fp32 matmuls on CUDA (no TF32) for tests with fp32 tolerances; a no-op on CPU."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
