"""iBOT / DINOv2 masked-patch loss (the masks are :mod:`dino_fast.ibot_masks`).

The student sees its global views with some patch tokens replaced by the backbone's mask token;
the teacher sees them unmasked. At every masked position the student's patch-head output is
trained towards the teacher's patch-head distribution at the same position (iBOT, Zhou et al.
2022; DINOv2 ``iBOTPatchLoss.forward_masked``):

    q_p = softmax((t_p - c) / tau_t)            teacher, own EMA center c (or Sinkhorn-Knopp)
    loss = -(1 / n) * sum_p w_p <q_p, log softmax(s_p / tau_s)>,   w_p = 1 / m_{i(p)}

over the masked patches p, with m_i the number of masked patches of sample i (global view i of
an image) and n the number of global-view samples on this rank, masked or not: the mean over
samples of each sample's mean patch cross-entropy, unmasked samples counting 0 (DINOv2 divides
by ``student_masks_flat.shape[0]``). The trainer adds ``ibot_weight * loss`` to the DINO loss
(DINOv2's ``loss_scales * ibot_loss_scale`` is 2 * 1/2 = 1). Rows are in
:class:`~dino_fast.ibot_masks.PatchMasks` order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dino_fast.center import Center
from dino_fast.ibot_masks import PatchMasks

__all__ = ["ibot_patch_loss_from_probs", "iBOTPatchLoss"]


def ibot_patch_loss_from_probs(student_masked_logits: torch.Tensor, teacher_probs: torch.Tensor,
                               weights: torch.Tensor, n_samples: int, student_temp: float) -> torch.Tensor:
    """DINOv2 ``forward_masked``: ``-sum_p weights[p] * <teacher_probs[p], log_softmax(s_p /
    student_temp)> / n_samples``, in at least fp32; autograd to the student logits only.

    student_masked_logits, teacher_probs: (M, K); weights: (M,); n_samples: the number of
    global-view samples (masked or not) the M patches come from."""
    dtype = torch.promote_types(student_masked_logits.dtype, torch.float32)
    log_p = F.log_softmax(student_masked_logits.to(dtype) / student_temp, dim=-1)  # (M, K)
    ce = -torch.sum(teacher_probs.detach().to(dtype) * log_p, dim=-1)  # (M,)
    return torch.sum(ce * weights.to(dtype)) / max(int(n_samples), 1)


class iBOTPatchLoss(Center):
    """The iBOT patch loss of DINOv2 (``iBOTPatchLoss.forward_masked``) with its own teacher center.

    ``forward(student_masked_logits, teacher_masked_logits, masks, teacher_temp)``: (M, K) patch
    head outputs of the student (masked input) and the teacher (unmasked input) at the masked
    positions of ``masks`` (a :class:`~dino_fast.ibot_masks.PatchMasks`, or the (n, N) bool
    masks: then computed here, a device sync if they are on the GPU). Returns the 0-d loss (see
    the module docstring); ``teacher_temp`` is the DINO loss's of the step.

    Centering (:class:`~dino_fast.center.Center`): "center": teacher probabilities
    ``softmax((t - center) / teacher_temp)``, then the EMA of the masked teacher logits' mean,
    pooled over every rank's masked patches (DINOv2 averages per-rank means: the same when ranks
    mask equally many patches; a rank with none gives DINOv2 a NaN, here it adds nothing; a
    batch without masked patches anywhere leaves the center as it is). "sinkhorn_knopp": over
    every rank's masked patches. ``update_center=False`` defers the center to
    :meth:`flush_center` (gradient accumulation), as ``DINOLoss``.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", sinkhorn_iterations: int = 3) -> None:
        if int(patch_out_dim) < 1:
            raise ValueError(f"patch_out_dim must be >= 1, got {patch_out_dim}")
        if not student_temp > 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        super().__init__(int(patch_out_dim), center_momentum, centering, sinkhorn_iterations)
        self.patch_out_dim = int(patch_out_dim)
        self.student_temp = student_temp

    def extra_repr(self) -> str:
        return (f"patch_out_dim={self.patch_out_dim}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}, centering={self.centering!r}")

    @torch.no_grad()
    def teacher_probs(self, teacher_masked_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(M, K) teacher probabilities, fp32, by the configured centering (the center is not moved)."""
        if not teacher_temp > 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        if not self.uses_center:
            return self.sinkhorn(teacher_masked_logits, teacher_temp)
        return F.softmax((teacher_masked_logits.detach().float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_masked_logits: torch.Tensor, teacher_masked_logits: torch.Tensor,
                masks: PatchMasks | torch.Tensor | Sequence[torch.Tensor], teacher_temp: float, *,
                update_center: bool = True) -> torch.Tensor:
        masks = PatchMasks.from_masks(masks)
        self._check(student_masked_logits, teacher_masked_logits, masks)
        probs = self.teacher_probs(teacher_masked_logits, float(teacher_temp))
        loss = ibot_patch_loss_from_probs(student_masked_logits, probs, masks.weights, masks.n_samples,
                                          self.student_temp)
        self.step_center(teacher_masked_logits, update_center=update_center)
        return loss

    def _check(self, student: torch.Tensor, teacher: torch.Tensor, masks: PatchMasks) -> None:
        for name, t in (("student_masked_logits", student), ("teacher_masked_logits", teacher)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise ValueError(f"{name} must be a 2-D float tensor (M, patch_out_dim), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            if t.shape != (masks.n_masked, self.patch_out_dim):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (masked patches, patch_out_dim) = "
                                 f"({masks.n_masked}, {self.patch_out_dim})")
        if student.device != teacher.device or self.center.device != teacher.device:
            raise ValueError(f"student logits on {student.device}, teacher logits on {teacher.device}, center on "
                             f"{self.center.device}: move the iBOTPatchLoss module and the logits to one device")
        if masks.weights.device != student.device:
            raise ValueError(f"masks are on {masks.weights.device}, logits on {student.device}: "
                             "PatchMasks.to(device) first")
