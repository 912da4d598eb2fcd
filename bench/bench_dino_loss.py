"""Benchmark: DINO loss forward + backward, in the same process:

- on logits: the split-K fused Triton kernel vs the eager reference vs torch.compile(reference);
- with the head's last layer (weight-normed Linear(256 -> K), norm_last_layer): the last layer
  fused into the loss (``fused_head``, logits never materialised) vs the plain last layer followed
  by the fused loss (``head+fused``) or by the eager reference (``head+eager``), with their peak
  memory (torch.cuda.max_memory_allocated over the step).

Bytes floor of the loss on logits (what GB/s and "% floor" use): read every student and teacher
logit once and write every student gradient once, ``dino_fast.ops.dino_loss_floor_bytes`` (the
formula of kernels/dino_loss.py's docstring, in one place). "% floor" is GB/s over the device's
datasheet HBM bandwidth (bench.common.device_peaks: H200 4800, H100 SXM 3350, A100 80GB 2039 ...;
``--peak-gbps`` overrides; none on CPU). The head rows are matmul-bound: they report time, peak
memory and speed-ups, no bytes floor.

    python bench/bench_dino_loss.py                      # CUDA: the default sizes below; CPU: a tiny interpreter run
    python bench/bench_dino_loss.py --sizes '256,12,65536' --dtypes bf16 --out /tmp/res
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable

import torch

GPU_SIZES = [(64, 12, 65536), (256, 12, 65536), (256, 8, 65536)]
CPU_SIZES = [(2, 4, 4096)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
BOTTLENECK = 256


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
    from dino_fast.dino_loss import dino_loss_reference
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


def head_step_fns(batch: int, ncrops: int, k: int, dtype: torch.dtype, device: torch.device,
                  seed: int = 0) -> dict[str, Callable[[], None]]:
    """Bottleneck features -> last layer -> loss, forward + backward, three ways (autocast in ``dtype``
    as the trainer runs it; fp32 without autocast)."""
    from dino_fast.dino_loss import dino_loss_reference
    from dino_fast.models.head import WeightNormLinear
    from dino_fast.ops import fused_dino_head_loss, fused_dino_loss

    torch.manual_seed(seed)
    layer = WeightNormLinear(BOTTLENECK, k).to(device)
    layer.weight_g.requires_grad_(False)  # norm_last_layer
    feats = torch.nn.functional.normalize(torch.randn(ncrops * batch, BOTTLENECK, device=device), dim=-1)
    feats.requires_grad_()
    _, teacher, center = make_case(batch, ncrops, k, dtype, device, seed)

    def autocast() -> contextlib.AbstractContextManager:
        return (contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype))

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            feats.grad = None
            layer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn()
            loss.backward()
        return run

    return {
        "fused_head": step(lambda: fused_dino_head_loss(feats, layer.weight, teacher, center, STUDENT_TEMP,
                                                        TEACHER_TEMP, ncrops)[0]),
        "head+fused": step(lambda: fused_dino_loss(layer(feats), teacher, center, STUDENT_TEMP, TEACHER_TEMP,
                                                   ncrops)[0]),
        "head+eager": step(lambda: dino_loss_reference(layer(feats), teacher, center, STUDENT_TEMP, TEACHER_TEMP,
                                                       ncrops)),
    }


def _measure(fn: Callable[[], None], cuda: bool) -> tuple[float, int | None]:
    """(median ms, peak extra bytes) of one step; (nan, None) when it runs out of memory."""
    from bench.common import oom_as_reason, peak_memory, time_fn

    with oom_as_reason({}):
        fn()  # compile / JIT / autotune warm-up outside the timing
        ms = time_fn(fn) if cuda else time_fn(fn, warmup=1, rep=3)
        return ms, peak_memory(fn)
    return float("nan"), None


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
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="HBM GB/s for '%% floor' (default: the device's datasheet figure, "
                             "bench.common.device_peaks)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--no-head", action="store_true", help="skip the last-layer + loss rows")
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        # CPU: the kernels run through the Triton interpreter; set before they are first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.common import Results, device_peaks, peak_note
    from dino_fast.ops import dino_loss_floor_bytes

    peaks = device_peaks() if cuda else None
    peak_gbps = args.peak_gbps or (peaks[0] if peaks else None)
    device = torch.device("cuda" if cuda else "cpu")
    sizes = args.sizes or (GPU_SIZES if cuda else CPU_SIZES)
    with_compile = cuda and not args.no_compile  # compile on CPU would time the C++ compiler, not the op
    notes = ("forward+backward per step; bytes floor (loss rows) = read student+teacher logits once + write student "
             f"grad once; % floor against {peak_note(peak_gbps, 'GB/s', bool(args.peak_gbps))}; head rows: features "
             f"(V*B, {BOTTLENECK}) -> weight-normed last layer -> loss under autocast in the row's dtype (fp32: none), "
             "peak extra GB = torch.cuda.max_memory_allocated over one step minus the memory before it; speed-ups are "
             "time ratios (>1: faster)")
    if not cuda:
        notes += "; CPU run through the Triton interpreter: NOT GPU figures, tiny sizes, no torch.compile"
    # rows go to disk per size as they are measured: a run stopped at its cap keeps the sizes it finished
    results = Results("bench_dino_loss", ["B", "V", "K", "dtype", "impl", "ms", "GB/s", "% floor", "peak extra GB",
                                          "vs eager", "vs compile", "vs head+fused"], notes, out_dir=args.out)
    for batch, ncrops, k in sizes:
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            student, teacher, center = make_case(batch, ncrops, k, dtype, device)
            nbytes = dino_loss_floor_bytes(batch, ncrops, k, dtype)
            timed = {impl: _measure(fn, cuda)
                     for impl, fn in step_fns(student, teacher, center, ncrops, with_compile).items()}
            del student, teacher, center
            for impl, (ms, mem) in timed.items():
                gbps = nbytes / (ms * 1e-3) / 1e9
                results.add({
                    "B": batch, "V": ncrops, "K": k, "dtype": dname, "impl": impl, "ms": ms, "GB/s": gbps,
                    "% floor": 100.0 * gbps / peak_gbps if peak_gbps else None,
                    "peak extra GB": None if mem is None else mem / 1e9,
                    "vs eager": timed["eager"][0] / ms,
                    "vs compile": timed["compile"][0] / ms if "compile" in timed else None,
                })
            if args.no_head:
                continue
            head = {impl: _measure(fn, cuda) for impl, fn in head_step_fns(batch, ncrops, k, dtype, device).items()}
            for impl, (ms, mem) in head.items():
                results.add({"B": batch, "V": ncrops, "K": k, "dtype": dname, "impl": impl, "ms": ms,
                             "peak extra GB": None if mem is None else mem / 1e9,
                             "vs eager": head["head+eager"][0] / ms, "vs head+fused": head["head+fused"][0] / ms})
            if cuda:
                torch.cuda.empty_cache()
    results.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/bench_dino_loss.py` finds bench.common
    main()
