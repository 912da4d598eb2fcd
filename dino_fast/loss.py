"""DINO loss: the plain-torch reference (the one every test and benchmark imports) and
``DINOLoss``, a drop-in for the official ``main_dino.DINOLoss`` that runs the fused Triton
kernel (``dino_fast.ops.fused_dino_loss``) or the reference.

Layout (official): ``student_output`` (ncrops*B, K) and ``teacher_output`` (2*B, K) hold the
views stacked along dim 0, view-major (``chunk(ncrops)`` / ``chunk(2)`` gives the views).
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dino_fast import ops

__all__ = ["dino_loss_reference", "check_dino_loss_inputs", "DINOLoss"]

_IMPLS = ("auto", "torch", "triton")


def check_dino_loss_inputs(student_output: torch.Tensor, teacher_output: torch.Tensor, ncrops: int,
                           n_global: int = 2, out_dim: int | None = None) -> int:
    """Validate the official layout; returns the batch size B. Raises ValueError/TypeError naming the problem."""
    if not 1 <= n_global <= ncrops or ncrops < 2:
        raise ValueError(f"need ncrops >= 2 and 1 <= n_global <= ncrops, got ncrops={ncrops}, n_global={n_global}")
    for name, t in (("student_output", student_output), ("teacher_output", teacher_output)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (views*B, out_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if student_output.device != teacher_output.device:
        raise ValueError(f"student_output is on {student_output.device}, teacher_output on {teacher_output.device}")
    k_s, k_t = student_output.shape[1], teacher_output.shape[1]
    if k_s != k_t:
        raise ValueError(f"student_output has {k_s} columns, teacher_output {k_t}")
    if out_dim is not None and k_s != out_dim:
        raise ValueError(f"outputs have {k_s} columns, expected out_dim = {out_dim}")
    t_rows, s_rows = teacher_output.shape[0], student_output.shape[0]
    if t_rows < n_global or t_rows % n_global:
        raise ValueError(f"teacher_output has {t_rows} rows, expected n_global*B = {n_global}*B with B >= 1")
    batch = t_rows // n_global
    if s_rows != ncrops * batch:
        raise ValueError(f"student_output has {s_rows} rows, expected ncrops*B = {ncrops}*{batch} = {ncrops * batch} "
                         f"(B = {batch} from teacher_output's {t_rows} rows / {n_global} global views)")
    return batch


def dino_loss_reference(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                        student_temp: float, teacher_temp: float, ncrops: int, n_global: int = 2) -> torch.Tensor:
    """The official ``DINOLoss.forward`` math in plain torch (no center update).

    Computed in at least fp32 (the official code runs softmax under autocast, which is fp32
    too); float64 inputs stay float64. Memory: materializes V*B*K log-probabilities.
    Returns a 0-d loss with autograd to ``student_output`` only.
    """
    check_dino_loss_inputs(student_output, teacher_output, ncrops, n_global)
    dtype = torch.promote_types(student_output.dtype, torch.float32)
    student_out = (student_output.to(dtype) / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output.to(dtype) - center.to(dtype)) / teacher_temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(n_global)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # the same view seen by both networks
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


class DINOLoss(nn.Module):
    """Drop-in for the official ``DINOLoss`` (same constructor, ``center`` buffer, schedule).

    ``impl``: "torch" runs :func:`dino_loss_reference`; "triton" the fused kernel; "auto" the
    kernel for CUDA inputs when Triton is usable, the reference otherwise. Both paths update the
    center from fp32 column sums of the teacher output (the official code sums in the teacher
    dtype; identical for fp32).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, impl: str = "auto") -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        if out_dim < 1 or ncrops < 2:
            raise ValueError(f"need out_dim >= 1 and ncrops >= 2, got out_dim={out_dim}, ncrops={ncrops}")
        if not 0 <= warmup_teacher_temp_epochs <= nepochs or nepochs < 1:
            raise ValueError(f"need 0 <= warmup_teacher_temp_epochs ({warmup_teacher_temp_epochs}) <= nepochs "
                             f"({nepochs}) and nepochs >= 1")
        if student_temp <= 0 or teacher_temp <= 0 or warmup_teacher_temp <= 0:
            raise ValueError(f"temperatures must be > 0, got student_temp={student_temp}, "
                             f"teacher_temp={teacher_temp}, warmup_teacher_temp={warmup_teacher_temp}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.impl = impl
        self.register_buffer("center", torch.zeros(1, out_dim))
        # warm-up of the teacher temperature: too high a temperature early makes training unstable
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, ncrops={self.ncrops}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, impl={self.impl!r}")

    def teacher_temp_at(self, epoch: int) -> float:
        """Teacher temperature of ``epoch``; epochs past the schedule use its last value."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.impl == "torch":
            return False
        if self.impl == "triton":
            if not ops.triton_usable(x.device):
                raise RuntimeError(f"impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 (inputs on {x.device})")
            return True
        return x.device.type == "cuda" and ops.triton_usable(x.device)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Loss over all (teacher global view, other student view) pairs, then the center update."""
        check_dino_loss_inputs(student_output, teacher_output, self.ncrops, 2, self.out_dim)
        if self.center.device != teacher_output.device:
            raise ValueError(f"center is on {self.center.device}, outputs on {teacher_output.device}: "
                             "move the DINOLoss module to the outputs' device")
        temp = self.teacher_temp_at(epoch)
        if self._use_triton(student_output):
            loss, col_sum = ops.fused_dino_loss(student_output, teacher_output, self.center, self.student_temp,
                                                temp, self.ncrops, 2)
        else:
            loss = dino_loss_reference(student_output, teacher_output, self.center, self.student_temp, temp,
                                       self.ncrops, 2)
            col_sum = None
        self._update_center(teacher_output, col_sum)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Official name: EMA of the batch mean of the teacher output (all-reduced over ranks)."""
        self._update_center(teacher_output, None)

    @torch.no_grad()
    def _update_center(self, teacher_output: torch.Tensor, col_sum: torch.Tensor | None) -> None:
        rows = teacher_output.shape[0]
        if col_sum is None:
            col_sum = torch.sum(teacher_output.detach(), dim=0, dtype=torch.float32)
        batch_center = col_sum.reshape(1, -1)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            # all_reduce writes in place: never into the caller's (or kernel's) tensor
            batch_center = batch_center.clone()
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        batch_center = batch_center / (rows * world_size)
        m = self.center_momentum
        # in place (same storage for DDP buffer sync / CUDA graphs); same products as the official formula
        self.center.mul_(m).add_(batch_center * (1 - m))
