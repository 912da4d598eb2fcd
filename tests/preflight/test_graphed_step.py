"""The ``cuda_graphs`` step on a fake CUDA device (tests/preflight/fake_cuda.py), and the launch count
of the step's tail.

1. Capture-readiness: what ``torch.cuda.graph`` would record is ``CudaGraphStep``'s static-buffer
   step (``capture=False`` runs it here as the warm-up steps do). From the second step on (the
   first builds the kept cu_seqlens, the EMA launch table and the optimizer state) it must read
   no value on the host (a sync: illegal in a capture) and create no CPU tensor (a host buffer the
   graph would record a copy from: freed and reused after the capture), and take its per-step
   values from device tensors: AdamW fused with a tensor lr, the EMA momentum a tensor.
2. Launches: ops dispatched per step by clipping + optimizer + EMA, plain and graphed: at most 30
   on the CUDA path, and the same for a model twice as deep (they must not grow with the number
   of parameters: foreach clipping, fused AdamW, one EMA op).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dino_fast.train as train_mod
from dino_fast.config import TrainConfig
from dino_fast.models import build_models
from dino_fast.train import Trainer
from tests.preflight.fake_cuda import StepRecorder, fake_cuda, to_fake_cuda_

pytest.importorskip("torch.nn.attention.varlen", reason="varlen attention needs torch >= 2.10")

BATCH = 64


def _config(**over) -> TrainConfig:
    base = dict(arch="vit_small", patch_size=16, depth=2, out_dim=65536, local_crops_number=10,
                batch_size_per_gpu=BATCH, packed_multicrop=True, attn_backend="varlen", precision="bf16",
                loss_impl="auto", ema_impl="auto", compile=False, drop_path_rate=0.1, cuda_graphs=True,
                freeze_last_layer=0)
    return TrainConfig(**{**base, **over})


def _fake_trainer(cfg: TrainConfig) -> Trainer:
    """``Trainer.for_step`` around models built on "meta" and moved to fake CUDA (call inside fake_cuda())."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("meta"):
        student, teacher = build_models(cfg, torch.device("meta"), torch.bfloat16)
    return Trainer.for_step(cfg, torch.device("cuda", 0), to_fake_cuda_(student), to_fake_cuda_(teacher))


def _views(cfg: TrainConfig) -> list[torch.Tensor]:
    sizes = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
    return [torch.empty(cfg.batch_size_per_gpu, 3, s, s, device="cuda", dtype=torch.bfloat16) for s in sizes]


class _Overloads(TorchDispatchMode):
    """Every op overload dispatched (``_fused_adamw_.tensor_lr`` vs ``.default``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):  # noqa: ANN001
        self.seen[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def kept_resize_matrices(monkeypatch):
    """pos_embed.resize_matrix keeps its matrices on a real device and rebuilds them for fake tensors
    (it never keeps a fake): keep them here too, as a real run does after its first step."""
    from dino_fast.models import pos_embed

    real, kept = pos_embed.resize_matrix, {}

    def resize_matrix(n_in, n_out, device, dtype):
        key = (n_in, n_out, torch.device(device), dtype)
        if key not in kept:
            kept[key] = real(n_in, n_out, device, dtype)
        return kept[key]

    monkeypatch.setattr(pos_embed, "resize_matrix", resize_matrix)


def test_graphed_step_is_capture_ready_on_fake_cuda(kept_resize_matrices):
    cfg = _config()
    with fake_cuda():
        trainer = _fake_trainer(cfg)
        step = trainer.graphed
        assert step is not None and step.capture and step.tensor_lr
        step.capture = False  # run here what the capture would record (a real capture needs a GPU)
        views = _views(cfg)
        with StepRecorder():  # (which also stands in for pinning host memory: fake tensors have none)
            trainer.train_step(views)  # builds what is kept: cu_seqlens, the EMA launch table, AdamW's state
        for _ in range(2):
            recorder, overloads = StepRecorder(), _Overloads()
            with recorder, overloads:
                loss = trainer.train_step(views)
            assert recorder.syncs == [] and recorder.to_host == [], (recorder.syncs, recorder.to_host)
            assert not recorder.host_ops, f"CPU tensors made in a step a graph would replay: {dict(recorder.host_ops)}"
            assert overloads.seen["aten._fused_adamw_.tensor_lr"] == 2, sorted(k for k in overloads.seen if "adam" in k)
            assert overloads.seen["aten._fused_adamw_.default"] == 0
            assert recorder.ops["ema_"] == 1 and recorder.ops["fill_"] >= 3  # lr, decay, momentum: kernel arguments
        assert loss.device.type == "cuda" and trainer.step == 3
        for g in trainer.optimizer.param_groups:
            assert g["lr"] is step.lr and g["fused"] and g["capturable"]
        assert trainer.ema.forward_teacher is not trainer.teacher  # the teacher's forward reads its bf16 copy


class _TailCounter(TorchDispatchMode):
    """Ops dispatched while ``phase`` is set (clip, optimizer, ema)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase: str | None = None
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):  # noqa: ANN001
        if self.phase is not None and func.namespace != "prim":
            self.ops[self.phase] += 1
        return func(*args, **(kwargs or {}))


def _tail_ops(depth: int, graphed: bool, monkeypatch: pytest.MonkeyPatch) -> Counter:
    cfg = _config(depth=depth, batch_size_per_gpu=2, out_dim=4096, cuda_graphs=graphed)
    counter = _TailCounter()

    def mark(phase, fn):
        def run(*a, **k):
            counter.phase = phase
            try:
                return fn(*a, **k)
            finally:
                counter.phase = None
        return run

    with fake_cuda():
        trainer = _fake_trainer(cfg)
        if graphed:
            trainer.graphed.capture = False
        views = _views(cfg)
        with StepRecorder():
            trainer.train_step(views)
        monkeypatch.setattr(train_mod, "clip_gradients_", mark("clip", train_mod.clip_gradients_))
        trainer.ema.step = mark("ema", trainer.ema.step)
        trainer.optimizer.step = mark("optimizer", trainer.optimizer.step)  # its pre-hooks (the decay) included
        with StepRecorder(), counter:
            trainer.train_step(views)
    return counter.ops


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda_graphs"])
def test_clip_optimizer_ema_launches_do_not_grow_with_the_model(graphed, monkeypatch):
    shallow, deep = _tail_ops(2, graphed, monkeypatch), _tail_ops(4, graphed, monkeypatch)
    total = sum(shallow.values())
    assert shallow == deep, f"ops grow with the parameter count: depth 2 {dict(shallow)}, depth 4 {dict(deep)}"
    assert total <= 30, f"{total} ops for clip + optimizer + EMA: {dict(shallow)}"
    assert shallow["ema"] == 1, dict(shallow)
