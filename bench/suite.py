"""Every GPU figure from one command: the CUDA tests, then every benchmark, each step a subprocess
capped in time, the most valuable first, into ONE results folder with a ``summary.md``.

    python3 -m bench.suite --out /tmp/results          # GPU: ~9 minutes on one H200 (--budget-s 540)
    python3 -m bench.suite --smoke --out /tmp/r        # each bench's tiny CPU mode (what CI tests)
    python3 -m bench.suite --only bench_dino_loss train --out /tmp/r
    python3 -m bench.suite --list                      # the steps, their budgets and commands

Without CUDA the suite runs the smoke mode. It needs no install: from a plain copy of the checkout
with ``PYTHONPATH`` set to it (an offline GPU machine), ``bench.common`` finds ``kernels/`` as
``dino_fast.kernels``; pass ``--git-sha`` there, where the copy has no ``.git``.

Budget: the first step (env) may take 45 s; every other step has a nominal share of the rest of
``--budget-s`` (``--list`` shows them; on the GPU they add up to 540 s). A step may also use what
the steps before it left unused, never more than what remains, and is killed with its whole process
group when its cap runs out. A step whose cap would be under 5 s is skipped.

The folder gets each bench's ``<name>-<device>-<date>.json`` / ``.md`` (the three runs of
bench_train named ``train``, ``train-compile``, ``train-loader``), ``env.json``, ``summary.md``
(device, versions, git sha, command, date; one table per bench with its key numbers; what failed
or timed out and why), ``summary.json``, and ``logs/`` (each step's output, the tests' junit
XML): commit the results into bench/results/, never the logs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python3 bench/suite.py` as well as `python3 -m bench.suite`
    sys.path.insert(0, str(ROOT))

GPU_BUDGET_S = 540.0  # 9 minutes: a 15-minute device lease less start-up, install and transfers
MIN_STEP_S = 5.0
# Test files whose tests run on CUDA when there is a GPU (kernels, attention, models, DALI,
# FSDP, the trainer's resume); the whole suite took 45 s on the H200 on 2026-12-04.
CUDA_TEST_FILES = ["tests/test_dino_loss.py", "tests/test_ema.py", "tests/test_attention.py",
                   "tests/test_models.py", "tests/test_dali.py", "tests/test_fsdp.py", "tests/test_train.py",
                   "tests/test_pretrained.py"]
SMOKE_TEST_FILES = ["tests/test_schedules.py"]  # the plumbing only: a CPU run of the above takes many minutes
# Key columns per result name in summary.md (a result not listed shows all its columns).
KEY_COLUMNS = {
    "bench_dino_loss": ["B", "V", "K", "dtype", "impl", "ms", "GB/s", "% floor", "peak extra GB", "vs eager",
                   "vs compile"],
    "bench_ema": ["model", "student", "method", "ms", "GB/s", "% of peak", "x vs loop", "kernels/update (profiler)"],
    "model": ["model", "variant", "batch", "ms", "img_s", "x_sdpa", "tflops", "mfu", "peak_gib", "reason"],
    "model_attention": ["model", "variant", "batch", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_tflops", "reason"],
    "bench_data": ["loader", "workers", "batch_size", "views", "images_in_folder", "img_per_s",
                   "speedup_vs_torchvision"],
    "train": ["mode", "path", "attn", "batch", "img_s", "x_ref", "step_ms", "mfu", "peak_gib", "data_ms", "reason"],
}


@dataclass
class Step:
    """One capped subprocess: ``python3 <argv>`` run from the repository root."""

    name: str
    what: str
    budget_s: float                       # nominal seconds: a share of --budget-s (see run_suite)
    argv: list[str]
    rename: dict[str, str] = field(default_factory=dict)  # result name -> file name stem
    results: bool = True                  # writes result files (given --out)
    skip: str | None = None               # planned skip and why
    needs: str | None = None              # a step that must have succeeded first
    fixed: bool = False                   # cap = budget_s itself, not scaled to --budget-s
    # filled in by run_step
    status: str = "pending"
    seconds: float = 0.0
    cap_s: float = 0.0
    files: list[str] = field(default_factory=list)
    note: str = ""


# --- the plan ----------------------------------------------------------------------------------
def plan_steps(smoke: bool, out: Path, jpeg_dir: Path, peaks: list[float] | None, workers: int,
               test_files: list[str] | None) -> list[Step]:
    """The steps in the order they run (most valuable first), GPU sizes or the CPU smoke sizes."""
    logs = out / "logs"
    tests = test_files or (SMOKE_TEST_FILES if smoke else CUDA_TEST_FILES)
    # the suite passes the datasheet peaks itself so that every bench divides by the same numbers
    gbps = ["--peak-gbps", f"{peaks[0]:g}"] if peaks and not smoke else []
    tflops = ["--peak-tflops", f"{peaks[1]:g}"] if peaks and not smoke else []
    n_images = 48 if smoke else 1000

    def b(gpu_s: float, cpu_s: float) -> float:  # nominal seconds: GPU run (sums to 540), CPU smoke
        return cpu_s if smoke else gpu_s

    steps = [
        # fixed, so that a short --budget-s cannot starve it: what follows depends on it
        Step("env", "device, driver, versions, kernels import, xformers kernels usable", 45,
             ["-m", "bench.suite", "--print-env", str(out / "env.json")], results=False, fixed=True),
        Step("tests", "pytest on the CUDA-relevant test files" + (" (smoke: one cheap file)" if smoke else ""),
             b(60, 40),
             ["-m", "pytest", "-p", "bench.common", "-p", "no:cacheprovider", "-q", "-rfE",
              f"--junitxml={logs / 'tests.xml'}", *tests], results=False),
        Step("bench_dino_loss", "fused DINO loss vs eager vs torch.compile, forward+backward", b(60, 30),
             ["-m", "bench.bench_dino_loss", *([] if smoke else ["--dtypes", "bf16"]), *gbps]),
        Step("bench_ema", "teacher EMA: one Triton launch vs foreach vs per-parameter loop", b(30, 25),
             ["-m", "bench.bench_ema"]),
        Step("model", "student forward+backward per attention backend, per-resolution vs packed", b(65, 30),
             ["-m", "bench.bench_model", *([] if smoke else ["--archs", "vit_small", "--batch-sizes", "64"]),
              *tflops]),
        Step("jpegs", f"generate {n_images} ImageNet-sized JPEGs for the loader benches", b(40, 20),
             ["-m", "bench.suite", "--make-jpegs", str(jpeg_dir), "--n-images", str(n_images)], results=False),
        Step("bench_data", "multi-crop loader img/s: torchvision vs DALI "
             + ("on CPU operators" if smoke else "on the GPU (nvJPEG)"), b(55, 35),
             ["-m", "bench.bench_data", "--data", str(jpeg_dir), "--workers", str(workers),
              *([] if smoke else ["--modes", "torchvision", "dali-gpu"])], needs="jpegs"),
        Step("train", "whole training step, synthetic views: reference vs fast (+ the profile's top kernels)",
             b(70, 35), ["-m", "bench.bench_train", "--modes", "synthetic", "--paths", "reference", "fast",
                         "--profile", "2" if smoke else "10", *tflops]),
        Step("train-compile", "whole training step, synthetic views: fast+compile", b(60, 0),
             ["-m", "bench.bench_train", "--modes", "synthetic", "--paths", "fast+compile", *tflops],
             rename={"train": "train-compile"},
             skip="torch.compile on CPU spends minutes in the C++ compiler: GPU only" if smoke else None),
        Step("train-loader", "whole training step fed by the loader (DALI on CUDA): reference vs fast", b(55, 40),
             ["-m", "bench.bench_train", "--modes", "loader", "--paths", "reference", "fast", "--data", str(jpeg_dir),
              "--num-workers", str(workers), *tflops], rename={"train": "train-loader"}, needs="jpegs"),
    ]
    return steps


# --- running -----------------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's whole process group (loader workers included): TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:  # the leader is gone; workers it left in the group go too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])[-600:]


def _notable(path: Path) -> str:
    """Lines of a successful step's log that say something did not run as wanted."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    keys = ("not importable", "not usable", "timing torchvision only", "OutOfMemory")
    seen: list[str] = []
    for ln in text.splitlines():
        ln = ln.strip()
        if any(k in ln for k in keys) and ln not in seen:
            seen.append(ln)
    return " / ".join(s[:200] for s in seen[:3])


def run_step(step: Step, cap_s: float, out: Path, env: dict[str, str]) -> None:
    """Run one step under ``cap_s`` seconds; set its status, time, files and note."""
    logs = out / "logs"
    log = logs / f"{step.name}.log"
    tmp = Path(tempfile.mkdtemp(prefix=f".{step.name}-", dir=out)) if step.results else None
    argv = [sys.executable, *step.argv, *(["--out", str(tmp)] if tmp else [])]
    step.cap_s = cap_s
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(shlex.quote(a) for a in argv) + "\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        except BaseException:  # Ctrl-C: the step runs in its own session and would not see it
            _kill_group(proc)
            raise
        _kill_group(proc)
    step.seconds = time.monotonic() - t0
    if tmp is not None:
        for f in sorted(tmp.iterdir()):
            name, _, rest = f.name.partition("-")
            dest = out / (f"{step.rename.get(name, name)}-{rest}" if rest else f.name)
            if f.suffix in (".json", ".md"):  # the recorded command names the folder the file is in
                f.write_text(f.read_text().replace(str(tmp), str(out)))
            shutil.move(str(f), dest)
            step.files.append(dest.name)
        shutil.rmtree(tmp, ignore_errors=True)
    if timed_out:
        step.status = "timeout"
        step.note = f"killed after its {cap_s:.0f} s cap; last output: {_tail(log)}"
    elif rc != 0:
        step.status = "failed"
        step.note = f"exit {rc}: {_tail(log)}"
    elif step.results and not step.files:
        step.status = "failed"
        step.note = f"exit 0 but no result file: {_tail(log)}"
    else:
        step.status = "ok"
        step.note = _notable(log)
    if step.name == "tests":
        step.note = (_junit_summary(logs / "tests.xml") + ("; " + step.note if step.status != "ok" else "")).strip("; ")


def _junit_summary(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return ""
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname', '')}::{c.get('name', '')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    text = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    if failed:
        text += "; failed: " + ", ".join(failed[:12]) + (f" (+{len(failed) - 12} more)" if len(failed) > 12 else "")
    return text


def run_suite(steps: list[Step], budget_s: float, out: Path, env: dict[str, str],
              on_env: Any = None) -> list[Step]:
    """Run ``steps`` in order within ``budget_s`` (caps as in the module doc), updating the list in
    place. ``on_env(first_step, steps)`` returns the plan to go on with, once the device is known."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    i = 0
    while i < len(steps):
        step = steps[i]
        planned = [s for s in steps if s.skip is None]
        fixed_s = sum(s.budget_s for s in planned if s.fixed)
        scale = max(0.0, budget_s - fixed_s) / max(1e-9, sum(s.budget_s for s in planned if not s.fixed))
        if step.skip is not None:
            step.status, step.note = "skipped", step.skip
        elif step.needs and next((s.status for s in steps if s.name == step.needs), "ok") != "ok":
            step.status, step.note = "skipped", f"needs step '{step.needs}', which did not succeed"
        else:
            upto = sum(s.budget_s * (1.0 if s.fixed else scale) for s in steps[:i + 1] if s.skip is None)
            cap = min(upto, budget_s) - (time.monotonic() - t_start)
            if cap < MIN_STEP_S:
                step.status, step.note = "skipped", f"budget spent ({budget_s:.0f} s in all)"
            else:
                print(f"[suite] {step.name}: {step.what} (cap {cap:.0f} s)", flush=True)
                run_step(step, cap, out, env)
                print(f"[suite] {step.name}: {step.status} in {step.seconds:.1f} s"
                      + (f" - {step.note}" if step.note else ""), flush=True)
        if i == 0 and on_env is not None:
            steps[:] = on_env(step, steps)  # in place: the caller's list stays the one reported
        i += 1
    return steps


# --- summary -----------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v).replace("|", "/")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_tables(out: Path, steps: list[Step]) -> list[str]:
    """One markdown section per result file the steps wrote, with the key columns."""
    parts = []
    for step in steps:
        for fname in step.files:
            if not fname.endswith(".json"):
                continue
            try:
                data = json.loads((out / fname).read_text())
            except (OSError, ValueError) as e:
                parts.append(f"### {fname}\n\nunreadable: {e}\n")
                continue
            rows = data.get("rows") or []
            name = data.get("name", fname.partition("-")[0])
            present = [c for r in rows for c in r]
            columns = [c for c in KEY_COLUMNS.get(name, []) if c in present] or list(dict.fromkeys(present))
            notes = data.get("notes", "")
            parts.append(f"### {fname[:-5]} (step {step.name})\n\n"
                         f"`{(data.get('env') or {}).get('command', '')}`\n\n"
                         + (_table(rows, columns) if rows else "(no rows)")
                         + (f"\n\n<details><summary>notes</summary>\n\n{notes}\n\n</details>\n" if notes else "\n"))
    return parts


def write_summary(out: Path, steps: list[Step], info: dict[str, Any], meta: dict[str, Any]) -> Path:
    env_line = ", ".join(f"{k} {info.get(k)}" for k in ("torch", "torch_cuda", "triton", "xformers", "dali",
                                                        "torchvision", "timm", "numpy", "python") if k in info)
    lines = [
        f"# dino_fast bench suite: {info.get('device', 'unknown device')}",
        "",
        f"- date: {meta['date']}; mode: {meta['mode']}; budget {meta['budget_s']:.0f} s, "
        f"used {meta['elapsed_s']:.0f} s",
        f"- device: {info.get('device')}" + (f"; driver {info['driver']}" if info.get("driver") else "")
        + (f"; datasheet peaks {info['peaks'][0]:g} GB/s, {info['peaks'][1]:g} bf16 TFLOP/s"
           if info.get("peaks") else ""),
        f"- versions: {env_line or 'unknown (env step failed)'}",
        f"- kernels: {info.get('kernels', 'unknown')}; xformers kernels usable: {info.get('xformers_usable')}",
        f"- git: {meta['git_sha']}",
        f"- command: `{meta['command']}`",
        "",
        "## Steps",
        "",
        _table([{"step": s.name, "status": s.status, "seconds": round(s.seconds, 1),
                 "cap s": round(s.cap_s) if s.cap_s else None, "what": s.what,
                 "files": ", ".join(f for f in s.files if f.endswith(".json"))} for s in steps],
               ["step", "status", "seconds", "cap s", "what", "files"]),
        "",
    ]
    tests = next((s for s in steps if s.name == "tests"), None)
    if tests is not None and tests.note:
        lines += ["## Tests", "", tests.note, ""]
    bad = [s for s in steps if s.status not in ("ok",)]
    lines += ["## Failed, timed out or skipped", ""]
    lines += [f"- **{s.name}**: {s.status}: {s.note or 'no detail'}" + (f" (log: logs/{s.name}.log)" if s.cap_s else "")
              for s in bad] or ["- none"]
    noted = [s for s in steps if s.status == "ok" and s.note and s.name != "tests"]
    if noted:
        lines += ["", "## Notes from successful steps", ""]
        lines += [f"- **{s.name}**: {s.note}" for s in noted]
    lines += ["", "## Results", ""] + result_tables(out, steps)
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"meta": meta, "env": info, "steps": [{k: getattr(s, k) for k in ("name", "what", "status", "seconds",
                                                                        "cap_s", "files", "note", "argv")}
                                              for s in steps]}, indent=2, default=str))
    return path


# --- helper modes run as steps -----------------------------------------------------------------
def print_env(path: Path) -> None:
    """Write env.json: bench.common.env_info() plus driver, more versions, kernels, xformers, peaks."""
    import importlib

    from bench.common import device_peaks, env_info

    import torch

    info = env_info()
    info["torch_cuda"] = torch.version.cuda
    for mod, key in (("torchvision", "torchvision"), ("timm", "timm"), ("numpy", "numpy"),
                     ("nvidia.dali", "dali"), ("PIL", "pillow")):
        try:
            info[key] = getattr(importlib.import_module(mod), "__version__", "unknown")
        except Exception as e:  # noqa: BLE001 - a missing package is a fact to report
            info[key] = f"not importable ({type(e).__name__})"
    try:
        import dino_fast
        import dino_fast.kernels.dino_loss as k

        info["dino_fast"] = getattr(dino_fast, "__version__", None)
        info["kernels"] = f"dino_fast.kernels from {Path(k.__file__).parent}"
    except Exception as e:  # noqa: BLE001
        info["kernels"] = f"NOT importable: {type(e).__name__}: {e}"
    info["xformers_usable"] = False
    if info["cuda"]:
        info["peaks"] = device_peaks()
        try:
            from dino_fast.models import xformers_usable

            info["xformers_usable"] = xformers_usable(torch.cuda.current_device())
        except Exception as e:  # noqa: BLE001
            info["xformers_usable"] = f"probe failed: {type(e).__name__}"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    path.write_text(json.dumps(info, indent=2, default=str))
    print(json.dumps(info, indent=2, default=str))


def make_jpegs(root: Path, n_images: int) -> None:
    from bench.bench_data import make_bench_jpegs

    t0 = time.perf_counter()
    make_bench_jpegs(n_images, root=root)
    print(f"{n_images} JPEGs in {root} ({time.perf_counter() - t0:.1f} s)")


# --- command line ------------------------------------------------------------------------------
def _git_sha(given: str | None) -> str | None:
    if given:
        return given
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return sha + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DINO_FAST_GIT_SHA") or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench-suite-<date> here)")
    p.add_argument("--budget-s", type=float, default=GPU_BUDGET_S, help="seconds for all steps together")
    p.add_argument("--smoke", action="store_true", help="tiny CPU sizes (the default without CUDA)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps (env always runs)")
    p.add_argument("--skip", nargs="+", default=[], help="leave these steps out")
    p.add_argument("--tests", nargs="+", default=None, help="test files for the tests step (default: the CUDA ones)")
    p.add_argument("--workers", type=int, default=None, help="loader workers / DALI threads (GPU default 12)")
    p.add_argument("--jpeg-dir", type=Path, default=None,
                   help="keep the generated JPEGs here and reuse them next time (default: a temporary folder)")
    p.add_argument("--git-sha", default=None, help="sha to record where the checkout has no .git")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    p.add_argument("--print-env", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-jpegs", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-images", type=int, default=1000, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 when every step that was meant to run succeeded, else 1."""
    args = parse_args(argv)
    if args.print_env:
        print_env(args.print_env)
        return 0
    if args.make_jpegs:
        make_jpegs(args.make_jpegs, args.n_images)
        return 0

    date = _dt.datetime.now(_dt.timezone.utc)
    out = (args.out or Path(f"bench-suite-{date:%Y%m%d-%H%M%S}")).resolve()
    # a fresh folder per run unless asked: the images then always come from today's generator
    jpeg_dir = args.jpeg_dir or Path(tempfile.gettempdir()) / f"dino_fast-suite-jpegs-{os.getpid()}"

    def plan(smoke: bool, peaks: list[float] | None) -> list[Step]:
        workers = args.workers or (2 if smoke else min(12, os.cpu_count() or 1))
        steps = plan_steps(smoke, out, jpeg_dir, peaks, workers, args.tests)
        for s in steps:
            if s.name in args.skip:
                s.skip = "left out with --skip"
            elif args.only and s.name not in args.only and s.name != "env":
                s.skip = "not in --only"
        return steps

    steps = plan(args.smoke, None)
    if args.list:
        for s in steps:
            print(f"{s.name:14s} {s.budget_s:4.0f} s  {'SKIP: ' + s.skip if s.skip else ''}\n    python3 "
                  + " ".join(shlex.quote(a) for a in s.argv) + (" --out DIR" if s.results else ""))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    git_sha = _git_sha(args.git_sha)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if git_sha:
        env["DINO_FAST_GIT_SHA"] = git_sha.split("+")[0]
    invoked = ["python3", "-m", "bench.suite"] if __spec__ is not None else ["python3", "bench/suite.py"]
    meta = {"date": date.strftime("%Y-%m-%dT%H:%M:%SZ"), "git_sha": git_sha, "budget_s": args.budget_s,
            "command": " ".join(shlex.quote(a) for a in invoked + (sys.argv[1:] if argv is None else argv)),
            "mode": "smoke" if args.smoke else "gpu", "elapsed_s": 0.0}
    info: dict[str, Any] = {}

    def on_env(env_step: Step, steps: list[Step]) -> list[Step]:
        """Once the device is known: smoke mode without CUDA, datasheet peaks with it."""
        try:
            info.update(json.loads((out / "env.json").read_text()))
        except (OSError, ValueError):
            import torch  # the env step failed: ask torch here so the plan is still right

            info.update(device=platform.processor() or platform.machine(), cuda=torch.cuda.is_available())
        smoke = args.smoke or not info.get("cuda")
        if smoke and not args.smoke:
            print("[suite] no CUDA: running the smoke mode (tiny CPU sizes, NOT GPU figures)", flush=True)
        meta["mode"] = "smoke" if smoke else "gpu"
        new = plan(smoke, info.get("peaks"))
        new[0] = env_step
        return new

    t0 = time.monotonic()
    try:
        run_suite(steps, args.budget_s, out, env, on_env=on_env)
    finally:
        if args.jpeg_dir is None:
            shutil.rmtree(jpeg_dir, ignore_errors=True)
        meta["elapsed_s"] = time.monotonic() - t0
        for s in steps:
            if s.status == "pending":
                s.status, s.note = "skipped", "suite interrupted"
        path = write_summary(out, steps, info, meta)
        print(f"[suite] summary: {path}", flush=True)
    # planned skips (smoke's compile, --only, --skip) are fine; a step the budget or a failure cut is not
    cut = [s for s in steps if s.status in ("failed", "timeout") or s.note.startswith(("budget", "needs"))]
    return 1 if cut else 0


if __name__ == "__main__":
    sys.exit(main())
