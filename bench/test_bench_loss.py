"""pytest-benchmark twin of bench/bench_loss.py: fused vs eager DINO loss, forward + backward.

CUDA only (skips elsewhere): ``python -m pytest bench/test_bench_loss.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

from bench.bench_loss import make_case, step_fns

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmark needs a CUDA GPU")


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bench_dino_loss(benchmark, impl, dtype):
    batch, ncrops, k = 64, 12, 65536
    student, teacher, center = make_case(batch, ncrops, k, dtype, torch.device("cuda"))
    fn = step_fns(student, teacher, center, ncrops, with_compile=False)[impl]

    def step() -> None:
        fn()
        torch.cuda.synchronize()  # time the GPU work, not the launch

    benchmark.group = f"dino_loss B={batch} V={ncrops} K={k} {dtype}"
    benchmark.pedantic(step, warmup_rounds=3, rounds=20)
    assert student.grad is not None and student.grad.shape == student.shape
