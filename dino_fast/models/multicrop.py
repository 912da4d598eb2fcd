"""Multi-crop forward: backbone on every view, then the head once on all CLS features."""
from __future__ import annotations

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
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False) -> None:
        super().__init__()
        if packed and not callable(getattr(backbone, "forward_packed", None)):
            raise TypeError(f"packed=True needs a backbone with forward_packed (DinoViT), "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.head = head
        self.packed = packed

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        views = [x] if isinstance(x, torch.Tensor) else list(x)
        if not views or not all(isinstance(v, torch.Tensor) for v in views):
            raise TypeError("MultiCropWrapper expects a Tensor or a non-empty list of Tensors")
        if self.packed:
            feats = self.backbone.forward_packed(views)  # (sum_v B, D)
        else:
            feats = torch.cat([self.backbone(views[s] if e - s == 1 else torch.cat(views[s:e]))
                               for s, e in _same_size_runs(views)])
        return self.head(feats)
