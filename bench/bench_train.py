"""End-to-end DINO training throughput: images/s, MFU and a per-phase breakdown of the step.

Runs the real ``Trainer.train_step`` (teacher forward, student forward, loss + center, backward,
clip, AdamW, teacher EMA) on one process, for two input modes:

  synthetic  views already on the GPU (bf16 on CUDA, like DALI's output): isolates the model
  loader     the trainer's own loader (DALI on CUDA when installed, else torchvision) over
             --data, or over the generated demo dataset (64-px JPEGs: far cheaper to decode
             than ImageNet's, so loader figures on demo data are an upper bound)

and these paths (config fields in brackets):

  reference    eager torch loss [loss_impl=torch], foreach EMA [ema_impl=foreach], sdpa attention
               (timm's default kernel) one backbone pass per resolution [packed_multicrop=false]
  fast         fused Triton loss, Triton EMA, xformers attention (sdpa if xformers cannot run),
               all crops packed into one backbone pass
  fast+compile fast with each model's forward compiled as one graph [compile=true]

all in bf16 autocast on CUDA (fp32 on CPU). ``--fsdp`` runs every path through the FSDP2 code
path on this one process (world size 1).

Breakdown (ms per step, CUDA events, or wall clock on CPU): data (GPU idle waiting for the next
batch), forward (teacher + student), loss (incl. center update), backward, optimizer (per-param
clip + AdamW), ema, other (schedules, bookkeeping). Measured in a separate pass from img/s so
the instrumentation (module hooks) cannot slow the throughput figure.

FLOPs per step (multiply-add = 2; bench/bench_model.py formula per view: patch embed
2 (N-1) 3 p^2 D + L (24 N D^2 + 4 N^2 D), N = 1 + (S/p)^2; head 2 (D h + h h + h b + b K)):
student 3 x forward (backward = 2 x forward) over all 2 + n_local views, teacher 1 x forward over
the 2 global views; loss, optimizer and EMA not counted. MFU = FLOPs / step time / --peak-tflops
(default: the datasheet peak of this GPU, bench.common.device_peaks).

    python bench/bench_train.py                       # GPU: ViT-S/16, 2x224 + 10x96, batch 64
    python bench/bench_train.py --data /imagenet/train --batch-size 128 --steps 50
    python bench/bench_train.py --out /tmp/r          # CPU: a tiny model, NOT GPU figures

--preset NAME: the preset as ``dino-fast train --config NAME`` runs it, variants (today's settings, the file
as it is, levers) interleaved in one process, with each phase's ops, FLOP rate: bench/train_preset.py.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if not torch.cuda.is_available():  # before any Triton kernel is defined: CPU runs the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.bench_model import vit_forward_flops  # noqa: E402
from bench.common import Results, device_peaks, oom_as_reason, peak_note  # noqa: E402
from bench.train_preset import outside_ops  # noqa: E402

PATHS = ("reference", "fast", "fast+compile")
MODES = ("synthetic", "loader")
PHASES = ("data", "forward", "loss", "backward", "optimizer", "ema", "other")


# --- FLOP counting -----------------------------------------------------------------------------
def step_flops(cfg: Any) -> int:
    """Counted FLOPs of one training step over the global batch (formula in the module doc)."""
    student, teacher = forward_flops(cfg)
    return 3 * student + teacher


def forward_flops(cfg: Any) -> tuple[int, int]:
    """Counted forward FLOPs of (the student over all views, the teacher over the globals) for the batch;
    the student's backward is twice its forward."""
    from dino_fast.models import ARCHS

    arch = ARCHS[cfg.arch]
    dim, depth, p = arch["embed_dim"], cfg.depth or arch["depth"], cfg.patch_size
    h, b, k = cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.out_dim
    head = 2 * (dim * h + h * h + h * b + b * k)

    def view(size: int) -> int:
        return vit_forward_flops(1 + (size // p) ** 2, dim, depth, p) + head

    student = 2 * view(cfg.global_crops_size) + cfg.local_crops_number * view(cfg.local_crops_size)
    teacher = 2 * view(cfg.global_crops_size)
    return cfg.batch_size_per_gpu * student, cfg.batch_size_per_gpu * teacher


# --- configs -----------------------------------------------------------------------------------
def path_overrides(path: str, cuda: bool) -> dict[str, Any]:
    if path == "reference":
        return dict(loss_impl="torch", ema_impl="foreach", attn_backend="sdpa", packed_multicrop=False,
                    compile=False)
    # auto: the fastest packed kernel that runs here (varlen > xformers > flex > sdpa runs), logged
    return dict(loss_impl="triton", ema_impl="triton", attn_backend="auto", packed_multicrop=True,
                compile=path == "fast+compile")


def build_config(args: argparse.Namespace, path: str, mode: str, data: Path, out: Path, batch: int) -> Any:
    from dino_fast.config import TrainConfig

    cuda = torch.cuda.is_available()
    base = dict(arch=args.arch, patch_size=args.patch_size, depth=args.depth or 0, out_dim=args.out_dim,
                head_hidden_dim=args.head_hidden_dim, head_bottleneck_dim=args.head_bottleneck_dim,
                global_crops_size=args.global_size, local_crops_size=args.local_size,
                local_crops_number=args.n_local, batch_size_per_gpu=batch,
                precision="bf16" if cuda else "fp32", freeze_last_layer=0,  # time the steady-state update
                data_path=str(data), output_dir=str(out), num_workers=args.num_workers, progress=False,
                data_backend="torchvision" if mode == "synthetic" else "auto",  # synthetic: loader never read
                fsdp=args.fsdp, epochs=100, seed=0)
    base.update(path_overrides(path, cuda))
    return TrainConfig.from_dict(base)


# --- timing ------------------------------------------------------------------------------------
class PhaseTimer:
    """Marks on the GPU timeline (CUDA events; wall clock on CPU). ``mark(phase)`` ends ``phase``;
    a phase lasts from the previous mark to its own. With ``counter`` (an OpCounter) each mark also
    notes the ops dispatched so far, so ``per_step_ops`` gives each phase's ops."""

    def __init__(self, cuda: bool, counter: Any = None) -> None:
        self.cuda, self.counter = cuda, counter
        self.marks: list[tuple[str, Any]] = []
        self.ops: list[int] = []

    def mark(self, phase: str) -> None:
        self.ops.append(self.counter.count if self.counter is not None else 0)
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((phase, ev))
        else:
            self.marks.append((phase, time.perf_counter()))

    def per_step_ops(self, steps: int) -> dict[str, float]:
        totals = dict.fromkeys(PHASES, 0)
        for (phase, _), n0, n1 in zip(self.marks[1:], self.ops, self.ops[1:]):
            totals[phase] += n1 - n0
        return {p: v / steps for p, v in totals.items()}

    def per_step_ms(self, steps: int) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        totals = dict.fromkeys(PHASES, 0.0)
        for (_, t0), (phase, t1) in zip(self.marks, self.marks[1:]):
            totals[phase] += t0.elapsed_time(t1) if self.cuda else (t1 - t0) * 1e3
        return {f"{p}_ms": v / steps for p, v in totals.items()}


@contextlib.contextmanager
def instrumented(trainer: Any, timer: PhaseTimer) -> Iterator[None]:
    """Phase marks inside ``Trainer.train_step`` without copying it: module hooks for the forwards
    and the loss, wrappers around the clip (start of the optimizer phase) and the EMA step."""
    import dino_fast.train as train_mod

    real_clip, real_ema = train_mod.clip_gradients_, trainer.ema.step

    def clip(*a: Any, **kw: Any) -> Any:
        timer.mark("backward")
        return real_clip(*a, **kw)

    def ema(*a: Any, **kw: Any) -> Any:
        timer.mark("optimizer")
        real_ema(*a, **kw)
        timer.mark("ema")

    handles = [trainer.teacher.register_forward_pre_hook(lambda *_: timer.mark("other")),
               trainer.student.register_forward_hook(lambda *_: timer.mark("forward")),
               trainer.objective.dino_loss.register_forward_hook(lambda *_: timer.mark("loss"))]
    train_mod.clip_gradients_, trainer.ema.step = clip, ema
    try:
        yield
    finally:
        train_mod.clip_gradients_ = real_clip
        del trainer.ema.step  # back to the class method
        for h in handles:
            h.remove()


def batches(trainer: Any, mode: str, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """Endless views: one fixed synthetic batch (in the run's compute dtype, as DALI delivers), or
    the trainer's loader epoch after epoch."""
    if mode == "synthetic":
        g = torch.Generator(device=device).manual_seed(0)
        cfg = trainer.cfg
        sizes = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
        batch = cfg.batch_size_per_gpu
        views = [torch.randn(batch, 3, s, s, device=device, dtype=trainer.compute_dtype, generator=g) for s in sizes]
        while True:
            yield views
    epoch = 0
    while True:
        yield from trainer.data.epoch(epoch)
        epoch += 1


def run_steps(trainer: Any, it: Iterator[list[torch.Tensor]], n: int, timer: PhaseTimer | None = None) -> float:
    """``n`` train steps; returns wall seconds (synchronized at both ends)."""
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if timer is not None:
        timer.mark("other")
    for _ in range(n):
        views = next(it)
        if timer is not None:
            timer.mark("data")
        trainer.train_step(views)
        if timer is not None:
            timer.mark("other")
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def phase_pass(trainer: Any, it: Iterator[list[torch.Tensor]], n: int, counter: Any = None) -> PhaseTimer:
    """``n`` instrumented steps (phase marks; with ``counter``, an active OpCounter, the ops of each phase)."""
    timer = PhaseTimer(trainer.device.type == "cuda", counter)
    with instrumented(trainer, timer), (counter if counter is not None else contextlib.nullcontext()):
        run_steps(trainer, it, n, timer)
    return timer


def profile_steps(trainer: Any, it: Iterator[list[torch.Tensor]], n: int, top: int = 15,
                  summary: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """torch.profiler over ``n`` steps: the ``top`` kernels (CUDA) or ops (CPU) by self time; ``summary``
    gets the top-level ops per step and the ms per step outside them (Python, autograd, hooks)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        secs = run_steps(trainer, it, n)
    if summary is not None:
        summary["profiled_ops"], summary["outside_ops_ms"] = outside_ops(prof, n, secs)
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events.sort(key=key, reverse=True)
    total = sum(key(e) for e in events) or 1.0
    return [{"kernel": e.key[:90], "calls_per_step": e.count / n, "ms_per_step": key(e) / n / 1e3,
             "pct": 100.0 * key(e) / total} for e in events[:top]]


def bench_one(args: argparse.Namespace, path: str, mode: str, data: Path, device: torch.device,
              batch: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from dino_fast.train import Trainer

    row: dict[str, Any] = {"mode": mode, "path": path, "batch": batch}
    prof: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(args, path, mode, data, Path(out), batch)
        trainer = Trainer(cfg, device=device)
        row["attn"] = trainer.describe()[1].removeprefix("attention: ") + (
            " packed" if cfg.packed_multicrop else " per-res")
        it = batches(trainer, mode, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run_steps(trainer, it, args.warmup)
        secs = run_steps(trainer, it, args.steps)
        step_s = secs / args.steps
        flops = step_flops(cfg)
        row.update(img_s=batch / step_s, step_ms=step_s * 1e3, tflops=flops / step_s / 1e12,
                   mfu=flops / step_s / 1e12 / args.peak_tflops if args.peak_tflops else None,
                   peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None)
        timer = PhaseTimer(device.type == "cuda")
        with instrumented(trainer, timer):
            run_steps(trainer, it, args.steps, timer)
        row.update(timer.per_step_ms(args.steps))
        if args.profile:
            prof = [{"mode": mode, "path": path, "batch": batch, **r} for r in profile_steps(trainer, it, args.profile)]
        del trainer, it
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row, prof


def bench_preset(args: argparse.Namespace, data: Path, device: torch.device) -> None:
    """--preset: the preset's variants in interleaved rounds, then, per variant, its phases, ops, tiny-batch
    phases and top ops (bench/train_preset.py)."""
    from dino_fast.models import arch_family
    from dino_fast.train import Trainer
    from bench.train_preset import (OpCounter, apply_run_keys, cpu_seconds, interleaved, load_average, model_gemm,
                                    parse_variant, phase_rows, preset_config, preset_results, settle, threads,
                                    timing_row)

    results, phases, profile = preset_results(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        def build(mode: str, name: str, over: dict[str, Any], batch: int = 0) -> dict[str, Any]:
            cfg = preset_config(args.preset, over, str(data), str(Path(tmp) / f"{mode}-{name}-{batch}"), batch)
            trainer = Trainer(cfg, device=device)
            apply_run_keys(trainer, over)
            run, t0 = dict(trainer=trainer, it=batches(trainer, mode, device), over=over), time.perf_counter()
            with threads(over.get("threads")):
                run_steps(trainer, run["it"], args.warmup)
            return {**run, "warmup_s": time.perf_counter() - t0}

        def timed(run: dict[str, Any]) -> tuple[float, float, float | None]:
            settle()  # the loader threads of the variant before have filled their queues
            with threads(run["over"].get("threads")):
                run_steps(run["trainer"], run["it"], 1)  # untimed: the switch from the variant before costs here
                c0, wall = cpu_seconds(), run_steps(run["trainer"], run["it"], args.steps)
                return wall / args.steps, (cpu_seconds() - c0) / args.steps, load_average()

        variants = [parse_variant(v) for v in args.variants]  # a misspelt name stops here, before any build
        runs = {(mode, name): build(mode, name, over) for mode in args.modes for name, over in variants}
        times = interleaved({key: (lambda r=run: timed(r)) for key, run in runs.items()}, args.rounds)
        for (mode, name), run in runs.items():
            trainer, it, over, cfg = run["trainer"], run["it"], run["over"], run["trainer"].cfg
            fwd = forward_flops(cfg) if arch_family(cfg.arch) == "vit" else (0, 0)
            row = timing_row(mode, name, over, trainer, times[(mode, name)], run["warmup_s"], fwd)
            with threads(over.get("threads")):
                settle()
                timer, ops, small = phase_pass(trainer, it, args.steps), None, None
                if not cfg.compile:  # a dispatch mode under a compiled graph would time something else
                    ops = phase_pass(trainer, it, 1, OpCounter()).per_step_ops(1)
                    row["ops"] = sum(ops.values())
                if args.overhead_batch and mode == "synthetic" and not cfg.compile:
                    tiny = build(mode, name, over, args.overhead_batch)
                    small = phase_pass(tiny["trainer"], tiny["it"], args.steps).per_step_ms(args.steps)
                    row["step_ms_small_batch"] = sum(small.values())
                    tiny["it"].close()
                gemm = model_gemm(trainer)
                if profile is not None:
                    summary: dict[str, Any] = {}
                    top = profile_steps(trainer, it, args.profile, top=25, summary=summary)
                    profile.add(*[{"mode": mode, "variant": name, **r} for r in top])
                    row.update(summary)
            results.add(row)
            phases.add(*phase_rows({"mode": mode, "variant": name}, timer.per_step_ms(args.steps), ops, small, fwd,
                                   gemm))
        for run in runs.values():
            run["it"].close()  # stops the loader's feeder thread
    for r in filter(None, (results, phases, profile)):
        r.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS) if cuda else ["reference", "fast"],
                   help="fast+compile is not run by default on CPU (compiling there takes minutes)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--data", default="", help="ImageFolder root for the loader mode (default: demo dataset)")
    p.add_argument("--arch", default="vit_small" if cuda else "vit_tiny")
    p.add_argument("--patch-size", type=int, default=16 if cuda else 8)
    p.add_argument("--depth", type=int, default=None if cuda else 2, help="override depth (CPU default 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64] if cuda else [4],
                   help="images per step, one row each (e.g. 64 128 256: the best batch that fits)")
    p.add_argument("--global-size", type=int, default=224 if cuda else 32)
    p.add_argument("--local-size", type=int, default=96 if cuda else 16)
    p.add_argument("--n-local", type=int, default=10 if cuda else 2)
    p.add_argument("--out-dim", type=int, default=65536 if cuda else 1024)
    p.add_argument("--head-hidden-dim", type=int, default=2048 if cuda else 256)
    p.add_argument("--head-bottleneck-dim", type=int, default=256 if cuda else 64)
    p.add_argument("--num-workers", type=int, default=8 if cuda else 0, help="loader workers (DALI threads)")
    p.add_argument("--fsdp", action="store_true", help="run the FSDP2 code path (one rank)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, compile included (default: GPU 10, CPU 1, "
                   "--preset 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per pass (GPU 20, CPU 2, --preset 5)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for MFU (default: bench.common.device_peaks of this GPU; "
                        "H100 SXM / H200 989)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also run torch.profiler over N steps per row and write the top kernels (train_profile)")
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads on CPU (1; --preset: torch's own)")
    p.add_argument("--preset", default="", help="time this preset as dino-fast train runs it, variant by variant "
                   "(bench/train_preset.py): e.g. tiny_imagenet_sk --data ../shared/data/tiny-imagenet-10/train")
    p.add_argument("--variants", nargs="+", default=["before", "after"],
                   help="--preset: names in bench/train_preset.py VARIANTS, or name:key=value,...")
    p.add_argument("--rounds", type=int, default=3, help="--preset: interleaved rounds of --steps steps per variant")
    p.add_argument("--overhead-batch", type=int, default=2, help="--preset: also time each variant at this batch")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args(argv)
    args.warmup = (3 if args.preset else 10 if cuda else 1) if args.warmup is None else args.warmup
    args.steps = (5 if args.preset else 20 if cuda else 2) if args.steps is None else args.steps
    return args


def add_x_ref(rows: list[dict[str, Any]]) -> None:
    """Speed-up of each row over the reference path of the same mode and batch (measured in this run:
    the one same-card baseline on any GPU)."""
    for row in rows:
        ref = next((r for r in rows if r["mode"] == row["mode"] and r["batch"] == row["batch"]
                    and r["path"] == "reference" and "img_s" in r), None)
        if ref is not None and "img_s" in row:
            row["x_ref"] = row["img_s"] / ref["img_s"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    given_peak = args.peak_tflops is not None
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = (device_peaks() or (None, None))[1]
    if device.type == "cpu" and (args.cpu_threads or not args.preset):
        torch.set_num_threads(args.cpu_threads or 1)
    args.cpu_threads = torch.get_num_threads()
    data = Path(args.data) if args.data else None
    if data is None:
        from dino_fast.data.demo import make_demo_dataset

        data = make_demo_dataset() / "train"
    if args.preset:
        return bench_preset(args, data, device)
    shape = (f"{args.arch}/{args.patch_size}" + (f" depth {args.depth}" if args.depth else "") +
             f", 2x{args.global_size} + {args.n_local}x{args.local_size} px views, out_dim {args.out_dim}, "
             f"head {args.head_hidden_dim}/{args.head_bottleneck_dim}")
    precision = "bf16 autocast" if device.type == "cuda" else f"fp32 (CPU, {args.cpu_threads} thread(s))"
    source = f"--data {args.data}" if args.data else "demo dataset (64-px JPEGs)"
    notes = (f"one process{' (FSDP2 path, 1 rank)' if args.fsdp else ''}; {shape}; {precision}; "
             f"{args.warmup} warm-up + {args.steps} timed steps; loader data: {source}; tflops = counted FLOPs "
             f"(student 3x fwd all views + teacher fwd globals, formula in bench/bench_train.py) / step time; "
             f"mfu against {peak_note(args.peak_tflops, 'bf16 dense TFLOP/s', given_peak)}; "
             "phase ms from a second, instrumented pass")
    if device.type == "cpu":
        notes += "; CPU: the fast path runs its Triton kernels in the interpreter, so its times mean nothing"
    columns = ["mode", "path", "attn", "batch", "img_s", "x_ref", "step_ms", "tflops", "mfu", "peak_gib",
               *[f"{p}_ms" for p in PHASES], "reason"]
    # each row on disk as soon as it is measured: a run stopped at its cap keeps the paths it finished
    results = Results("train", columns, notes, out_dir=args.out, derive=add_x_ref)
    profile = Results("train_profile", ["mode", "path", "batch", "kernel", "calls_per_step", "ms_per_step", "pct"],
                      notes=f"torch.profiler over {args.profile} steps per row (after the timed passes); self time "
                            f"per kernel ({'CUDA' if device.type == 'cuda' else 'CPU ops'}), top 15 per row",
                      out_dir=args.out) if args.profile else None
    for mode in args.modes:
        for path in args.paths:
            for batch in args.batch_sizes:
                row: dict[str, Any] = {"mode": mode, "path": path, "batch": batch}
                with oom_as_reason(row):
                    measured, top = bench_one(args, path, mode, data, device, batch)
                    row.update(measured)
                    if profile is not None and top:
                        profile.add(*top)
                results.add(row)
    results.close()
    if profile is not None:
        profile.close()


if __name__ == "__main__":
    main()
