"""KoLeo regulariser (DINOv2, after Sablayrolles et al. 2019): spread the features of a batch.

For l2-normalised features x_1..x_n, with nn(i) the nearest other sample (largest dot product,
the sample itself excluded), ``koleo = -mean_i log(||x_i - x_nn(i)|| + eps)``. DINOv2 adds
``0.1 * sum over the 2 global views' chunks`` of it, computed on the student backbone's CLS
features of the global crops, in fp32 (autocast off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["koleo_loss", "koleo_loss_views"]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's ``KoLeoLoss()(x, eps)``: (n, d) features -> 0-d fp32 loss (float64 stays float64).

    As DINOv2: normalise with ``eps``; nearest neighbour by the largest dot product with the
    diagonal set to -1 (first index on ties); distance ``nn.PairwiseDistance(2, eps=1e-8)``, which
    is ``||x_i - x_j + 1e-8||``; then ``-log(distance + eps).mean()``. The neighbour index carries
    no gradient; the distances do, back to ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"koleo_loss needs 2-D float features (n, d), got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 samples to find a neighbour, got {x.shape[0]}")
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), eps=eps, p=2, dim=-1)
        with torch.no_grad():
            dots = x @ x.t()  # (n, n)
            dots.fill_diagonal_(-1.0)  # a sample is not its own neighbour
            neighbour = torch.max(dots, dim=1).indices
        distances = F.pairwise_distance(x, x[neighbour], p=2, eps=1e-8)
        return -torch.log(distances + eps).mean()


def koleo_loss_views(x: torch.Tensor, n_views: int = 2, eps: float = 1e-8) -> torch.Tensor:
    """Sum of :func:`koleo_loss` over the ``n_views`` view chunks of ``x`` ((n_views*B, d),
    views stacked along dim 0), as DINOv2 applies it to the global crops' CLS features; the
    trainer multiplies by ``koleo_weight`` (DINOv2: 0.1)."""
    if n_views < 1 or x.shape[0] % n_views:
        raise ValueError(f"x has {x.shape[0]} rows, not n_views={n_views} equal chunks")
    return sum(koleo_loss(chunk, eps) for chunk in x.chunk(n_views))
