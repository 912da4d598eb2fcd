"""Shared benchmark plumbing: environment facts, timing, datasheet peaks, markdown tables, results.

Every benchmark prints a markdown table and writes ``bench/results/<name>-<device>-<date>.json``
and a ``.md`` twin holding the device, versions, git sha, command and date. ``Results`` rewrites
both after every row (temp file + rename), so a run stopped at its time cap keeps the rows it
finished. ``device_peaks`` is the one table of datasheet peaks (memory bandwidth, bf16 dense
FLOP/s) that "% of peak" and MFU use; ``peak_note`` says which peak a result divides by.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Datasheet peaks, one place: (HBM GB/s, bf16 dense tensor TFLOP/s, i.e. the sparse figure halved).
# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM 3.35 TB/s, 1,979 sparse; PCIe 2 TB/s, 1,513;
# NVL 3.9 TB/s, 1,671), NVIDIA H200 datasheet (SXM 4.8 TB/s, 1,979; NVL 4.8 TB/s, 1,671), A100
# datasheet (40GB 1,555 GB/s, 80GB SXM 2,039, 80GB PCIe 1,935; 312 dense), B200, L40S and L4
# product pages. Matched against torch.cuda.get_device_name() word by word ('GH200' is not 'H200'),
# first hit wins, so a variant precedes its family. Vendor figures, not measurements (a measured
# copy or matmul lands below them); a device not listed gets no % of peak and no MFU.
DEVICE_PEAKS: list[tuple[tuple[str, ...], float, float]] = [
    (("h200", "nvl"), 4800.0, 835.0),
    (("h200",), 4800.0, 989.0),                # 'NVIDIA H200' (SXM)
    (("h100", "pcie"), 2000.0, 756.0),         # 'NVIDIA H100 PCIe'
    (("h100", "nvl"), 3900.0, 835.0),          # 'NVIDIA H100 NVL'
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


def peak_note(value: float | None, unit: str, given: bool) -> str:
    """Which peak a result's ratios divide by, for its notes: the value and where it came from, or
    why there is none (so a missing % of peak or MFU says why)."""
    if not torch.cuda.is_available():
        return "none (CPU): no % of peak / MFU"
    if value is None:
        return (f"none: {torch.cuda.get_device_name()} is not in bench.common.DEVICE_PEAKS, so no % of peak / "
                "MFU (pass the peak by hand to get them)")
    return f"{value:g} {unit} (" + ("given on the command line" if given else
                                   f"datasheet, {torch.cuda.get_device_name()}") + ")"


def module_version(mod: str) -> str | None:
    """``mod.__version__`` ("unknown" when it has none), or None when it does not import."""
    try:
        m = __import__(mod, fromlist=["__version__"])
        return getattr(m, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - a package that fails to import is reported as missing
        return None


def git_sha(mark_dirty: bool = False) -> str | None:
    """Short sha of HEAD (with "+uncommitted changes" when asked and the tree differs); where the
    checkout is a copy without .git (a GPU machine), the sha the caller put in ``DINO_FAST_GIT_SHA``
    (bench/suite.py passes it down)."""
    def git(*args: str) -> str:
        return subprocess.check_output(["git", *args], cwd=REPO_ROOT, stderr=subprocess.DEVNULL, text=True).strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        if mark_dirty and git("status", "--porcelain", "--untracked-files=no"):
            sha += "+uncommitted changes"
        return sha
    except (OSError, subprocess.CalledProcessError):
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
        "triton": module_version("triton"),
        "xformers": module_version("xformers"),
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


@contextlib.contextmanager
def oom_as_reason(row: dict[str, Any]) -> Iterator[None]:
    """Run a measurement; out of GPU memory, stop it, free the cache and set ``row["reason"] = "OOM"``
    so the benchmark goes on to its next row (a size that does not fit is a result, not a crash)."""
    try:
        yield
    except torch.OutOfMemoryError:
        row["reason"] = "OOM"
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- tables and result files --------------------------------------------------------------------
def format_cell(v: Any) -> str:
    """One table cell: 3 significant digits, thousands separated from 1,000 on, "|" kept out."""
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v).replace("|", "/")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename: a reader (or a
    kill mid-write) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: the suite moves no dot-file
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class Results:
    """One benchmark's rows, on disk as they come: ``add`` rewrites ``<name>-<device>-<date>.json``
    and its ``.md`` (atomically) after every row, marked ``"complete": false`` until ``close``, so a
    run killed at its time cap leaves valid files with the rows it finished.

    ``derive(rows)``, when given, fills the columns computed across rows (speed-ups against a
    baseline row) before every write.
    """

    def __init__(self, name: str, columns: Sequence[str] | None = None, notes: str = "",
                 out_dir: Path | str | None = None,
                 derive: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.name, self.columns, self.notes, self.derive = name, list(columns or []), notes, derive
        self.rows: list[dict[str, Any]] = []
        self.info = env_info()
        self.json_path = self.path_for(name, out_dir, self.info)
        self.md_path = self.json_path.with_suffix(".md")
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self._write(complete=False)

    @staticmethod
    def path_for(name: str, out_dir: Path | str | None = None, info: dict[str, Any] | None = None) -> Path:
        """The JSON file ``Results(name, out_dir=...)`` writes today on this device."""
        info = info or env_info()
        dev = "cuda-" + info["device"].replace(" ", "_") if info["cuda"] else "cpu"
        return (Path(out_dir) if out_dir else RESULTS_DIR) / f"{name}-{dev}-{info['date'][:10]}.json"

    def add(self, *rows: dict[str, Any]) -> None:
        """Append rows and rewrite both files; print each row as a table line (progress in the log)."""
        self.rows.extend(rows)
        self._write(complete=False)
        for r in rows:
            print(f"[{self.name}] " + ", ".join(f"{k}={format_cell(v)}" for k, v in r.items() if v is not None),
                  flush=True)

    def replace(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rewrite both files with ``rows`` in place of the ones so far (rows that are medians over
        turns change as the turns come)."""
        self.rows[:] = rows
        self._write(complete=False)

    def close(self) -> Path:
        """Mark the files complete, print the header and table; returns the JSON path."""
        text = self._write(complete=True)
        print(text, flush=True)
        return self.json_path

    def _write(self, complete: bool) -> str:
        if self.derive is not None:
            self.derive(self.rows)
        info = self.info
        header = (f"# {self.name}\n\n- device: {info['device']}\n- torch {info['torch']}, triton {info['triton']}, "
                  f"xformers {info['xformers']}, python {info['python']}\n- git {info['git_sha']}, date "
                  f"{info['date']}\n- command: `{info['command']}`\n")
        if self.notes:
            header += f"- notes: {self.notes}\n"
        if not complete:
            header += f"- PARTIAL: {len(self.rows)} rows so far (the run had not finished when this was written)\n"
        text = header + "\n" + markdown_table(self.rows, self.columns or None) + "\n"
        write_atomic(self.json_path, json.dumps({"name": self.name, "env": info, "notes": self.notes,
                                                 "complete": complete, "columns": self.columns,
                                                 "rows": self.rows}, indent=2, default=str))
        write_atomic(self.md_path, text)
        return text


def write_results(name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                  notes: str = "", out_dir: Path | str | None = None) -> Path:
    """All rows at once (a benchmark that cannot be cut short): print the table, write JSON +
    markdown with the environment. Returns the JSON path."""
    results = Results(name, columns, notes, out_dir)
    results.add(*rows)
    return results.close()
