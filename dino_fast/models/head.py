"""DINO projection head, exactly as official DINO's ``DINOHead``.

MLP (in_dim -> hidden -> ... -> bottleneck, GELU, optional BatchNorm), l2-normalise, then a
weight-normalised linear layer without bias to ``out_dim`` prototypes. The weight norm is
written out by hand (``WeightNormLinear``) with the official parameter names
``last_layer.weight_g`` (out, 1) and ``last_layer.weight_v`` (out, in): plain parameters, so
official checkpoints load, and FSDP2 / torch.compile see no weight-norm hooks.

``DINOHead(..., fused_loss=True)`` stops before the last layer: its forward returns the
l2-normalised bottleneck features, and ``DINOLoss.forward_fused_head(feats, head.last_layer,
teacher_logits, epoch)`` runs the last layer fused with the loss (the student logits are never
materialised). Parameters and state dict are unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """``y = x @ W^T`` with ``W = weight_g * weight_v / ||weight_v||`` (norm over each output
    row, i.e. ``torch.nn.utils.weight_norm(..., dim=0)``), no bias."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # Official DINO wraps a freshly built nn.Linear (after its trunc_normal init pass), so
        # the direction keeps nn.Linear's default init.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out, in) weight."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """Official DINO head: ``(B, in_dim) -> (B, out_dim)``.

    ``norm_last_layer=True`` fixes ``last_layer.weight_g`` to 1 (requires_grad False), so the
    prototypes stay unit-norm; ``use_bn`` adds BatchNorm1d after the hidden linears (off for ViT).
    ``fused_loss=True``: forward returns the ``(B, bottleneck_dim)`` normalised features and the
    loss applies ``last_layer`` (see the module docstring); ``logits(x)`` still gives the logits.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 fused_loss: bool = False) -> None:
        super().__init__()
        self.fused_loss = fused_loss
        for name, val in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                          ("bottleneck_dim", bottleneck_dim)):
            if int(val) < 1:
                raise ValueError(f"{name} must be positive, got {val}")
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)  # weight_g starts at 1
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, bottleneck_dim)``: the l2-normalised input of the last layer."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, out_dim)`` whatever ``fused_loss`` says."""
        return self.last_layer(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)  # (B, bottleneck)
        return feats if self.fused_loss else self.last_layer(feats)  # (B, out_dim) unless fused_loss
