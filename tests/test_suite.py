"""bench/: the suite's caps, statuses, process-group kills, renamed result files and summary.md;
pytest's own deadline (junit written), counts from a killed pytest's log, the suite stopped by
SIGTERM; results rewritten after every row (a SIGKILL keeps them); device peaks and the plan; the
whole suite in its CPU smoke mode with a short budget.

The smoke run with a budget large enough for every step to finish (minutes on 2 cores) runs only
with DINO_FAST_SLOW_TESTS=1."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import common
from bench.common import device_peaks, peak_note
from bench.runner import Step, pytest_log_counts, run_suite
from bench.suite import GPU_BUDGET_S, main, plan_steps
from bench.summary import write_summary

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("ok", "failed", "timeout", "skipped")
META = {"date": "2026-01-01T00:00:00Z", "mode": "smoke", "budget_s": 7.0, "elapsed_s": 7.0,
        "git_sha": "abc1234", "command": "python3 -m bench.suite"}


def _py(code: str) -> list[str]:
    return ["-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _steps_table(summary: str) -> dict[str, str]:
    """step -> status from summary.md's Steps table."""
    section = summary.split("## Steps", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| step")]
    return {cells[0]: cells[1] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def test_caps_statuses_kills_and_summary(tmp_path):
    out = tmp_path / "out"
    grandchild_pid = tmp_path / "grandchild.pid"
    writes_result = ("import sys, json, pathlib; d = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); "
                     "(d / 'fake-cpu-2026-01-01.json').write_text(json.dumps({'name': 'fake', 'notes': 'n', "
                     "'env': {'command': 'fake'}, 'rows': [{'x': 1, 'y': 2.5}]})); "
                     "(d / 'fake-cpu-2026-01-01.md').write_text('t'); (d / '.fake.json.1.tmp').write_text('{')")
    # the sleeper starts a grandchild in its own process group: a timeout must end both
    sleeper = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(120)']); open({str(grandchild_pid)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    steps = [  # the sleeper first: a later step would inherit the time the quick ones leave
        Step("sleeper", "killed at its cap", 6, _py(sleeper), results=False),
        Step("first", "ok, no results", 20, _py("print('hello')"), results=False),
        Step("bench", "writes a result, renamed", 20, _py(writes_result), rename={"fake": "renamed"}),
        Step("fails", "exits 3", 20, _py("import sys; print('boom'); sys.exit(3)"), results=False),
        Step("no-files", "exits 0 without results", 20, _py("pass")),
        Step("planned", "planned skip", 20, _py("pass"), skip="not here"),
        Step("dependent", "needs the failed step", 20, _py("pass"), results=False, needs="fails"),
    ]
    t0 = time.monotonic()
    run_suite(steps, budget_s=106.0, out=out, env=dict(os.environ))  # nominal shares, unscaled
    assert time.monotonic() - t0 < 90
    by_name = {s.name: s for s in steps}
    assert [s.status for s in steps] == ["timeout", "ok", "ok", "failed", "failed", "skipped", "skipped"]
    assert "exit 3" in by_name["fails"].note and "boom" in by_name["fails"].note
    assert "no result file" in by_name["no-files"].note
    # the kill lands inside the cap, not after a grace period past it
    assert by_name["sleeper"].cap_s == pytest.approx(6.0, abs=0.5) and by_name["sleeper"].seconds < 6.0 + 2.5
    assert "needs step 'fails'" in by_name["dependent"].note
    # a half-written temp file (a dot-file) is not a result
    assert sorted(by_name["bench"].files) == ["renamed-cpu-2026-01-01.json", "renamed-cpu-2026-01-01.md"]
    assert (out / "renamed-cpu-2026-01-01.json").is_file() and not list(out.glob(".bench-*"))
    assert _gone(int(grandchild_pid.read_text())), "the timed-out step's child survived"
    for name in ("first", "fails", "sleeper"):
        assert (out / "logs" / f"{name}.log").is_file()

    info = {"device": "CPU (test)", "torch": "x", "cuda": False}
    summary = write_summary(out, steps, info, META).read_text()
    assert _steps_table(summary) == {s.name: s.status for s in steps}
    assert "### renamed-cpu-2026-01-01 (step bench)" in summary and "| 1 | 2.5 |" in summary
    assert "**sleeper**: timeout" in summary and "abc1234" in summary and "CPU (test)" in summary
    assert json.loads((out / "summary.json").read_text())["steps"][0]["status"] == "timeout"


def test_budget_spent_skips_the_rest(tmp_path):
    steps = [Step("slow", "uses it all", 5.5, _py("import time; time.sleep(60)"), results=False),
             Step("late", "no time left", 0.5, _py("pass"), results=False)]
    run_suite(steps, budget_s=6.0, out=tmp_path, env=dict(os.environ))
    assert [s.status for s in steps] == ["timeout", "skipped"]
    assert steps[1].note.startswith("budget spent")


def test_rows_on_disk_survive_sigkill(tmp_path):
    """A bench killed after two rows leaves valid JSON and markdown holding those two rows."""
    code = ("import os, signal, sys; from bench.common import Results; "
            f"r = Results('fake', ['x', 'y'], 'n', out_dir={str(tmp_path)!r}); "
            "r.add({'x': 1, 'y': 0.5}); r.add({'x': 2, 'y': 1.5}); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (path,) = tmp_path.glob("fake-cpu-*.json")
    data = json.loads(path.read_text())
    assert data["rows"] == [{"x": 1, "y": 0.5}, {"x": 2, "y": 1.5}] and data["complete"] is False
    assert data["env"]["command"] and data["notes"] == "n"
    md = path.with_suffix(".md").read_text()
    assert "| 2 | 1.5 |" in md and "PARTIAL: 2 rows" in md
    assert not list(tmp_path.glob(".*.tmp"))


def test_step_cut_at_its_cap_keeps_its_rows(tmp_path):
    """Through the runner: a bench stopped at its cap reports timeout, and its rows reach the
    folder and the summary, marked partial."""
    code = ("import sys, time; from bench.common import Results; "
            "r = Results('fake', ['x'], out_dir=sys.argv[sys.argv.index('--out') + 1]); "
            "r.add({'x': 1}); r.add({'x': 2}); print('two rows', flush=True); time.sleep(120)")
    steps = [Step("cut", "two rows, then stuck", 20, _py(code))]
    run_suite(steps, budget_s=20.0, out=tmp_path, env=dict(os.environ))
    (step,) = steps
    assert step.status == "timeout" and "partial" in step.note, step.note
    (fname,) = [f for f in step.files if f.endswith(".json")]
    assert [r["x"] for r in json.loads((tmp_path / fname).read_text())["rows"]] == [1, 2]
    summary = write_summary(tmp_path, steps, {"device": "CPU (test)", "cuda": False}, META).read_text()
    assert "PARTIAL: 2 rows" in summary and "| 2 |" in summary


def test_pytest_deadline_writes_junit(tmp_path):
    """pytest gets SIGINT before its step's cap and still writes its junit XML: the summary counts
    the tests that finished, where a killed pytest would have left only "killed"."""
    (tmp_path / "test_some.py").write_text(
        "import time\n\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n\ndef test_c():\n    assert False\n\n"
        "def test_stuck():\n    time.sleep(120)\n")
    junit = tmp_path / "logs" / "t.xml"
    argv = ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", str(tmp_path / "test_some.py")]
    steps = [Step("tests", "pytest", 14, argv, results=False, junit=str(junit), interrupt_s=6)]
    run_suite(steps, budget_s=14.0, out=tmp_path, env=dict(os.environ))
    (step,) = steps
    assert junit.is_file() and step.status == "timeout"
    assert step.note.startswith("2 passed, 1 failed, 0 errors, 0 skipped; failed: test_some::test_c"), step.note
    assert "SIGINT" in step.note and step.seconds < 14.0 + 2.5


def test_killed_pytest_counts_from_its_log(tmp_path):
    """No junit XML (pytest killed anyway): the note says what its log shows so far."""
    fake = "print('bringing up nodes...'); print('..F.s', flush=True); import time; time.sleep(120)"
    steps = [Step("tests", "pytest", 6, _py(fake), results=False, junit=str(tmp_path / "none.xml"))]
    run_suite(steps, budget_s=6.0, out=tmp_path, env=dict(os.environ))
    assert steps[0].status == "timeout"
    assert steps[0].note.startswith("no junit XML; its log shows 3 passed, 1 failed, 1 skipped so far")
    assert pytest_log_counts("..F [ 50%]\n.E\n") == {"passed": 3, "failed": 1, "errors": 1}
    assert pytest_log_counts("....\nFAILED x\n1 failed, 4 passed, 2 deselected in 3.10s\n") == {
        "failed": 1, "passed": 4, "deselected": 2}


def test_suite_stopped_by_sigterm_writes_its_summary(tmp_path):
    """SIGTERM to the suite: the running step's process group goes, summary.md is written (it was
    already, as the step started), and the suite exits 143."""
    pid_file = tmp_path / "pytest.pid"
    test_file = tmp_path / "test_stuck.py"
    test_file.write_text("import os, time\n\ndef test_stuck():\n"
                         f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n    time.sleep(120)\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bench.suite", "--smoke", "--skip", "env", "--only", "tests",
                             "--tests", str(test_file), "--out", str(out), "--budget-s", "100"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.is_file(), "the tests step never started"
        assert _steps_table((out / "summary.md").read_text())["tests"] == "running"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, output[-3000:]
    table = _steps_table((out / "summary.md").read_text())
    assert table["tests"] == "interrupted" and table["bench_dino_loss"] == "skipped"
    assert "stopped by SIGTERM" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["meta"]["stopped"].startswith("stopped by SIGTERM")
    assert _gone(int(pid_file.read_text())), "the running step's pytest survived the suite"


def _list_caps(text: str) -> tuple[dict[str, float], float]:
    caps = {m[1]: float(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+\.\d)\b", text, re.M)}
    return caps, caps.pop("total")


@pytest.mark.parametrize("budget", [None, 300.0])
def test_list_caps_add_up_to_the_budget(capsys, budget):
    assert main(["--list"] + ([] if budget is None else ["--budget-s", str(budget)])) == 0
    caps, total = _list_caps(capsys.readouterr().out)
    budget = budget or GPU_BUDGET_S
    assert GPU_BUDGET_S == 420 and caps["env"] == 45.0 and len(caps) == 11
    assert total == pytest.approx(budget) and sum(caps.values()) == pytest.approx(budget, abs=0.6)


def test_list_as_a_script_from_a_plain_checkout(tmp_path):
    """`dino-fast bench all` runs bench/suite.py as a script: bench.* must come from the checkout
    with no install and no PYTHONPATH, from any folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--list", "--smoke"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    caps, total = _list_caps(run.stdout)
    assert total == pytest.approx(GPU_BUDGET_S) and caps["tests-slow"] == 0.0 and "SKIP: minutes on CPU" in run.stdout


def test_plan_names_and_gpu_flags(tmp_path):
    gpu = plan_steps(False, tmp_path, tmp_path / "j", [4800.0, 989.0], 12, None)
    names = [s.name for s in gpu]
    assert names == ["env", "tests", "bench_dino_loss", "bench_ema", "model", "jpegs", "bench_data", "train",
                     "train-compile", "train-loader", "tests-slow"]
    assert sum(s.budget_s for s in gpu) == pytest.approx(GPU_BUDGET_S)
    argv = {s.name: s.argv for s in gpu}
    assert argv["bench_dino_loss"][-2:] == ["--peak-gbps", "4800"] and argv["bench_ema"][-2:] == ["--peak-gbps", "4800"]
    assert argv["train"][-2:] == ["--peak-tflops", "989"]
    assert "dali-gpu" in argv["bench_data"] and "fast+compile" in argv["train-compile"]
    assert {s.name: s.rename for s in gpu if s.rename} == {"train-compile": {"train": "train-compile"},
                                                           "train-loader": {"train": "train-loader"}}
    # quick tests first, the slow ones (resume, SIGKILL, FSDP spawn) last, each with its junit and deadline
    tests, slow = gpu[1], gpu[-1]
    assert ["-m", "not slow"] == tests.argv[tests.argv.index("-q") + 2:tests.argv.index("-q") + 4]
    assert "slow" == slow.argv[slow.argv.index("-q") + 3] and "tests/test_signals.py" in slow.argv
    assert tests.junit and slow.junit and tests.interrupt_s > 5 and slow.skip is None
    smoke = {s.name: s for s in plan_steps(True, tmp_path, tmp_path / "j", None, 2, None)}
    assert smoke["train-compile"].skip and smoke["tests-slow"].skip
    assert "--peak-gbps" not in smoke["bench_dino_loss"].argv


def test_test_flags_follow_the_installed_plugins(monkeypatch):
    """-n and --timeout only where pytest-xdist / pytest-timeout import; the step says which."""
    from bench import suite

    monkeypatch.setattr(suite.importlib.util, "find_spec", lambda name: object())
    args, how = suite.pytest_options(cpus=16)
    assert args == ["-n", "8", "--timeout", "60"] and "8 workers" in how
    monkeypatch.setattr(suite.importlib.util, "find_spec", lambda name: None)
    args, how = suite.pytest_options(cpus=16)
    assert args == [] and "pytest-xdist not importable" in how and "pytest-timeout not importable" in how


def test_device_peaks_know_h100_and_h200():
    assert device_peaks("NVIDIA H100 80GB HBM3") == (3350.0, 989.0)  # SXM
    assert device_peaks("NVIDIA H100 PCIe") == (2000.0, 756.0)
    assert device_peaks("NVIDIA H100 NVL") == (3900.0, 835.0)
    assert device_peaks("NVIDIA H200") == (4800.0, 989.0)
    assert device_peaks("NVIDIA H200 NVL") == (4800.0, 835.0)
    assert device_peaks("NVIDIA A100-SXM4-80GB") == (2039.0, 312.0)
    assert device_peaks("NVIDIA GH200 480GB") is None and device_peaks("Some New GPU") is None


def test_peak_note_says_why_there_is_none(monkeypatch):
    if not torch.cuda.is_available():
        assert peak_note(None, "GB/s", False).startswith("none (CPU)")
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "get_device_name", lambda *a: "Some New GPU")
    assert "Some New GPU is not in bench.common.DEVICE_PEAKS, so no % of peak" in peak_note(None, "GB/s", False)
    assert peak_note(3350.0, "GB/s", False) == "3350 GB/s (datasheet, Some New GPU)"


@pytest.mark.parametrize("device,peaks,says", [
    ("NVIDIA H200", [4800.0, 989.0], "measured on an H200 like this one"),
    ("NVIDIA H100 80GB HBM3", [3350.0, 989.0], "not on this NVIDIA H100 80GB HBM3: the one same-card baseline"),
    ("Some New GPU", None, "no datasheet peak known for it"),
])
def test_summary_names_the_same_card_baseline(tmp_path, device, peaks, says):
    info = {"device": device, "cuda": True, "peaks": peaks}
    summary = write_summary(tmp_path, [], info, META).read_text()
    assert says in summary and "official main_dino.py step" in summary


def _run_smoke(tmp_path: Path, budget_s: float, timeout_s: float) -> tuple[int, str, Path]:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DINO_FAST_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "bench.suite", "--smoke", "--budget-s", str(budget_s),
                          "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    assert (out / "summary.md").is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    return run.returncode, (out / "summary.md").read_text(), out


def test_smoke_suite_short_budget_lists_every_step(tmp_path):
    """The real suite on CPU with a short budget: whatever finishes, every step gets a status."""
    rc, summary, out = _run_smoke(tmp_path, budget_s=25, timeout_s=120)
    table = _steps_table(summary)
    expected = [s.name for s in plan_steps(True, out, out, None, 2, None)]
    assert list(table) == expected
    assert all(status in STATUSES for status in table.values()), table
    assert table["env"] == "ok" and table["train-compile"] == "skipped" and table["tests-slow"] == "skipped"
    assert (out / "env.json").is_file() and (out / "summary.json").is_file()
    assert re.search(r"- versions: torch \S+", summary) and "- command: `python3 -m bench.suite --smoke" in summary
    assert rc == (0 if all(v == "ok" for k, v in table.items() if k not in ("train-compile", "tests-slow")) else 1)


@pytest.mark.skipif(os.environ.get("DINO_FAST_SLOW_TESTS") != "1", reason="minutes on 2 cores: DINO_FAST_SLOW_TESTS=1")
def test_smoke_suite_every_step_succeeds(tmp_path):
    rc, summary, out = _run_smoke(tmp_path, budget_s=900, timeout_s=1200)
    table = _steps_table(summary)
    assert rc == 0, summary
    assert {k for k, v in table.items() if v != "ok"} == {"train-compile", "tests-slow"}, table
    for stem in ("bench_dino_loss", "bench_ema", "model", "model_attention", "bench_data", "train", "train-loader"):
        assert list(out.glob(f"{stem}-cpu-*.json")), f"no {stem} result"
        assert f"### {stem}-cpu-" in summary
