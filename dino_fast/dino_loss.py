"""DINO loss: the plain-torch references (the ones every test and benchmark imports), DINOv2's
Sinkhorn-Knopp teacher centering, and ``DINOLoss``, a drop-in for the official
``main_dino.DINOLoss`` that runs the fused Triton kernels (``dino_fast.ops``) or the references,
on logits or, with the head's last layer fused in, on the bottleneck features.

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

__all__ = ["dino_loss_reference", "dino_loss_from_probs_reference", "sinkhorn_knopp_teacher",
           "check_dino_loss_inputs", "DINOLoss"]

_IMPLS = ("auto", "torch", "triton")
_CENTERINGS = ("center", "sinkhorn_knopp")


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
    probabilities given ((n_global*B, K), e.g. :func:`sinkhorn_knopp_teacher`'s), averaged over
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


def _all_reduce_(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's ``SinkhornKnoppTeacher``: teacher probabilities (rows, K) fp32 by Sinkhorn-Knopp.

    Over the global batch (every rank's rows, ``B_total = rows * world_size``):
    ``Q = exp(t / tau).T`` (K, B_total) normalised to sum 1, then ``n_iterations`` times: each
    prototype row scaled to sum 1/K (row sums all-reduced), each sample column to 1/B_total;
    finally ``Q * B_total``, transposed back (each sample's probabilities sum to 1).

    Numerically safe form of the same values: each prototype's max over the global batch (a MAX
    all-reduce) is subtracted before exp. That multiplies row k of Q by exp(-m_k / tau), a
    factor the first row normalisation divides out exactly, so the plan is DINOv2's while exp
    never overflows (DINOv2's exp(t / tau) does for t / tau > 88 in fp32) and no row sums to 0.
    No center is used and none is updated.
    """
    if teacher_output.dim() != 2 or not teacher_output.is_floating_point():
        raise ValueError(f"teacher_output must be a 2-D float tensor (rows, K), got {teacher_output.dtype} "
                         f"{tuple(teacher_output.shape)}")
    if not teacher_temp > 0 or n_iterations < 1:
        raise ValueError(f"need teacher_temp > 0 and n_iterations >= 1, got {teacher_temp}, {n_iterations}")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    t = teacher_output.detach().float()  # (rows, K)
    row_max = _all_reduce_(t.max(dim=0, keepdim=True).values, dist.ReduceOp.MAX)  # (1, K) per prototype
    q = torch.exp((t - row_max) / teacher_temp).t()  # (K, rows): Q, prototype k's row scaled by exp(-m_k/tau)
    n_samples = q.shape[1] * world
    n_prototypes = q.shape[0]
    q /= _all_reduce_(torch.sum(q))
    for _ in range(n_iterations):
        # each prototype (row) gets total weight 1/K
        q /= _all_reduce_(torch.sum(q, dim=1, keepdim=True))
        q /= n_prototypes
        # each sample (column) gets total weight 1/B
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples  # the columns sum to 1: every sample's assignment is a probability vector
    return q.t()


class DINOLoss(nn.Module):
    """Drop-in for the official ``DINOLoss`` (same constructor, ``center`` buffer, schedule).

    ``impl``: "torch" runs :func:`dino_loss_reference`; "triton" the fused kernel; "auto" the
    kernel for CUDA inputs when Triton is usable, the reference otherwise. Both paths update the
    center from fp32 column sums of the teacher output (the official code sums in the teacher
    dtype; identical for fp32).

    ``centering``: "center" (official EMA center) or "sinkhorn_knopp" (DINOv2: teacher
    probabilities by :func:`sinkhorn_knopp_teacher`, ``sinkhorn_iterations`` iterations; the
    ``center`` buffer stays for state-dict compatibility and is neither used nor updated).
    :meth:`forward_fused_head` takes the bottleneck features and the head's last layer instead
    of the student logits (``DINOHead(fused_loss=True)``).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, impl: str = "auto", centering: str = "center",
                 sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        if centering not in _CENTERINGS:
            raise ValueError(f"centering must be one of {_CENTERINGS}, got {centering!r}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
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
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: tuple[torch.Tensor, int] | None = None  # deferred center sums (accumulation)
        # warm-up of the teacher temperature: too high a temperature early makes training unstable
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, ncrops={self.ncrops}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, impl={self.impl!r}, centering={self.centering!r}")

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

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int, *,
                teacher_temp: float | None = None, update_center: bool = True) -> torch.Tensor:
        """Loss over all (teacher global view, other student view) pairs, then the center update.

        ``teacher_temp`` overrides the temperature of ``epoch`` (a trainer whose run plan owns
        the schedule passes it). ``update_center=False`` keeps this batch's teacher column sums
        for :meth:`flush_center` (gradient accumulation: the center moves once per optimizer
        step, from the mean over all its micro-batches)."""
        check_dino_loss_inputs(student_output, teacher_output, self.ncrops, 2, self.out_dim)
        if self.center.device != teacher_output.device:
            raise ValueError(f"center is on {self.center.device}, outputs on {teacher_output.device}: "
                             "move the DINOLoss module to the outputs' device")
        temp = self.teacher_temp_at(epoch) if teacher_temp is None else float(teacher_temp)
        triton = self._use_triton(student_output)
        col_sum = None
        if self.centering == "sinkhorn_knopp":
            probs = sinkhorn_knopp_teacher(teacher_output, temp, self.sinkhorn_iterations)
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
        self._center_step(teacher_output, col_sum, update_center)
        return loss

    def forward_fused_head(self, student_feats: torch.Tensor, last_layer: nn.Module, teacher_output: torch.Tensor,
                           epoch: int, *, teacher_temp: float | None = None,
                           update_center: bool = True) -> torch.Tensor:
        """:meth:`forward` of ``last_layer(student_feats)`` without materialising those logits.

        ``student_feats``: (ncrops*B, D) l2-normalised bottleneck features (what
        ``DINOHead(fused_loss=True)`` returns); ``last_layer``: the head's ``last_layer``
        (``WeightNormLinear``: its differentiable ``weight`` (K, D), no bias), whose parameters get
        their gradients as with the plain head. With Triton the matmul and the loss run in chunks
        of images (``dino_fast.ops.fused_dino_head_loss``); otherwise this is the reference on
        ``last_layer(student_feats)``. Center update / centering as :meth:`forward`."""
        weight = getattr(last_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or getattr(last_layer, "bias", None) is not None:
            raise TypeError(f"last_layer must have a 2-D weight (out_dim, D) and no bias, got "
                            f"{type(last_layer).__name__}")
        if not isinstance(student_feats, torch.Tensor) or student_feats.dim() != 2:
            raise ValueError(f"student_feats must be a 2-D (ncrops*B, D) tensor, got "
                             f"{getattr(student_feats, 'shape', None)}")
        if not self._use_triton(student_feats):
            return self.forward(last_layer(student_feats), teacher_output, epoch, teacher_temp=teacher_temp,
                                update_center=update_center)
        check_dino_loss_inputs(student_feats.new_empty((1, 1)).expand(student_feats.shape[0], weight.shape[0]),
                               teacher_output, self.ncrops, 2, self.out_dim)
        if self.center.device != teacher_output.device:
            raise ValueError(f"center is on {self.center.device}, outputs on {teacher_output.device}: "
                             "move the DINOLoss module to the outputs' device")
        temp = self.teacher_temp_at(epoch) if teacher_temp is None else float(teacher_temp)
        if self.centering == "sinkhorn_knopp":
            teacher, center = sinkhorn_knopp_teacher(teacher_output, temp, self.sinkhorn_iterations), None
        else:
            teacher, center = teacher_output, self.center
        loss, col_sum = ops.fused_dino_head_loss(student_feats, weight, teacher, center, self.student_temp, temp,
                                                 self.ncrops, 2)
        self._center_step(teacher_output, col_sum, update_center)
        return loss

    def _center_step(self, teacher_output: torch.Tensor, col_sum: torch.Tensor | None, update_center: bool) -> None:
        if self.centering == "sinkhorn_knopp":
            return  # DINOv2: Sinkhorn-Knopp replaces the center; nothing to update
        if update_center:
            self._update_center(teacher_output, col_sum)
        else:
            self._defer_center(teacher_output, col_sum)

    def describe(self, device: torch.device) -> str:
        """Which implementation runs on ``device`` and why (for a start-up log line)."""
        if self._use_triton(torch.empty(0, device=device)):
            return "fused Triton kernel"
        why = "requested" if self.impl == "torch" else "the fused kernel runs on CUDA"
        return f"torch reference ({why})"

    @torch.no_grad()
    def _defer_center(self, teacher_output: torch.Tensor, col_sum: torch.Tensor | None) -> None:
        if col_sum is None:
            col_sum = torch.sum(teacher_output.detach(), dim=0, dtype=torch.float32)
        if self._pending is None:
            self._pending = (col_sum.clone(), teacher_output.shape[0])
        else:
            self._pending = (self._pending[0] + col_sum, self._pending[1] + teacher_output.shape[0])

    @torch.no_grad()
    def flush_center(self) -> None:
        """Apply the center update of the batches deferred with ``update_center=False`` (one EMA step)."""
        if self._pending is not None:
            col_sum, rows = self._pending
            self._pending = None
            self._apply_center(col_sum, rows)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Official name: EMA of the batch mean of the teacher output (all-reduced over ranks)."""
        self._update_center(teacher_output, None)

    @torch.no_grad()
    def _update_center(self, teacher_output: torch.Tensor, col_sum: torch.Tensor | None) -> None:
        if col_sum is None:
            col_sum = torch.sum(teacher_output.detach(), dim=0, dtype=torch.float32)
        self._apply_center(col_sum, teacher_output.shape[0])

    @torch.no_grad()
    def _apply_center(self, col_sum: torch.Tensor, rows: int) -> None:
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
