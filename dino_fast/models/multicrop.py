"""Multi-crop forward: backbone on every view, then the head once on all CLS features; for
iBOT / DINOv2 training, also the patch head on the masked patch tokens of the global views."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from .vit import _same_size_runs

__all__ = ["MultiCropWrapper"]


class MultiCropWrapper(nn.Module):
    """``head(backbone(views))`` over a list of views, official DINO ``MultiCropWrapper`` layout.

    ``forward(x)`` takes one tensor or a list of ``(B, C, H, W)`` views and returns
    ``(sum_v B, out_dim)`` with the views stacked along dim 0 in the given order.

    packed=False: consecutive views of the same resolution are concatenated and run through
    the backbone together (official ``unique_consecutive`` logic), one pass per resolution.
    packed=True: every view goes through the backbone in ONE pass
    (``backbone.forward_packed``: one token row, block-diagonal attention).

    ``patch_head`` (iBOT / DINOv2 masked image modelling, used by :meth:`forward_train` only):
    None (default: no patch objective, state dict unchanged); an ``nn.Module`` mapping
    (M, D) patch tokens to (M, K_p) logits (DINOv2 ``ibot_separate_head=True``; its parameters
    are ``patch_head.*``, so a teacher wrapper built the same way gets them by EMA); or
    ``"shared"`` (or ``head`` itself): the DINO head also scores the patches (DINOv2's default,
    ``ibot_separate_head=False``; no extra parameters).

    ``attn_backend`` / ``attn_head_dim``: the backbone's attention backend as configured and its
    head size (None for a convnet). :meth:`compile` compiles each forward whole (one graph).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False,
                 patch_head: nn.Module | str | None = None) -> None:
        super().__init__()
        if packed and not callable(getattr(backbone, "forward_packed", None)):
            raise TypeError(f"packed=True needs a backbone with forward_packed (DinoViT), "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.head = head
        self.packed = packed
        self.shared_patch_head = False
        if isinstance(patch_head, str):
            if patch_head != "shared":
                raise ValueError(f"patch_head must be an nn.Module, 'shared' or None, got {patch_head!r}")
            self.shared_patch_head = True
        elif patch_head is head:  # registering it twice would duplicate its state-dict keys
            self.shared_patch_head = True
        elif patch_head is not None and not isinstance(patch_head, nn.Module):
            raise TypeError(f"patch_head must be an nn.Module, 'shared' or None, got {type(patch_head).__name__}")
        self.patch_head = None if self.shared_patch_head else patch_head

    @property
    def has_patch_head(self) -> bool:
        return self.shared_patch_head or self.patch_head is not None

    @property
    def attn_backend(self) -> str | None:
        """The backbone's configured attention backend ("auto", "sdpa", ...); None for a convnet."""
        return getattr(self.backbone, "attn_backend", None)

    @property
    def attn_head_dim(self) -> int | None:
        """The backbone's attention head size; None for a convnet."""
        return getattr(self.backbone, "attn_head_dim", None)

    def compile(self, **compile_kw: Any) -> None:  # type: ignore[override]
        """``torch.compile`` the wrapper's forwards whole, in place: ``self(views)`` (backbone over
        every view, packed or per resolution, and the head) and :meth:`forward_train`, one
        compiled region each (``compile_kw`` as torch.compile's, e.g. ``backend="eager"``).

        One region rather than one per block: a block-by-block compile recompiles per block
        variant and stops at the recompile limit, and leaves the glue between blocks (pos-embed,
        packing, the head) eager. The models keep no step-dependent Python values, so steps,
        new ``PackedSeqlens`` and a re-sized run plan reuse the graph. Parameter names and the
        state dict are unchanged (no ``_orig_mod.`` wrapper)."""
        super().compile(**compile_kw)
        # an instance attribute in front of the method: FSDP's register_fsdp_forward_method wraps it as is
        self.forward_train = torch.compile(MultiCropWrapper.forward_train.__get__(self), **compile_kw)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        return self.head(self._cls_features(self._views(x)))

    @staticmethod
    def _views(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        views = [x] if isinstance(x, torch.Tensor) else list(x)
        if not views or not all(isinstance(v, torch.Tensor) for v in views):
            raise TypeError("MultiCropWrapper expects a Tensor or a non-empty list of Tensors")
        return views

    def _cls_features(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Backbone CLS features of every view, (sum_v B, D), in view order."""
        if self.packed:
            return self.backbone.forward_packed(views)  # (sum_v B, D)
        return torch.cat([self.backbone(views[s] if e - s == 1 else torch.cat(views[s:e]))
                          for s, e in _same_size_runs(views)])

    def forward_train(self, x: torch.Tensor | list[torch.Tensor], masks=None, n_global: int = 2,
                      mask_input: bool = True) -> dict[str, torch.Tensor]:
        """The training forward: a dict of

        - ``"logits"``: the head output of every view, (sum_v B, out_dim), as :meth:`forward`;
        - ``"cls"``: the backbone CLS features of every view, (sum_v B, D) (KoLeo takes the
          global views' rows, ``cls[:n_global * B]``);
        - with ``masks``: ``"masked_patch_logits"``, (M, K_p), the patch head's logits of the
          global views' patch tokens at the masked positions, in
          :class:`~dino_fast.ibot.PatchMasks` order (view-major, then sample, then patch index).

        ``masks``: None, or the masks of the ``n_global`` first views (all of one size): a
        :class:`~dino_fast.ibot.PatchMasks`, a (n_global * B, h*w) bool tensor with view-major
        rows, or a list of n_global (B, h*w) ones. ``mask_input=True`` (the student): the
        backbone puts its mask token on the masked patches (``DinoViT(masked_im_modeling=True)``),
        so the global views' ``"logits"`` and ``"cls"`` come from the masked input, as in
        DINOv2. ``mask_input=False`` (the teacher): unmasked input, the same positions selected.

        Without masks this is :meth:`forward` (same values) plus ``"cls"``. With masks the
        global views go through ``backbone.forward_tokens`` in one pass, the local views through
        the usual path (one ``forward_packed`` pass when ``packed``, one pass per resolution
        otherwise), not masked. With a shared head, one head call scores the CLS rows and the
        masked patches together (DINOv2); a shared head must return logits (not a
        ``fused_loss`` head). Under FSDP2, register ``forward_train`` on the wrapper and
        ``forward_tokens`` on the backbone (``register_fsdp_forward_method``).
        """
        views = self._views(x)
        if masks is None:
            cls = self._cls_features(views)
            return {"logits": self.head(cls), "cls": cls}

        from dino_fast.ibot_masks import PatchMasks  # the models package does not import the engine at load

        backbone = self.backbone
        if not self.has_patch_head:
            raise ValueError("masks given, but this MultiCropWrapper has no patch head: build it with "
                             "patch_head=DINOHead(...) or patch_head='shared'")
        if not callable(getattr(backbone, "forward_tokens", None)):
            raise TypeError(f"masked image modelling needs a ViT backbone with patch tokens (DinoViT); "
                            f"{type(backbone).__name__} has none (a ResNet cannot take masks): set ibot_weight 0")
        if mask_input and not getattr(backbone, "masked_im_modeling", False):
            raise ValueError("mask_input=True needs a backbone with a mask token: build it with "
                             "masked_im_modeling=True (the teacher, which is not masked, passes mask_input=False)")
        if self.shared_patch_head and getattr(self.head, "fused_loss", False):
            raise ValueError("a shared patch head must return logits: use DINOHead(fused_loss=False) or a "
                             "separate patch head")
        if not 1 <= n_global <= len(views):
            raise ValueError(f"n_global must be in [1, {len(views)}] (the number of views), got {n_global}")
        glob, loc = views[:n_global], views[n_global:]
        if any(v.shape[-2:] != glob[0].shape[-2:] for v in glob):
            raise ValueError(f"the {n_global} global views must have one size, got "
                             f"{[tuple(v.shape[-2:]) for v in glob]}")
        pm = PatchMasks.from_masks(masks)
        xg = glob[0] if n_global == 1 else torch.cat(glob)  # (n_global*B, C, H, W)
        if pm.n_samples != xg.shape[0]:
            raise ValueError(f"masks have {pm.n_samples} rows, the {n_global} global views {xg.shape[0]} images")
        if pm.indices.device != xg.device:
            pm = pm.to(xg.device)
        cls_g, patches = backbone.forward_tokens(xg, pm.masks if mask_input else None)  # (nB, D), (nB, N, D)
        if patches.shape[1] != pm.masks.shape[1]:
            raise ValueError(f"masks have {pm.masks.shape[1]} patches per view, the global views "
                             f"{patches.shape[1]} tokens")
        masked_tokens = patches.flatten(0, 1).index_select(0, pm.indices)  # (M, D)
        cls = torch.cat([cls_g, self._cls_features(loc)]) if loc else cls_g  # (sum_v B, D)
        if self.shared_patch_head:
            out = self.head(torch.cat([cls, masked_tokens]))  # one call, as DINOv2
            logits, patch_logits = out[:cls.shape[0]], out[cls.shape[0]:]
        else:
            logits, patch_logits = self.head(cls), self.patch_head(masked_tokens)
        return {"logits": logits, "cls": cls, "masked_patch_logits": patch_logits}
