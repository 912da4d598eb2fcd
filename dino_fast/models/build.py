"""Every model of a run from its names: the backbone of any ``--arch`` (``build_backbone``) and
the student and teacher wrappers of a config (``build_models``).

``--arch`` takes what official ``main_dino.py`` takes: the ViTs (``vit_tiny`` | ``vit_small`` |
``vit_base``, ``deit_*`` aliases), the XCiTs (official facebookresearch/xcit names, timm's
implementation: ``xcit.py``) and the torchvision classification models (``torchvision_archs.py``);
``ARCH_CHOICES`` lists them all."""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from .head import DINOHead
from .multicrop import MultiCropWrapper
from .torchvision_archs import TORCHVISION_ARCHS, build_torchvision, torchvision_refusal
from .vit import ARCHS, build_vit
from .xcit import XCIT_ARCHS, build_xcit

__all__ = ["ARCH_ALIASES", "ARCH_CHOICES", "arch_family", "build_backbone", "build_models", "canonical_arch"]

# Official main_dino.py: ``args.arch = args.arch.replace("deit", "vit")`` for its --arch choices.
ARCH_ALIASES: dict[str, str] = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}
# Every --arch value (config.py validates against it, -h points to it).
ARCH_CHOICES: tuple[str, ...] = (*ARCHS, *ARCH_ALIASES, *XCIT_ARCHS, *TORCHVISION_ARCHS)

_HALF = (torch.float16, torch.bfloat16)


def canonical_arch(arch: str) -> str:
    """``arch`` with the official aliases resolved (``deit_small`` -> ``vit_small``); ValueError
    in one line when it is none of ``ARCH_CHOICES`` (why, for a torchvision model DINO cannot train)."""
    arch = ARCH_ALIASES.get(arch, arch)
    if arch in ARCHS or arch in XCIT_ARCHS or arch in TORCHVISION_ARCHS:
        return arch
    why = torchvision_refusal(arch)
    if why:
        raise ValueError(f"arch {arch!r}: {why}")
    close = difflib.get_close_matches(arch, ARCH_CHOICES, n=1)
    raise ValueError(f"unknown arch {arch!r}{f' (did you mean {close[0]!r}?)' if close else ''}; choose a ViT "
                     f"({', '.join([*ARCHS, *ARCH_ALIASES])}), an XCiT (xcit_small_12_p16, ...) or a torchvision "
                     f"classification model (resnet50, resnet18, convnext_tiny, ...): all "
                     f"{len(ARCH_CHOICES)} in dino_fast.models.ARCH_CHOICES")


def arch_family(arch: str) -> str:
    """"vit" (dino_fast's ViT: patches, packed multi-crop, iBOT), "xcit" (timm's XCiT) or
    "torchvision" (a torchvision classification model); ValueError as :func:`canonical_arch`."""
    arch = canonical_arch(arch)
    return "vit" if arch in ARCHS else "xcit" if arch in XCIT_ARCHS else "torchvision"


def build_backbone(arch: str = "vit_small", patch_size: int = 16, drop_path_rate: float = 0.0,
                   attn_backend: str = "auto", img_size: int = 224, **kw: Any) -> nn.Module:
    """The backbone of official ``--arch``, with an ``embed_dim`` attribute and no classifier:
    a :class:`DinoViT` (:func:`build_vit`) for ``vit_*`` / ``deit_*``; timm's XCiT
    (:func:`build_xcit`, patch size from the name, ``drop_path_rate`` passed, as official); a
    torchvision model (:func:`build_torchvision`: classifier Linear -> Identity; ``small_image_stem``
    for a ResNet). As in official ``main_dino.py``, a torchvision model ignores ``patch_size`` and
    ``drop_path_rate``; only the ViT reads ``attn_backend`` / ``img_size``. ``kw`` goes to the builder."""
    family = arch_family(arch)
    arch = canonical_arch(arch)
    if family != "torchvision" and kw.pop("small_image_stem", False):
        raise ValueError(f"small_image_stem replaces a torchvision ResNet's stem; {arch} is a {family.upper()} "
                         f"(its patch embedding sets the token grid)")
    if family == "torchvision":
        return build_torchvision(arch, **kw)
    if family == "xcit":
        return build_xcit(arch, drop_path_rate=drop_path_rate, **kw)
    return build_vit(arch, patch_size, drop_path_rate=drop_path_rate, attn_backend=attn_backend,
                     img_size=img_size, **kw)


def build_models(cfg: Any, device: torch.device, compute_dtype: torch.dtype | None = None
                 ) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (same weights at start; the teacher has no drop path and no gradients).

    As main_dino.py: a ViT (``vit_*``, or the ``deit_*`` aliases), an XCiT or a torchvision model
    (``resnet50``: ``fc`` removed, the head on its 2048-d pooled features); with BatchNorm in
    the model (convnets, XCiT, ``use_bn_in_head``) and several ranks, SyncBatchNorm.
    ``cfg.small_image_stem``: a torchvision ResNet with the 3x3 stride-1 stem.

    ``compute_dtype`` (the run's autocast dtype): bf16 / fp16 keep the ViT's residual stream in
    it (``DinoViT(low_precision_stream=True)``) and rebuild the LayerNorm / GELU outputs in backward
    (``recompute_norm_gelu=True``); None or fp32 leave the fp32 stream and keep them.
    ``cfg.compile``: each wrapper's forwards compiled whole (:meth:`MultiCropWrapper.compile`)."""
    kw: dict[str, Any] = dict(arch=cfg.arch, patch_size=cfg.patch_size, attn_backend=cfg.attn_backend,
                              img_size=cfg.global_crops_size)
    family = arch_family(cfg.arch)
    if family != "torchvision" and cfg.depth:
        kw["depth"] = cfg.depth
    if family == "vit" and compute_dtype in _HALF:
        kw["low_precision_stream"] = kw["recompute_norm_gelu"] = True  # the fast path (vit.py's docstring)
    if cfg.small_image_stem:
        kw["small_image_stem"] = True
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
