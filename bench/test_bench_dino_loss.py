"""pytest-benchmark twin of bench/bench_dino_loss.py: fused vs eager DINO loss, and the head's last
layer fused into the loss vs last layer + loss, forward + backward.

CUDA only (skips elsewhere): ``python -m pytest bench/test_bench_dino_loss.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

from bench.bench_dino_loss import head_step_fns, make_case, step_fns

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmark needs a CUDA GPU")


def _run(benchmark, fn, group: str) -> None:
    def step() -> None:
        fn()
        torch.cuda.synchronize()  # time the GPU work, not the launch

    fn()  # autotune / compile outside the rounds
    benchmark.group = group
    benchmark.pedantic(step, warmup_rounds=3, rounds=20)


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bench_dino_loss(benchmark, impl, dtype):
    batch, ncrops, k = 64, 12, 65536
    student, teacher, center = make_case(batch, ncrops, k, dtype, torch.device("cuda"))
    _run(benchmark, step_fns(student, teacher, center, ncrops, with_compile=False)[impl],
         f"dino_loss B={batch} V={ncrops} K={k} {dtype}")
    assert student.grad is not None and student.grad.shape == student.shape


@pytest.mark.parametrize("impl", ["fused_head", "head+fused"])
def test_bench_dino_head_loss(benchmark, impl):
    batch, ncrops, k = 256, 12, 65536
    fn = head_step_fns(batch, ncrops, k, torch.bfloat16, torch.device("cuda"))[impl]
    _run(benchmark, fn, f"dino_head_loss B={batch} V={ncrops} K={k} bf16 autocast")
