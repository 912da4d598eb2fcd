"""iBOT / DINOv2 block masks for the student's global views (the loss is :mod:`dino_fast.ibot`).

Masks (DINOv2 ``MaskingGenerator`` and ``collate_data_and_cast``): of the n global-view samples
of a batch, ``int(n * mask_sample_probability)`` get a blockwise mask whose target ratio is drawn
from its own slice of ``mask_ratio_min_max``, the others none; the rows are then shuffled. Every
draw comes from a generator the caller passes (:func:`mask_rng` derives one from seed, step and
rank), never from a global RNG, so a resumed run replays the same masks.

Row order everywhere (:class:`PatchMasks`): masked patches in ``masks.flatten().nonzero()``
order, i.e. view-major, then sample, then patch index, the order
:meth:`~dino_fast.models.MultiCropWrapper.forward_train` returns them in.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["MaskingGenerator", "sample_masks", "mask_rng", "PatchMasks"]


class MaskingGenerator:
    """DINOv2's ``MaskingGenerator`` (from BEiT): blockwise masks on an (h, w) patch grid.

    ``__call__(num_masking_patches, rng=...)`` returns an (h, w) bool array with at most
    ``num_masking_patches`` patches set, made of rectangles of ``min_num_patches`` to
    ``max_num_patches`` patches with an aspect ratio log-uniform in [min_aspect, max_aspect]
    (default 1 / min_aspect). A rectangle never spans the whole height or width (DINOv2's strict
    ``<``). Each rectangle gets 10 tries; the first rectangle that adds nothing ends the mask, so
    the call always terminates, also on tiny grids, where a mask may stay below its target or
    empty (as DINOv2). ``rng`` is a ``numpy.random.Generator`` (anything with ``random()`` and
    ``integers(low, high)``); DINOv2's draws map one to one: ``random.uniform(a, b)`` is
    ``a + (b - a) * rng.random()``, ``random.randint(a, b)`` is ``rng.integers(a, b + 1)``.
    """

    def __init__(self, input_size: int | tuple[int, int], num_masking_patches: int | None = None,
                 min_num_patches: float = 4, max_num_patches: float | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None) -> None:
        if not isinstance(input_size, tuple):
            input_size = (int(input_size),) * 2
        self.height, self.width = (int(s) for s in input_size)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input_size must be a positive (h, w) patch grid, got {input_size}")
        if not min_aspect > 0 or (max_aspect is not None and not max_aspect > 0):
            raise ValueError(f"aspect ratios must be > 0, got min_aspect={min_aspect}, max_aspect={max_aspect}")
        if not min_num_patches >= 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            # DINOv2's class default is num_masking_patches; its train.py passes half the grid
            max_num_patches = num_masking_patches if num_masking_patches is not None else 0.5 * self.num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        lo, hi = self.log_aspect_ratio
        return (f"MaskingGenerator(({self.height}, {self.width}), patches per block [{self.min_num_patches}, "
                f"{self.max_num_patches}], log aspect [{lo:.3f}, {hi:.3f}])")

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: Any) -> int:
        """Add one rectangle (up to 10 tries); returns how many patches it added."""
        delta = 0
        for _ in range(10):
            target_area = _uniform(rng, self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(_uniform(rng, *self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:  # overlap with earlier blocks allowed, overshoot not
                    block[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int = 0, *, rng: Any) -> np.ndarray:
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break  # no rectangle fits what is left: stop below the target (small grids)
            mask_count += delta
        return mask


def _uniform(rng: Any, a: float, b: float) -> float:
    """Python's ``random.uniform(a, b)``: also defined for a > b (DINOv2 relies on it when the
    patches left are fewer than ``min_num_patches``)."""
    return a + (b - a) * rng.random()


def _numpy_rng(generator: np.random.Generator | torch.Generator) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"pass a CPU torch.Generator (masks are drawn on the host), got one on {generator.device}")
        # one draw from the caller's stream seeds this call: the stream advances by exactly one value
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        return np.random.default_rng(seed)
    if not isinstance(generator, types.ModuleType) and all(
            callable(getattr(generator, m, None)) for m in ("random", "integers", "permutation")):
        return generator  # numpy-Generator-like (tests drive DINOv2's python-random stream through one)
    raise TypeError(f"generator must be a numpy.random.Generator or a torch.Generator, got "
                    f"{type(generator).__name__}: masks never come from a global RNG, so that a resumed run "
                    "replays them (see dino_fast.ibot_masks.mask_rng)")


def mask_rng(seed: int, step: int, rank: int = 0, micro_batch: int = 0) -> np.random.Generator:
    """A fresh generator for the masks of one micro-batch: a function of (seed, step, rank,
    micro_batch) only, so a run resumed at ``step`` draws the masks an uninterrupted run draws,
    with nothing to checkpoint; ranks draw different masks."""
    for name, val in (("seed", seed), ("step", step), ("rank", rank), ("micro_batch", micro_batch)):
        if int(val) < 0:
            raise ValueError(f"mask_rng: {name} must be >= 0, got {val}")
    return np.random.default_rng([int(seed), int(step), int(rank), int(micro_batch), 0x1B07])


def sample_masks(n_samples: int, grid_size: int | tuple[int, int],
                 generator: np.random.Generator | torch.Generator, *,
                 mask_ratio_min_max: tuple[float, float] = (0.1, 0.5), mask_sample_probability: float = 0.5,
                 masking: MaskingGenerator | None = None) -> torch.Tensor:
    """Masks of ``n_samples`` global-view samples as DINOv2's ``collate_data_and_cast``: a
    (n_samples, h*w) bool CPU tensor, True = masked.

    ``int(n_samples * mask_sample_probability)`` rows are masked, the i-th of them with target
    ``int(N * U(r_i, r_{i+1}))`` patches, r = ``linspace(*mask_ratio_min_max, k + 1)`` (fp32, as
    DINOv2's ``torch.linspace``), the rest all False; then the rows are shuffled. ``generator``:
    a ``numpy.random.Generator`` (e.g. :func:`mask_rng`) or a CPU ``torch.Generator`` (one value
    drawn from it seeds the call). ``masking`` defaults to ``MaskingGenerator(grid_size)``
    (blocks of 4 to N/2 patches, aspect 0.3 to 3.3, DINOv2's train.py). DINOv2 draws the masks of
    all global views of a batch in one call (``n_samples = n_global * B``, view-major rows):
    do the same to follow it.
    """
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 0:
        raise ValueError(f"n_samples must be an int >= 0, got {n_samples!r}")
    lo, hi = (float(r) for r in mask_ratio_min_max)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mask_ratio_min_max must be (min, max) with 0 <= min <= max <= 1, got {mask_ratio_min_max}")
    if not 0.0 <= mask_sample_probability <= 1.0:
        raise ValueError(f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}")
    grid = tuple(int(g) for g in grid_size) if isinstance(grid_size, (tuple, list)) else (int(grid_size),) * 2
    masking = masking if masking is not None else MaskingGenerator(grid)
    if grid != masking.get_shape():
        raise ValueError(f"grid_size {grid_size} differs from the masking generator's {masking.get_shape()}")
    rng = _numpy_rng(generator)
    n_tokens = masking.num_patches
    n_masked = int(n_samples * mask_sample_probability)
    probs = torch.linspace(lo, hi, n_masked + 1)  # fp32 as DINOv2: same integer targets
    masks = []
    for i in range(n_masked):
        ratio = probs[i] + (probs[i + 1] - probs[i]) * rng.random()
        masks.append(masking(int(n_tokens * ratio), rng=rng))
    masks += [np.zeros(masking.get_shape(), dtype=bool)] * (n_samples - n_masked)
    order = rng.permutation(n_samples)
    out = np.stack([masks[j] for j in order]) if n_samples else np.zeros((0, *masking.get_shape()), dtype=bool)
    return torch.from_numpy(out.reshape(n_samples, n_tokens))


@dataclass(frozen=True)
class PatchMasks:
    """The masks of a batch's global views and what the loss needs from them, computed once
    where the masks are (on the host: no device sync), then moved together.

    ``masks`` (n, N) bool, rows view-major (n = n_global * B); ``indices`` (M,) int64, the flat
    positions ``masks.flatten().nonzero()`` (view-major, then sample, then patch);
    ``weights`` (M,) fp32, ``1 / (masked patches of the sample)`` for each masked patch (DINOv2's
    ``masks_weight``).
    """

    masks: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_masks(cls, masks: torch.Tensor | Sequence[torch.Tensor]) -> "PatchMasks":
        """From one (n, N) bool tensor or a list of per-view (B_v, N) ones (concatenated in order)."""
        if isinstance(masks, PatchMasks):
            return masks
        if not isinstance(masks, torch.Tensor):
            masks = list(masks)
            if not masks or not all(isinstance(m, torch.Tensor) for m in masks):
                raise TypeError("masks must be a bool Tensor (n, N) or a non-empty list of them")
            masks = masks[0] if len(masks) == 1 else torch.cat(masks)
        if masks.dtype != torch.bool or masks.dim() != 2:
            raise ValueError(f"masks must be a 2-D bool tensor (n_global * B, h * w), got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        indices = masks.flatten().nonzero().flatten()  # (M,)
        counts = masks.sum(-1, dtype=torch.float32).clamp(min=1.0)  # (n,)
        weights = (1.0 / counts).unsqueeze(-1).expand_as(masks)[masks]  # (M,)
        return cls(masks, indices, weights)

    @property
    def n_samples(self) -> int:
        return self.masks.shape[0]

    @property
    def n_masked(self) -> int:
        """M, known on the host (a shape, no sync)."""
        return self.indices.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PatchMasks":
        return PatchMasks(*(t.to(device, non_blocking=non_blocking) for t in (self.masks, self.indices, self.weights)))

    def pin_memory(self) -> "PatchMasks":
        """Page-locked copies, so that ``to(cuda, non_blocking=True)`` does not wait for the copy."""
        return PatchMasks(*(t.pin_memory() for t in (self.masks, self.indices, self.weights)))
