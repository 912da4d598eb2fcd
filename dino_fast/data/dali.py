"""DINO multi-crop loader on NVIDIA DALI: JPEG decode and crops in DALI, the rest batched in torch.

One DALI pipeline decodes each image once (``mixed`` nvJPEG on the GPU, libjpeg-turbo in CPU
mode) and cuts ``2 + local_crops_number`` views from it, each as in the official recipe
(:mod:`dino_fast.data.recipe`)::

    RandomResizedCrop (bicubic, antialiased) -> flip p=.5 -> ColorJitter(.4, .4, .2, .1) p=.8
    -> grayscale p=.2 -> GaussianBlur sigma~U(.1, 2) p = 1.0 | 0.1 | 0.5 (global 1 | global 2 | locals)
    -> solarize (threshold 128) p=.2 on global 2 only -> ImageNet mean/std -> CHW in the training dtype.

All draws of a batch are made at once on the host (:func:`~dino_fast.data.batch_augment.draw_batch`),
per sample and per view, from a generator seeded by (seed, epoch, batch, shard): a run resumed
at any batch is bit-identical to an uninterrupted one. DALI runs the decoder, one ``fn.resize``
per view over the drawn window (flip included) and one stack per resolution; the photometric
ops run in torch on all views of a resolution at once (:mod:`dino_fast.data.batch_augment`).
``return_params=True`` also returns the draws.

How the ops map to torchvision / PIL (differences stated, none hidden):

- Crop: torchvision's ``RandomResizedCrop.get_params`` (area fraction in ``scale``, aspect ratio
  in (3/4, 4/3), 10 tries then the central crop) on the size read from the file header; the
  window is resized by DALI with ``INTERP_CUBIC`` and antialiasing (PIL's bicubic resize also
  widens its filter when downscaling). EXIF orientation is ignored, as PIL's ``Image.open`` does.
- Flip: the window's x start and end are swapped, which ``fn.resize`` mirrors.
- Colour jitter + grayscale: torchvision draws brightness b, contrast c ~ U(.6, 1.4),
  saturation s ~ U(.8, 1.2), hue h ~ U(-.1, .1) (a fraction of the hue circle) and applies
  them in a random order, clamping to [0, 255] after each. Here the same four factors are
  drawn, and one per-pixel affine map is applied::

      out = b c (P0 + s R(h) (I - P0)) x + b (1 - c) mu

  where ``P0 = 1 w^T`` projects onto Rec.601 luma (w = .299, .587, .114, the weights of
  torchvision's ``rgb_to_grayscale`` and PIL's ``convert("L")``), ``mu`` is the view's mean
  luma (torchvision's contrast centre) and ``R(h)`` rotates chroma in YIQ space by ``h * 360``
  degrees. Brightness, contrast and saturation are exact torchvision blends; the four maps
  commute, so the order does not matter except for torchvision's intermediate clamping (here
  one clamp, at the end). Hue is the one approximation: a YIQ rotation (as DALI's own
  ``fn.hsv``) instead of a shift of the HSV hue. Grayscale multiplies the chroma term by 0,
  which gives exactly ``rgb_to_grayscale`` of the jittered image, equal in all three channels.
- Blur: a true Gaussian of the drawn sigma cut at 3 sigma, mirrored borders (PIL's
  ``GaussianBlur(radius)`` takes the same sigma and approximates the Gaussian with box filters).
- Solarize: ``x >= 128 -> 255 - x`` (PIL ``ImageOps.solarize``).

Sample order is the one of :class:`~dino_fast.data.sampling.ResumableSampler`: epoch ``e`` is
``randperm(N)`` seeded with ``seed * 1_000_003 + e``, laid out as (batches, shards,
batch_size), shard ``k`` taking column ``k``. ``last_batch="drop"`` drops the tail that does
not fill a global batch (the official behaviour); ``"pad"`` fills it by wrapping around the
permutation. Files are read in Python and fed through ``fn.external_source`` (rather than
``fn.readers.file``, whose shuffle is not seeded by the user seed), so the order is a pure
function of (seed, epoch) and ``set_epoch`` can start anywhere. ``root`` is an image folder or a
shard folder written by ``dino-fast pack`` (:mod:`dino_fast.data.shards`: members read by
(shard, offset, size) from the index, in the same external source, so both give the same batches).

The loader runs ahead of the step (``prefetch_batches``, default 2): a feeder thread
(:mod:`dino_fast.data.feeder`) reads the files, draws the batch, builds the crop windows, runs the
DALI pipeline and the photometric ops, and keeps that many finished batches queued; in GPU mode it
launches the photometric ops on a side CUDA stream and the consumer's stream waits on an event
(no host sync). ``prefetch_batches=0`` does all of it inline in the thread that calls ``next()``:
the batches are bit-identical either way.

Files are checked up front (:mod:`dino_fast.data.dali_validate`: broken files and
decompression bombs are skipped with a warning naming each, counted in :attr:`num_skipped`).

GPU mode (not measurable on the CPU machines this was written on): decode is ``mixed``
(nvJPEG, ``hw_decoder_load`` of the JPEGs on the hardware decoder of A100 / H100 / H200), the
crops run as GPU resizes, the photometric ops as ~25 torch kernels per resolution on the
feeder thread's side stream (the default stream with ``prefetch_batches=0``); the only
host-to-device traffic per batch is two small pinned copies (the
draws, and labels + which views blur / solarize), so nothing syncs. ROI decoding
(``fn.decoders.image_slice`` / ``image_random_crop``) is not used: it decodes one window per
call, and the 2 + N windows of an image cover most of it, so one full decode serves them all.
"""
from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dino_fast.data import batch_augment as aug
from dino_fast.data.dali_validate import bomb_problem, inspect_image_bytes, validate_samples
from dino_fast.data.feeder import Feeder
from dino_fast.data.folder import IMG_EXTENSIONS, DataError
from dino_fast.data.recipe import DECISIONS, GLOBAL_CROPS_SCALE, LOCAL_CROPS_SCALE, view_recipes
from dino_fast.data.shards import open_dataset

try:  # DALI is optional: without it this module still imports and dali_available() is False.
    import nvidia.dali.types as types
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    _DALI_IMPORT_ERROR: Exception | None = None
except Exception as _e:  # ImportError, or OSError when a shared library is missing
    _DALI_IMPORT_ERROR = _e

__all__ = ["DALIMultiCropLoader", "dali_available", "PARAM_NAMES"]

# Keys of the per-view record returned with return_params=True.
PARAM_NAMES = DECISIONS + ("brightness", "contrast", "saturation", "hue", "blur_sigma")

def dali_available() -> bool:
    """True when ``nvidia.dali`` and its PyTorch plugin import."""
    return _DALI_IMPORT_ERROR is None


def _multicrop_graph(source: Any, sizes: tuple[int, ...], on_gpu: bool, hw_decoder_load: float) -> tuple[Any, ...]:
    """Pipeline body: uint8 (F, 3, S, S) per sample for the global views, then the local views."""
    encoded, *windows = fn.external_source(source=source, num_outputs=1 + 2 * len(sizes), batch=True,
                                           dtype=[types.UINT8] + [types.FLOAT] * 2 * len(sizes))
    decode = dict(device="mixed", hw_decoder_load=hw_decoder_load) if on_gpu else dict(device="cpu")
    # adjust_orientation=False: PIL ignores EXIF orientation too, and the crop windows are drawn on the stored size.
    images = fn.decoders.image(encoded, output_type=types.RGB, adjust_orientation=False, **decode)
    crops = [fn.resize(images, size=[s, s], roi_start=windows[2 * v], roi_end=windows[2 * v + 1],
                       interp_type=types.INTERP_CUBIC, antialias=True) for v, s in enumerate(sizes)]
    outputs = []
    for group in (crops[:2], crops[2:]):
        if group:  # one tensor per resolution: the torch side then works on whole batches of views
            outputs.append(fn.transpose(fn.stack(*group, axis=0, axis_name="F"), perm=[0, 3, 1, 2]))
    return tuple(outputs)


def _weak_callback(loader: "DALIMultiCropLoader") -> Any:
    """The external source's callback, holding the loader weakly: a loader dropped by its user is freed at once
    (with its pipeline and threads), not left in a reference cycle that a forked DataLoader worker would then
    collect, running DALI's shutdown on threads that do not exist there (a segfault)."""
    ref = weakref.ref(loader)

    def feed() -> tuple[Any, ...]:
        live = ref()
        if live is None:
            raise StopIteration
        return live._next_input()

    return feed


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (min, max), got {scale!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {scale!r}")
    return lo, hi


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DALIMultiCropLoader:
    """Iterable over ``(views, labels)`` of one epoch, like the torchvision loader.

    ``views`` is a list of ``2 + local_crops_number`` contiguous tensors ``(B, 3, size, size)``
    in ``dtype`` (globals first), ``labels`` a ``(B,)`` int64 tensor; both on
    ``cuda:device_id`` in GPU mode, on the CPU in CPU mode. With ``return_params=True`` a third
    element maps each name of :data:`PARAM_NAMES` to a CPU tensor ``(B, V)`` (bool for the
    coins, float32 for the factors; hue as a fraction of the circle, blur_sigma 0 where no blur),
    ``"crop"`` ``(B, V, 4)`` (top, left, height, width) and ``"index"`` ``(B,)``, the position
    in :attr:`samples` of each image.

    Each ``iter()`` runs the epoch set by :meth:`set_epoch` (else the one after the last
    completed epoch, starting at 0). ``len()`` is the number of batches that iteration yields.
    Sharding: ``shard_id`` = rank, ``num_shards`` = world size; every shard gets the same number
    of batches. ``hw_decoder_load``: share of the JPEGs sent to the GPU's hardware decoder
    (``mixed`` decoding only; A100 / H100 / H200 have one). ``prefetch_batches``: finished batches
    the feeder thread keeps ahead of ``next()`` (0: no thread, all work inline).
    """

    def __init__(self, root: str | os.PathLike, batch_size: int,
                 global_crops_scale: Sequence[float] = GLOBAL_CROPS_SCALE,
                 local_crops_scale: Sequence[float] = LOCAL_CROPS_SCALE,
                 local_crops_number: int = 8, global_crops_size: int = 224, local_crops_size: int = 96, *,
                 device: str = "gpu", device_id: int | None = 0, num_threads: int = 4, seed: int = 0,
                 shard_id: int = 0, num_shards: int = 1, shuffle: bool = True,
                 dtype: torch.dtype = torch.float32, last_batch: str = "drop", return_params: bool = False,
                 validate: str = "header", prefetch_queue_depth: int = 2, hw_decoder_load: float = 0.65,
                 extensions: Sequence[str] = IMG_EXTENSIONS, prefetch_batches: int = 2) -> None:
        if not dali_available():
            raise ImportError(f"nvidia.dali is not usable ({type(_DALI_IMPORT_ERROR).__name__}: "
                              f"{_DALI_IMPORT_ERROR}); install nvidia-dali-cuda130 or use the torchvision loader")
        device = {"cuda": "gpu"}.get(device, device)
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu":
            if not torch.cuda.is_available():
                raise ValueError("device='gpu' needs CUDA, which torch does not see; use device='cpu'")
            device_id = torch.cuda.current_device() if device_id is None else device_id
            _check_int("device_id", device_id, 0)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.local_crops_number = _check_int("local_crops_number", local_crops_number, 0)
        self.global_crops_size = _check_int("global_crops_size", global_crops_size, 1)
        self.local_crops_size = _check_int("local_crops_size", local_crops_size, 1)
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.num_shards = _check_int("num_shards", num_shards, 1)
        self.shard_id = _check_int("shard_id", shard_id, 0)
        if shard_id >= num_shards:
            raise ValueError(f"shard_id={shard_id} must be < num_shards={num_shards}")
        self.num_threads = _check_int("num_threads", num_threads, 1)
        self.prefetch_queue_depth = _check_int("prefetch_queue_depth", prefetch_queue_depth, 1)
        self.prefetch_batches = _check_int("prefetch_batches", prefetch_batches, 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, got {dtype!r}")
        if last_batch not in ("drop", "pad"):
            raise ValueError(f"last_batch must be 'drop' or 'pad', got {last_batch!r}")
        if validate not in ("header", "full", "none"):
            raise ValueError(f"validate must be 'header', 'full' or 'none', got {validate!r}")
        if not 0.0 <= float(hw_decoder_load) <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load!r}")
        self.device, self.device_id, self.seed, self.shuffle = device, device_id, seed, bool(shuffle)
        self.dtype, self.last_batch, self.return_params = dtype, last_batch, bool(return_params)
        self.hw_decoder_load = float(hw_decoder_load)
        self._torch_device = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")

        # An image folder or a shard folder; DataError on a missing / empty one.
        self._source = source = open_dataset(root, extensions=extensions)
        self.root, self.classes, self.class_to_idx = source.root, source.classes, source.class_to_idx
        self._src_index, self._sizes, self.skipped = validate_samples(source, validate)
        self.samples = [source.samples[k] for k in self._src_index]
        n, global_batch = len(self.samples), self.batch_size * self.num_shards
        self.batches_per_epoch = n // global_batch if last_batch == "drop" else -(-n // global_batch)
        if self.batches_per_epoch == 0:
            raise DataError(f"{n} usable images in {self.root} is fewer than one global batch "
                            f"({self.batch_size} x {self.num_shards} shards) with last_batch='drop'")
        self._labels = np.array([label for _, label in self.samples], np.int64)

        self._views = view_recipes(self.global_crops_scale, self.local_crops_scale, local_crops_number,
                                   global_crops_size, local_crops_size)
        self._io = ThreadPoolExecutor(max_workers=min(8, self.num_threads), thread_name_prefix="dali-read")
        self._epoch, self._start_batch = 0, 0
        self._pipe = self._iter = None
        self._stream_start = self._fed = self._delivered = 0
        self._pending: dict[int, dict[str, Any]] = {}  # host side of each batch fed to DALI, by stream position
        self._order_cache: dict[int, np.ndarray] = {}
        self._feeder: Feeder | None = None

    # -- dataset facts ------------------------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return len(self._views)

    @property
    def num_skipped(self) -> int:
        """Files left out by the up-front check (see :attr:`skipped` for paths and reasons)."""
        return len(self.skipped)

    def __len__(self) -> int:
        return self.batches_per_epoch - self._start_batch

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, images={len(self.samples)}, "
                f"skipped={self.num_skipped}, batch_size={self.batch_size}, views={self.num_views}, "
                f"device={self.device!r}, shard={self.shard_id}/{self.num_shards})")

    # -- order ------------------------------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This shard's sample indices for ``epoch``, shape (batches_per_epoch, batch_size)."""
        if epoch not in self._order_cache:
            n, nb, b, k = len(self.samples), self.batches_per_epoch, self.batch_size, self.num_shards
            if self.shuffle:  # same permutation as ResumableSampler, so both backends see one order
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=g).numpy()
            else:
                perm = np.arange(n)
            order = np.resize(perm, nb * b * k)  # drop: truncates; pad: wraps around the permutation
            if len(self._order_cache) >= 2:
                self._order_cache.pop(min(self._order_cache))
            self._order_cache[epoch] = order.reshape(nb, k, b)[:, self.shard_id].copy()
        return self._order_cache[epoch]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``iter()`` yields batches ``start_batch..`` of ``epoch``; a resume does not decode
        the batches it skips."""
        _check_int("epoch", epoch, 0)
        if not 0 <= start_batch < self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} must be in [0, {self.batches_per_epoch})")
        self._epoch, self._start_batch = epoch, start_batch

    # -- the stream DALI pulls from ---------------------------------------------------------------------------
    def _sizes_of(self, idx: np.ndarray, data: list[np.ndarray]) -> np.ndarray:
        """(B, 2) sizes of a batch; read from the bytes when the up-front check was skipped."""
        sizes = self._sizes[idx]
        for k in np.flatnonzero(sizes[:, 0] < 0):
            problem, size = inspect_image_bytes(data[k].tobytes())
            path = self._source.describe(int(self._src_index[idx[k]]))
            if size is None or bomb_problem(size):
                raise DataError(f"cannot use {path} ({bomb_problem(size) if size else problem}); rebuild the loader "
                                f"with validate='header' (or 'full') to skip such files")
            self._sizes[idx[k]] = sizes[k] = size
        return sizes

    def _next_input(self) -> tuple[Any, ...]:
        """external_source callback: batch ``_fed`` of the endless stream that starts at ``_stream_start``.

        The stream never ends (no StopIteration), so DALI's prefetching runs on across epoch
        boundaries without a bubble; ``__iter__`` counts batches per epoch."""
        g = self._stream_start + self._fed
        self._fed += 1
        epoch, b = divmod(g, self.batches_per_epoch)
        idx = self.epoch_indices(epoch)[b]
        data = list(self._io.map(self._source.read_bytes, self._src_index[idx].tolist()))
        draws = aug.draw_batch(aug.batch_rng(self.seed, epoch, b, self.shard_id), self._sizes_of(idx, data),
                               self._views)
        self._pending[g] = {"index": idx, "draws": draws, "params": aug.view_params(draws)}
        windows = [w for v in range(self.num_views) for w in aug.crop_windows(draws, v)]
        return (data, *windows)

    def _build(self, stream_start: int) -> None:
        self.close_pipeline()
        self._stream_start, self._fed, self._delivered = stream_start, 0, 0
        on_gpu = self.device == "gpu"
        sizes = tuple(v.size for v in self._views)
        # No DALI operator draws anything: the pipeline seed only fixes DALI's internals.
        pipe = pipeline_def(_multicrop_graph)(
            _weak_callback(self), sizes, on_gpu, self.hw_decoder_load, batch_size=self.batch_size,
            num_threads=self.num_threads, device_id=self.device_id if on_gpu else None, seed=self.seed,
            prefetch_queue_depth=self.prefetch_queue_depth)
        self._names = ["globals", "locals"][:1 + (self.local_crops_number > 0)]
        try:
            pipe.build()
            self._iter = DALIGenericIterator(pipe, self._names, size=-1, auto_reset=False, prepare_first_batch=False)
        except RuntimeError as e:
            raise DataError(f"DALI could not start the pipeline on {self.root}: {e}") from e
        self._pipe = pipe

    def close_pipeline(self) -> None:
        """Release the DALI pipeline (and its GPU buffers); the next ``iter()`` builds a new one."""
        self._iter = self._pipe = None
        self._pending.clear()

    def close(self) -> None:
        """Stop the feeder thread, release the pipeline and the file-reading threads; the loader cannot be
        iterated afterwards."""
        self._stop_feeder()
        self.close_pipeline()
        self._io.shutdown(wait=False)

    def _stop_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None

    def __iter__(self) -> Iterator[tuple]:
        self._stop_feeder()  # an earlier iterator left part-way: its thread must not drive the pipeline any more
        target = self._epoch * self.batches_per_epoch + self._start_batch
        if self._pipe is None or self._stream_start + self._delivered != target:
            self._build(target)  # first epoch, resume, or a previous epoch left part-way
        batches = self._batches(self.batches_per_epoch - self._start_batch)
        if self.prefetch_batches:
            feeder = self._feeder = Feeder(batches, self.prefetch_batches, "dino-fast-dali-feeder", self._torch_device)
            try:
                yield from feeder
            finally:  # done, closed, garbage-collected or left part-way: no thread outlives the iterator
                feeder.close()
                if self._feeder is feeder:
                    self._feeder = None
        else:
            yield from batches
        self._epoch, self._start_batch = self._epoch + 1, 0

    def _batches(self, n: int) -> Iterator[tuple]:
        """The next ``n`` batches of the stream: DALI's outputs and the photometric ops (in the feeder thread
        when there is one)."""
        for _ in range(n):
            try:
                out = next(self._iter)[0]
            except StopIteration:  # not expected: the stream is endless
                raise DataError("DALI pipeline ended early") from None
            except DataError:  # raised by our own callback (validate='none'), already says what to do
                self.close_pipeline()
                raise
            except RuntimeError as e:
                self.close_pipeline()
                raise DataError(f"DALI failed on a batch from {self.root} ({e}); if a file is corrupt in a way the "
                                f"up-front check missed, rebuild the loader with validate='full'") from e
            meta = self._pending.pop(self._stream_start + self._delivered)
            self._delivered += 1
            yield self._convert(out, meta)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the views' device: pinned and copied without blocking on the GPU."""
        t = torch.from_numpy(array)
        return t.pin_memory().to(self._torch_device, non_blocking=True) if self.device == "gpu" else t

    def _convert(self, out: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple:
        draws = meta["draws"]
        groups = [(name, sl) for name, sl in (("globals", slice(0, 2)), ("locals", slice(2, None))) if name in out]
        # Labels and, per resolution, the views (rows f * B + b) that draw blur / solarize, known here on the
        # host: one copy to the device, and the photometric ops never sync to find out.
        ints = [self._labels[meta["index"]]] + [np.flatnonzero(c[:, sl].T) for _, sl in groups
                                                 for c in (draws.blur, draws.solarize)]
        labels, *rows = torch.split(self._to_device(np.concatenate(ints).astype(np.int64)), [len(a) for a in ints])
        params = self._to_device(meta["params"])  # (B, V, NUM_VIEW_PARAMS)
        views = []
        with aug.single_threaded(self._torch_device):
            for k, (name, sl) in enumerate(groups):
                views += aug.apply_photometric(out[name], params[:, sl], blur_rows=rows[2 * k],
                                               solarize_rows=rows[2 * k + 1], dtype=self.dtype)
        if not self.return_params:
            return views, labels
        params_out = {name: torch.from_numpy(np.ascontiguousarray(getattr(draws, name))) for name in PARAM_NAMES}
        params_out["crop"] = torch.from_numpy(draws.crop)
        params_out["index"] = torch.from_numpy(meta["index"])
        return views, labels, params_out
