"""Pre-flight (CPU): ``compile: true`` gives one graph per model forward, and keeps it.

The student over the packed crops and the teacher over the globals, at the shapes of
``configs/vit_small_h200.yaml`` (2 x 224 + 10 x 96, patch 16; depth and width cut for time),
each ``torch.compile``'d whole (``MultiCropWrapper.compile``: backbone, packing, pos-embed and
head in one region): one graph per model, no graph break, no recompile over several steps of new
data (a new ``PackedSeqlens`` per forward) nor after the time budget re-sizes the run plan, and
the same values as the eager forward. A per-block compile recompiled once per drop-path rate
and ran the last student blocks eager (recompile limit 8; the 2026-12-04 H200 log).

Dynamo's ``backend="eager"`` captures the graphs and runs them with the eager kernels: the graph
and recompile counts (``torch._dynamo.utils.counters``) are Dynamo's, the same with Inductor,
without Inductor's minutes of CPU code generation. The varlen kernel is CUDA-only: a stand-in
custom op with its signature (``tests.test_attention.varlen_standin``) takes its place; the real
kernel is an opaque op to Dynamo too.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

from dino_fast.models import DINOHead, MultiCropWrapper, build_vit
from tests.helpers import assert_close
from tests.test_attention import use_varlen_standin

pytestmark = pytest.mark.preflight

GLOBAL, LOCAL, N_LOCAL, PATCH = 224, 96, 10, 16  # configs/vit_small_h200.yaml
CUT = dict(depth=2, embed_dim=64, num_heads=2)  # ViT-S/16 is depth 12, width 384
STEPS = 3


@pytest.fixture
def dynamo():
    """Dynamo's caches and counters fresh for the test, and reset after it."""
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _views(seed: int, batch: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in [GLOBAL] * 2 + [LOCAL] * N_LOCAL]


def _models(attn: str, low_precision_stream: bool, packed: bool) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path 0.1, the official default) and teacher (none), same weights."""
    torch.manual_seed(0)

    def wrapper(drop_path_rate: float) -> MultiCropWrapper:
        backbone = build_vit("vit_small", PATCH, drop_path_rate=drop_path_rate, attn_backend=attn,
                             low_precision_stream=low_precision_stream, **CUT)
        return MultiCropWrapper(backbone, DINOHead(CUT["embed_dim"], 256, hidden_dim=64, bottleneck_dim=32),
                                packed=packed)

    student, teacher = wrapper(0.1), wrapper(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


# (attention, bf16 autocast with the bf16 stream, packed): the vit_small_h200 path on a GPU with
# varlen; and the per-resolution fallback (one pass per resolution group, inside the one graph).
CASES = [("varlen", True, True), ("sdpa", False, False)]


@pytest.mark.parametrize("attn,bf16,packed", CASES)
def test_one_graph_per_model_no_break_no_recompile(attn, bf16, packed, dynamo, monkeypatch):
    if attn == "varlen":
        use_varlen_standin(monkeypatch)
    student, teacher = _models(attn, low_precision_stream=bf16, packed=packed)
    student.compile(backend="eager")
    teacher.compile(backend="eager")
    amp = (lambda: torch.autocast("cpu", torch.bfloat16)) if bf16 else contextlib.nullcontext
    tol = dict(rtol=0, atol=0)  # the same kernels in the same order, the same drop-path draws
    params = [p for p in student.parameters() if p.requires_grad]
    for step in range(STEPS):
        views = _views(step)
        with amp():
            with torch.no_grad():
                t, t_eager = teacher(views[:2]), teacher.forward(views[:2])  # compiled __call__, eager forward
            torch.manual_seed(step)
            s = student(views)
            torch.manual_seed(step)
            s_eager = student.forward(views)
        assert s.shape == (2 + N_LOCAL, 256) and t.shape == (2, 256)
        assert_close(t, t_eager, name=f"step {step} teacher", **tol)
        assert_close(s, s_eager, name=f"step {step} student", **tol)
        g = torch.randn_like(s)
        for p, a, b in zip(params, torch.autograd.grad(s, params, g), torch.autograd.grad(s_eager, params, g)):
            assert_close(a, b, name=f"step {step} grad", **tol)
        if step == 0:
            graphs = dict(dynamo["stats"])
    assert dynamo["stats"]["unique_graphs"] == 2, f"graphs (student + teacher expected): {dict(dynamo['stats'])}"
    assert dynamo["frames"]["total"] == 2, f"recompiled: {dict(dynamo['frames'])}"  # one compile per model
    assert dict(dynamo["stats"]) == graphs  # nothing traced after the first step
    assert not dynamo["graph_break"], f"graph breaks: {dict(dynamo['graph_break'])}"


def test_training_steps_and_a_resized_plan_reuse_the_graphs(demo_root, tmp_path, dynamo):
    """Through the trainer: steps of new views, then the time budget's re-sized plan (every
    schedule value changes): the compiled forwards read no schedule value, nothing recompiles."""
    from dino_fast.train import Trainer
    from tests.test_train import tiny_cfg

    trainer = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=4, packed_multicrop=True))
    trainer.student.compile(backend="eager")
    trainer.teacher.compile(backend="eager")
    batches = iter(trainer.data.epoch(0))
    for step in range(4):
        if step == 2:
            trainer.set_plan(trainer.plan.resized(trainer.step, 3 * trainer.plan.total_steps))  # TimeBudget's
        loss = trainer.train_step(next(batches))
        if step == 0:
            graphs = dict(dynamo["stats"])
    assert torch.isfinite(loss)
    assert graphs["unique_graphs"] == 2 and dict(dynamo["stats"]) == graphs
    assert dynamo["frames"]["total"] == 2 and not dynamo["graph_break"], dict(dynamo["graph_break"])


def test_compile_true_compiles_each_wrapper_whole(demo_root, tmp_path):
    """``compile: true`` (build_models) compiles each wrapper's forwards, not its blocks one by one
    (compilation is lazy: building costs nothing here)."""
    from dino_fast.models import build_models
    from tests.test_train import tiny_cfg

    for model in build_models(tiny_cfg(demo_root, tmp_path, compile=True), torch.device("cpu")):
        assert model._compiled_call_impl is not None and "forward_train" in vars(model)
        assert all(m._compiled_call_impl is None for m in model.modules() if m is not model)
