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


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small generated demo dataset (10 classes, 4 train / 2 val images each, 32 px), made once."""
    from dino_fast.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=4, n_val_per_class=2, size=32)


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
