"""ImageNet-like JPEGs for the loader benchmarks (bench_data, bench_train's loader mode), generated
once: 500x375 and 375x500, a smooth random colour field plus fine texture (compresses like a
photo), quality 90, in ``<root>/class_XX/``.

    python3 -m bench.jpegs DIR --n-images 1000      # what the suite's `jpegs` step runs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder to fill (kept and reused when complete)")
    p.add_argument("--n-images", type=int, default=1000)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    make_bench_jpegs(args.n_images, root=args.root)
    print(f"{args.n_images} JPEGs in {args.root} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
