"""What one micro-batch is trained on: the DINO loss (official; fused head or Sinkhorn-Knopp
centering as configured), plus, when switched on, DINOv2's KoLeo regulariser on the student's
global-view CLS features and iBOT's masked-patch loss. Official DINO (both weights 0) runs the
plain forward of student and teacher; the extras ask the wrappers for more (``forward_train``).

The losses' states (centers) are the trainer's Stateful parts (``dino_loss``, ``ibot_loss``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dino_fast.dino_head_loss import DINOHeadLoss, fuses_last_layer
from dino_fast.dino_loss import DINOLoss
from dino_fast.plan import StepValues

__all__ = ["Objective", "build_dino_loss"]


def build_dino_loss(cfg: Any, device: torch.device) -> DINOLoss:
    """The run's DINO loss: :class:`~dino_fast.dino_head_loss.DINOHeadLoss` when config
    ``loss_impl`` fuses the head's last layer in (the student head is then built without it:
    the same :func:`~dino_fast.dino_head_loss.fuses_last_layer`), else ``DINOLoss(impl=loss_impl)``.
    Built without the official teacher-temperature schedule: each step passes its temperature
    from the run plan."""
    fused = fuses_last_layer(cfg.loss_impl)
    return (DINOHeadLoss if fused else DINOLoss)(
        cfg.out_dim, 2 + cfg.local_crops_number, student_temp=cfg.student_temp, center_momentum=cfg.center_momentum,
        centering=cfg.centering, impl="auto" if fused else cfg.loss_impl).to(device)


class Objective:
    """``objective(student, teacher, views, values, step, micro)`` -> the micro-batch's loss."""

    def __init__(self, cfg: Any, device: torch.device, rank: int = 0) -> None:
        self.cfg, self.rank = cfg, rank
        self.dino_loss = build_dino_loss(cfg, device)
        self.ibot: nn.Module | None = None
        if cfg.ibot_weight > 0:
            from dino_fast.ibot import iBOTPatchLoss

            self.ibot = iBOTPatchLoss(cfg.ibot_out_dim or cfg.out_dim, student_temp=cfg.student_temp,
                                      center_momentum=cfg.center_momentum, centering=cfg.centering).to(device)

    @property
    def plain(self) -> bool:
        """Official DINO: the wrappers' plain forward is all the loss needs."""
        return self.cfg.koleo_weight == 0 and self.ibot is None

    def parts(self) -> dict[str, Any]:
        return {"dino_loss": self.dino_loss} | ({"ibot_loss": self.ibot} if self.ibot is not None else {})

    def __call__(self, student: nn.Module, teacher: nn.Module, views: list[torch.Tensor], v: StepValues,
                 step: int, micro: int, update_center: bool) -> torch.Tensor:
        """Loss of one micro-batch (run under the caller's autocast); ``update_center=False`` defers
        the centers to :meth:`flush_center` (gradient accumulation)."""
        cfg = self.cfg
        kw = dict(teacher_temp=v.teacher_temp, update_center=update_center)
        masks = self._masks(views, step, micro) if self.ibot is not None else None
        with torch.no_grad():
            t = teacher(views[:2]) if self.plain else teacher.forward_train(views[:2], masks, mask_input=False)
        s = student(views) if self.plain else student.forward_train(views, masks)
        t_logits, s_out = (t, s) if self.plain else (t["logits"], s["logits"])
        if isinstance(self.dino_loss, DINOHeadLoss):  # s_out: the bottleneck features; the loss applies the last layer
            loss = self.dino_loss(s_out, student.head.last_layer, t_logits, v.epoch, **kw)
        else:
            loss = self.dino_loss(s_out, t_logits, v.epoch, **kw)
        if cfg.koleo_weight > 0:
            from dino_fast.koleo import koleo_loss_views

            loss = loss + cfg.koleo_weight * koleo_loss_views(s["cls"][:2 * views[0].shape[0]], 2)
        if self.ibot is not None:
            loss = loss + cfg.ibot_weight * self.ibot(s["masked_patch_logits"], t["masked_patch_logits"], masks,
                                                      v.teacher_temp, update_center=update_center)
        return loss

    def _masks(self, views: list[torch.Tensor], step: int, micro: int) -> Any:
        """Block masks of the global views, a function of (seed, step, rank, micro-batch) only: a
        resumed run draws the same ones, and the global RNG streams are untouched."""
        from dino_fast.ibot_masks import PatchMasks, mask_rng, sample_masks

        cfg, (h, w), p = self.cfg, views[0].shape[-2:], self.cfg.patch_size
        masks = PatchMasks.from_masks(sample_masks(
            2 * views[0].shape[0], (h // p, w // p), mask_rng(cfg.seed, step, self.rank, micro),
            mask_ratio_min_max=cfg.ibot_mask_ratio_min_max, mask_sample_probability=cfg.ibot_mask_sample_probability))
        device = views[0].device
        if device.type == "cuda":
            masks = masks.pin_memory()
        return masks.to(device, non_blocking=True)

    def flush_center(self) -> None:
        self.dino_loss.flush_center()
        if self.ibot is not None:
            self.ibot.flush_center()

    def describe(self, device: torch.device) -> str:
        extras = [f"KoLeo x {self.cfg.koleo_weight:g}"] * (self.cfg.koleo_weight > 0) + \
                 [f"iBOT x {self.cfg.ibot_weight:g}"] * (self.ibot is not None)
        return (f"{self.dino_loss.describe(device)}, centering {self.cfg.centering}"
                + (f" + {' + '.join(extras)}" if extras else ""))
