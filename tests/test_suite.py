"""bench/suite.py: caps, statuses, process-group kills, renamed result files, summary.md; and the
whole suite in its CPU smoke mode with a short budget.

The smoke run with a budget large enough for every step to finish (minutes on 2 cores) runs only
with DINO_FAST_SLOW_TESTS=1."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.suite import Step, plan_steps, run_suite, write_summary

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("ok", "failed", "timeout", "skipped")


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
                     "(d / 'fake-cpu-2026-01-01.md').write_text('t')")
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
    assert by_name["sleeper"].cap_s == pytest.approx(6.0, abs=0.5) and by_name["sleeper"].seconds < 20
    assert "needs step 'fails'" in by_name["dependent"].note
    assert sorted(by_name["bench"].files) == ["renamed-cpu-2026-01-01.json", "renamed-cpu-2026-01-01.md"]
    assert (out / "renamed-cpu-2026-01-01.json").is_file() and not list(out.glob(".bench-*"))
    pid = int(grandchild_pid.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the timed-out step's child survived"
    for name in ("first", "fails", "sleeper"):
        assert (out / "logs" / f"{name}.log").is_file()

    info = {"device": "CPU (test)", "torch": "x", "cuda": False}
    meta = {"date": "2026-01-01T00:00:00Z", "mode": "smoke", "budget_s": 7.0, "elapsed_s": 7.0,
            "git_sha": "abc1234", "command": "python3 -m bench.suite"}
    summary = write_summary(out, steps, info, meta).read_text()
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


def test_plan_names_and_gpu_flags(tmp_path):
    gpu = plan_steps(False, tmp_path, tmp_path / "j", [4800.0, 989.0], 12, None)
    names = [s.name for s in gpu]
    assert names == ["env", "tests", "bench_dino_loss", "bench_ema", "model", "jpegs", "bench_data", "train",
                     "train-compile", "train-loader"]
    assert sum(s.budget_s for s in gpu) == pytest.approx(540)
    argv = {s.name: s.argv for s in gpu}
    assert argv["bench_dino_loss"][-2:] == ["--peak-gbps", "4800"]
    assert argv["train"][-2:] == ["--peak-tflops", "989"]
    assert "dali-gpu" in argv["bench_data"] and "fast+compile" in argv["train-compile"]
    assert {s.name: s.rename for s in gpu if s.rename} == {"train-compile": {"train": "train-compile"},
                                                           "train-loader": {"train": "train-loader"}}
    smoke = {s.name: s for s in plan_steps(True, tmp_path, tmp_path / "j", None, 2, None)}
    assert smoke["train-compile"].skip and "--peak-gbps" not in smoke["bench_dino_loss"].argv


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
    rc, summary, out = _run_smoke(tmp_path, budget_s=110, timeout_s=300)
    table = _steps_table(summary)
    expected = [s.name for s in plan_steps(True, out, out, None, 2, None)]
    assert list(table) == expected
    assert all(status in STATUSES for status in table.values()), table
    assert table["env"] == "ok" and table["train-compile"] == "skipped"
    assert (out / "env.json").is_file() and (out / "summary.json").is_file()
    assert re.search(r"- versions: torch \S+", summary) and "- command: `python3 -m bench.suite --smoke" in summary
    assert rc == (0 if all(v == "ok" for k, v in table.items() if k != "train-compile") else 1)


@pytest.mark.skipif(os.environ.get("DINO_FAST_SLOW_TESTS") != "1", reason="minutes on 2 cores: DINO_FAST_SLOW_TESTS=1")
def test_smoke_suite_every_step_succeeds(tmp_path):
    rc, summary, out = _run_smoke(tmp_path, budget_s=900, timeout_s=1200)
    table = _steps_table(summary)
    assert rc == 0, summary
    assert {k for k, v in table.items() if v != "ok"} == {"train-compile"}, table
    for stem in ("bench_dino_loss", "bench_ema", "model", "model_attention", "bench_data", "train", "train-loader"):
        assert list(out.glob(f"{stem}-cpu-*.json")), f"no {stem} result"
        assert f"### {stem}-cpu-" in summary
