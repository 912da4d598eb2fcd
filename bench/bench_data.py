"""Data-loading benchmark: DINO multi-crop images/s of the trainer's loader, DALI vs torchvision.

Both back-ends are built by the trainer's own builder (``dino_fast.data.build.build_train_data``),
from one config, and read through ``TrainData.epoch`` exactly as the training loop reads them:
views on the device, DALI's in the training dtype (``--precision``, default the trainer's
``auto``: bf16 on CUDA, fp32 on CPU). Same folder, same number of CPU workers (DataLoader
processes / DALI threads). One image/s = all of its views produced. Modes are timed in turns,
``--repeats`` times; the speedup is the median of the per-turn ratios, so both sides of each
ratio ran under the same machine load.

``--profile`` also times the DALI path stage by stage (CPU time of the whole process per batch,
which other processes on the machine disturb less than wall time): feeding a batch (file reads,
draws), DALI's decoder, DALI's crops, the torch photometric ops, the whole loader.

Without --data, ImageNet-like JPEGs (500x375 and 375x500, smooth random content plus
texture, quality 90) are generated once into a cache folder.

``dali-cpu-inline`` / ``dali-gpu-inline``: the DALI loader without its feeder thread (everything in
the thread that calls ``next()``, ``prefetch_batches=0``), against the default threaded loader.
``--shards``: every mode also on the same images packed as tar shards (``dino-fast pack``, once,
into /tmp), rows ``<mode>@shards``. ``--index-files N``: only the folder listing: the scan of a
generated folder of N tiny files in /tmp against the cached start (the file index).

    python -m bench.bench_data                                  # GPU: dali-gpu, dali-cpu, torchvision
    python -m bench.bench_data --data /imagenet/train --workers 12 --modes torchvision dali-gpu
    python -m bench.bench_data --data ../shared/data/tiny-imagenet-10/train --global-size 32 \\
        --local-size 16 --local-crops 6 --workers 2 --repeats 3 --profile   # CPU: NOT GPU figures
    python -m bench.bench_data --modes torchvision dali-cpu dali-cpu-inline --shards   # folder vs shards
    python -m bench.bench_data --index-files 100000                 # scan vs cached start
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Results, write_results  # noqa: E402
from bench.jpegs import make_bench_jpegs  # noqa: E402


def train_config(args: argparse.Namespace, root: Path, backend: str) -> Any:
    """The training config the loader is built from (official names); sizes not multiples of 16 use patch 8."""
    from dino_fast.config import TrainConfig

    patch = 16 if args.global_size % 16 == 0 and args.local_size % 16 == 0 else 8
    fits = args.global_size % patch == 0 and args.local_size % patch == 0  # else a ResNet: any size
    return TrainConfig.from_dict(dict(
        data_path=str(root), data_backend=backend, batch_size_per_gpu=args.batch_size,
        local_crops_number=args.local_crops, global_crops_size=args.global_size, local_crops_size=args.local_size,
        patch_size=patch, arch="vit_small" if fits else "resnet50", num_workers=args.workers,
        precision=args.precision, seed=0))


def endless(data: Any) -> Iterator[list[torch.Tensor]]:
    """Batches across epochs, as the trainer reads them (the timed window may exceed one epoch)."""
    epoch = 0
    while True:
        yield from data.epoch(epoch)
        epoch += 1


def time_batches(batches: Iterator, n_warmup: int, n_timed: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(wall s, process CPU s) for ``n_timed`` batches after ``n_warmup`` (build, worker start, first decode)."""
    for _ in range(n_warmup):
        next(batches)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_timed):
        next(batches)
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def build(args: argparse.Namespace, root: Path, mode: str, device: torch.device, dtype: torch.dtype) -> Any:
    from dino_fast.data.build import build_train_data

    mode, _, source = mode.partition("@")  # "<mode>@shards": the same images from tar shards
    root = args.shards_root if source == "shards" else root
    backend = "torchvision" if mode == "torchvision" else "dali"
    # dali-cpu: DALI's CPU operators, views on the CPU
    dev = torch.device("cpu") if mode.startswith("dali-cpu") else device
    data = build_train_data(train_config(args, root, backend), dev, compute_dtype=dtype)
    if backend == "dali" and args.hw_decoder_load is not None:
        data.loader.hw_decoder_load = args.hw_decoder_load  # read when the pipeline is built (first epoch)
    if mode.endswith("-inline"):
        data.loader.prefetch_batches = 0  # no feeder thread: reads, draws, DALI and the photometric ops inline
    return data


def profile_dali(args: argparse.Namespace, root: Path, dtype: torch.dtype, n: int) -> list[dict[str, Any]]:
    """Stage by stage CPU ms per batch of the DALI CPU path (each stage on top of the previous one)."""
    from nvidia.dali import fn, pipeline_def, types

    from dino_fast.data.dali import _multicrop_graph

    data = build(args, root, "dali-cpu", torch.device("cpu"), dtype)
    loader = data.loader

    def cpu_ms(step: Callable[[], Any]) -> float:
        for _ in range(3):
            step()
        best = float("inf")
        for _ in range(3):  # best of 3: the least disturbed by other processes
            c0 = time.process_time()
            for _ in range(n):
                step()
            best = min(best, (time.process_time() - c0) / n)
        return best * 1e3

    def feed() -> Any:
        out = loader._next_input()
        loader._pending.clear()
        return out

    def pipe_ms(graph: Callable[[], Any]) -> float:
        pipe = pipeline_def(graph, batch_size=loader.batch_size, num_threads=loader.num_threads, device_id=None,
                            prefetch_queue_depth=loader.prefetch_queue_depth)()
        pipe.build()
        return cpu_ms(lambda: (pipe.run(), loader._pending.clear()))

    n_out = 1 + 2 * loader.num_views

    def decode_only() -> Any:
        encoded, *windows = fn.external_source(source=loader._next_input, num_outputs=n_out, batch=True)
        return (fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False), *windows)

    t_feed = cpu_ms(feed)
    t_decode = pipe_ms(decode_only)
    sizes = tuple(view.size for view in loader._views)
    t_dali = pipe_ms(lambda: _multicrop_graph(loader._next_input, sizes, False, loader.hw_decoder_load))
    loader._build(0)
    out = next(loader._iter)[0]
    meta = loader._pending.pop(0)
    t_photo = cpu_ms(lambda: loader._convert(out, meta))
    loader.close_pipeline()
    batches = endless(data)
    t_all = cpu_ms(lambda: next(batches))
    v = loader.num_views
    stages = [("feed: read files, draw crops and factors (numpy)", t_feed),
              ("DALI decode (libjpeg-turbo)", t_decode - t_feed),
              (f"DALI crops: {v} x fn.resize (window, flip) + stack/transpose per resolution", t_dali - t_decode),
              ("torch photometric: colour, blur, solarize, normalize, cast (all views)", t_photo),
              ("iterator copies and the rest", t_all - t_dali - t_photo),
              ("whole loader (TrainData.epoch)", t_all)]
    return [{"stage": name, "cpu_ms_per_batch": ms, "share_of_loader": ms / t_all,
             "img_per_cpu_s": loader.batch_size / ms * 1e3} for name, ms in stages]


def with_step(batches: Iterator, step_ms: float) -> Iterator:
    """``batches`` with ``step_ms`` of host idle time after each (a GPU step the host waits on)."""
    for batch in batches:
        yield batch
        if step_ms:
            time.sleep(step_ms / 1e3)


def bench_shards(root: Path) -> Path:
    """``root`` packed as tar shards (``dino-fast pack``, 64 MB shards), once, under /tmp."""
    import hashlib
    import tempfile

    from dino_fast.data.pack import pack
    from dino_fast.data.shards import INDEX_NAME

    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    out = Path(tempfile.gettempdir()) / f"dino_fast_bench_shards-{digest}"
    if not (out / INDEX_NAME).is_file():
        if out.exists():
            import shutil

            shutil.rmtree(out)  # an interrupted pack
        pack(root, out, shard_size="64MB")
    return out


def time_index(n_files: int, repeats: int, out_dir: str | None) -> None:
    """The folder listing of ``n_files`` empty ``.jpg`` files (1,000 per class, in /tmp): a full scan against
    the cached start (index read, every directory's mtime checked). Warm page cache: the floor of a scan;
    on network storage the scan costs more and the cached start about the same."""
    import os
    import tempfile

    from dino_fast.data.folder import ImageFolderDataset
    from dino_fast.data.listing import index_path, list_folder

    root = Path(tempfile.gettempdir()) / f"dino_fast_bench_index-{n_files}"
    classes = max(1, n_files // 1000)
    if not (root / ".complete").is_file():
        for k in range(n_files):
            folder = root / f"n{k % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"img_{k:08d}.jpg").touch()
        (root / ".complete").touch()
    old = time.time_ns() - 60 * 10**9  # folders changed in the last 2 s are not trusted by the index
    for d, _, _ in os.walk(root):
        os.utime(d, ns=(old, old))

    def best(fn: Callable[[], Any]) -> list[float]:
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times

    index_path(root).unlink(missing_ok=True)
    # What a start builds: the dataset (classes, samples, labels) the loaders read.
    scan = best(lambda: ImageFolderDataset(root, use_index=False))
    first = best(lambda: (index_path(root).unlink(missing_ok=True), ImageFolderDataset(root)))
    cached = best(lambda: ImageFolderDataset(root))
    assert list_folder(root).from_index, "the index was not reused"
    base = statistics.median(scan)
    rows = [{"start": name, "files": n_files, "classes": classes, "seconds": statistics.median(t),
             "seconds_min": min(t), "files_per_s": n_files / statistics.median(t),
             "speedup_vs_scan": base / statistics.median(t)}
            for name, t in (("scan (no index)", scan), ("first start: scan + write index", first),
                            ("cached start: read index, check folder mtimes", cached))]
    write_results("bench_data_index", rows, ["start", "files", "classes", "seconds", "seconds_min", "files_per_s",
                                             "speedup_vs_scan"],
                  notes=f"{root}: {n_files} empty .jpg files in {classes} class folders; median of {repeats} "
                        "(min beside); warm page cache; index file size "
                        f"{index_path(root).stat().st_size} bytes. CPU machine: NOT a GPU figure (none is involved)",
                  out_dir=out_dir)


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder root (folder per class); default: generated JPEGs")
    p.add_argument("--n-images", type=int, default=2000 if cuda else 48, help="images to generate without --data")
    p.add_argument("--batch-size", type=int, default=64 if cuda else 8)
    p.add_argument("--local-crops", type=int, default=10 if cuda else 2)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--workers", type=int, default=8 if cuda else 2, help="DataLoader workers = DALI threads")
    p.add_argument("--batches", type=int, default=30 if cuda else 3, help="timed batches per loader and turn")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed batches first")
    p.add_argument("--repeats", type=int, default=1, help="turns over all modes")
    p.add_argument("--modes", nargs="+", default=None,
                   choices=["torchvision", "dali-gpu", "dali-cpu", "dali-gpu-inline", "dali-cpu-inline"],
                   help="default: all that apply (dali-gpu needs CUDA); -inline: the DALI loader without its feeder "
                        "thread")
    p.add_argument("--shards", action="store_true",
                   help="also time every mode on the images packed as tar shards (rows <mode>@shards)")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="the consumer sleeps this long per batch, a stand-in for a GPU step that leaves the host idle: "
                        "the threaded loader hides its work under it, the inline one adds to it")
    p.add_argument("--index-files", type=int, default=None,
                   help="time only the folder listing: scan vs cached index on N generated tiny files in /tmp")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="training precision: DALI's views come in its dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--hw-decoder-load", type=float, default=None,
                   help="share of JPEGs for the GPU's hardware decoder (dali-gpu; default DALI's 0.65)")
    p.add_argument("--profile", action="store_true", help="also time the DALI CPU path stage by stage")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args(argv)

    from dino_fast.data.dali import dali_available
    from dino_fast.precision import resolve_compute_dtype

    if args.index_files is not None:
        return time_index(args.index_files, args.repeats, args.out)
    root = Path(args.data) if args.data else make_bench_jpegs(args.n_images)
    modes = args.modes or (["torchvision", "dali-gpu", "dali-cpu"] if cuda else ["torchvision", "dali-cpu"])
    if not dali_available():
        print("nvidia.dali is not importable: timing torchvision only")
        modes = [m for m in modes if m == "torchvision"]
    if any(m.startswith("dali-gpu") for m in modes) and not cuda:
        raise SystemExit("dali-gpu needs CUDA")
    if args.shards:
        args.shards_root = bench_shards(root)
        modes = modes + [f"{m}@shards" for m in modes]
    device = torch.device("cuda" if cuda else "cpu")
    dtype = resolve_compute_dtype(args.precision, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n_views = 2 + args.local_crops

    where = f"global {args.global_size}px, local {args.local_size}px x {args.local_crops}, precision {args.precision}"
    notes = (f"data={root}; {where}; loaders built by build_train_data and read through TrainData.epoch; img/s "
             "counts every view of an image; median of the turns (min, max beside), speedup = median of per-turn "
             "ratios; cpu_ms_per_batch = CPU time of the whole process (all threads) per batch, worker processes "
             "not counted" + ("; views moved to the GPU inside the timed loop" if cuda
                              else "; CPU run: NOT a GPU figure")
             + (f"; the consumer slept {args.step_ms:g} ms per batch (a stand-in for the step)" if args.step_ms
                else ""))
    # With a stand-in step the figures answer another question (is the loader off the critical path): own file.
    results = Results("bench_data_step" if args.step_ms else "bench_data",
                      ["loader", "workers", "batch_size", "views", "view_dtype", "images_in_folder", "timed_batches",
                       "repeats", "img_per_s", "img_per_s_min", "img_per_s_max", "views_per_s", "cpu_ms_per_batch",
                       "speedup_vs_torchvision", "speedups"],
                      notes, out_dir=args.out)
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    info: dict[str, tuple[int, str]] = {}
    imgs = args.batches * args.batch_size

    def rows_so_far() -> list[dict[str, Any]]:
        """One row per mode timed so far: medians over its turns, ratios over the turns both sides ran."""
        rows = []
        for mode in (m for m in modes if runs[m]):
            rates = [imgs / wall for wall, _ in runs[mode]]
            ratios = ([runs["torchvision"][k][0] / runs[mode][k][0]
                       for k in range(min(len(runs["torchvision"]), len(runs[mode])))]
                      if "torchvision" in runs else None)
            rows.append({"loader": mode, "workers": args.workers, "batch_size": args.batch_size, "views": n_views,
                         "view_dtype": info[mode][1], "images_in_folder": info[mode][0],
                         "timed_batches": args.batches, "repeats": len(runs[mode]),
                         "img_per_s": statistics.median(rates), "img_per_s_min": min(rates),
                         "img_per_s_max": max(rates), "views_per_s": statistics.median(rates) * n_views,
                         "cpu_ms_per_batch": statistics.median(c for _, c in runs[mode]) / args.batches * 1e3,
                         "speedup_vs_torchvision": statistics.median(ratios) if ratios else None,
                         "speedups": " ".join(f"{r:.2f}" for r in ratios) if ratios else ""})
        return rows

    for _ in range(args.repeats):
        for mode in modes:
            data = build(args, root, mode, device, dtype)
            n_images = len(data.dataset) if mode.startswith("torchvision") else len(data.loader.samples)
            info[mode] = (n_images, str(data.view_dtype).replace("torch.", ""))
            runs[mode].append(time_batches(with_step(endless(data), args.step_ms), args.warmup, args.batches, sync))
            del data
            results.replace(rows_so_far())  # on disk after every timed loader: a cut run keeps them
    results.close()
    if args.profile and dali_available():
        prof = profile_dali(args, root, dtype, n=max(args.batches, 10))
        write_results("bench_data_profile", prof, ["stage", "cpu_ms_per_batch", "share_of_loader", "img_per_cpu_s"],
                      notes=f"DALI CPU mode stage by stage, data={root}; {where}; {args.workers} DALI threads; CPU "
                            "time of the process per batch, best of 3; each stage measured on top of the previous "
                            "one and differenced. NOT a GPU figure", out_dir=args.out)


if __name__ == "__main__":
    main()
