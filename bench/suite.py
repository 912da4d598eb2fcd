"""Every GPU figure from one command: the CUDA tests, then every benchmark, each step a subprocess
capped in time, the most valuable first, into ONE results folder with a ``summary.md``.

    python3 -m bench.suite --out /tmp/results          # GPU: 7 minutes (--budget-s 420) on an H100 or H200
    python3 -m bench.suite --smoke --out /tmp/r        # each bench's tiny CPU mode (what CI tests)
    python3 -m bench.suite --only bench_dino_loss train --out /tmp/r
    python3 -m bench.suite --list                      # the steps, their caps and commands

Without CUDA the suite runs the smoke mode. It needs no install: from a plain copy of the checkout
with ``PYTHONPATH`` set to it (an offline GPU machine), ``dino_fast`` finds ``kernels/`` as
``dino_fast.kernels``; pass ``--git-sha`` there, where the copy has no ``.git``.

Budget: ``--budget-s`` (default 420 s: what one ~8-minute device call leaves after start, install
and transfers) is shared out as ``bench/runner.py`` says: the env step keeps its 45 s, the others
share the rest (``--list`` prints each cap; they add up to the budget), and a step may use what the
steps before it left unused. The tests run twice: the quick ones first, in parallel with a per-test
timeout (pytest-xdist, pytest-timeout; serially without, and the summary says so), the slow ones
(``@pytest.mark.slow``: resume, SIGKILL, FSDP spawn) last.

The folder gets each bench's ``<name>-<device>-<date>.json`` / ``.md`` (the three runs of
bench_train named ``train``, ``train-compile``, ``train-loader``; a bench stopped at its cap leaves
the rows it finished, marked partial), ``env.json``, ``summary.md`` (device, versions, git sha,
command, date; one table per bench with its key numbers; what failed or timed out and why),
``summary.json``, and ``logs/`` (each step's output, the tests' junit XML): commit the results into
bench/results/, never the logs. The summary is rewritten after every step and when the suite is
stopped (SIGTERM: exit 143, SIGINT: 130, the running step's process group killed first).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # `python3 bench/suite.py` (what `dino-fast bench all` runs): bench.* from this checkout
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
    sys.path.insert(0, str(ROOT))

from bench.common import git_sha as _git_sha  # noqa: E402
from bench.runner import Step, nominal_caps, run_suite  # noqa: E402
from bench.summary import write_summary  # noqa: E402

GPU_BUDGET_S = 420.0  # one ~8-minute device call less start-up, install and transfers
TEST_TIMEOUT_S = 60   # pytest-timeout, per test
TEST_WORKERS_MAX = 8  # pytest-xdist workers: CPU cores, at most this many
PYTEST_INTERRUPT_S = 15.0  # pytest's own deadline, before its step's cap: time to write its junit XML
# Test files whose tests run on CUDA when there is a GPU (kernels, attention, models, DALI,
# FSDP, the trainer's resume); their slow tests (resume, SIGKILL, FSDP spawn) run in a later step.
CUDA_TEST_FILES = ["tests/test_dino_loss.py", "tests/test_dino_head_loss.py", "tests/test_ema.py",
                   "tests/test_attention.py", "tests/test_models.py", "tests/test_dali.py", "tests/test_fsdp.py",
                   "tests/test_train.py", "tests/test_pretrained.py"]
SLOW_TEST_FILES = [*CUDA_TEST_FILES, "tests/test_signals.py"]
SMOKE_TEST_FILES = ["tests/test_schedules.py"]  # the plumbing only: a CPU run of the above takes many minutes


class SuiteStopped(BaseException):
    """The suite process got SIGTERM or SIGINT: the summary is written, then it exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- the plan ----------------------------------------------------------------------------------
def pytest_options(cpus: int | None = None) -> tuple[list[str], str]:
    """pytest flags for parallel runs with a per-test timeout, as far as the plugins are importable
    here, and a line saying how the tests run (it goes into the summary)."""
    cpus = cpus or os.cpu_count() or 1
    args: list[str] = []
    said: list[str] = []
    if importlib.util.find_spec("xdist") is not None:
        n = min(TEST_WORKERS_MAX, cpus)
        args += ["-n", str(n)]
        said.append(f"{n} workers (pytest-xdist)")
    else:
        said.append("serially: pytest-xdist not importable")
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", str(TEST_TIMEOUT_S)]
        said.append(f"{TEST_TIMEOUT_S} s per test (pytest-timeout)")
    else:
        said.append("no per-test timeout: pytest-timeout not importable")
    return args, ", ".join(said)


def plan_steps(smoke: bool, out: Path, jpeg_dir: Path, peaks: list[float] | None, workers: int,
               test_files: list[str] | None) -> list[Step]:
    """The steps in the order they run (most valuable first), GPU sizes or the CPU smoke sizes."""
    logs = out / "logs"
    opts, how = pytest_options()
    # the suite passes the datasheet peaks itself so that every bench divides by the same numbers
    gbps = ["--peak-gbps", f"{peaks[0]:g}"] if peaks and not smoke else []
    tflops = ["--peak-tflops", f"{peaks[1]:g}"] if peaks and not smoke else []
    n_images = 48 if smoke else 1000

    def b(gpu_s: float, cpu_s: float) -> float:  # nominal seconds: GPU run (sums to 420), CPU smoke
        return cpu_s if smoke else gpu_s

    def tests(name: str, marker: str, files: list[str]) -> list[str]:
        return ["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "-m", marker, *opts,
                f"--junitxml={logs / (name + '.xml')}", *files]

    quick_files = test_files or (SMOKE_TEST_FILES if smoke else CUDA_TEST_FILES)
    slow_files = test_files or SLOW_TEST_FILES
    steps = [
        # fixed, so that a short --budget-s cannot starve it: what follows depends on it
        Step("env", "device, driver, versions, kernels import, xformers kernels usable", 45,
             ["-m", "bench.env", str(out / "env.json")], results=False, fixed=True),
        Step("tests", "pytest, slow tests left for later, on the CUDA-relevant test files"
             + (" (smoke: one cheap file)" if smoke else "") + f": {how}", b(55, 40),
             tests("tests", "not slow", quick_files), results=False, junit=str(logs / "tests.xml"),
             interrupt_s=PYTEST_INTERRUPT_S),
        Step("bench_dino_loss", "fused DINO loss vs eager vs torch.compile, forward+backward", b(45, 30),
             ["-m", "bench.bench_dino_loss", *([] if smoke else ["--dtypes", "bf16"]), *gbps]),
        Step("bench_ema", "teacher EMA: one Triton launch vs foreach vs per-parameter loop", b(20, 25),
             ["-m", "bench.bench_ema", *gbps]),
        Step("model", "student forward+backward per attention backend, per-resolution vs packed", b(40, 30),
             ["-m", "bench.bench_model", *([] if smoke else ["--archs", "vit_small", "--batch-sizes", "64"]),
              *tflops]),
        Step("jpegs", f"generate {n_images} ImageNet-sized JPEGs for the loader benches", b(25, 20),
             ["-m", "bench.jpegs", str(jpeg_dir), "--n-images", str(n_images)], results=False),
        Step("bench_data", "multi-crop loader img/s: torchvision vs DALI "
             + ("on CPU operators" if smoke else "on the GPU (nvJPEG)"), b(35, 35),
             ["-m", "bench.bench_data", "--data", str(jpeg_dir), "--workers", str(workers),
              *([] if smoke else ["--modes", "torchvision", "dali-gpu"])], needs="jpegs"),
        Step("train", "whole training step, synthetic views: reference vs fast (+ the profile's top kernels)",
             b(45, 35), ["-m", "bench.bench_train", "--modes", "synthetic", "--paths", "reference", "fast",
                         "--profile", "2" if smoke else "10", *tflops]),
        Step("train-compile", "whole training step, synthetic views: fast+compile", b(45, 0),
             ["-m", "bench.bench_train", "--modes", "synthetic", "--paths", "fast+compile", *tflops],
             rename={"train": "train-compile"},
             skip="torch.compile on CPU spends minutes in the C++ compiler: GPU only" if smoke else None),
        Step("train-loader", "whole training step fed by the loader (DALI on CUDA): reference vs fast", b(30, 40),
             ["-m", "bench.bench_train", "--modes", "loader", "--paths", "reference", "fast", "--data", str(jpeg_dir),
              "--num-workers", str(workers), *tflops], rename={"train": "train-loader"}, needs="jpegs"),
        Step("tests-slow", f"pytest, the slow tests (resume, SIGKILL, FSDP spawn): {how}", b(35, 0),
             tests("tests-slow", "slow", slow_files), results=False, junit=str(logs / "tests-slow.xml"),
             interrupt_s=PYTEST_INTERRUPT_S,
             skip="minutes on CPU: CI runs them (pytest tests); the GPU run does" if smoke else None),
    ]
    return steps


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench-suite-<date> here)")
    p.add_argument("--budget-s", type=float, default=GPU_BUDGET_S, help="seconds for all steps together")
    p.add_argument("--smoke", action="store_true", help="tiny CPU sizes (the default without CUDA)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps (env always runs)")
    p.add_argument("--skip", nargs="+", default=[], help="leave these steps out")
    p.add_argument("--tests", nargs="+", default=None, help="test files for the tests steps (default: the CUDA ones)")
    p.add_argument("--workers", type=int, default=None, help="loader workers / DALI threads (GPU default 12)")
    p.add_argument("--jpeg-dir", type=Path, default=None,
                   help="keep the generated JPEGs here and reuse them next time (default: a temporary folder)")
    p.add_argument("--git-sha", default=None, help="sha to record where the checkout has no .git")
    p.add_argument("--list", action="store_true", help="print the steps with their caps and exit")
    return p.parse_args(argv)


def print_plan(steps: list[Step], budget_s: float) -> None:
    """``--list``: each step's cap at this budget (they add up to it) and its command."""
    caps = nominal_caps(steps, budget_s)
    print(f"{'step':14s} {'cap s':>6s}")
    for s, cap in zip(steps, caps):
        print(f"{s.name:14s} {cap:6.1f}  {'SKIP: ' + s.skip if s.skip else s.what}\n    python3 "
              + " ".join(shlex.quote(a) for a in s.argv) + (" --out DIR" if s.results else ""))
    print(f"{'total':14s} {sum(caps):6.1f}  (--budget-s {budget_s:g}; a step may also use what the steps "
          "before it left unused)")


def _on_signal(signum: int, frame: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the summary short
        signal.signal(sig, signal.SIG_IGN)
    raise SuiteStopped(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 when every step that was meant to run succeeded, 1 if not, 128 + signal
    number when the suite itself was stopped (the summary is written in every case)."""
    args = parse_args(argv)
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
        print_plan(steps, args.budget_s)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    git_sha = args.git_sha or _git_sha(mark_dirty=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if git_sha:
        env["DINO_FAST_GIT_SHA"] = git_sha.split("+")[0]
    invoked = ["python3", "-m", "bench.suite"] if __spec__ is not None else ["python3", "bench/suite.py"]
    meta = {"date": date.strftime("%Y-%m-%dT%H:%M:%SZ"), "git_sha": git_sha, "budget_s": args.budget_s,
            "command": " ".join(shlex.quote(a) for a in invoked + (sys.argv[1:] if argv is None else argv)),
            "mode": "smoke" if args.smoke else "gpu", "elapsed_s": 0.0}
    info: dict[str, Any] = {}
    t0 = time.monotonic()

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

    def summarize(steps: list[Step]) -> Path:
        meta["elapsed_s"] = time.monotonic() - t0
        return write_summary(out, steps, info, meta)

    handled = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if handled else {}
    code = None
    try:
        run_suite(steps, args.budget_s, out, env, on_env=on_env, on_step=summarize)
    except SuiteStopped as stop:
        code = 128 + stop.signum
        meta["stopped"] = f"stopped by {stop} after {time.monotonic() - t0:.0f} s"
        print(f"[suite] {meta['stopped']}: writing the summary", flush=True)
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if args.jpeg_dir is None:
            shutil.rmtree(jpeg_dir, ignore_errors=True)
        for s in steps:
            if s.status in ("pending", "running"):
                s.status, s.note = "skipped", "suite stopped before this step" if code else "suite interrupted"
        path = summarize(steps)
        print(f"[suite] summary: {path}", flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code is not None:
        return code
    # planned skips (smoke's compile, --only, --skip) are fine; a step the budget or a failure cut is not
    cut = [s for s in steps if s.status in ("failed", "timeout") or s.note.startswith(("budget", "needs"))]
    return 1 if cut else 0


if __name__ == "__main__":
    sys.exit(main())
