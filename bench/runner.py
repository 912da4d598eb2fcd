"""The suite's runner: each step a subprocess in its own process group, run under a time cap, its
outcome read back (status, seconds, result files, a one-line note from its log or junit XML).

Caps: a step's nominal share of the budget (``nominal_caps``: fixed steps keep their seconds, the
others share the rest in proportion) accumulates, so time a step leaves unused flows on to the
next ones, never past the budget. A step whose cap would be under ``MIN_STEP_S`` is skipped.
A step ends within its cap, its kill included: SIGTERM to its process group ``KILL_GRACE_S``
before the cap, SIGKILL at the cap. A pytest step also gets SIGINT ``interrupt_s`` before its cap:
pytest then stops where it is and still writes its junit XML (a SIGTERM'd pytest writes none).
"""
from __future__ import annotations

import json
import os
import re
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
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
MIN_STEP_S = 5.0
KILL_GRACE_S = 3.0


@dataclass
class Step:
    """One capped subprocess: ``python3 <argv>`` run from the repository root."""

    name: str
    what: str
    budget_s: float                       # nominal seconds: a share of --budget-s (see nominal_caps)
    argv: list[str]
    rename: dict[str, str] = field(default_factory=dict)  # result name -> file name stem
    results: bool = True                  # writes result files (given --out)
    skip: str | None = None               # planned skip and why
    needs: str | None = None              # a step that must have succeeded first
    fixed: bool = False                   # cap = budget_s itself, not scaled to --budget-s
    junit: str | None = None              # a pytest step's junit XML: its note counts the tests
    interrupt_s: float = 0.0              # SIGINT this long before the cap (pytest writes its junit)
    # filled in by run_step
    status: str = "pending"
    seconds: float = 0.0
    cap_s: float = 0.0
    files: list[str] = field(default_factory=list)
    note: str = ""


def nominal_caps(steps: list[Step], budget_s: float) -> list[float]:
    """Each step's share of ``budget_s`` (0 for a planned skip); the shares add up to the budget."""
    planned = [s for s in steps if s.skip is None]
    fixed = sum(s.budget_s for s in planned if s.fixed)
    flexible = sum(s.budget_s for s in planned if not s.fixed)
    scale = max(0.0, budget_s - fixed) / flexible if flexible else 0.0
    return [0.0 if s.skip is not None else s.budget_s * (1.0 if s.fixed else scale) for s in steps]


# --- one step ------------------------------------------------------------------------------------
def _signal_group(proc: subprocess.Popen, sig: int) -> bool:
    try:
        os.killpg(proc.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """End the step's whole process group (loader workers, pytest workers included): TERM, then KILL."""
    if not _signal_group(proc, signal.SIGTERM):
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc, signal.SIGKILL)  # the leader may be gone while workers it left in the group are not
    try:
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        pass


def _wait_until(proc: subprocess.Popen, t: float) -> int | None:
    try:
        return proc.wait(timeout=max(0.0, t - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def run_step(step: Step, cap_s: float, out: Path, env: dict[str, str]) -> None:
    """Run one step within ``cap_s`` seconds; set its status, time, files and note. Interrupted itself
    (the suite got a signal), it ends the step's group, keeps what the step wrote, and re-raises."""
    log = out / "logs" / f"{step.name}.log"
    tmp = Path(tempfile.mkdtemp(prefix=f".{step.name}-", dir=out)) if step.results else None
    argv = [sys.executable, *step.argv, *(["--out", str(tmp)] if tmp else [])]
    step.cap_s = cap_s
    t0 = time.monotonic()
    deadline = t0 + cap_s
    interrupted = False
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(shlex.quote(a) for a in argv) + "\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = None
            if step.interrupt_s > 0:
                rc = _wait_until(proc, deadline - min(step.interrupt_s, cap_s / 2))
                interrupted = rc is None and _signal_group(proc, signal.SIGINT)
            if rc is None:
                rc = _wait_until(proc, deadline - min(KILL_GRACE_S, cap_s / 4))
            kill_group(proc, grace_s=min(KILL_GRACE_S, cap_s / 4))  # children it left behind go too
        except BaseException:  # the suite itself was stopped: the step runs in its own session
            kill_group(proc, grace_s=1.0)
            step.seconds = time.monotonic() - t0
            step.status, step.note = "interrupted", "the suite was stopped while this step ran"
            _collect(step, tmp, out)
            raise
    step.seconds = time.monotonic() - t0
    _collect(step, tmp, out)
    tail = log_tail(log)
    if rc is None or interrupted:
        step.status = "timeout"
        step.note = (f"SIGINT {min(step.interrupt_s, cap_s / 2):.0f} s before its {cap_s:.0f} s cap (its own "
                     "deadline, so that pytest writes its junit XML); tests running then are not counted"
                     + ("" if rc is not None else "; killed at the cap") if interrupted
                     else f"killed at its {cap_s:.0f} s cap; last output: {tail}")
    elif rc != 0 and not (step.junit and rc == 5):  # pytest's 5: no test selected, not a failure
        step.status, step.note = "failed", f"exit {rc}: {tail}"
    elif step.results and not step.files:
        step.status, step.note = "failed", f"exit 0 but no result file: {tail}"
    else:
        step.status, step.note = "ok", notable_lines(log)
    partial = [f for f in step.files if f.endswith(".json") and _is_partial(out / f)]
    if partial and step.status != "ok":
        step.note += f"; rows written before it stopped are kept ({', '.join(partial)}: partial)"
    if step.junit:
        step.note = "; ".join(x for x in (pytest_counts(Path(step.junit), log),
                                          step.note if step.status != "ok" else "") if x)


def _collect(step: Step, tmp: Path | None, out: Path) -> None:
    """Move the result files a step wrote (its rows so far, if it was stopped) from its own folder to
    ``out``, renamed as the plan says; temp files of an unfinished write are dropped."""
    if tmp is None:
        return
    for f in sorted(tmp.iterdir()):
        if f.name.startswith(".") or f.suffix not in (".json", ".md"):
            continue
        name, _, rest = f.name.partition("-")
        dest = out / (f"{step.rename.get(name, name)}-{rest}" if rest else f.name)
        f.write_text(f.read_text().replace(str(tmp), str(out)))  # the recorded command names the folder
        shutil.move(str(f), dest)
        step.files.append(dest.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _is_partial(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("complete") is False
    except (OSError, ValueError):
        return False


# --- reading a step's output ---------------------------------------------------------------------
def log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])[-600:]


def notable_lines(path: Path) -> str:
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


def junit_counts(path: Path) -> str | None:
    """"N passed, N failed, N errors, N skipped; failed: ..." from a junit XML, None without one."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    # the classname's last part: where the tests sit relative to pytest's rootdir changes what precedes it
    failed = [f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name', '')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    text = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    if failed:
        text += "; failed: " + ", ".join(failed[:12]) + (f" (+{len(failed) - 12} more)" if len(failed) > 12 else "")
    return text


_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?$")
_FINAL = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")
_MARKS = {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed", "X": "xpassed"}


def pytest_log_counts(text: str) -> dict[str, int]:
    """Test outcomes from a ``pytest -q`` log: its closing line when it got that far, else the
    progress characters it printed so far (``.`` passed, ``F`` failed, ``E`` error, ``s`` skipped)."""
    for line in reversed(text.splitlines()):
        found = _FINAL.findall(line)
        if found and re.search(r"\bin [\d.]+s", line):
            counts: dict[str, int] = {}
            for num, word in found:
                key = "errors" if word.startswith("error") else word
                counts[key] = counts.get(key, 0) + int(num)
            return counts
    counts = {}
    for line in text.splitlines():
        m = _PROGRESS.match(line.strip())
        if m:
            for ch in m.group(1):
                counts[_MARKS[ch]] = counts.get(_MARKS[ch], 0) + 1
    return counts


def pytest_counts(junit: Path, log: Path) -> str:
    """A pytest step's counts: from its junit XML, or (killed before writing one) from its log."""
    from_junit = junit_counts(junit)
    if from_junit is not None:
        return from_junit
    try:
        counts = pytest_log_counts(log.read_text(errors="replace"))
    except OSError:
        counts = {}
    shown = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no test finished"
    return f"no junit XML; its log shows {shown} so far"


# --- the whole plan --------------------------------------------------------------------------------
def run_suite(steps: list[Step], budget_s: float, out: Path, env: dict[str, str],
              on_env: Callable[[Step, list[Step]], list[Step]] | None = None,
              on_step: Callable[[list[Step]], Any] | None = None) -> list[Step]:
    """Run ``steps`` in order within ``budget_s`` (caps as in the module doc), updating the list in
    place. ``on_env(first_step, steps)`` returns the plan to go on with, once the device is known;
    ``on_step(steps)`` is called as each step starts and ends (the suite rewrites its summary)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    i = 0
    while i < len(steps):
        step = steps[i]
        caps = nominal_caps(steps, budget_s)
        if step.skip is not None:
            step.status, step.note = "skipped", step.skip
        elif step.needs and next((s.status for s in steps if s.name == step.needs), "ok") != "ok":
            step.status, step.note = "skipped", f"needs step '{step.needs}', which did not succeed"
        else:
            cap = min(sum(caps[:i + 1]), budget_s) - (time.monotonic() - t_start)
            if cap < MIN_STEP_S:
                step.status, step.note = "skipped", f"budget spent ({budget_s:.0f} s in all)"
            else:
                print(f"[suite] {step.name}: {step.what} (cap {cap:.0f} s)", flush=True)
                step.status = "running"
                if on_step is not None:
                    on_step(steps)
                run_step(step, cap, out, env)
                print(f"[suite] {step.name}: {step.status} in {step.seconds:.1f} s"
                      + (f" - {step.note}" if step.note else ""), flush=True)
        if i == 0 and on_env is not None:
            steps[:] = on_env(step, steps)  # in place: the caller's list stays the one reported
        if on_step is not None:
            on_step(steps)
        i += 1
    return steps
