"""KoLeo regulariser vs its definition written as a plain loop (DINOv2's KoLeoLoss), gradients
by finite differences, the per-view sum, input validation."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from dino_fast.koleo import koleo_loss, koleo_loss_views
from tests.helpers import assert_close


def _seed(*case) -> None:
    torch.manual_seed(zlib.crc32(repr(case).encode()))


def _koleo_loop(x: torch.Tensor, eps: float = 1e-8) -> float:
    """Per sample, in float64 Python: normalise, nearest other sample by the largest dot product,
    distance ||x_i - x_j + 1e-8|| (nn.PairwiseDistance's eps), then -mean log(distance + eps)."""
    rows = [[float(v) for v in row] for row in x.double()]
    unit = []
    for row in rows:
        norm = max(math.sqrt(sum(v * v for v in row)), eps)
        unit.append([v / norm for v in row])
    total = 0.0
    for i, a in enumerate(unit):
        best, best_dot = None, -math.inf
        for j, b in enumerate(unit):
            dot = -1.0 if i == j else sum(p * q for p, q in zip(a, b))
            if dot > best_dot:
                best, best_dot = j, dot
        dist = math.sqrt(sum((p - q + 1e-8) ** 2 for p, q in zip(a, unit[best])))
        total += -math.log(dist + eps)
    return total / len(unit)


@pytest.mark.parametrize("n,d", [(2, 3), (7, 5), (33, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_koleo_matches_loop(n, d, dtype):
    _seed("koleo", n, d, dtype)
    x = (3.0 * torch.randn(n, d)).to(dtype)
    loss = koleo_loss(x)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert_close(loss, torch.tensor(_koleo_loop(x), dtype=torch.float64), dtype, name="koleo")


def test_koleo_gradcheck():
    _seed("koleo-grad")
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(koleo_loss, (x,), eps=1e-6, atol=1e-6)


def test_koleo_spread_lowers_loss():
    """Spread-out features have a lower KoLeo than a tight cluster (the regulariser's point)."""
    _seed("koleo-spread")
    spread = torch.randn(16, 8)
    tight = torch.randn(1, 8) + 1e-3 * torch.randn(16, 8)
    assert koleo_loss(spread) < koleo_loss(tight)


def test_koleo_views_sums_chunks():
    _seed("koleo-views")
    x = torch.randn(10, 6)
    assert_close(koleo_loss_views(x, 2), koleo_loss(x[:5]) + koleo_loss(x[5:]), name="sum over views")
    with pytest.raises(ValueError, match="n_views"):
        koleo_loss_views(x, 3)
    with pytest.raises(ValueError, match="2 samples"):
        koleo_loss(x[:1])
    with pytest.raises(ValueError, match="2-D"):
        koleo_loss(x[0])
