"""Ahead-of-time compile of every dino_fast Triton kernel for a CUDA target, on a machine with no GPU.

    python3 -m bench.aot_compile --cc 90 [80 100] [--sms 132] [--json out.json] [--quick]

Layer 2 of DESIGN.md's "The GPU, engineered from a machine without one": each launch the project's
own code makes compiles through Triton's compiler for sm_<cc>, with no register spill, registers x
threads within the 64 K register file and shared memory within the per-block limit.

1. Capture. Each op's own implementation (``kernels/*.py``: the fused loss, the fused head, the
   backward's scale, the EMA launch) runs on fake CUDA tensors (FakeTensorMode) with
   ``torch.cuda.get_device_properties`` answering ``--sms`` and every Triton launch
   (``JITFunction.run`` / ``Autotuner.run``) recorded instead of run: the launchers' own grids,
   constexprs and, for autotuned kernels, every config their ``early_config_prune`` keeps.
2. Compile. Triton's own binder turns the arguments into the JIT's specialization (dtypes, 16-byte
   alignment, int == 1 / % 16 hints); each distinct one is compiled with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.
3. Check. The ptxas log of that compile (the ptxas Triton picks for the arch) gives registers and
   spills; Triton's metadata the shared memory.

Exit 1 when a kernel fails to compile, spills or exceeds a limit. A target prints "SKIP sm_<cc>: <why>"
(``"skipped"`` in its JSON entry, exit 0) when the installed Triton lacks it or its private API
(``create_function_from_signature``, ``JITFunction._pack_args``) has moved. Runs from an installed
package or a PYTHONPATH copy of the checkout; it patches ``torch.cuda`` and Triton's launch entry
points, so run it as its own process (tests do: tests/preflight/test_aot_compile.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

# Per-block limits of the targets: opt-in shared memory per block (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability": 163 KB on 8.0, 227 KB on 9.0 and 10.0; the same
# bytes as torch/testing/_internal/inductor_utils.py's A100 / H100 checks, 166912 and 232448) and
# the register file a block can use (64 K 32-bit registers, all three).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
REGISTERS_PER_BLOCK = 64 * 1024
NAMES = ("BLOCK_K", "BLOCK_R", "BLOCK", "num_warps", "num_stages", "G_PAD", "NS_S_PAD", "NS_T_PAD", "TEACHER_PROBS",
         "WRITE_GRAD", "HAS_CENTER", "COL_SUM", "S_DTYPE", "C_DTYPE", "HAS_COPY", "M_FROM_PTR",
         "ALIGNED")  # what a row prints of a config


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.aot_compile", description=__doc__.splitlines()[0])
    p.add_argument("--cc", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT),
                   help="compute capabilities (90: H100 / H200; several compile the same launches for each)")
    p.add_argument("--sms", type=int, default=132, help="SM count the launchers size grids for (H100 SXM, H200: 132)")
    p.add_argument("--json", default=None, help="write every row here")
    p.add_argument("--quick", action="store_true", help="only what the vit_small_h200 preset runs (CI's set)")
    return p.parse_args(argv)


@dataclass
class Launch:
    """One recorded kernel launch: the @triton.jit function, its autotuner (or None), grid, arguments."""
    case: str
    kernel: Any
    tuner: Any
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


# ------------------------------------------------------------------ 1. capture
@contextlib.contextmanager
def recording(sms: int, launches: list[Launch], case: list[str]) -> Iterator[None]:
    """Fake CUDA tensors, a device with ``sms`` SMs, launches recorded into ``launches``."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup=False, **kwargs):
        launches.append(Launch(case[0], self, None, grid, args, kwargs))

    def tuned_run(self, *args, grid, warmup=False, **kwargs):
        launches.append(Launch(case[0], self.fn, self, grid, args, kwargs))

    real = JITFunction.run, Autotuner.run, torch.cuda.get_device_properties
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    torch.cuda.get_device_properties = lambda *_a, **_k: types.SimpleNamespace(multi_processor_count=sms)
    try:
        with FakeTensorMode(), torch.device("cuda"):
            yield
    finally:
        JITFunction.run, Autotuner.run, torch.cuda.get_device_properties = real


def capture(sms: int, quick: bool) -> list[Launch]:
    """Run every op's implementation: ``quick``, what the vit_small_h200 preset runs (B 64, V 12,
    K 65536, bf16 logits, fp32 master weights) and the no-grad loss; else also batch 256, 8 views,
    an odd K (no 16-divisibility), fp16 / fp32 logits, the in-place and Sinkhorn-Knopp calls."""
    import torch

    from dino_fast.kernels import dino_head_loss as hl, dino_loss as dl, ema, grad_scale as gs

    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    launches: list[Launch] = []
    case = [""]
    shapes = [(64, 12, 65536)] + ([] if quick else [(256, 12, 65536), (256, 8, 65536), (7, 5, 4099)])
    dtypes = [bf16] if quick else [bf16, f16, f32]
    with recording(sms, launches, case):
        for (b, v, k), dt in [(s, d) for s in shapes for d in dtypes]:
            s, t, c = torch.empty(v * b, k, dtype=dt), torch.empty(2 * b, k, dtype=dt), torch.empty(1, k)
            case[0] = f"loss B{b} V{v} K{k} {str(dt)[6:]}"
            dl._dino_loss_impl(s, t, c, 0.1, 0.04, v, 2, True, False, None, None)
            case[0] = f"fused head B{b} V{v} K{k} D256 {str(dt)[6:]}"  # chunked logits, gradient in place
            feats, w = torch.empty(v * b, 256, dtype=dt), torch.empty(k, 256, dtype=dt)
            hl._dino_head_loss_impl(feats, w, t, c, 0.1, 0.04, v, 2, hl._chunk_images(b, v, k), dt, True, True, None,
                                    None)
            if dt == bf16:  # the other calls of the fused loss (no-grad: the WRITE_GRAD=False variant)
                calls = [("no-grad", (s, t, c, 0.1, 0.04, v, 2, False, False))] + ([] if quick else [
                    ("in place", (s, t, c, 0.1, 0.04, v, 2, True, True)),
                    ("Sinkhorn-Knopp probabilities", (s, t.float(), None, 0.1, 1.0, v, 2, True, False))])
                for name, args in calls:
                    case[0] = f"loss {name} B{b} V{v} K{k} bf16"
                    dl._dino_loss_impl(*args, None, None)
        for dt in sorted({*dtypes, f32}, key=str):  # the backward's scale: logits' gradient, head weight's (fp32)
            case[0] = f"grad_scale {str(dt)[6:]}"
            gs._launch_scale(torch.empty(768 * 65536, dtype=dt), torch.empty(()))
        # EMA: student dtype x momentum tensor / number x alignment x the teacher's compute-dtype copy (the
        # preset: a bf16 copy; the momentum a tensor under cuda_graphs, a number in eager steps)
        for s_dt in [f32] if quick else [f32, bf16, f16]:
            for m_ptr in (torch.empty(1), None):
                for aligned in (True,) if quick else (True, False):
                    for c_dt in [bf16] if quick else [None, bf16, f16]:
                        case[0] = (f"ema student {str(s_dt)[6:]} m_ptr={m_ptr is not None} aligned={aligned} "
                                   f"copy={str(c_dt)[6:] if c_dt else None}")
                        # ViT-S + head: ~44 M params / 16384 per chunk
                        table = torch.empty(2700, 3 + (c_dt is not None), dtype=torch.int64)
                        ema._launch(ema.EMAPlan(None, table.device, [(s_dt, aligned, table)], c_dt), m_ptr, 0.996,
                                    ema.DEFAULT_BLOCK)
    return launches


# ------------------------------------------------------------------ 2. compile, 3. check
def variants(launch: Launch) -> list[dict]:
    """The compile variants a GPU run builds: every config the autotuner keeps, or the one given."""
    if launch.tuner is None:
        return [dict(launch.kwargs)]
    tuner = launch.tuner
    named = dict(zip(tuner.arg_names, launch.args))
    kept = tuner.early_config_prune(tuner.configs, named, **launch.kwargs) if tuner.early_config_prune else tuner.configs
    return [dict(launch.kwargs, **c.all_kwargs()) for c in kept]


def as_meta(x: Any) -> Any:
    """A fake tensor as a meta tensor of the same layout (the binder reads data_ptr: 0, 16-byte aligned)."""
    import torch

    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


def ptxas_stats(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"regs": int(regs.group(1)) if regs else None,
            **dict(zip(("stack", "spill_st", "spill_ld"), map(int, frame.groups()) if frame else (None,) * 3))}


class Compiler:
    """Triton's binder + compile for one target; each distinct specialization compiled once."""

    def __init__(self, cc: int) -> None:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        self.triton, self.ASTSource, self.cc = triton, ASTSource, cc
        self.target = GPUTarget("cuda", cc, 32)
        self.backend = make_backend(self.target)
        self.binder_for = create_function_from_signature
        self.seen: dict[str, dict] = {}

    def compile(self, kernel: Any, args: tuple, kwargs: dict) -> dict:
        from triton import knobs

        binder = self.binder_for(kernel.signature, kernel.params, self.backend)
        bound, spec, options = binder(*args, **kwargs)
        opts, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound, spec, options)
        key = repr((kernel.fn.__name__, signature, constexprs, attrs, sorted(opts.__dict__.items())))
        if key in self.seen:
            return dict(self.seen[key], dup=True)
        log, t0 = io.StringIO(), time.perf_counter()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log: its flags, its ptxas
            compiled = self.triton.compile(self.ASTSource(kernel, signature, constexprs, attrs), target=self.target,
                                           options=opts.__dict__)
        md = compiled.metadata
        row = {"shared_B": md.shared, "num_warps": md.num_warps, "compile_s": round(time.perf_counter() - t0, 2),
               "sig": ",".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr")}
        row.update(ptxas_stats(log.getvalue()))
        self.seen[key] = row
        return row


def problems(row: dict, cc: int) -> list[str]:
    """Why a compiled row would fail or slow down on the GPU (empty: fine)."""
    out = []
    if row.get("regs") is None:
        out.append("no ptxas register count")
    elif row["regs"] * 32 * row["num_warps"] > REGISTERS_PER_BLOCK:
        out.append(f"{row['regs']} registers x {32 * row['num_warps']} threads > {REGISTERS_PER_BLOCK}")
    if row.get("spill_st") or row.get("spill_ld"):
        out.append(f"spills {row['spill_st']} B stored / {row['spill_ld']} B loaded")
    if row["shared_B"] > SHARED_LIMIT[cc]:
        out.append(f"shared memory {row['shared_B']} B > {SHARED_LIMIT[cc]} B per block")
    return out


def why_skip(cc: int) -> str:
    """'' when this Triton can compile for sm_<cc> through the private API used here; else why not."""
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"Triton's private API has moved: {e}"
    if not hasattr(JITFunction, "_pack_args") or not hasattr(knobs.nvidia, "dump_ptxas_log"):
        return f"Triton {triton.__version__}: JITFunction._pack_args / knobs.nvidia.dump_ptxas_log missing"
    try:
        make_backend(GPUTarget("cuda", cc, 32))
    except Exception as e:  # noqa: BLE001 - no NVIDIA backend, or an unknown arch
        return f"Triton {triton.__version__} has no sm_{cc} target: {e}"
    return ""


def compile_all(launches: list[Launch], cc: int) -> dict:
    """Every launch x kept config compiled for sm_<cc>, one row each, with the counts of the report."""
    import triton

    result: dict[str, Any] = {"triton": triton.__version__, "cc": cc}
    skip = why_skip(cc)
    if skip:
        return dict(result, skipped=skip, rows=[], failing=0)
    compiler, rows = Compiler(cc), []
    for launch in launches:
        for kw in variants(launch):
            row = {"case": launch.case, "kernel": launch.kernel.fn.__name__, "grid": list(launch.grid),
                   "autotuned": launch.tuner is not None,
                   "cfg": {k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in kw.items() if k in NAMES}}
            try:
                row.update(compiler.compile(launch.kernel, tuple(map(as_meta, launch.args)), kw))
                row["problems"] = problems(row, cc)
            except Exception as e:  # noqa: BLE001 - a compile error is a finding, reported per row
                row["problems"] = [f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"]
            rows.append(row)
    distinct = [r for r in rows if not r.get("dup") and "regs" in r]
    return dict(result, rows=rows, compiles=len(distinct), failing=sum(bool(r["problems"]) for r in rows),
                compile_s=round(sum(r["compile_s"] for r in distinct), 1),
                max_regs=max((r["regs"] or 0 for r in distinct), default=0),
                max_shared_B=max((r["shared_B"] for r in distinct), default=0),
                spilling=sum(bool(r.get("spill_st") or r.get("spill_ld")) for r in rows))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Before any kernel module is imported: real @triton.jit functions (not the interpreter's), and a
    # fresh cache so that every specialization is compiled (and its ptxas log printed) here.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dino-fast-aot-")
    sys.dont_write_bytecode = True
    launches = capture(args.sms, args.quick)
    results = {}
    for cc in args.cc:
        res = results[f"sm_{cc}"] = dict(compile_all(launches, cc), sms=args.sms, quick=args.quick)
        if res.get("skipped"):
            print(f"SKIP sm_{cc}: {res['skipped']}")
            continue
        for row in res["rows"]:
            print(("BAD " if row["problems"] else "OK  ") + json.dumps(row), flush=True)
        print(f"triton {res['triton']}, sm_{cc}, {args.sms} SMs{' (quick set)' if args.quick else ''}: "
              f"{res['compiles']} distinct compiles ({len(res['rows'])} launch x config rows), {res['compile_s']} s "
              f"of compile; max {res['max_regs']} registers, max {res['max_shared_B']} B shared; {res['spilling']} "
              f"spilling, {res['failing']} failing\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["failing"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
