"""Time to accuracy on tiny-imagenet-10 (issue 31): named rows of flags on top of the small preset, each
trained for ``--minutes`` per dataset and seed, one run after the other (never two at once: they
would share the cores and each other's time budget).

    python3 -m bench.accuracy --rows sk patch4 locals4 --seeds 0 1 --minutes 20 --data tin10 tin10-half-a
    python3 -m bench.accuracy --rows sk --seeds 0 --minutes 0.2 --data tin10 --out /tmp/acc   # a dry run
    python3 -m bench.accuracy --list                                                            # the rows

A run is ``dino-fast train --config tiny_imagenet_sk --data_path <train> --val_path <val>
--time_budget_min M --knn_every_min 5 --seed S --output_dir <cache>/runs/... <the row's flags>``; the
runner reads its metrics.csv: the teacher's 20-NN top-1 at random init, nearest ~5 and ~10 minutes
(``--marks``) and at the end, the steps, the loss at its first log / its lowest / its last log and the
training minutes. After every run it rewrites, per dataset, ``accuracy_<data>`` (one row per run,
with the whole k-NN curve in the JSON) and ``accuracy_<data>_table`` (one row per named row: the mean
over its seeds, each seed's value in brackets, and the raw-pixel references first) through
``bench.common.Results``, so a campaign stopped part-way keeps the runs it finished.

Datasets, made at run time under ``--cache`` (default: the system temp folder), never in the repo nor
in the shared folder: ``tin10`` (the folder as it is), ``tin10-half-a`` / ``tin10-half-b`` (classes
0-4 / 5-9 in classes.txt order, each with its own train and val), ``tin10-32px`` (every photo
downscaled to 32 x 32, bicubic, saved as PNG so no JPEG loss is added). The raw-pixel reference of each
(``pixel_knn``): 32 x 32 bicubic pixels, centred on the train set's mean pixel vector, l2-normalised,
20-NN by majority vote (the definition of ../shared/data/README.md: 25.8 % on tin10) and by the
teacher's k-NN vote (weights exp(cos / 0.07), dino_fast.eval.knn.knn_classifier).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Results  # noqa: E402

__all__ = ["ROWS", "DATASETS", "make_dataset", "pixel_knn", "summarize_metrics", "table_rows", "Campaign", "main"]

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-10"
PRESET = "tiny_imagenet_sk"
# The catalogue: flags added to the preset. The lr is per 256 images and scaled by the batch
# (plan.py, the official rule), so batch128 doubles the preset's step lr by itself.
ROWS: dict[str, list[str]] = {
    "sk": [],
    "patch4": ["--patch_size", "4"],
    "resnet18_small": ["--arch", "resnet18", "--small_image_stem", "true"],
    "locals4": ["--local_crops_number", "4"],
    "locals10": ["--local_crops_number", "10"],
    "locals24px": ["--local_crops_size", "24"],
    "batch128": ["--batch_size_per_gpu", "128"],
    "sk_koleo": ["--koleo_weight", "0.1"],
}
DATASETS = ("tin10", "tin10-half-a", "tin10-half-b", "tin10-32px")


def run_columns(marks: Sequence[float]) -> list[str]:
    """Columns of ``accuracy_<data>``: one row per run."""
    return (["data", "row", "seed", "steps", "knn_init"] + [f"{c}_{m:g}" for m in marks for c in ("knn", "min")]
            + ["knn_end", "min_end", "loss_start", "loss_min", "loss_end", "train_min", "wall_min", "rc", "reason",
               "flags"])


def table_columns(marks: Sequence[float]) -> list[str]:
    """Columns of ``accuracy_<data>_table``: one row per named row, the mean over its seeds."""
    return (["row", "seeds", "steps", "knn_init"] + [f"knn_{m:g}" for m in marks]
            + ["knn_end", "loss (start -> min -> end)", "train_min", "flags"])


# --- datasets --------------------------------------------------------------------------------------
def class_order(source: Path) -> list[str]:
    """The class folders in classes.txt order (``wnid <tab> names`` per line); sorted names without one."""
    listing = source / "classes.txt"
    if listing.is_file():
        return [line.split("\t")[0].strip() for line in listing.read_text().splitlines() if line.strip()]
    return sorted(p.name for p in (source / "train").iterdir() if p.is_dir())


def make_dataset(name: str, source: Path, cache: Path) -> tuple[Path, Path]:
    """(train, val) folders of dataset ``name`` (one of DATASETS), made under ``cache`` once (a finished
    one is marked by a ``.complete`` file; a half-made one is made again)."""
    if name not in DATASETS:
        raise SystemExit(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}")
    if name == "tin10":
        return source / "train", source / "val"
    dest = cache / name
    if not (dest / ".complete").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        classes = class_order(source)
        if name.startswith("tin10-half"):
            keep = classes[:5] if name.endswith("-a") else classes[5:10]
            for src in sorted(p for split in ("train", "val") for c in keep for p in (source / split / c).rglob("*")
                              if p.is_file()):  # file by file: a read-only source's modes are not copied
                (dest / src.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / src.relative_to(source))
        else:  # tin10-32px
            from PIL import Image

            for src in sorted(p for split in ("train", "val") for p in (source / split).rglob("*") if p.is_file()):
                if src.suffix.lower() not in (".jpeg", ".jpg", ".png"):
                    continue
                out = (dest / src.relative_to(source)).with_suffix(".png")
                out.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(src) as im:
                    im.convert("RGB").resize((32, 32), Image.BICUBIC).save(out)
        (dest / ".complete").write_text(f"made from {source}\n")
    return dest / "train", dest / "val"


def _pixels(root: Path, classes: list[str]) -> tuple[Any, Any]:
    import numpy as np
    import torch
    from PIL import Image

    xs, ys = [], []
    for label, c in enumerate(classes):
        for f in sorted(p for p in (root / c).rglob("*") if p.is_file()):
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC), np.float32).reshape(-1))
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def pixel_knn(train: Path, val: Path, k: int = 20) -> dict[str, float]:
    """Raw-pixel 20-NN top-1 (%) on ``val``: 32 x 32 bicubic pixels minus the train set's mean vector,
    l2-normalised, cosine neighbours; ``majority`` (most common label of the k, ties to the lowest
    label) and ``weighted`` (the teacher's k-NN: votes exp(cos / 0.07))."""
    import torch

    from dino_fast.eval.knn import knn_classifier

    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    xt, yt = _pixels(train, classes)
    xv, yv = _pixels(val, classes)
    mean = xt.mean(0)
    a = torch.nn.functional.normalize(xt - mean, dim=1)
    b = torch.nn.functional.normalize(xv - mean, dim=1)
    idx = (b @ a.T).topk(min(k, len(a)), dim=1).indices  # (M, k)
    votes = torch.zeros(len(b), len(classes)).scatter_add_(1, yt[idx], torch.ones(idx.shape))
    majority = 100.0 * float((votes.argmax(1) == yv).float().mean())  # argmax: the first of tied labels
    weighted = knn_classifier(a, yt, b, yv, k=k, num_classes=len(classes))[0]
    return {"majority": majority, "weighted": weighted}


# --- one run's metrics.csv ----------------------------------------------------------------------
def _num(x: str | None) -> float | None:
    try:
        v = float(x) if x not in (None, "") else None
    except ValueError:
        return None
    return v if v is None or math.isfinite(v) else None


def summarize_metrics(path: Path, marks: Sequence[float] = (5, 10)) -> dict[str, Any]:
    """What the table needs from a run's metrics.csv: ``knn_init`` (step 0), ``knn_<m>`` / ``min_<m>``
    (the k-NN measured nearest ``m`` training minutes, within half a mark's spacing; None if none
    is), ``knn_end`` / ``min_end`` (the last k-NN after step 0), the last step, the loss at its first
    log, its lowest and its last log, the training minutes and the whole k-NN curve."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [v for r in rows if (v := _num(r.get("loss"))) is not None]
    curve = [(_num(r.get("train_min")) or 0.0, v, int(_num(r.get("step")) or 0))
             for r in rows if (v := _num(r.get("knn_top1"))) is not None]
    out: dict[str, Any] = {"steps": max((int(_num(r.get("step")) or 0) for r in rows), default=0),
                           "knn_init": next((v for _, v, s in curve if s == 0), None),
                           "loss_start": losses[0] if losses else None, "loss_min": min(losses, default=None),
                           "loss_end": losses[-1] if losses else None,
                           "train_min": max((_num(r.get("train_min")) or 0.0 for r in rows), default=None),
                           "curve": [[t, v] for t, v, _ in curve]}
    trained = [(t, v) for t, v, s in curve if s > 0]
    spacing = min((b - a for a, b in zip(marks, marks[1:])), default=marks[0] if marks else 0)
    for m in marks:
        near = min(trained, key=lambda p: abs(p[0] - m), default=None)
        ok = near is not None and abs(near[0] - m) <= max(spacing / 2, 0.5)
        out[f"knn_{m:g}"], out[f"min_{m:g}"] = (near[1], near[0]) if ok else (None, None)
    out["min_end"], out["knn_end"] = trained[-1] if trained else (None, None)
    return out


# --- the table ---------------------------------------------------------------------------------
def _mean(values: list[float | None], digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    return f"{sum(vals) / len(vals):,.{digits}f}" if vals else ""


def _cell(values: list[float | None], minutes: list[float | None] | None = None) -> str:
    """``mean (seed values; at mean minute)``: '28.1 (27.6 / 28.6; 5.2 min)'; '' when no run has it."""
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    text = f"{sum(vals) / len(vals):.1f}"
    inner = " / ".join(f"{v:.1f}" for v in vals) if len(vals) > 1 else ""
    mins = [m for m in (minutes or []) if m is not None]
    if mins:
        inner += ("; " if inner else "") + f"{sum(mins) / len(mins):.1f} min"
    return f"{text} ({inner})" if inner else text


def table_rows(runs: list[dict[str, Any]], pixels: dict[str, float] | None,
               marks: Sequence[float] = (5, 10)) -> list[dict[str, Any]]:
    """One row per named row (first-run order): the mean over its finished seeds, each seed's value in
    brackets; the raw-pixel references first."""
    rows: list[dict[str, Any]] = []
    if pixels:
        for vote, what in (("majority", "raw pixels, 20-NN majority vote (../shared/data/README.md)"),
                           ("weighted", "raw pixels, 20-NN weighted exp(cos/0.07) (the teacher's k-NN vote)")):
            rows.append({"row": what, "knn_end": f"{pixels[vote]:.1f}"})
    for name in dict.fromkeys(r["row"] for r in runs):
        done = [r for r in runs if r["row"] == name and r.get("knn_end") is not None]
        mine = done or [r for r in runs if r["row"] == name]
        row = {"row": name, "seeds": " ".join(str(r["seed"]) for r in done) or "none finished",
               "steps": _mean([r.get("steps") for r in done], 0), "flags": mine[0]["flags"],
               "knn_init": _cell([r.get("knn_init") for r in done]),
               "knn_end": _cell([r.get("knn_end") for r in done], [r.get("min_end") for r in done]),
               "train_min": _mean([r.get("train_min") for r in done])}
        for m in marks:
            row[f"knn_{m:g}"] = _cell([r.get(f"knn_{m:g}") for r in done], [r.get(f"min_{m:g}") for r in done])
        losses = [_mean([r.get(k) for r in done], 2) for k in ("loss_start", "loss_min", "loss_end")]
        row["loss (start -> min -> end)"] = " -> ".join(losses) if all(losses) else ""
        if not done:
            row["knn_end"] = "; ".join(f"seed {r['seed']}: {r.get('reason') or 'no k-NN'}" for r in mine)
        rows.append(row)
    return rows


# --- the campaign ------------------------------------------------------------------------------
def train_command(train: Path, val: Path, out: Path, seed: int, minutes: float, knn_every: float,
                  flags: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "dino_fast", "train", "--config", PRESET, "--data_path", str(train),
            "--val_path", str(val), "--time_budget_min", f"{minutes:g}", "--knn_every_min", f"{knn_every:g}",
            "--seed", str(seed), "--output_dir", str(out), "--progress", "false", *flags]


def run_training(cmd: list[str], log: Path, timeout_s: float) -> tuple[int, str | None]:
    """Run one training to its end (its output in ``log``); (exit status, why it failed or None)."""
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's dino_fast, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, env=env).returncode
        except subprocess.TimeoutExpired:
            return -9, f"killed after {timeout_s / 60:.0f} min"
    if rc == 0:
        return 0, None
    tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return rc, (tail[-1][:200] if tail else f"exit status {rc}")


def earlier_runs(data: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--append``: the runs already in today's ``accuracy_<data>`` file of the results folder, so a
    campaign continued by another invocation adds to its table instead of replacing it."""
    probe = Results.path_for(f"accuracy_{data}", args.out)
    if not probe.is_file():
        return []
    return [r for r in json.loads(probe.read_text()).get("rows", []) if r.get("data") == data]


class Campaign:
    """Rows x seeds on one dataset, run one after the other; the two result files rewritten after each."""

    def __init__(self, data: str, train: Path, val: Path, pixels: dict[str, float] | None, args: argparse.Namespace,
                 run: Callable[[list[str], Path, float], tuple[int, str | None]] = run_training) -> None:
        self.data, self.train, self.val, self.pixels, self.args, self.run = data, train, val, pixels, args, run
        px = (f"raw pixels 20-NN: {pixels['majority']:.1f} % majority vote, {pixels['weighted']:.1f} % weighted"
              if pixels else "raw pixels: not computed")
        notes = (f"dataset {data} (train {train}, val {val}); {args.minutes:g}-minute runs of `dino-fast train "
                 f"--config {PRESET} --time_budget_min {args.minutes:g} --knn_every_min {args.knn_every_min:g}` + "
                 f"each row's flags, one after the other; cells: the teacher's 20-NN top-1 (%) on val, mean over "
                 f"seeds (each seed; training minute); {px}")
        earlier = earlier_runs(data, args) if getattr(args, "append", False) else []
        if earlier:
            notes += (f"; {len(earlier)} runs appended from earlier invocations of the runner (each row's command "
                      f"says how it was run)")
        self.runs = Results(f"accuracy_{data}", run_columns(args.marks), notes, out_dir=args.out)
        self.table = Results(f"accuracy_{data}_table", table_columns(args.marks), notes, out_dir=args.out)
        self.runs.replace(earlier)
        self.table.replace(table_rows(earlier, pixels, args.marks))

    def run_one(self, row: str, flags: list[str], seed: int) -> dict[str, Any]:
        args = self.args
        out = Path(args.cache) / "runs" / self.data / f"{row}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        out.mkdir(parents=True)
        cmd = train_command(self.train, self.val, out, seed, args.minutes, args.knn_every_min, flags)
        t0 = time.monotonic()
        rc, reason = self.run(cmd, out / "train.log", args.minutes * 90 + 900)  # k-NN and start-up are not budget
        result: dict[str, Any] = {"data": self.data, "row": row, "seed": seed, "flags": " ".join(flags) or "(none)",
                                  "rc": rc, "reason": reason, "wall_min": (time.monotonic() - t0) / 60,
                                  "output_dir": str(out), "command": shlex.join(cmd)}
        if (out / "metrics.csv").is_file():
            result.update(summarize_metrics(out / "metrics.csv", args.marks))
        elif reason is None:
            result["reason"] = "no metrics.csv"
        self.runs.add(result)
        self.table.replace(table_rows(self.runs.rows, self.pixels, args.marks))
        return result

    def close(self) -> None:
        self.runs.close()
        self.table.close()


def parse_rows(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Row names from ROWS, or ``name=--flag value ...`` for a row of one's own."""
    rows = []
    for spec in specs:
        name, eq, flags = spec.partition("=")
        if eq:
            rows.append((name, shlex.split(flags)))
        elif spec in ROWS:
            rows.append((spec, list(ROWS[spec])))
        else:
            raise SystemExit(f"unknown row {spec!r}: one of {', '.join(ROWS)}, or name='--flag value ...'")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=["sk"], help=f"rows: {', '.join(ROWS)}, or name='--flag value ...'")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--minutes", type=float, default=20.0, help="--time_budget_min of each run")
    p.add_argument("--data", nargs="+", default=["tin10"], choices=DATASETS)
    p.add_argument("--knn-every-min", type=float, default=5.0, help="--knn_every_min of each run")
    p.add_argument("--marks", nargs="+", type=float, default=[5.0, 10.0],
                   help="training minutes whose nearest k-NN gets a column (the end always has one)")
    p.add_argument("--source", default=str(SOURCE), help="tiny-imagenet-10 (train/, val/, classes.txt)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dino_fast_accuracy"),
                   help="where the derived datasets and the runs' output folders go (never the repo)")
    p.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel references")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in today's accuracy_<data> file of the results folder and add to them")
    p.add_argument("--list", action="store_true", help="print the rows and their flags, then exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = parse_rows(args.rows)
    if args.list:
        for name, flags in ROWS.items():
            print(f"{name:16s} {' '.join(flags) or '(the preset as it is)'}")
        return 0
    source, cache = Path(args.source), Path(args.cache)
    forbidden = [Path(__file__).resolve().parents[1], source.resolve(), SOURCE.resolve().parents[1]]
    if any(cache.resolve().is_relative_to(f) for f in forbidden):
        raise SystemExit(f"--cache {cache} is inside the repository or the shared data: give a temp folder")
    if not (source / "train").is_dir():
        raise SystemExit(f"--source {source}: no train/ folder (tiny-imagenet-10, see ../shared/data/README.md)")
    for data in args.data:
        train, val = make_dataset(data, source, cache)
        pixels = None if args.no_pixels else pixel_knn(train, val)
        campaign = Campaign(data, train, val, pixels, args)
        # Seeds outermost: a campaign stopped part-way has every row at its first seed.
        for seed in args.seeds:
            for row, flags in rows:
                campaign.run_one(row, flags, seed)
        campaign.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
