"""Per-batch draws and the batched photometric ops of the DALI multi-crop loader.

Where the time went before: DALI on CPU pays a fixed cost per operator and per sample, not per
pixel, and each view ran ~30 operators (coin flips, scalar arithmetic for the colour matrix,
conditionals splitting and merging the batch, a luma reduction, blur, LUT, normalize). By
ablation (64 images of 64 px, 2 x 32 + 6 x 16 px views, CPU time per batch): 57 ms in all, of
which ~28 ms the per-view scalar graph of draws and matrix arithmetic, ~11 ms the colour op's
pixel work, ~7 ms the blur, ~16 ms decode + crops + normalize; decode alone ~1 ms. So the work
is split by what each side does cheaply (now ~20 ms per batch; ``bench/bench_data.py --profile``):

- every random decision of every view of a batch is drawn here, in numpy, in one go
  (:func:`draw_batch`), from a generator seeded by (seed, epoch, batch, shard)
  (:func:`batch_rng`): a resumed run draws the same crops as an uninterrupted one;
- DALI decodes each image once and cuts each view with one ``fn.resize`` over the drawn crop
  window, the flip folded in (:func:`crop_windows`: a window whose start is right of its end is
  mirrored);
- the photometric ops run in torch on all views of one resolution at once
  (:func:`apply_photometric`, on the views' device): colour jitter and grayscale as one 3x3
  matrix + offset per view, the Gaussian blur as a per-view band matrix (the identity where
  the view draws no blur), solarize, ImageNet normalization and the cast to the training dtype.

The draws follow the recipe (:mod:`dino_fast.data.recipe`) and torchvision's definitions: the
crop is ``RandomResizedCrop.get_params`` (10 tries, then the central crop), the jitter factors
``ColorJitter.get_params``. How the colour matrix maps to torchvision is in :mod:`dino_fast.data.dali`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from dino_fast.data import recipe
from dino_fast.data.recipe import ViewRecipe

__all__ = ["BatchDraws", "batch_rng", "draw_batch", "random_resized_crops", "crop_windows", "color_matrices",
           "view_params", "apply_photometric", "blur_matrices", "single_threaded", "NUM_VIEW_PARAMS"]

_CROP_TRIES = 10  # RandomResizedCrop.get_params
# YIQ (NTSC): row 0 is luma; rows 1-2 (chroma) sum to 0, so gray (x = k 1) has no chroma.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64)
# Per-view record fed to apply_photometric: 3x3 colour matrix (9), contrast offset factor, blur sigma, solarize.
NUM_VIEW_PARAMS = 12


@dataclass
class BatchDraws:
    """Every random decision of one batch, arrays (B, V); factors hold the identity where their op is off."""

    crop: np.ndarray
    """(B, V, 4) int64: top, left, height, width of the crop in the source image."""
    flip: np.ndarray
    color_jitter: np.ndarray
    grayscale: np.ndarray
    blur: np.ndarray
    solarize: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    """A fraction of the hue circle, in [-0.1, 0.1]."""
    blur_sigma: np.ndarray
    """0 where the view draws no blur."""


def batch_rng(seed: int, epoch: int, batch: int, shard: int) -> np.random.Generator:
    """The generator of one batch's draws: a pure function of its position, so resume repeats them."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, batch, shard])))


def random_resized_crops(rng: np.random.Generator, sizes: np.ndarray, scales: np.ndarray,
                         ratio: Sequence[float] = recipe.CROP_RATIO) -> np.ndarray:
    """``RandomResizedCrop.get_params`` for every (sample, view): (B, V, 4) int64 (top, left, height, width).

    ``sizes`` (B, 2) is each image's (height, width), ``scales`` (V, 2) each view's area range."""
    n_img, n_view = len(sizes), len(scales)
    height = sizes[:, 0, None, None].astype(np.float64)  # (B, 1, 1)
    width = sizes[:, 1, None, None].astype(np.float64)
    lo, hi = scales[None, :, 0, None], scales[None, :, 1, None]  # (1, V, 1)
    target = height * width * (lo + (hi - lo) * rng.random((n_img, n_view, _CROP_TRIES)))
    log_r = np.log(np.asarray(ratio, np.float64))
    aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * rng.random((n_img, n_view, _CROP_TRIES)))
    w = np.rint(np.sqrt(target * aspect))  # Python's round(): half to even, as np.rint
    h = np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(axis=2)[..., None]  # the first try that fits
    w = np.take_along_axis(w, first, 2)[..., 0]
    h = np.take_along_axis(h, first, 2)[..., 0]
    # Fallback where no try fits: the whole image cut to the ratio range, centred.
    height, width = height[..., 0], width[..., 0]
    in_ratio = width / height
    fw = np.where(in_ratio > max(ratio), np.rint(height * max(ratio)), width)
    fh = np.where(in_ratio < min(ratio), np.rint(width / min(ratio)), height)
    fits = ok.any(axis=2)
    w, h = np.where(fits, w, np.broadcast_to(fw, w.shape)), np.where(fits, h, np.broadcast_to(fh, h.shape))
    u = rng.random((2, n_img, n_view))  # uniform integer offsets, as torch.randint(0, n + 1)
    top = np.where(fits, np.floor(u[0] * (height - h + 1)), (height - h) // 2)
    left = np.where(fits, np.floor(u[1] * (width - w + 1)), (width - w) // 2)
    return np.stack([top, left, h, w], axis=-1).astype(np.int64)


def draw_batch(rng: np.random.Generator, sizes: np.ndarray, views: Sequence[ViewRecipe]) -> BatchDraws:
    """All decisions of a batch of images of ``sizes`` (B, 2) for ``views``. Every uniform is drawn
    whether or not its op fires, so the stream of draws has a fixed layout."""
    n = len(sizes)
    scales = np.array([v.scale for v in views], np.float64)
    crop = random_resized_crops(rng, sizes, scales)
    probs = np.array([[v.flip_p, v.jitter_p, v.grayscale_p, v.blur_p, v.solarize_p] for v in views])  # (V, 5)
    coins = rng.random((n, len(views), 5)) < probs
    flip, jitter, gray, blur, solarize = (coins[..., k] for k in range(5))
    shape = (n, len(views))

    def factor(strength: float) -> np.ndarray:  # ColorJitter's [max(0, 1 - s), 1 + s], identity where off
        f = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, shape)
        return np.where(jitter, f, 1.0).astype(np.float32)

    brightness, contrast, saturation = factor(recipe.BRIGHTNESS), factor(recipe.CONTRAST), factor(recipe.SATURATION)
    hue = np.where(jitter, rng.uniform(-recipe.HUE, recipe.HUE, shape), 0.0).astype(np.float32)
    sigma = np.where(blur, rng.uniform(*recipe.BLUR_SIGMA, shape), 0.0).astype(np.float32)
    return BatchDraws(crop, flip, jitter, gray, blur, solarize, brightness, contrast, saturation, hue, sigma)


def crop_windows(draws: BatchDraws, view: int) -> tuple[np.ndarray, np.ndarray]:
    """``fn.resize`` ROI of one view: start, end (B, 2) float32 in (y, x) order; a flipped view has
    its x start and end swapped, which DALI's resize mirrors."""
    top, left, h, w = (draws.crop[:, view, k].astype(np.float32) for k in range(4))
    flip = draws.flip[:, view]
    start = np.stack([top, np.where(flip, left + w, left)], axis=1)
    end = np.stack([top + h, np.where(flip, left, left + w)], axis=1)
    return start, end


def _chroma_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P0 (luma projection 1 w^T), P1 = I - P0 (chroma) and P2 (chroma rotated 90 deg), float64.

    A chroma rotation by theta is ``cos(theta) P1 + sin(theta) P2``; P1 and P2 leave luma
    unchanged (w^T P1 = w^T P2 = 0), so the jitter's mean luma is b * mu."""
    yiq2rgb = np.linalg.inv(_RGB2YIQ)
    rot90 = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    p0 = yiq2rgb @ np.diag([1.0, 0.0, 0.0]) @ _RGB2YIQ
    return p0, np.eye(3) - p0, yiq2rgb @ rot90 @ _RGB2YIQ


_P0, _P1, _P2 = _chroma_matrices()


def color_matrices(draws: BatchDraws) -> tuple[np.ndarray, np.ndarray]:
    """Jitter + grayscale of every view as ``out = M x + offset * mu`` (mu: the view's mean luma):
    M (B, V, 3, 3) and offset (B, V), float32; exactly the identity where neither op fires."""
    b, c, s = (x.astype(np.float64)[..., None, None] for x in (draws.brightness, draws.contrast, draws.saturation))
    theta = draws.hue.astype(np.float64)[..., None, None] * (-2.0 * math.pi)  # YIQ rotation by -theta: HSV hue +theta
    chroma = np.where(draws.grayscale[..., None, None], 0.0, s)
    m = b * c * (_P0 + chroma * (np.cos(theta) * _P1 + np.sin(theta) * _P2))
    m = np.where((draws.color_jitter | draws.grayscale)[..., None, None], m, np.eye(3))
    offset = (b * (1.0 - c))[..., 0, 0]
    return m.astype(np.float32), offset.astype(np.float32)


def view_params(draws: BatchDraws) -> np.ndarray:
    """(B, V, NUM_VIEW_PARAMS) float32 for :func:`apply_photometric`: one array, one copy to the device."""
    m, offset = color_matrices(draws)
    n, v = offset.shape
    return np.concatenate([m.reshape(n, v, 9), offset[..., None], draws.blur_sigma[..., None],
                           draws.solarize[..., None].astype(np.float32)], axis=-1)


def blur_matrices(sigma: torch.Tensor, n: int) -> torch.Tensor:
    """(N, n, n) Gaussian blur of a length-``n`` signal per sigma, as a matrix: weights exp(-t^2 / 2 sigma^2)
    for |t| <= ceil(3 sigma), normalised, borders mirrored without repeating the edge (reflect-101,
    DALI's gaussian_blur border). sigma 0 gives the identity, exactly. Sigmas are at most the
    recipe's maximum (the taps stop at 3 times it: known without looking at the device tensor)."""
    radius = math.ceil(3 * recipe.BLUR_SIGMA[1])
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)  # (K,)
    sig = sigma.float()[:, None]
    w = torch.exp(-t.square() / (2 * sig.square().clamp_min(1e-12)))
    w = torch.where(t.abs() <= torch.ceil(3 * sig), w, 0.0)
    w = torch.where(sig > 0, w, (t == 0).float())
    w = w / w.sum(1, keepdim=True)  # (N, K)
    idx = torch.arange(n, device=sigma.device)[:, None] + t.long()  # (n, K) source index of each tap
    if n > 1:
        period = 2 * (n - 1)
        idx = idx.abs() % period
        idx = torch.where(idx >= n, period - idx, idx)
    else:
        idx = torch.zeros_like(idx)
    out = torch.zeros(len(sigma), n, n, device=sigma.device)
    return out.scatter_add_(2, idx.expand(len(sigma), n, -1), w[:, None, :].expand(-1, n, -1))


@contextlib.contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """torch's intra-op threads limited to one on the CPU for the duration: the views are small
    (a parallel region costs more than it saves) and DALI's threads already hold the cores; with
    more threads than free cores the workers of each op wait on each other (measured: ~10x the
    CPU time of one thread on the loaded 2-core machine)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def apply_photometric(x: torch.Tensor, params: torch.Tensor, *, blur_rows: torch.Tensor | None = None,
                      solarize_rows: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The photometric ops of F views of B images: ``x`` uint8 (B, F, 3, H, W), ``params``
    (B, F, NUM_VIEW_PARAMS) on the same device -> F views (B, 3, H, W) in ``dtype``, normalized.

    Each op works in uint8 units and rounds after it, as PIL does: colour (jitter + grayscale),
    clamped to [0, 255]; blur; solarize; then ImageNet normalization. ``blur_rows`` /
    ``solarize_rows``: the views (index ``f * B + b``) that draw the op, so that only those pay
    for it; the loader knows them on the host from the draws (no device sync). None: read from
    ``params`` (blur sigma > 0, solarize flag)."""
    b, f, _, h, w = x.shape
    n = b * f
    # View-major from the start (rows f * B + b): the output is then F contiguous (B, 3, H, W) without a transpose.
    x = x.transpose(0, 1)
    p = params.transpose(0, 1).reshape(n, NUM_VIEW_PARAMS).float()
    if blur_rows is None:
        blur_rows = torch.nonzero(p[:, 10] > 0)[:, 0]
    if solarize_rows is None:
        solarize_rows = torch.nonzero(p[:, 11] > 0.5)[:, 0]
    xf = x.reshape(n, 3, h * w).float()  # (N, 3, HW)
    means = xf.mean(2)
    # (N,) mean luma of each view, torchvision's contrast centre; Python-float weights: no host-to-device copy
    mu = sum(means[:, c] * wc for c, wc in enumerate(recipe.LUMA))
    m = p[:, :9].view(n, 3, 3)
    # Elementwise multiply-adds (not a bmm): exact fp32 on every device, whatever TF32 setting is on.
    y = (p[:, 9] * mu)[:, None, None].expand(n, 3, h * w).clone()
    for k in range(3):
        y.addcmul_(m[:, :, k, None], xf[:, k, None, :])
    y = y.round_().clamp_(0, 255).view(n, 3, h, w)
    if len(blur_rows):
        sel = y if len(blur_rows) == n else y.index_select(0, blur_rows)
        sigma = p[:, 10] if len(blur_rows) == n else p.index_select(0, blur_rows)[:, 10]
        a_h = blur_matrices(sigma, h)
        a_w = a_h if h == w else blur_matrices(sigma, w)
        k = len(sigma)
        sel = torch.bmm(sel.reshape(k, 3 * h, w), a_w.transpose(1, 2)).view(k, 3, h, w)  # along x
        sel = torch.matmul(a_h[:, None], sel).round_()  # along y
        y = sel if len(blur_rows) == n else y.index_copy_(0, blur_rows, sel)
    if len(solarize_rows):
        sel = y.index_select(0, solarize_rows)
        y.index_copy_(0, solarize_rows, torch.where(sel >= recipe.SOLARIZE_THRESHOLD, 255.0 - sel, sel))
    # (x / 255 - mean) / std, one channel at a time with Python-float constants: the fast elementwise path.
    out = torch.empty((n, 3, h, w), device=x.device)
    for c, (mean, std) in enumerate(zip(recipe.IMAGENET_MEAN, recipe.IMAGENET_STD)):
        torch.mul(y[:, c], 1.0 / (255.0 * std), out=out[:, c]).add_(-mean / std)
    return list(out.to(dtype).view(f, b, 3, h, w).unbind(0))
