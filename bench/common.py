"""Shared benchmark plumbing: environment facts, timing, markdown table, JSON results.

Every benchmark prints a markdown table and writes ``bench/results/<name>-<device>-<date>.json``
and a ``.md`` twin holding the device, versions, git sha, command and date. ``device_peaks`` is the
one table of datasheet peaks (memory bandwidth, bf16 dense FLOP/s) that "% of peak" and MFU use.

Importing this module also lets a plain checkout run without an install (``PYTHONPATH=.`` on an
offline GPU machine): ``kernels/`` is found as ``dino_fast.kernels`` when nothing else provides it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Datasheet peaks, one place: (HBM GB/s, bf16 dense tensor TFLOP/s, no sparsity). Matched against
# torch.cuda.get_device_name() word by word ('GH200' is not 'H200'), first hit wins, so a variant
# precedes its family. Vendor figures, not measurements (a measured copy or matmul lands below
# them); a device not listed gets no % of peak and no MFU.
DEVICE_PEAKS: list[tuple[tuple[str, ...], float, float]] = [
    (("h200", "nvl"), 4800.0, 835.0),
    (("h200",), 4800.0, 989.0),                # 'NVIDIA H200' (SXM)
    (("h100", "pcie"), 2000.0, 756.0),
    (("h100", "nvl"), 3900.0, 835.0),
    (("h100",), 3350.0, 989.0),                # 'NVIDIA H100 80GB HBM3' (SXM)
    (("a100", "pcie", "80gb"), 1935.0, 312.0),
    (("a100", "pcie"), 1555.0, 312.0),
    (("a100", "40gb"), 1555.0, 312.0),         # 'NVIDIA A100-SXM4-40GB'
    (("a100",), 2039.0, 312.0),                # 'NVIDIA A100-SXM4-80GB'
    (("b200",), 8000.0, 2250.0),
    (("l40s",), 864.0, 362.0),
    (("l4",), 300.0, 121.0),
]


def device_peaks(name: str | None = None) -> tuple[float, float] | None:
    """Datasheet ``(memory GB/s, bf16 dense TFLOP/s)`` of a GPU by name (default: the current CUDA
    device), or None when it is not in ``DEVICE_PEAKS`` (or there is no GPU)."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    words = set(re.split(r"[\s_\-/]+", name.lower()))
    for keys, gbps, tflops in DEVICE_PEAKS:
        if all(k in words for k in keys):
            return gbps, tflops
    return None


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "unknown")
    except Exception:
        return None


def git_sha() -> str | None:
    """Short sha of HEAD; where the checkout is a copy without .git (a GPU machine), the sha the
    caller put in ``DINO_FAST_GIT_SHA`` (bench/suite.py passes it down)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return os.environ.get("DINO_FAST_GIT_SHA") or None


def command_line() -> str:
    """This process's command as typed: ``python3 -m bench.bench_dino_loss ...`` for a module run."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *head, *sys.argv[1:]])


def env_info() -> dict[str, Any]:
    """Device, library versions, git sha, command line and date of this run."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                           f"{os.cpu_count()} cores) - NOT a GPU figure",
        "cuda": cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "command": command_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def time_fn(fn: Callable[[], Any], warmup: int = 3, rep: int = 10) -> float:
    """Median milliseconds per call. CUDA: triton.testing.do_bench; CPU: wall clock."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_memory(fn: Callable[[], Any]) -> int | None:
    """Peak extra CUDA bytes allocated while ``fn`` runs (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                  notes: str = "", out_dir: Path | str | None = None) -> Path:
    """Print the table and write JSON + markdown with the environment. Returns the JSON path."""
    info = env_info()
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda-" + info["device"].replace(" ", "_") if info["cuda"] else "cpu"
    stem = f"{name}-{dev}-{info['date'][:10]}"
    table = markdown_table(rows, columns)
    header = (f"# {name}\n\n- device: {info['device']}\n- torch {info['torch']}, triton {info['triton']}, "
              f"xformers {info['xformers']}, python {info['python']}\n- git {info['git_sha']}, date {info['date']}\n"
              f"- command: `{info['command']}`\n")
    if notes:
        header += f"- notes: {notes}\n"
    print(header + "\n" + table)
    (out / f"{stem}.json").write_text(json.dumps({"name": name, "env": info, "notes": notes, "rows": list(rows)},
                                                 indent=2, default=str))
    (out / f"{stem}.md").write_text(header + "\n" + table + "\n")
    return out / f"{stem}.json"
