"""Pre-flight proxies of GPU cost, counted on a machine without a GPU (no time is measured).

The real ``Trainer`` (its own ``__init__`` and ``train_step``) runs on FakeTensorMode tensors on a
fake ``cuda`` device (tests/preflight/fake_cuda.py): full-size shapes cost nothing and the ops are
the CUDA path's (bf16 autocast, varlen attention, the custom ops). For the ``vit_small_h200``
preset's shapes it counts: (1) ops dispatched per eager step by phase, marked from outside (module
hooks, wrappers around ``clip_gradients_``, ``ema.step``, ``Tensor.backward``, the optimizer's step
hooks), and the ones that would launch a kernel; (2) Dynamo graphs, recompiles and graph breaks
per model under ``compile: true``; (3) activation bytes the student forward saves for backward,
per image; (4) FLOPs and bytes per phase as a roofline time on H100 / H200 datasheet peaks, and
launches x an ASSUMED host time per launch. ``NOTES`` below says what each column is and is not.

    python3 -m bench.preflight                              # this checkout, paths torch and fast
    python3 -m bench.preflight --repo ../baseline --paths torch  # another checkout (no custom ops)
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Results, device_peaks  # noqa: E402
from tests.preflight.fake_cuda import StepRecorder, fake_cuda, to_fake_cuda_  # noqa: E402

PHASES = ("teacher_fwd", "student_fwd", "loss", "backward", "clip", "optimizer", "ema", "other")
PATHS = {"torch": dict(loss_impl="torch", ema_impl="foreach"),  # like for like with code before custom ops
         "fast": dict(loss_impl="auto", ema_impl="auto")}       # the preset's: fused loss, Triton EMA
GPUS = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}  # names device_peaks knows (SXM)
SECONDS = [f"{g}_s" for g in GPUS]  # roofline seconds per GPU, summed per phase
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
             "lift_fresh", "_unsafe_view", "set_", "resize_"}  # move no data, launch nothing (+ views: schema)


def use_repo(repo: str | None) -> Path:
    """Import ``dino_fast`` from ``repo`` (first on sys.path); the folder it came from."""
    if repo:
        if "dino_fast" in sys.modules:
            raise SystemExit("bench.preflight --repo: dino_fast was imported before the repository path was set")
        sys.path.insert(0, str(Path(repo).resolve()))
    import dino_fast

    root = Path(dino_fast.__file__).resolve().parent.parent
    if repo and root != Path(repo).resolve():
        raise SystemExit(f"bench.preflight --repo {repo}: dino_fast came from {root} (is {repo} a checkout?)")
    return root


def make_config(preset: str | None = "vit_small_h200", **overrides: Any) -> Any:
    """The preset with ``overrides``, its step eager (no CUDA graphs, where the code has them) and steady
    (the last layer not frozen)."""
    from dino_fast.config import TrainConfig, load_config

    fixed = dict(freeze_last_layer=0, output_dir="/nonexistent/preflight", data_path="/nonexistent/preflight",
                 **({"cuda_graphs": False} if "cuda_graphs" in TrainConfig.__dataclass_fields__ else {}))
    return load_config(preset, {**fixed, **overrides})


def fake_views(trainer: Any, batch: int | None = None) -> list[torch.Tensor]:
    """The step's views on the fake device, in the run's compute dtype (as DALI delivers them)."""
    cfg, dtype = trainer.cfg, getattr(trainer, "compute_dtype", None) or trainer.dtype  # (older name)
    sizes = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
    return [torch.empty(batch or cfg.batch_size_per_gpu, 3, s, s, device="cuda", dtype=dtype) for s in sizes]


@contextlib.contextmanager
def _patched(obj: Any, **attrs: Any) -> Iterator[None]:
    """``obj``'s attributes replaced for the block (ones ``obj`` does not have are skipped)."""
    saved = {k: getattr(obj, k) for k in attrs if hasattr(obj, k)}
    try:
        for k in saved:
            setattr(obj, k, attrs[k])
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def fake_trainer(cfg: Any) -> Any:
    """``Trainer(cfg)`` on the fake device (call inside ``fake_cuda()``): its own ``__init__``, with the
    loader, output folder and checkpointer stubbed and the models built on "meta" then swapped to
    fake CUDA tensors (a fake tensor cannot be moved by ``Module.to``)."""
    import dino_fast.train as train_mod
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    real_build = train_mod.build_models
    data = types.SimpleNamespace(num_batches=1000, identity=dict)  # all the trainer asks of its loader when built

    def build_models(cfg: Any, device: torch.device, *a: Any, **kw: Any) -> tuple[Any, Any]:
        with unset_fake_temporarily(), torch.device("meta"):
            student, teacher = real_build(cfg, torch.device("meta"), *a, **kw)
        return to_fake_cuda_(student), to_fake_cuda_(teacher)

    with _patched(train_mod, build_models=build_models, build_train_data=lambda *a, **k: data,
                  check_output_dir=lambda p: Path(p), Checkpointer=lambda *a, **k: None):
        return train_mod.Trainer(cfg, device=torch.device("cuda", 0))


@contextlib.contextmanager
def device_caches() -> Iterator[None]:
    """The caches a real device keeps and the fake one skips (they never keep a fake tensor): the
    position embedding's resize matrices, built once per shape on a GPU, so not counted per step."""
    import dino_fast.models as models

    pos_embed = getattr(models, "pos_embed", None)
    real = getattr(pos_embed, "resize_matrix", None)
    memo: dict[tuple[Any, ...], torch.Tensor] = {}

    def resize_matrix(n_in: int, n_out: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
        key = (n_in, n_out, str(device), dtype)
        return memo[key] if key in memo else memo.setdefault(key, real(n_in, n_out, device, dtype))

    with _patched(pos_embed, resize_matrix=resize_matrix) if real is not None else contextlib.nullcontext():
        yield


# --- counting ------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel addresses in ``t``: its distinct elements (an expanded tensor reads its source once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


class OpCounter(TorchDispatchMode):
    """Per phase: ops dispatched, launches, FLOPs, bytes and the roofline seconds per GPU in ``peaks``."""

    def __init__(self, peaks: dict[str, tuple[float, float]], seqlens: list[int] | None = None) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.flop_registry, self.peaks, self.seqlens = flop_registry, peaks, seqlens or []
        self.phase = "other"
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.matmul_flops: dict[str, float] = defaultdict(float)  # by output dtype
        self.attn_ops: set[str] = set()
        self.attn_bound = 0  # varlen calls whose lengths were not found: torch's max-length bound counted

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim":  # prim.device & co: metadata queries of a fake tensor, not ops
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        s = self.stats[self.phase]
        s["ops"] += 1
        name = func.overloadpacket.__name__
        if "attn" in name or "attention" in name:
            self.attn_ops.add(name)
        if name in NO_KERNEL or func.is_view or all(t.device.type == "cpu" for t in ins + outs):
            return out  # views and allocations move nothing; host ops launch nothing
        written = {id(t): t for t in outs}
        for a, v in zip(func._schema.arguments, args):  # in-place / out= arguments are written too
            if a.alias_info is not None and a.alias_info.is_write:
                written.update((id(t), t) for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor))
        nbytes = sum(_nbytes(t) for t in {id(t): t for t in ins}.values()) + sum(map(_nbytes, written.values()))
        flops = self._flops(func, args, kwargs, out)
        if flops and outs:
            self.matmul_flops[str(outs[0].dtype).removeprefix("torch.")] += flops
        s["launches"] += 1
        s["flops"] += flops
        s["bytes"] += nbytes
        for gpu, (gbps, tflops) in self.peaks.items():
            s[f"{gpu}_s"] += max(flops / (tflops * 1e12), nbytes / (gbps * 1e9))
        return out

    def _flops(self, func, args, kwargs, out) -> int:  # noqa: ANN001
        count = self.flop_registry.get(func.overloadpacket)
        if count is None:
            return 0
        if "varlen" not in func.overloadpacket.__name__:
            return int(count(*args, **kwargs, out_val=out))
        import torch.utils.flop_counter as fc

        real = fc._offsets_to_lengths  # fake offsets: torch counts every sequence at the maximum length
        tokens = args[0].shape[0]  # q (forward) or grad_out (backward): (T, H, Dh)

        def lengths(offsets: torch.Tensor, max_len: int) -> list[int]:
            n = offsets.size(0) - 1  # packed in view order: the step's first n sequences (teacher: globals)
            known = self.seqlens[:n]
            if len(known) == n and max(known) == max_len and sum(known) == tokens:
                return known
            self.attn_bound += 1
            return real(offsets, max_len)

        with _patched(fc, _offsets_to_lengths=lengths):
            return int(count(*args, **kwargs, out_val=out))


def seqlens(cfg: Any, batch: int) -> list[int]:
    """Token counts of the step's sequences, view by view (class token + patches)."""
    sizes = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
    return [1 + (s // cfg.patch_size) ** 2 for s in sizes for _ in range(batch)]


def teacher_module(trainer: Any) -> torch.nn.Module:
    """The module the teacher's forward runs on: the EMA's compute-dtype copy where there is one."""
    return getattr(trainer.ema, "forward_teacher", trainer.teacher)


@contextlib.contextmanager
def phase_marks(trainer: Any, counter: OpCounter) -> Iterator[None]:
    """``counter.phase`` follows ``train_step`` (hooks and wrappers from outside, like bench_train)."""
    import dino_fast.train as train_mod

    def mark(phase: str, fn: Any) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            counter.phase = phase
            try:
                return fn(*a, **kw)
            finally:
                counter.phase = "other"
        return run

    def enter(phase: str) -> Any:
        return lambda *_: setattr(counter, "phase", phase)

    losses = [m for m in trainer.objective.parts().values() if isinstance(m, torch.nn.Module)]
    handles = [h for m, phase in [(teacher_module(trainer), "teacher_fwd"), (trainer.student, "student_fwd"),
                                  *[(m, "loss") for m in losses]]
               for h in (m.register_forward_pre_hook(enter(phase)), m.register_forward_hook(enter("other")))]
    handles += [trainer.optimizer.register_step_pre_hook(enter("optimizer")),
                trainer.optimizer.register_step_post_hook(enter("other"))]
    trainer.ema.step = mark("ema", trainer.ema.step)
    try:
        with _patched(train_mod, clip_gradients_=mark("clip", train_mod.clip_gradients_)), \
                _patched(torch.Tensor, backward=mark("backward", torch.Tensor.backward)):
            yield
    finally:
        del trainer.ema.step  # back to the class's method
        for h in handles:
            h.remove()


def count_step(cfg: Any, peaks: dict[str, tuple[float, float]]) -> tuple[OpCounter, StepRecorder]:
    """One steady eager step counted by phase (after one step that sets up the optimizer state)."""
    with fake_cuda(), device_caches():
        trainer = fake_trainer(cfg)
        views = fake_views(trainer)
        with StepRecorder():
            trainer.train_step(views)
        counter, recorder = OpCounter(peaks, seqlens(cfg, cfg.batch_size_per_gpu)), StepRecorder()
        with phase_marks(trainer, counter), recorder, counter:
            trainer.train_step(views)
    return counter, recorder


def saved_bytes(cfg: Any, batches: tuple[int, ...]) -> list[dict[str, int]]:
    """Bytes the student forward saves for backward at each batch size, by dtype: one count per
    storage, the model's own parameters and buffers left out (they are not activations)."""
    out = []
    with fake_cuda(), device_caches():
        trainer = fake_trainer(cfg)
        own = {t.untyped_storage()._cdata for t in [*trainer.student.parameters(), *trainer.student.buffers()]}
        for b in batches:
            seen: dict[int, tuple[str, int]] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                st = t.untyped_storage()
                if st._cdata not in own:
                    seen[st._cdata] = (str(t.dtype).removeprefix("torch."), st.nbytes())
                return t

            views = fake_views(trainer, b)
            with StepRecorder(), trainer.autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                trainer.student(views)
            out.append({d: sum(n for dt, n in seen.values() if dt == d) for d, _ in seen.values()})  # by dtype
    return out


@contextlib.contextmanager
def _dynamo_on_fake_cuda() -> Iterator[None]:
    """What Dynamo asks of a CUDA build beyond fake_cuda(): the RNG state it saves around a trace, stream
    capture, the current stream; pinning a no-op (StepRecorder does that, but a dispatch mode stops Dynamo)."""
    state = torch.zeros(16, dtype=torch.uint8)
    with _patched(torch.cuda, get_rng_state=lambda *a, **k: state, set_rng_state=lambda *a, **k: None,
                  is_current_stream_capturing=lambda: False), \
            _patched(torch.accelerator, is_available=lambda: False), \
            _patched(torch.Tensor, pin_memory=lambda self, *a, **k: self):
        yield


def compile_counts(cfg: Any, steps: int) -> dict[str, Any]:
    """Dynamo graphs per model, recompiles, graph breaks over ``steps`` compiled steps (``compile: true``;
    every torch.compile the build does gets the one counting "eager" backend)."""
    import torch._dynamo
    import torch._guards
    from torch._dynamo.utils import counters

    owners: dict[str, set[int]] = {}
    graphs: list[tuple[str, int, int]] = []  # (model, code object's frame id, step)
    step = 0

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        cid = torch._guards.CompileContext.current_compile_id()
        ids = {id(t) for t in example_inputs}  # the model's own parameters are among the graph's inputs
        model = next((m for m, params in owners.items() if ids & params), "other")
        graphs.append((model, cid.frame_id if cid else -1, step))
        return gm.forward

    real_compile = torch.compile

    def counting_compile(*a: Any, **kw: Any) -> Any:
        return real_compile(*a, **{**kw, "backend": backend})

    torch._dynamo.reset()
    counters.clear()
    try:
        with fake_cuda(), _dynamo_on_fake_cuda(), _patched(torch, compile=counting_compile):
            trainer = fake_trainer(cfg)
            models = {"student": [trainer.student], "teacher": [trainer.teacher, teacher_module(trainer)]}
            owners = {k: {id(t) for m in ms for t in [*m.parameters(), *m.buffers()]} for k, ms in models.items()}
            views = fake_views(trainer)
            for step in range(steps):
                trainer.train_step(views)
        limit = sum(n for k, n in counters["unimplemented"].items() if "recompile limit" in k.lower())
        row = {f"graphs_{m}": sum(g[0] == m for g in graphs) for m in ("student", "teacher")}
        # a recompile: a model's further graph of a code object (not another model's first one of it)
        row.update(recompiles=len(graphs) - len({g[:2] for g in graphs}),
                   graphs_after_step1=sum(g[2] > 0 for g in graphs),
                   graph_breaks=sum(counters["graph_break"].values()), recompile_limit_hits=limit,
                   compile_steps=steps)
        return row
    finally:
        torch._dynamo.reset()


# --- the run -------------------------------------------------------------------------------------
PHASE_COLUMNS = ["code", "path", "phase", "ops", "launches", "gflop", "gbyte", *[f"{g}_ms" for g in GPUS], "launch_ms"]
MODEL_COLUMNS = ["code", "path", "saved_mb_per_image", "saved_mb_fixed", "saved_fp32_pct", "graphs_student",
                 "graphs_teacher", "recompiles", "graphs_after_step1", "graph_breaks", "recompile_limit_hits",
                 "compile_steps", "host_syncs", "matmul_gflop_not_bf16", "attn_flops_bounded", "attn_ops"]
NOTES = (
    "CPU COUNTS, NOT GPU TIMES. The real Trainer step on FakeTensorMode tensors on a fake cuda device. ops: aten + "
    "custom ops dispatched in one steady eager step (prim metadata queries left out); launches: ops minus views, "
    "allocations and host-only ops (a proxy: one op may launch 0-3 kernels). gflop: torch.utils.flop_counter's "
    "formulas (matmul, conv, attention; varlen attention over the step's true sequence lengths). gbyte: each op "
    "reads all its inputs and writes its outputs in HBM (eager, no fusion, no cache: an upper bound). "
    "h100_ms / h200_ms: sum over ops of max(flops / bf16 dense peak, bytes / HBM peak), datasheet peaks "
    "(bench.common.device_peaks) {peaks}: a bound from counts without launch or host cost, not a measurement. "
    "launch_ms: launches x {launch_us:g} us, an ASSUMED host cost per launch. saved_mb: bytes the student forward "
    "saves for backward (saved_tensors_hooks, one count per storage, parameters left out) in the compute dtype; "
    "per image: the slope between batch B and B/2; fixed: the rest (autocast's bf16 weight copies). Dynamo "
    "(compile true, backend eager: the graphs Inductor would get) on the same fake tensors over compile_steps "
    "steps: graphs per model; recompiles: a model's further graphs of a code object it already has one of; "
    "recompile_limit_hits: frames left eager at the recompile limit. Measured: {source}; {shape}; "
    "freeze_last_layer 0 (the steady step), cuda_graphs off (eager counts).")


def phase_rows(counter: OpCounter, launch_us: float) -> list[dict[str, Any]]:
    """One row per phase, then the total."""
    rows = []
    for phase in (*PHASES, "total"):
        parts = [counter.stats[p] for p in (PHASES if phase == "total" else (phase,))]
        s = {k: sum(p.get(k, 0.0) for p in parts) for k in ("ops", "launches", "flops", "bytes", *SECONDS)}
        rows.append({"phase": phase, "ops": int(s["ops"]), "launches": int(s["launches"]), "gflop": s["flops"] / 1e9,
                     "gbyte": s["bytes"] / 1e9, **{f"{g}_ms": s[f"{g}_s"] * 1e3 for g in GPUS},
                     "launch_ms": s["launches"] * launch_us / 1e3})
    return rows


def model_row(cfg: Any, counter: OpCounter, recorder: StepRecorder) -> dict[str, Any]:
    """Saved activation bytes (at B and B/2), host syncs and FLOP checks of one path."""
    b, small = cfg.batch_size_per_gpu, max(1, cfg.batch_size_per_gpu // 2)
    big, half = saved_bytes(cfg, (b, small))
    total = sum(big.values())
    per_image = (total - sum(half.values())) / (b - small) if b > small else total / b
    return {"saved_mb_per_image": per_image / 1e6, "saved_mb_fixed": (total - per_image * b) / 1e6,
            "saved_fp32_pct": 100.0 * big.get("float32", 0) / max(1, total),
            "host_syncs": len(recorder.syncs) + len(recorder.to_host),
            "matmul_gflop_not_bf16": sum(v for k, v in counter.matmul_flops.items() if k != "bfloat16") / 1e9,
            "attn_flops_bounded": counter.attn_bound, "attn_ops": " ".join(sorted(counter.attn_ops))}


def checkout_sha(root: Path) -> str:
    """Short sha of the measured checkout, "+dirty" when its code (dino_fast/, kernels/) differs from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "dino_fast", "kernels")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=None, help="measure the dino_fast of this checkout (first on sys.path)")
    p.add_argument("--label", default=None, help="names the results and their rows (default: the checkout's sha)")
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                   help="torch: loss_impl torch + ema_impl foreach; fast: the preset's (fused loss, Triton EMA)")
    p.add_argument("--preset", default="vit_small_h200")
    p.add_argument("--depth", type=int, default=0, help="cut the depth (0: the arch's)")
    p.add_argument("--batch", type=int, default=0, help="images per step (0: the preset's)")
    p.add_argument("--out-dim", type=int, default=0, help="0: the preset's")
    p.add_argument("--attn-backend", default=None, help="default: the preset's")
    p.add_argument("--compile-steps", type=int, default=10, help="compiled steps for Dynamo's counts (0: skip)")
    p.add_argument("--launch-us", type=float, default=5.0, help="ASSUMED host time per launch, us (not measured)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = use_repo(args.repo)
    sha = checkout_sha(root)
    label = args.label or sha.replace("+", "_")
    peaks = {gpu: device_peaks(name) for gpu, name in GPUS.items()}
    over = {k: v for k, v in dict(depth=args.depth, batch_size_per_gpu=args.batch, out_dim=args.out_dim,
                                  attn_backend=args.attn_backend).items() if v}
    c = make_config(args.preset, **over)
    shape = (f"preset {args.preset}: {c.arch}/{c.patch_size} depth {c.depth or 'full'}, 2 x {c.global_crops_size} + "
             f"{c.local_crops_number} x {c.local_crops_size}, out_dim {c.out_dim}, batch {c.batch_size_per_gpu}, "
             f"{c.precision}, attn_backend {c.attn_backend}, packed {c.packed_multicrop}")
    notes = NOTES.format(peaks=peaks, launch_us=args.launch_us, shape=shape,
                         source=f"dino_fast from {root} at {sha} ({label})")
    phases = Results(f"preflight_{label}", PHASE_COLUMNS, notes, out_dir=args.out)
    models = Results(f"preflight_model_{label}", MODEL_COLUMNS, notes, out_dir=args.out)
    for path in args.paths:
        cfg = make_config(args.preset, **over, **PATHS[path], compile=False)
        try:
            counter, recorder = count_step(cfg, peaks)
        except Exception as e:  # fast: a Triton kernel launched outside a custom op has no fake implementation
            if path == "torch":
                raise
            raise SystemExit(f"bench.preflight: path {path!r} does not run on the fake device ({type(e).__name__}: "
                             f"{str(e).strip()[:200]}); code without the custom ops runs --paths torch only") from e
        phases.add(*[{"code": label, "path": path, **r} for r in phase_rows(counter, args.launch_us)])
        row = {"code": label, "path": path, **model_row(cfg, counter, recorder)}
        if args.compile_steps:
            row.update(compile_counts(make_config(args.preset, **over, **PATHS[path], compile=True),
                                      args.compile_steps))
        models.add(row)
    phases.close()
    models.close()


if __name__ == "__main__":
    main()
