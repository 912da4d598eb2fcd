"""Benchmark: DINO loss forward + backward, fused Triton kernel vs eager reference vs
torch.compile(reference), in the same process.

Bytes floor per step (what GB/s and "% floor" use): read every student and teacher logit once
and write every student gradient once = 2 * V*B*K * es + 2*B*K * et bytes (es, et: element
sizes of student and teacher). The fused kernel does more than that (second student sweep,
fp32 teacher probabilities, the backward's in-place scale by grad_output); see
kernels/dino_loss.py.

    python bench/bench_loss.py                      # CUDA: the default sizes below; CPU: a tiny interpreter run
    python bench/bench_loss.py --sizes 64,12,65536 --dtypes bf16 --peak-gbps 3350 --out /tmp/res
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import torch

GPU_SIZES = [(64, 12, 65536), (256, 12, 65536), (256, 8, 65536)]
CPU_SIZES = [(2, 4, 4096)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def floor_bytes(batch: int, ncrops: int, k: int, dtype: torch.dtype, teacher_dtype: torch.dtype | None = None,
                n_global: int = 2) -> int:
    """Read student + teacher logits once, write the student gradient once."""
    es = torch.empty((), dtype=dtype).element_size()
    et = torch.empty((), dtype=teacher_dtype or dtype).element_size()
    return 2 * ncrops * batch * k * es + n_global * batch * k * et


def make_case(batch: int, ncrops: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random student (requires grad), teacher and center in the official stacked layout."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(ncrops * batch, k, device=device, generator=g).to(dtype).requires_grad_()
    teacher = torch.randn(2 * batch, k, device=device, generator=g).to(dtype)
    center = 0.1 * torch.randn(1, k, device=device, generator=g)
    return student, teacher, center


def step_fns(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
             with_compile: bool) -> dict[str, Callable[[], None]]:
    """One forward + backward per call for each implementation (the gradient is reset, not accumulated)."""
    from dino_fast.loss import dino_loss_reference
    from dino_fast.ops import fused_dino_loss

    def fused() -> None:
        student.grad = None
        loss, _ = fused_dino_loss(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP, ncrops)
        loss.backward()

    def make_ref(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def ref() -> None:
            student.grad = None
            fn(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP, ncrops).backward()
        return ref

    fns = {"fused": fused, "eager": make_ref(dino_loss_reference)}
    if with_compile:
        fns["compile"] = make_ref(torch.compile(dino_loss_reference))
    return fns


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for item in text.split(";"):
        b, v, k = (int(x) for x in item.split(","))
        sizes.append((b, v, k))
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_parse_sizes, default=None,
                        help="'B,V,K;B,V,K' (default: GPU sizes on CUDA, a tiny one on CPU)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32, fp16")
    parser.add_argument("--peak-gbps", type=float, default=3350.0,
                        help="memory bandwidth peak for '%% floor' (default 3350: H100 SXM HBM3)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        # CPU: the kernels run through the Triton interpreter; set before they are first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.common import peak_memory, time_fn, write_results

    device = torch.device("cuda" if cuda else "cpu")
    sizes = args.sizes or (GPU_SIZES if cuda else CPU_SIZES)
    with_compile = cuda and not args.no_compile  # compile on CPU would time the C++ compiler, not the op
    rows = []
    for batch, ncrops, k in sizes:
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            student, teacher, center = make_case(batch, ncrops, k, dtype, device)
            nbytes = floor_bytes(batch, ncrops, k, dtype)
            results = {}
            for impl, fn in step_fns(student, teacher, center, ncrops, with_compile).items():
                try:
                    fn()  # compile / JIT warm-up outside the timing
                    ms = time_fn(fn) if cuda else time_fn(fn, warmup=1, rep=3)
                    mem = peak_memory(fn)
                except torch.cuda.OutOfMemoryError:
                    ms, mem = float("nan"), None
                    torch.cuda.empty_cache()
                results[impl] = (ms, mem)
            for impl, (ms, mem) in results.items():
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append({
                    "B": batch, "V": ncrops, "K": k, "dtype": dname, "impl": impl, "ms": ms,
                    "GB/s": gbps, "% floor": 100.0 * gbps / args.peak_gbps,
                    "peak extra GB": None if mem is None else mem / 1e9,
                    "vs eager": results["eager"][0] / ms,
                    "vs compile": results["compile"][0] / ms if "compile" in results else None,
                })
            del student, teacher, center
    notes = (f"forward+backward per step; bytes floor = read student+teacher logits once + write student grad "
             f"once; % floor against --peak-gbps {args.peak_gbps:g} GB/s; speed-ups are time ratios (>1: faster)")
    if not cuda:
        notes += "; CPU run through the Triton interpreter: NOT GPU figures, tiny sizes, no torch.compile"
    write_results("bench_loss", rows, ["B", "V", "K", "dtype", "impl", "ms", "GB/s", "% floor", "peak extra GB",
                                       "vs eager", "vs compile"], notes, out_dir=args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/bench_loss.py` finds bench.common
    main()
