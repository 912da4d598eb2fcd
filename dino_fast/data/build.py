"""The one train-data builder: the trainer and the benchmarks (bench_data, bench_train) call
:func:`build_train_data`, so what is measured is what training runs.

Both back-ends give the same sample order for a seed (``(seed, epoch)`` permutation, sharded by
rank, resumable at any batch) and the same augmentation recipe (one :class:`DINOMultiCrop`); views
arrive on ``device``. ``data_path`` is an image folder or a shard folder (``dino-fast pack``).
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch

from dino_fast.data.multicrop import DINOMultiCrop
from dino_fast.errors import ConfigError, DataError

__all__ = ["DATA_BACKENDS", "TrainData", "build_train_data", "resolve_data_backend"]

DATA_BACKENDS = ("auto", "dali", "torchvision")

log = logging.getLogger(__name__)


def resolve_data_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """(backend, why): ``auto`` is DALI wherever it imports (nvJPEG on CUDA; on CPU its operators
    with the photometric ops batched in torch, 7.8x the torchvision loader on 2 cores:
    bench/results/bench_data-cpu-2026-12-04), else torchvision."""
    if backend != "auto":
        return backend, "requested"
    from dino_fast.data.dali import dali_available

    if not dali_available():
        return "torchvision", "nvidia-dali is not importable"
    return "dali", f"DALI present ({'GPU decode' if device.type == 'cuda' else 'CPU operators'})"


class TrainData:
    """The training loader and what the trainer needs of it: batches per epoch and
    epoch/resume control. ``epoch(e, start_batch)`` yields lists of view tensors on the device."""

    def __init__(self, cfg: Any, device: torch.device, rank: int = 0, world: int = 1,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.device, self.compute_dtype = cfg, device, compute_dtype
        self.backend, self.why = resolve_data_backend(cfg.data_backend, device)
        if not cfg.data_path:
            raise ConfigError("config data_path is empty: give --data_path <ImageFolder root or shard folder> "
                              "(or use `dino-fast demo`)")
        # One recipe object for both back-ends (the public transform users build the same way).
        self.multicrop = DINOMultiCrop.from_config(cfg)
        if self.backend == "dali":
            on_gpu = device.type == "cuda"
            # Views come out in the compute dtype (the last photometric op casts): no cast in the step.
            self.loader = self.multicrop.dali_loader(
                cfg.data_path, batch_size=cfg.batch_size_per_gpu, device="gpu" if on_gpu else "cpu",
                device_id=device.index if on_gpu else None, num_threads=max(1, cfg.num_workers), seed=cfg.seed,
                shard_id=rank, num_shards=world, dtype=compute_dtype)
            self.num_batches = len(self.loader)
            self.sampler = None
            self.view_dtype = compute_dtype
        else:
            from dino_fast.data.folder import collate_views
            from dino_fast.data.sampling import ResumableSampler, SeededDataset

            self.dataset = self.multicrop.dataset(cfg.data_path)  # an image folder, or shards (dino-fast pack)
            if len(self.dataset) < cfg.batch_size_per_gpu * world:
                raise DataError(f"{len(self.dataset)} images in {cfg.data_path} is fewer than one global batch "
                                f"({cfg.batch_size_per_gpu} x {world} ranks)")
            self.sampler = ResumableSampler(len(self.dataset), cfg.batch_size_per_gpu, seed=cfg.seed, rank=rank,
                                            world_size=world)
            self.num_batches = self.sampler.num_batches
            # Own generator: creating an iterator must not draw from the global RNG (resume exactness).
            self.loader = torch.utils.data.DataLoader(
                SeededDataset(self.dataset), batch_size=cfg.batch_size_per_gpu, sampler=self.sampler,
                num_workers=cfg.num_workers, collate_fn=collate_views, pin_memory=device.type == "cuda",
                persistent_workers=cfg.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed),
                drop_last=True)
            self.view_dtype = torch.float32

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[torch.Tensor]]:
        """Batches of epoch ``epoch`` from ``start_batch`` on, as lists of view tensors on the device."""
        # Both start at start_batch without loading the batches before it.
        (self.sampler or self.loader).set_epoch(epoch, start_batch)
        for views, _labels in self.loader:
            yield [v.to(self.device, non_blocking=True) for v in views]

    def describe(self) -> str:
        """One line for the start-up log: which loader and why."""
        return f"{self.backend} ({self.why}), views in {str(self.view_dtype).replace('torch.', '')}"

    def identity(self) -> dict[str, Any]:
        """What this run trains on, recorded in its checkpoints so that a resume can tell changed
        data: the root, the classes, the number of images and a fingerprint of the file list (sha1
        of the sorted paths relative to the root; the files DALI's check skipped count too, so both
        loaders give the same identity). Cheap: no file is read."""
        import hashlib
        import os

        source = self.loader if self.backend == "dali" else self.dataset
        root = str(source.root)
        paths = sorted(os.path.relpath(p, root) for p, _ in [*source.samples, *getattr(source, "skipped", [])])
        digest = hashlib.sha1("\n".join(paths).encode())
        return {"root": root, "classes": list(source.classes), "images": len(paths), "fingerprint": digest.hexdigest()}


def build_train_data(cfg: Any, device: torch.device, rank: int = 0, world: int = 1,
                     compute_dtype: torch.dtype = torch.float32) -> TrainData:
    """The training data of ``cfg`` (official names: data_path, batch_size_per_gpu, global/local crops
    scale/number/size, num_workers, seed, data_backend) for this rank. DALI gives views in ``compute_dtype``
    (on the GPU or the CPU); torchvision gives fp32 (autocast casts in the model)."""
    return TrainData(cfg, device, rank, world, compute_dtype)
