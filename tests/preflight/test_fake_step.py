"""The whole training step (``Trainer.train_step``) traced on a fake CUDA device: ViT-S/16 with
2 x 224 + 10 x 96 crops packed, batch 64, bf16 autocast, varlen attention, the fused DINO loss (on
the logits, or with the head's last layer fused in), clipping, fused AdamW and the Triton EMA, all
on FakeTensorMode tensors (tests/preflight/fake_cuda.py). Depth is cut to 2 blocks: every block is
the same code. What it proves without a GPU: every op of the step runs on CUDA tensors (host work
only builds small index tensors from Python lists, never reads the GPU), no op reads values on the
host (a sync), the matmuls run in bf16 while master weights, gradients and the optimizer state stay
fp32, and the custom ops (fused loss, backward scale, EMA) and torch's varlen kernel are what runs.

The trainer is ``Trainer.for_step``: the step's own parts, without the loader, output folder,
process group and checkpointer, which a fake device cannot (or need not) have.
"""
from __future__ import annotations

import pytest
import torch

from dino_fast.config import TrainConfig
from dino_fast.models import build_models
from dino_fast.precision import resolve_compute_dtype
from dino_fast.train import Trainer
from tests.preflight.fake_cuda import StepRecorder, fake_cuda, to_fake_cuda_

pytest.importorskip("torch.nn.attention.varlen", reason="varlen attention needs torch >= 2.10")

BATCH = 64
# Host work the packed forward may do per step: cu_seqlens from the crops' lengths (a Python list),
# copied to the device without a sync. Anything else on the CPU is a finding.
HOST_PREP = {"zeros", "lift_fresh", "cumsum", "slice", "copy_"}


def _config(loss_impl: str) -> TrainConfig:
    return TrainConfig(arch="vit_small", patch_size=16, depth=2, out_dim=65536, local_crops_number=10,
                       batch_size_per_gpu=BATCH, packed_multicrop=True, attn_backend="varlen", precision="bf16",
                       loss_impl=loss_impl, ema_impl="auto", compile=False, drop_path_rate=0.1)


def _models(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Student and teacher built by ``build_models`` on "meta" (no memory, no init cost), before the
    fake device: ``build_models(cfg, "cuda")`` cannot move fake parameters (fake_cuda.py)."""
    with torch.device("meta"):  # the run's compute dtype: the bf16 stream and what goes with it, as a run builds them
        return build_models(cfg, torch.device("meta"), resolve_compute_dtype(cfg.precision, torch.device("cuda")))


def _trainer(cfg: TrainConfig, student: torch.nn.Module, teacher: torch.nn.Module) -> Trainer:
    """The Trainer's own step parts (``Trainer.for_step``: no data, output folder or process group,
    which a fake device cannot have) around the models moved to fake CUDA."""
    return Trainer.for_step(cfg, torch.device("cuda", 0), to_fake_cuda_(student), to_fake_cuda_(teacher))


@pytest.mark.parametrize("loss_impl,loss_op", [("auto", "dino_loss"), ("fused_head", "dino_head_loss")])
def test_train_step_on_fake_cuda(loss_impl, loss_op):
    cfg = _config(loss_impl)
    student, teacher = _models(cfg)
    with fake_cuda():
        trainer = _trainer(cfg, student, teacher)
        views = [torch.empty(BATCH, 3, 224, 224, device="cuda", dtype=torch.bfloat16) for _ in range(2)] + \
                [torch.empty(BATCH, 3, 96, 96, device="cuda", dtype=torch.bfloat16) for _ in range(10)]
        recorder = StepRecorder()
        with recorder:
            loss = trainer.train_step(views)
        assert trainer.ema.impl == "triton", trainer.ema.impl
    # the step's path: CUDA only; host work builds index tensors and never reads the GPU
    assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.dim() == 0
    assert trainer.step == 1
    assert recorder.to_host == [], f"device-to-host copies (host syncs): {recorder.to_host}"
    assert recorder.syncs == [], f"ops that read CUDA values on the host: {recorder.syncs}"
    extra_host = set(recorder.host_ops) - HOST_PREP
    assert not extra_host, f"host (CPU) ops on the step's path: {extra_host} ({dict(recorder.host_ops)})"
    # the kernels that run: our custom ops and torch's varlen attention
    for op in (loss_op, "scale_", "ema_", "_fused_adamw_", "_varlen_attn", "_varlen_attn_backward"):
        assert recorder.ops[op] > 0, f"{op} did not run; ops: {sorted(recorder.ops)}"
    # dtypes: bf16 compute, fp32 master weights, gradients and optimizer state
    flops = recorder.matmul_flops
    bf16_share = flops[torch.bfloat16] / sum(flops.values())
    assert bf16_share > 0.99, f"matmul FLOPs in bf16: {bf16_share:.4f} ({ {str(k): v for k, v in flops.items()} })"
    for name, p in trainer.student.named_parameters():
        assert p.device.type == "cuda" and p.dtype == torch.float32, (name, p.device, p.dtype)
        if p.grad is not None:
            assert p.grad.device.type == "cuda" and p.grad.dtype == torch.float32, (name, p.grad.dtype)
        for key, value in trainer.optimizer.state.get(p, {}).items():
            assert value.device.type == "cuda" and value.dtype == torch.float32, (name, key, value.dtype)
    assert any(p.grad is not None for p in trainer.student.parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in trainer.teacher.parameters())
