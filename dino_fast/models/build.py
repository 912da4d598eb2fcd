"""Every model of a run from its names: the backbone of any ``--arch`` (``build_backbone``) and
the student and teacher wrappers of a config (``build_models``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .head import DINOHead
from .multicrop import MultiCropWrapper
from .resnet import RESNET_ARCHS, build_resnet, is_resnet_arch
from .vit import ARCHS, build_vit

__all__ = ["ARCH_ALIASES", "build_backbone", "build_models", "canonical_arch"]

# Official main_dino.py: ``args.arch = args.arch.replace("deit", "vit")`` for its --arch choices.
ARCH_ALIASES: dict[str, str] = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}

_HALF = (torch.float16, torch.bfloat16)


def canonical_arch(arch: str) -> str:
    """``arch`` with the official aliases resolved (``deit_small`` -> ``vit_small``);
    ValueError naming the choices when it is none of ours."""
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in ARCHS and arch not in RESNET_ARCHS:
        choices = sorted(ARCHS) + sorted(ARCH_ALIASES) + list(RESNET_ARCHS)
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(choices)}")
    return arch


def build_backbone(arch: str = "vit_small", patch_size: int = 16, drop_path_rate: float = 0.0,
                   attn_backend: str = "auto", img_size: int = 224, **kw: Any) -> nn.Module:
    """The backbone of official ``--arch``: a :class:`DinoViT` (:func:`build_vit`) for
    ``vit_*`` / ``deit_*``, a torchvision ResNet (:func:`build_resnet`) for ``resnet*``. As in
    official ``main_dino.py``, a convnet ignores ``patch_size`` and ``drop_path_rate`` (and
    ``attn_backend`` / ``img_size``); ``kw`` goes to the chosen builder."""
    arch = canonical_arch(arch)
    if arch in RESNET_ARCHS:
        return build_resnet(arch, **kw)
    return build_vit(arch, patch_size, drop_path_rate=drop_path_rate, attn_backend=attn_backend,
                     img_size=img_size, **kw)


def build_models(cfg: Any, device: torch.device, compute_dtype: torch.dtype | None = None
                 ) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (same weights at start; the teacher has no drop path and no gradients).

    As main_dino.py: a ViT (``vit_*``, or the ``deit_*`` aliases) or a torchvision convnet
    (``resnet50``: ``fc`` removed, the head on its 2048-d pooled features); with BatchNorm in
    the model (convnets, ``use_bn_in_head``) and several ranks, SyncBatchNorm.

    ``compute_dtype`` (the run's autocast dtype): bf16 / fp16 keep the ViT's residual stream in
    it (``DinoViT(low_precision_stream=True)``); None or fp32 leave the fp32 stream.
    ``cfg.compile``: each wrapper's forwards compiled whole (:meth:`MultiCropWrapper.compile`)."""
    kw: dict[str, Any] = dict(arch=cfg.arch, patch_size=cfg.patch_size, attn_backend=cfg.attn_backend,
                              img_size=cfg.global_crops_size)
    if not is_resnet_arch(canonical_arch(cfg.arch)):
        if cfg.depth:
            kw["depth"] = cfg.depth
        if compute_dtype in _HALF:
            kw["low_precision_stream"] = True
    mim = cfg.ibot_weight > 0
    if mim:
        kw["masked_im_modeling"] = True  # student and teacher: the EMA pairs backbone.mask_token
    student_backbone = build_backbone(drop_path_rate=cfg.drop_path_rate, **kw)
    teacher_backbone = build_backbone(drop_path_rate=0.0, **kw)
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
        student.compile()
        teacher.compile()
    return student, teacher


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
