"""Data-loading benchmark: DINO multi-crop images/s, DALI pipeline vs the torchvision DataLoader.

Both paths produce the same views (2 global + --local-crops local, official augmentations,
normalized CHW) from the same folder of JPEGs with the same number of CPU workers
(DataLoader processes / DALI threads). One image/s = all of its views produced; the
torchvision batches are moved to the GPU inside the timed loop, since DALI's arrive there.

Without --data, ImageNet-like JPEGs (500x375 and 375x500, smooth random content plus
texture, quality 90) are generated once into a cache folder.

    python bench/bench_data.py                                 # GPU: dali-gpu, dali-cpu, torchvision
    python bench/bench_data.py --data /imagenet/train --workers 8
    python bench/bench_data.py --out /tmp/r                    # CPU: tiny run, NOT GPU figures
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402

_GENERATOR_VERSION = 1


def make_bench_jpegs(n_images: int, root: Path | None = None, classes: int = 10, seed: int = 0) -> Path:
    """``n_images`` JPEGs at ImageNet-like sizes in ``root/<class>/``, generated once (a marker is written last)."""
    from PIL import Image

    from dino_fast.data.demo import demo_cache_dir

    root = root or demo_cache_dir() / f"bench-jpegs-v{_GENERATOR_VERSION}-{n_images}-{seed}"
    marker = root / ".complete"
    if marker.is_file():
        return root
    for k in range(n_images):
        rng = np.random.default_rng([seed, k])
        w, h = (500, 375) if k % 4 else (375, 500)
        # Smooth colour field (bilinear upsampling of a coarse grid) plus fine texture: compresses like a photo.
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float32)
        img += rng.normal(0, 12, (h, w, 1)).astype(np.float32)
        folder = root / f"class_{k % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{k:06d}.jpg", quality=90)
    marker.write_text(json.dumps({"n_images": n_images, "seed": seed}))
    return root


def time_batches(batches: Iterable, n_warmup: int, n_timed: int, sync: Callable[[], None]) -> float:
    """Seconds for ``n_timed`` batches after ``n_warmup`` (build, worker start, first decode) are drawn."""
    it = iter(batches)
    for _ in range(n_warmup):
        next(it)
    sync()
    t0 = time.perf_counter()
    for _ in range(n_timed):
        next(it)
    sync()
    return time.perf_counter() - t0


def _endless(make_epoch: Callable[[], Iterable], to_device: Callable | None = None) -> Iterable:
    """Batches across epochs (the timed window may exceed one epoch of a small folder)."""
    while True:
        for views, labels in make_epoch():
            if to_device is not None:
                views = [v.to(to_device, non_blocking=True) for v in views]
            yield views, labels


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder root (folder per class); default: generated JPEGs")
    p.add_argument("--n-images", type=int, default=2000 if cuda else 48, help="images to generate without --data")
    p.add_argument("--batch-size", type=int, default=64 if cuda else 8)
    p.add_argument("--local-crops", type=int, default=8 if cuda else 2)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--workers", type=int, default=8 if cuda else 2, help="DataLoader workers = DALI threads")
    p.add_argument("--batches", type=int, default=30 if cuda else 3, help="timed batches per loader")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed batches first")
    p.add_argument("--modes", nargs="+", default=None, choices=["torchvision", "dali-gpu", "dali-cpu"],
                   help="default: all that apply (dali-gpu needs CUDA)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="DALI view dtype")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args(argv)

    from dino_fast.data.dali import DALIMultiCropLoader, dali_available
    from dino_fast.data.folder import ImageFolderDataset, build_train_loader
    from dino_fast.data.transforms import DataAugmentationDINO

    root = Path(args.data) if args.data else make_bench_jpegs(args.n_images)
    modes = args.modes or (["torchvision", "dali-gpu", "dali-cpu"] if cuda else ["torchvision", "dali-cpu"])
    if not dali_available():
        print("nvidia.dali is not importable: timing torchvision only")
        modes = [m for m in modes if m == "torchvision"]
    if "dali-gpu" in modes and not cuda:
        raise SystemExit("dali-gpu needs CUDA")
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    crops = dict(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=args.local_crops,
                 global_crops_size=args.global_size, local_crops_size=args.local_size)
    n_views = 2 + args.local_crops

    rows, seconds = [], {}
    for mode in modes:
        if mode == "torchvision":
            dataset = ImageFolderDataset(root, transform=DataAugmentationDINO(**crops))
            loader = build_train_loader(dataset, args.batch_size, args.workers, seed=0)
            batches = _endless(lambda: loader, to_device=device if cuda else None)
            n_images = len(dataset)
        else:
            dali = DALIMultiCropLoader(root, args.batch_size, **crops, device=mode.split("-")[1],
                                       device_id=0 if mode == "dali-gpu" else None, num_threads=args.workers,
                                       dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
            batches = _endless(lambda: dali)
            n_images = len(dali.samples)
        seconds[mode] = time_batches(batches, args.warmup, args.batches, sync)
        del batches
        imgs = args.batches * args.batch_size
        rows.append({"loader": mode, "workers": args.workers, "batch_size": args.batch_size, "views": n_views,
                     "images_in_folder": n_images, "timed_batches": args.batches,
                     "img_per_s": imgs / seconds[mode], "views_per_s": imgs * n_views / seconds[mode]})
    base = seconds.get("torchvision")
    for r in rows:
        r["speedup_vs_torchvision"] = base / seconds[r["loader"]] if base else None

    notes = (f"data={root}, global {args.global_size}px, local {args.local_size}px, dali dtype {args.dtype}; "
             "img/s counts every view of an image"
             + ("; torchvision views moved to the GPU inside the timed loop" if cuda
                else "; CPU run at tiny sizes: NOT a GPU figure"))
    write_results("bench_data", rows, ["loader", "workers", "batch_size", "views", "images_in_folder",
                                       "timed_batches", "img_per_s", "views_per_s", "speedup_vs_torchvision"],
                  notes=notes, out_dir=args.out)


if __name__ == "__main__":
    main()
