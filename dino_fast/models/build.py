"""Student and teacher of a run, from its config (official names)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .head import DINOHead
from .multicrop import MultiCropWrapper
from .resnet import build_any_backbone, is_resnet_arch

__all__ = ["build_models"]


def build_models(cfg: Any, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (same weights at start; the teacher has no drop path and no gradients).

    As main_dino.py: a ViT (``vit_*``, or the ``deit_*`` aliases) or a torchvision convnet
    (``resnet50``: ``fc`` removed, the head on its 2048-d pooled features); with BatchNorm in
    the model (convnets, ``use_bn_in_head``) and several ranks, SyncBatchNorm."""
    kw: dict[str, Any] = dict(arch=cfg.arch, patch_size=cfg.patch_size, attn_backend=cfg.attn_backend,
                              img_size=cfg.global_crops_size)
    if cfg.depth and not is_resnet_arch(cfg.arch):
        kw["depth"] = cfg.depth
    mim = cfg.ibot_weight > 0
    if mim:
        kw["masked_im_modeling"] = True  # student and teacher: the EMA pairs backbone.mask_token
    student_backbone = build_any_backbone(drop_path_rate=cfg.drop_path_rate, **kw)
    teacher_backbone = build_any_backbone(drop_path_rate=0.0, **kw)
    heads = dict(in_dim=student_backbone.embed_dim, out_dim=cfg.out_dim, use_bn=cfg.use_bn_in_head,
                 hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
    # loss_impl fused_head: the student head stops before its last layer, which the loss applies
    student_head = DINOHead(norm_last_layer=cfg.norm_last_layer, fused_loss=cfg.loss_impl == "fused_head", **heads)

    def patch_head(**extra: Any) -> nn.Module | str | None:  # iBOT: a head of its own, or the DINO head shared
        if not mim or not cfg.ibot_separate_head:
            return "shared" if mim else None
        return DINOHead(**{**heads, "out_dim": cfg.ibot_out_dim or cfg.out_dim}, **extra)

    student = MultiCropWrapper(student_backbone, student_head, packed=cfg.packed_multicrop,
                               patch_head=patch_head(norm_last_layer=cfg.norm_last_layer))
    # official: the teacher head is built with norm_last_layer's default; it only receives EMA values
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(**heads), packed=cfg.packed_multicrop,
                               patch_head=patch_head())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and _has_batchnorm(student):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if cfg.compile:
        for m in (student, teacher):
            for block in getattr(m.backbone, "blocks", []):
                block.compile()
    return student, teacher


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
