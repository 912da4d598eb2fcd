"""Teacher EMA benchmark: the one-launch Triton kernel vs torch foreach ops vs a per-parameter loop.

Parameter lists are shaped like DINO's ViT-S/16 and ViT-B/16 + head (out_dim 65536), built from
the architecture (patch embed, cls/pos tokens, 12 blocks of qkv/proj/mlp 4x/LayerNorms, final
norm; head D -> 2048 -> 2048 -> 256 -> weight-normed 65536 with weight_g/weight_v).

Bytes floor per element: read teacher (4 B) + read student (4 B fp32, 2 B bf16) + write teacher
(4 B) = 12 B (fp32 student) / 10 B (bf16 student). "% of peak" = achieved GB/s over --peak-gbps, by
default the device's datasheet HBM bandwidth from bench.common.device_peaks (H200 4800, H100 SXM 3350).

    python bench/bench_ema.py                      # GPU: vit_s and vit_b, fp32 and bf16 students
    python bench/bench_ema.py --tiny --out /tmp/r  # CPU: a scaled-down list (NOT GPU figures)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Results, device_peaks, peak_note, time_fn  # noqa: E402

ARCHS = {  # name: (embed dim, depth, image size, patch size, head hidden, head bottleneck, out_dim)
    "vit_s": (384, 12, 224, 16, 2048, 256, 65536),
    "vit_b": (768, 12, 224, 16, 2048, 256, 65536),
    "tiny": (48, 2, 32, 16, 128, 32, 1024),  # CPU smoke size only
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dino_param_shapes(dim: int, depth: int, img: int, patch: int, hidden: int, bottleneck: int,
                      out_dim: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a DINO ViT backbone + DINOHead, in named_parameters() order."""
    n_tokens = (img // patch) ** 2 + 1
    shapes: list[tuple[int, ...]] = [(1, 1, dim), (1, n_tokens, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,),                      # norm1
                   (3 * dim, dim), (3 * dim,),          # attn.qkv
                   (dim, dim), (dim,),                  # attn.proj
                   (dim,), (dim,),                      # norm2
                   (4 * dim, dim), (4 * dim,),          # mlp.fc1
                   (dim, 4 * dim), (dim,)]              # mlp.fc2
    shapes += [(dim,), (dim,)]                          # final norm
    shapes += [(hidden, dim), (hidden,), (hidden, hidden), (hidden,), (bottleneck, hidden), (bottleneck,),
               (out_dim, 1), (out_dim, bottleneck)]     # head mlp, last_layer weight_g / weight_v
    return shapes


def count_kernels(fn) -> int | None:
    """CUDA kernels launched by one call of ``fn`` (torch profiler); None on CPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_us(fn, reps: int = 20) -> float:
    """Median host (Python + launch) microseconds of one call, GPU work excluded."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    sync()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, choices=list(ARCHS),
                   help="parameter lists to time (default: vit_s vit_b on CUDA, tiny on CPU)")
    p.add_argument("--student-dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--momentum", type=float, default=0.996)
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="HBM GB/s for %% of peak (default: the device's datasheet figure, bench.common.device_peaks)")
    p.add_argument("--chunk", type=int, default=None, help="Triton elements per program (default: kernel's)")
    p.add_argument("--block", type=int, default=None, help="Triton elements per loop step (default: kernel's)")
    p.add_argument("--tiny", action="store_true", help="scaled-down list only (what runs on CPU)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    peaks = device_peaks() if cuda else None
    peak_gbps = args.peak_gbps or (peaks[0] if peaks else None)
    if not cuda:
        # CPU: Triton runs through its interpreter, which must be on before the kernel is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dino_fast.kernels.ema import DEFAULT_BLOCK, DEFAULT_CHUNK, multi_tensor_ema_, multi_tensor_ema_reference_

    chunk, block = args.chunk or DEFAULT_CHUNK, args.block or DEFAULT_BLOCK
    models = ["tiny"] if (args.tiny or not cuda) else (args.models or ["vit_s", "vit_b"])
    device = torch.device("cuda" if cuda else "cpu")
    m = args.momentum
    notes = (f"bytes floor 12 B/elem (fp32 student) or 10 B/elem (bf16 student); % of peak against "
             f"{peak_note(peak_gbps, 'GB/s', bool(args.peak_gbps))}; momentum {m}; Triton chunk={chunk} "
             f"block={block}; 'launches (plan)' = Triton launches per update from the plan; kernels/update "
             f"counted with torch.profiler (CUDA only); host us = Python + launch time of one call")
    if not cuda:
        notes += "; CPU run through the Triton interpreter on a tiny list: NOT GPU figures"
    results = Results("bench_ema", ["model", "student", "tensors", "Melem", "method", "ms", "GB/s", "% of peak",
                                    "x vs loop", "launches (plan)", "kernels/update (profiler)", "host us"],
                      notes, out_dir=args.out)
    for model in models:
        shapes = dino_param_shapes(*ARCHS[model])
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for dname in args.student_dtypes:
            s_dtype = DTYPES[dname]
            g = torch.Generator(device=device).manual_seed(0)
            teacher = [torch.randn(s, device=device, generator=g) for s in shapes]
            student = [torch.randn(s, device=device, generator=g).to(s_dtype) for s in shapes]
            m_tensor = torch.tensor(m, device=device)
            cache: dict = {}
            floor_bytes = numel * (8 + torch.tensor([], dtype=s_dtype).element_size())

            def fp32_student() -> list[torch.Tensor]:
                # foreach ops need matching dtypes: a bf16 student is upcast first (counted in the time)
                return student if s_dtype == torch.float32 else [s.float() for s in student]

            def foreach_lerp():
                torch._foreach_lerp_(teacher, fp32_student(), 1.0 - m)

            def foreach_mul_add():
                torch._foreach_mul_(teacher, m)
                torch._foreach_add_(teacher, fp32_student(), alpha=1.0 - m)

            methods = {
                "triton (float m)": lambda: multi_tensor_ema_(teacher, student, m, cache=cache, chunk=chunk,
                                                              block=block),
                "triton (tensor m)": lambda: multi_tensor_ema_(teacher, student, m_tensor, cache=cache,
                                                               chunk=chunk, block=block),
                "foreach lerp": foreach_lerp,
                "foreach mul+add": foreach_mul_add,
                "per-param loop": lambda: multi_tensor_ema_reference_(teacher, student, m),
            }
            timings, rows = {}, []
            for name, fn in methods.items():
                ms = time_fn(fn, warmup=1, rep=3) if not cuda else time_fn(fn)
                timings[name] = ms
                gbps = floor_bytes / (ms * 1e-3) / 1e9
                plan = next(iter(cache.values())) if name.startswith("triton") else None
                rows.append({
                    "model": model, "student": dname, "tensors": len(shapes), "Melem": numel / 1e6,
                    "method": name, "ms": ms, "GB/s": gbps,
                    "% of peak": 100 * gbps / peak_gbps if cuda and peak_gbps else None,
                    "x vs loop": None,
                    "launches (plan)": plan.num_launches if plan else None,
                    "kernels/update (profiler)": count_kernels(fn),
                    "host us": host_us(fn) if cuda else None,
                })
            for r in rows:
                r["x vs loop"] = timings["per-param loop"] / r["ms"]
            results.add(*rows)  # per (model, dtype): a run stopped at its cap keeps the lists it finished
    results.close()


if __name__ == "__main__":
    main()
