"""Shared benchmark plumbing: environment facts, timing, markdown table, JSON results.

Every benchmark prints a markdown table and writes ``bench/results/<name>-<device>-<date>.json``
and a ``.md`` twin holding the device, versions, git sha, command and date.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "unknown")
    except Exception:
        return None


def git_sha() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return None


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
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
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
