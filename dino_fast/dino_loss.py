"""DINO loss: the plain-torch references (the ones every test and benchmark imports) and
``DINOLoss``, a drop-in for the official ``main_dino.DINOLoss`` that runs the fused Triton kernels
(``dino_fast.ops``) or the references. The teacher centering (EMA center or DINOv2's
Sinkhorn-Knopp) is :class:`dino_fast.center.Center`; the loss with the head's last layer fused in
is :class:`dino_fast.dino_head_loss.DINOHeadLoss`.

Layout (official): ``student_output`` (ncrops*B, K) and ``teacher_output`` (2*B, K) hold the
views stacked along dim 0, view-major (``chunk(ncrops)`` / ``chunk(2)`` gives the views).
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F

from dino_fast import ops
from dino_fast.center import Center

__all__ = ["IMPLS", "dino_loss_reference", "dino_loss_from_probs_reference", "check_dino_loss_inputs", "DINOLoss"]

IMPLS = ("auto", "torch", "triton")
"""DINOLoss ``impl``: the fused kernel on CUDA when Triton is usable, else the reference | torch | triton."""


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
    teacher_probs = F.softmax((teacher_output.to(dtype) - center.to(dtype)) / teacher_temp, dim=-1)
    return dino_loss_from_probs_reference(student_output, teacher_probs, student_temp, ncrops, n_global)


def dino_loss_from_probs_reference(student_output: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                                   ncrops: int, n_global: int = 2) -> torch.Tensor:
    """Cross-entropy over all (teacher view, other student view) pairs with the teacher
    probabilities given ((n_global*B, K), e.g.
    :func:`dino_fast.center.sinkhorn_knopp_teacher`'s), averaged over
    pairs and batch, in at least fp32. Autograd to ``student_output`` only."""
    check_dino_loss_inputs(student_output, teacher_probs, ncrops, n_global)
    dtype = torch.promote_types(student_output.dtype, torch.float32)
    student_out = (student_output.to(dtype) / student_temp).chunk(ncrops)
    teacher_out = teacher_probs.to(dtype).detach().chunk(n_global)
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



class DINOLoss(Center):
    """Drop-in for the official ``DINOLoss`` (same constructor, ``center`` buffer, schedule).

    ``impl`` (:data:`IMPLS`): "torch" runs :func:`dino_loss_reference`; "triton" the fused kernel;
    "auto" the kernel for CUDA inputs when Triton is usable, the reference otherwise. Both paths
    update the center from fp32 column sums of the teacher output (the official code sums in the
    teacher dtype; identical for fp32).

    ``centering`` (:data:`dino_fast.center.CENTERINGS`): "center" (official EMA center) or
    "sinkhorn_knopp" (DINOv2: teacher probabilities by Sinkhorn-Knopp, ``sinkhorn_iterations``
    iterations; the ``center`` buffer stays for state-dict compatibility and is neither used nor
    updated). See :class:`~dino_fast.center.Center`.

    The teacher-temperature schedule (``warmup_teacher_temp``, ``teacher_temp``,
    ``warmup_teacher_temp_epochs``, ``nepochs``) serves the official signature only:
    ``forward(student, teacher, epoch)`` reads it when no ``teacher_temp=`` is given. The trainer
    builds the loss without it and passes each step's temperature from its run plan.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float | None = None,
                 teacher_temp: float | None = None, warmup_teacher_temp_epochs: int | None = None,
                 nepochs: int | None = None, student_temp: float = 0.1, center_momentum: float = 0.9,
                 impl: str = "auto", centering: str = "center", sinkhorn_iterations: int = 3) -> None:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if out_dim < 1 or ncrops < 2:
            raise ValueError(f"need out_dim >= 1 and ncrops >= 2, got out_dim={out_dim}, ncrops={ncrops}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        schedule = _teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        super().__init__(out_dim, center_momentum, centering, sinkhorn_iterations)
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.ncrops = ncrops
        self.impl = impl
        # official: a per-epoch warm-up of the teacher temperature (None: the caller passes teacher_temp=)
        self.teacher_temp_schedule = schedule

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, ncrops={self.ncrops}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, impl={self.impl!r}, centering={self.centering!r}")

    def teacher_temp_at(self, epoch: int) -> float:
        """Teacher temperature of ``epoch``; epochs past the schedule use its last value."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.teacher_temp_schedule is None:
            raise ValueError("this DINOLoss was built without a teacher-temperature schedule (warmup_teacher_temp, "
                             "teacher_temp, warmup_teacher_temp_epochs, nepochs): pass teacher_temp=")
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def _temp(self, epoch: int, teacher_temp: float | None) -> float:
        return self.teacher_temp_at(epoch) if teacher_temp is None else float(teacher_temp)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.impl == "torch":
            return False
        if self.impl == "triton":
            if not ops.triton_usable(x.device):
                raise RuntimeError(f"impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 (inputs on {x.device})")
            return True
        return x.device.type == "cuda" and ops.triton_usable(x.device)

    def _check_device(self, teacher_output: torch.Tensor) -> None:
        if self.center.device != teacher_output.device:
            raise ValueError(f"center is on {self.center.device}, outputs on {teacher_output.device}: "
                             f"move the {type(self).__name__} module to the outputs' device")

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int, *,
                teacher_temp: float | None = None, update_center: bool = True) -> torch.Tensor:
        """Loss over all (teacher global view, other student view) pairs, then the center update.

        ``teacher_temp`` overrides the temperature of ``epoch`` (a trainer whose run plan owns
        the schedule passes it). ``update_center=False`` keeps this batch's teacher column sums
        for :meth:`flush_center` (gradient accumulation: the center moves once per optimizer
        step, from the mean over all its micro-batches)."""
        check_dino_loss_inputs(student_output, teacher_output, self.ncrops, 2, self.out_dim)
        self._check_device(teacher_output)
        temp = self._temp(epoch, teacher_temp)
        triton = self._use_triton(student_output)
        col_sum = None
        if not self.uses_center:
            probs = self.sinkhorn(teacher_output, temp)
            if triton:  # Sinkhorn-Knopp in torch feeds the fused student pass
                loss = ops.fused_dino_loss_from_probs(student_output, probs, self.student_temp, self.ncrops, 2)
            else:
                loss = dino_loss_from_probs_reference(student_output, probs, self.student_temp, self.ncrops, 2)
        elif triton:
            loss, col_sum = ops.fused_dino_loss(student_output, teacher_output, self.center, self.student_temp,
                                                temp, self.ncrops, 2)
        else:
            loss = dino_loss_reference(student_output, teacher_output, self.center, self.student_temp, temp,
                                       self.ncrops, 2)
        self.step_center(teacher_output, col_sum, update_center=update_center)
        return loss

    def describe(self, device: torch.device) -> str:
        """Which implementation runs on ``device`` and why (for a start-up log line)."""
        if self._use_triton(torch.empty(0, device=device)):
            return "fused Triton kernel"
        why = "requested" if self.impl == "torch" else "the fused kernel runs on CUDA"
        return f"torch reference ({why})"

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Official name: EMA of the batch mean of the teacher output (all-reduced over ranks)."""
        self.step_center(teacher_output)


def _teacher_temp_schedule(warmup_teacher_temp: float | None, teacher_temp: float | None,
                           warmup_teacher_temp_epochs: int | None, nepochs: int | None) -> np.ndarray | None:
    """The official per-epoch schedule: a linear warm-up, then constant (too high a temperature
    early makes training unstable); None when none of the four is given."""
    given = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise ValueError("give all of warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs and nepochs "
                         "(the official schedule) or none of them (then pass teacher_temp= to forward)")
    if not 0 <= warmup_teacher_temp_epochs <= nepochs or nepochs < 1:
        raise ValueError(f"need 0 <= warmup_teacher_temp_epochs ({warmup_teacher_temp_epochs}) <= nepochs "
                         f"({nepochs}) and nepochs >= 1")
    if teacher_temp <= 0 or warmup_teacher_temp <= 0:
        raise ValueError(f"temperatures must be > 0, got teacher_temp={teacher_temp}, "
                         f"warmup_teacher_temp={warmup_teacher_temp}")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))
