"""bench_train's preset mode (``--preset tiny_imagenet_sk``): a preset's training step as ``dino-fast
train`` runs it, today's settings against the file as it is, and what the step is made of.

A variant is a set of config overrides on top of the preset file, plus run keys that are not
config: ``threads`` (torch's intra-op threads during its steps) and ``prefetch`` (the DALI loader's
``prefetch_batches``: 0 runs the loader inline, between steps, instead of in its feeder thread). The
variants are timed in interleaved rounds in one process (A B A B ...), so a shared machine's load
falls on all of them alike; each row is the median of its rounds.
What the step is made of, per phase (data, forward, loss, backward, optimizer, ema, other):
milliseconds, dispatched aten ops (:class:`OpCounter`, below autograd, in a pass of its own),
counted FLOPs and their rate against the measured GEMM rate of this machine at the model's own
shape (:func:`gemm_gflops`: what a compute-bound phase approaches), and the same phase at a tiny
batch (``--overhead-batch``: what does not shrink with the batch is per-step overhead). A
torch.profiler pass gives the top ops and the time outside any op (:func:`outside_ops`: Python,
autograd's own work, hooks).
"""
from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import Results, time_fn

__all__ = ["VARIANTS", "RUN_KEYS", "COLUMNS", "PHASE_COLUMNS", "parse_variant", "flags_of", "apply_run_keys",
           "preset_config", "preset_notes", "preset_results", "OpCounter", "gemm_gflops", "model_gemm", "outside_ops",
           "timing_row", "add_x_before", "phase_rows", "interleaved", "median", "cpu_seconds", "settle",
           "load_average", "threads"]

# "before" pins what tiny_imagenet_sk ran at the start of 2026-12-06 (precision auto was fp32 on every
# CPU and attention auto was sdpa; no compile; 2 loader threads; AdamW foreach), so it stays the baseline when the file
# or the defaults change. "after" is the file and the defaults as they are now. The others are levers.
VARIANTS: dict[str, dict[str, Any]] = {
    "before": dict(precision="fp32", attn_backend="sdpa", compile=False, num_workers=2, adamw="foreach"),
    "after": {},
    "fp32": dict(precision="fp32"),
    "bf16": dict(precision="bf16"),
    "bf16_sdpa": dict(precision="bf16", attn_backend="sdpa"),
    "bf16_math": dict(precision="bf16", attn_backend="math"),
    "compile": dict(compile=True),
    "threads1": dict(threads=1),
    "workers1": dict(num_workers=1),
    "inline_loader": dict(prefetch=0),
    "adamw_foreach": dict(adamw="foreach"),
}
# Keys the bench applies itself (not TrainConfig flags), with the type of their value.
RUN_KEYS: dict[str, type] = {"threads": int, "prefetch": int, "adamw": str}

COLUMNS = ["mode", "variant", "flags", "threads", "dtype", "batch", "img_s", "x_before", "step_ms", "step_ms_min",
           "cpu_ms", "gflop_s", "ops", "profiled_ops", "outside_ops_ms", "step_ms_small_batch", "warmup_s", "load"]
PHASE_COLUMNS = ["mode", "variant", "phase", "ms", "ops", "ms_small_batch", "gflop", "gflop_s", "pct_of_gemm",
                 "gemm_gflop_s"]


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``before`` (a name in VARIANTS) or ``name:key=value,key=value`` (config keys and RUN_KEYS)."""
    name, sep, body = spec.partition(":")
    if not sep:
        if spec not in VARIANTS:
            raise SystemExit(f"unknown variant {spec!r}: one of {', '.join(VARIANTS)} or name:key=value,...")
        return spec, dict(VARIANTS[spec])
    over: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"variant {spec!r}: {item!r} is not key=value")
        key = key.strip()
        over[key] = RUN_KEYS.get(key, str)(value.strip())
    return name, over


def flags_of(over: dict[str, Any]) -> str:
    """The overrides as ``dino-fast train`` flags; run keys (not flags) in brackets."""
    flags = [f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in over.items() if k not in RUN_KEYS]
    flags += [f"[{k} {v}]" for k, v in over.items() if k in RUN_KEYS]
    return " ".join(flags) or "(the preset as it is)"


def apply_run_keys(trainer: Any, over: dict[str, Any]) -> None:
    """The variant's ``prefetch`` on the trainer's DALI loader (read when its next epoch starts) and its
    ``adamw`` implementation (``fused``, the trainer's, or ``foreach``, the CPU default before 2026-12-06
    evening: the same math, read by AdamW from each group at every step)."""
    if "prefetch" in over and hasattr(trainer.data.loader, "prefetch_batches"):
        trainer.data.loader.prefetch_batches = over["prefetch"]
    if "adamw" in over:
        if over["adamw"] not in ("fused", "foreach"):
            raise ValueError(f"adamw={over['adamw']!r}: use fused or foreach")
        for group in trainer.optimizer.param_groups:
            group.update(fused=over["adamw"] == "fused", foreach=over["adamw"] == "foreach")


def preset_config(preset: str, over: dict[str, Any], data: str, out: str, batch: int = 0) -> Any:
    """The preset's TrainConfig with a variant's overrides, on ``data``, writing to ``out``; ``batch``
    (when not 0) replaces the preset's. The head's last layer is not frozen: the steady-state update."""
    from dino_fast.config import load_config

    keys = {k: v for k, v in over.items() if k not in RUN_KEYS}
    return load_config(preset, {"data_path": data, "output_dir": out, "progress": False, "seed": 0,
                                "freeze_last_layer": 0, **({"batch_size_per_gpu": batch} if batch else {}), **keys})


def preset_notes(args: Any, device: torch.device) -> str:
    """The notes of the preset mode's results: the machine, the protocol, what each column means."""
    caps = getattr(torch.cpu, "get_capabilities", dict)() if device.type == "cpu" else {}
    machine = (f"{caps.get('cpu_name', 'CPU')}, {caps.get('num_physical_cores', os.cpu_count())} cores, AMX-BF16 "
               f"{'yes' if caps.get('amx_bf16') else 'no'}" if caps else str(device))
    return (f"preset {args.preset} as `dino-fast train --config {args.preset}` runs it plus each variant's flags; "
            f"{machine}; torch threads {torch.get_num_threads()} unless the variant says; {args.warmup} warm-up "
            f"steps (warmup_s, compile included), then {args.rounds} interleaved rounds of {args.steps} steps per "
            f"variant (each block after the process is idle and one untimed step), medians and step_ms_min; "
            f"cpu_ms = process CPU time per step (all threads); load = 1-min load average of the machine during the "
            f"rounds (this process counts ~threads); x_before = img/s over the 'before' row of the same mode; "
            f"ops = aten ops dispatched per step (counted in a pass of its own; not under compile); "
            f"outside_ops_ms = profiled step time outside any top-level op (Python, autograd, hooks, profiler); "
            f"step_ms_small_batch = the same variant at batch {args.overhead_batch} (overhead that does not shrink "
            f"with the batch)")


def preset_results(args: Any, device: torch.device) -> tuple[Results, Results, Results | None]:
    """The preset mode's three result files: ``train_<preset>`` (a row per mode and variant),
    ``train_<preset>_phases`` (a row per phase) and, with --profile, ``train_<preset>_profile`` (top ops)."""
    notes, stem = preset_notes(args, device), f"train_{args.preset}"
    results = Results(stem, COLUMNS, notes, out_dir=args.out, derive=add_x_before)
    phases = Results(f"{stem}_phases", PHASE_COLUMNS, notes + "; per phase: ms, ops, the same phase at the tiny "
                     "batch, counted GFLOP and their rate against the measured GEMM rate at the model's fc1 shape "
                     "(gemm_gflop_s, this dtype and thread count)", out_dir=args.out)
    profile = Results(f"{stem}_profile", ["mode", "variant", "kernel", "calls_per_step", "ms_per_step", "pct"],
                      notes=f"torch.profiler over {args.profile} steps per variant; self CPU time per op, top 25",
                      out_dir=args.out) if args.profile else None
    return results, phases, profile


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (forward, the backward that autograd runs, the
    optimizer), ``count`` so far. Its Python callback slows each op: count in a pass of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> float:
    """Measured GFLOP/s of one (m, k) @ (k, n) matmul in ``dtype`` (2 m k n FLOPs per call), at the
    threads in force: the rate the step's compute-bound phases approach."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    ms = time_fn(lambda: a @ b, warmup=10, rep=60)
    return 2 * m * k * n / ms / 1e6


def model_gemm(trainer: Any) -> float:
    """:func:`gemm_gflops` at the ViT's first MLP linear over the global views, (B (1 + (S/p)^2), D) @ (D, 4D),
    in the run's compute dtype (0.0 for other archs)."""
    cfg, dim = trainer.cfg, getattr(trainer.student.backbone, "embed_dim", 0)
    if not dim or not hasattr(trainer.student.backbone, "patch_embed"):
        return 0.0
    tokens = cfg.batch_size_per_gpu * (1 + (cfg.global_crops_size // cfg.patch_size) ** 2)
    return gemm_gflops(tokens, dim, 4 * dim, trainer.compute_dtype, trainer.device)


def outside_ops(prof: Any, steps: int, wall_s: float) -> tuple[float, float]:
    """(top-level aten ops per step, ms per step outside them) of a torch.profiler trace of ``steps``
    steps that took ``wall_s``: an op is top-level when no aten op encloses it (called from Python
    or from autograd); the time outside every top-level op is Python, autograd's own work, hooks
    and the profiler's overhead."""
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    inside_ms = sum(e.cpu_time_total for e in top) / 1e3
    return len(top) / steps, (wall_s * 1e3 - inside_ms) / steps


def timing_row(mode: str, name: str, over: dict[str, Any], trainer: Any, times: list[tuple], warmup_s: float,
               fwd: tuple[int, int]) -> dict[str, Any]:
    """A variant's row from its rounds' (wall s, CPU s, load) per step; ``fwd`` = forward_flops (0s: not counted)."""
    cfg = trainer.cfg
    step_s = median([t[0] for t in times])
    loads = [t[2] for t in times if t[2] is not None]
    return dict(mode=mode, variant=name, flags=flags_of(over), threads=over.get("threads") or torch.get_num_threads(),
                dtype=str(trainer.compute_dtype).removeprefix("torch."), batch=cfg.batch_size_per_gpu,
                img_s=cfg.batch_size_per_gpu / step_s, step_ms=step_s * 1e3, step_ms_min=min(t[0] for t in times) * 1e3,
                cpu_ms=median([t[1] for t in times]) * 1e3, gflop_s=(3 * fwd[0] + fwd[1]) / step_s / 1e9 or None,
                warmup_s=warmup_s, load=sum(loads) / len(loads) if loads else None)


def add_x_before(rows: list[dict[str, Any]]) -> None:
    """img/s of each row over the 'before' row of the same mode (measured in the same rounds)."""
    for row in rows:
        ref = next((r for r in rows if r["mode"] == row["mode"] and r["variant"] == "before"), None)
        if ref is not None and "img_s" in row:
            row["x_before"] = row["img_s"] / ref["img_s"]


def phase_rows(base: dict[str, Any], phase_ms: dict[str, float], ops: dict[str, float] | None,
               small_ms: dict[str, float] | None, fwd: tuple[int, int], gemm: float) -> list[dict[str, Any]]:
    """One row per phase: ms, ops, the same phase at the tiny batch, counted GFLOP (forward: student
    over all views + teacher over the globals; backward: twice the student's forward) and their
    rate as a % of ``gemm`` (the measured GEMM rate)."""
    student, teacher = fwd
    flops = {"forward": student + teacher, "backward": 2 * student}
    rows = []
    for phase, ms in phase_ms.items():
        name = phase.removesuffix("_ms")
        gflop = flops.get(name, 0) / 1e9
        rate = gflop / ms * 1e3 if gflop and ms > 0 else None
        rows.append({**base, "phase": name, "ms": ms, "ops": ops.get(name) if ops else None,
                     "ms_small_batch": small_ms.get(phase) if small_ms else None, "gflop": gflop or None,
                     "gflop_s": rate, "pct_of_gemm": 100 * rate / gemm if rate and gemm else None,
                     "gemm_gflop_s": gemm or None})
    return rows


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Call each ``fn`` once per round, in turn (A B C A B C ...); each returns its times. A machine
    that slows down or speeds up meanwhile moves every variant's medians alike."""
    out: dict[str, list[Any]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def median(xs: list[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(xs) if xs else float("nan")


def cpu_seconds() -> float:
    """CPU seconds this process has used (all threads: compute, loader, DALI)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def settle(max_s: float = 5.0, window_s: float = 0.05) -> None:
    """Wait until this process is idle (under 10 % of a core over ``window_s``), at most ``max_s``: the
    loader of the variant timed before keeps filling its queues in its own threads for a while, and
    that work must not land in the next variant's time."""
    end = time.monotonic() + max_s
    while time.monotonic() < end:
        c0 = cpu_seconds()
        time.sleep(window_s)
        if cpu_seconds() - c0 < 0.1 * window_s:
            return


def load_average() -> float | None:
    """The machine's 1-minute load average (other work sharing the cores), None where unknown."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the duration (None: left as they are)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)
