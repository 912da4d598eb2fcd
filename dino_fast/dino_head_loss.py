"""The DINO loss with the student head's last layer fused in: ``DINOHeadLoss`` takes the head's
l2-normalised bottleneck features and its ``last_layer`` instead of the student logits, and with
Triton never materialises the (ncrops*B, K) logits (``kernels/dino_head_loss.py`` through
``dino_fast.ops.fused_dino_head_loss``).

A run uses it with config ``loss_impl: fused_head``; :func:`fuses_last_layer` is the one place
that reads that choice, for the loss (``dino_fast.objective.build_dino_loss``) and for the
student head (``DINOHead(fused_loss=True)`` stops before its last layer).
"""
from __future__ import annotations

import torch
from torch import nn

from dino_fast import ops
from dino_fast.dino_loss import IMPLS, DINOLoss, check_dino_loss_inputs

__all__ = ["FUSED_HEAD", "LOSS_IMPLS", "fuses_last_layer", "DINOHeadLoss"]

FUSED_HEAD = "fused_head"
LOSS_IMPLS = (*IMPLS, FUSED_HEAD)
"""Config ``loss_impl``: a :data:`dino_fast.dino_loss.IMPLS` of DINOLoss, or the head's last layer
fused into the loss (:class:`DINOHeadLoss`, which picks its kernel as impl "auto")."""


def fuses_last_layer(loss_impl: str) -> bool:
    """Whether config ``loss_impl`` fuses the student head's last layer into the DINO loss."""
    return loss_impl == FUSED_HEAD


class DINOHeadLoss(DINOLoss):
    """:class:`~dino_fast.dino_loss.DINOLoss` on ``last_layer(student_feats)`` without those logits.

    Same constructor, state dict (``center``), centering and center update as DINOLoss; only the
    student input differs: ``forward(student_feats, last_layer, teacher_output, epoch, *,
    teacher_temp=None, update_center=True)``.
    """

    def forward(  # type: ignore[override]  (the student input is the features and the last layer)
            self, student_feats: torch.Tensor, last_layer: nn.Module, teacher_output: torch.Tensor, epoch: int, *,
            teacher_temp: float | None = None, update_center: bool = True) -> torch.Tensor:
        """``student_feats``: (ncrops*B, D) l2-normalised bottleneck features (what
        ``DINOHead(fused_loss=True)`` returns); ``last_layer``: the head's ``last_layer``
        (``WeightNormLinear``: its differentiable ``weight`` (K, D), no bias), whose parameters get
        their gradients as with the plain head. With Triton the matmul and the loss run in chunks
        of images (``dino_fast.ops.fused_dino_head_loss``); otherwise this is
        :meth:`DINOLoss.forward` on ``last_layer(student_feats)``."""
        weight = getattr(last_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or getattr(last_layer, "bias", None) is not None:
            raise TypeError(f"last_layer must have a 2-D weight (out_dim, D) and no bias, got "
                            f"{type(last_layer).__name__}")
        if not isinstance(student_feats, torch.Tensor) or student_feats.dim() != 2:
            raise ValueError(f"student_feats must be a 2-D (ncrops*B, D) tensor, got "
                             f"{getattr(student_feats, 'shape', None)}")
        if not self._use_triton(student_feats):
            return super().forward(last_layer(student_feats), teacher_output, epoch, teacher_temp=teacher_temp,
                                   update_center=update_center)
        # the logits' shape, without the logits
        check_dino_loss_inputs(student_feats.new_empty((1, 1)).expand(student_feats.shape[0], weight.shape[0]),
                               teacher_output, self.ncrops, 2, self.out_dim)
        self._check_device(teacher_output)
        temp = self._temp(epoch, teacher_temp)
        if self.uses_center:
            teacher, center = teacher_output, self.center
        else:
            teacher, center = self.sinkhorn(teacher_output, temp), None
        loss, col_sum = ops.fused_dino_head_loss(student_feats, weight, teacher, center, self.student_temp, temp,
                                                 self.ncrops, 2)
        self.step_center(teacher_output, col_sum, update_center=update_center)
        return loss

    def describe(self, device: torch.device) -> str:
        return f"{super().describe(device)}, head's last layer fused in"
