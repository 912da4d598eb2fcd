"""cuda_graphs (dino_fast/cuda_graphs.py) on CPU: the static-buffer step (what a CUDA graph captures,
run eagerly here) against the trainer's plain step, value for value over several steps that cross
the schedules (lr warm-up, weight decay, momentum, teacher temperature, last-layer freeze); the
config refusals; and, with CUDA graphs stood in, when it warms up, captures, replays and captures
again. The fake-CUDA trace (no host sync, no CPU tensor per step) is tests/preflight/test_graphed_step.py.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from dino_fast.config import ConfigError, TrainConfig
from dino_fast.cuda_graphs import CudaGraphStep
from dino_fast.models import build_models
from dino_fast.precision import resolve_compute_dtype
from dino_fast.train import Trainer

CPU = torch.device("cpu")
STEPS = 5  # 2 per epoch: epoch 0 (last layer frozen, teacher temperature warming up), epoch 1, epoch 2


def _config(**over) -> TrainConfig:
    base = dict(arch="vit_tiny", patch_size=16, depth=2, out_dim=48, head_hidden_dim=32, head_bottleneck_dim=16,
                local_crops_number=2, global_crops_size=32, local_crops_size=16, batch_size_per_gpu=2, epochs=3,
                warmup_epochs=1, warmup_teacher_temp_epochs=2, warmup_teacher_temp=0.04, teacher_temp=0.07,
                freeze_last_layer=1, drop_path_rate=0.1, packed_multicrop=True, attn_backend="sdpa",
                loss_impl="torch", ema_impl="foreach", precision="fp32", weight_decay=0.04, weight_decay_end=0.4,
                lr=5e-3, clip_grad=0.3)
    return TrainConfig(**{**base, **over})


def _trainer(cfg: TrainConfig) -> Trainer:
    torch.manual_seed(0)
    student, teacher = build_models(cfg, CPU, resolve_compute_dtype(cfg.precision, CPU))
    return Trainer.for_step(cfg, CPU, student, teacher, niter_per_epoch=2)


def _views(cfg: TrainConfig, step: int, micro: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    sizes = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
    return [torch.randn(cfg.batch_size_per_gpu, 3, s, s, generator=g) for s in sizes]


def _run(cfg: TrainConfig, steps: int = STEPS, between=None) -> tuple[Trainer, list[float]]:
    trainer = _trainer(cfg)
    torch.manual_seed(7)  # the drop-path draws
    losses = []
    for step in range(steps):
        losses.append(float(trainer.train_step(*[_views(cfg, step, i) for i in range(cfg.accum_steps)])))
        if between is not None:
            between(trainer, step)
    return trainer, losses


def _assert_same_run(a: Trainer, b: Trainer, losses_a: list[float], losses_b: list[float]) -> None:
    """Bit for bit: losses, student, teacher, optimizer state, center and loss accumulators. (The
    same ops in the same order: on CPU the twin runs the optimizer as built, its lr a number; the
    decay factor and the EMA momentum from device tensors hold the fp32 numbers the plain step uses.)"""
    assert losses_b == losses_a
    for part in ("student", "teacher"):
        for (name, p), q in zip(getattr(a, part).named_parameters(), getattr(b, part).parameters()):
            assert torch.equal(q, p), f"{part}.{name}: {(q - p).abs().max():.3g} off"
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_b[i][key], state_a[i][key]), f"optimizer state {i} {key}"
    for name in ("objective.dino_loss.center", "_loss_sum", "_epoch_loss"):
        x, y = eval(f"a.{name}"), eval(f"b.{name}")  # noqa: S307 - attribute paths written above
        assert torch.equal(y, x), name


@pytest.mark.parametrize("over", [{}, {"accum_steps": 2}, {"koleo_weight": 0.1, "ema_impl": "triton"},
                                  {"centering": "sinkhorn_knopp", "loss_impl": "fused_head"}],
                         ids=["plain", "accum2", "koleo-triton-ema", "sinkhorn-fused-head"])
def test_static_buffer_step_equals_the_plain_step(over):
    """STEPS steps through CudaGraphStep (static views, lr / weight decay / momentum from device
    tensors, AdamW fused with decoupled decay from the pre-hook) equal STEPS plain steps."""
    if over.get("ema_impl") == "triton" or over.get("loss_impl") == "fused_head":
        from dino_fast import ops

        if not ops.triton_usable(CPU):
            pytest.skip("needs Triton's interpreter")
    plain, plain_losses = _run(_config(**over))
    graphed, graphed_losses = _run(_config(cuda_graphs=True, **over))
    assert plain.graphed is None and isinstance(graphed.graphed, CudaGraphStep)
    assert not graphed.graphed.capture  # on CPU: no capture, the same step eagerly
    assert graphed.step == plain.step == STEPS
    _assert_same_run(plain, graphed, plain_losses, graphed_losses)


def test_optimizer_load_keeps_the_step_equal():
    """A load replaces the optimizer's groups (their lr, weight decay) and state: the graphed step
    puts its lr tensor and zero weight decay back, and goes on as the plain step does."""
    def reload(trainer: Trainer, step: int) -> None:
        if step == 2:
            trainer.optimizer.load_state_dict(trainer.optimizer.state_dict())

    plain, plain_losses = _run(_config(), between=reload)
    graphed, graphed_losses = _run(_config(cuda_graphs=True), between=reload)
    for g in graphed.optimizer.param_groups:
        assert g["weight_decay"] == 0.0  # the no-decay group's own, the decayed group's put back (the pre-hook's)
    _assert_same_run(plain, graphed, plain_losses, graphed_losses)


@pytest.mark.parametrize("over,match", [
    ({"precision": "fp16"}, "precision fp16"), ({"use_fp16": True, "precision": "auto"}, "precision fp16"),
    ({"ibot_weight": 1.0}, "ibot_weight"), ({"fsdp": True}, "fsdp"),
    ({"activation_checkpointing": True}, "activation_checkpointing"), ({"optimizer": "lars"}, "optimizer lars"),
])
def test_what_a_graph_cannot_take_is_refused(over, match):
    with pytest.raises(ConfigError, match=f"cuda_graphs=true with {match}"):
        _config(cuda_graphs=True, **over)
    _config(**over)  # fine without cuda_graphs


class _StandIn:
    """torch.cuda's graph API on CPU: a 'capture' runs the body (it records nothing), a replay counts.
    For the bookkeeping only (when warm-up, capture and replay happen), not for values."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.captures, self.replays = 0, 0
        outer = self

        class Graph:
            def replay(self) -> None:
                outer.replays += 1

        @contextlib.contextmanager
        def graph(g, capture_error_mode="global"):
            assert capture_error_mode == "thread_local"  # the loader's threads may call CUDA meanwhile
            outer.captures += 1
            yield

        class Stream:
            def __init__(self, *a, **k) -> None:
                pass

            def wait_stream(self, other) -> None:
                pass

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())


def test_warm_up_capture_replay_and_capture_again(monkeypatch):
    """Per key: WARMUP_STEPS eager steps (side stream), one capture, then replays; a new key (the
    last layer unfrozen and the teacher temperature, at the epoch boundary) and a load capture again."""
    graphs = _StandIn(monkeypatch)
    cfg = _config(cuda_graphs=True)
    trainer = _trainer(cfg)
    step = trainer.graphed
    step.capture = True
    bodies = []
    real_body = step.body
    step.body = lambda *a: bodies.append(trainer.step) or real_body(*a)
    expected = []  # (eager bodies so far, captures, replays) after each step
    for i in range(7):
        if i == 5:
            trainer.optimizer.load_state_dict(trainer.optimizer.state_dict())
        trainer.train_step(_views(cfg, i, 0))
        expected.append((len(bodies), graphs.captures, graphs.replays))
    # steps 0-1 epoch 0: warm-up x2, step 2 (epoch 1, new key): warm-up; 3: warm-up; 4: capture + replay;
    # 5: a load, warm-up; 6: warm-up
    assert step.WARMUP_STEPS == 2
    assert expected == [(1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 1, 1), (6, 1, 1), (7, 1, 1)], expected
    assert step.captures == 1 and step._graph is None and step._warm == 2
