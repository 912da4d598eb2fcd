"""One run per output folder (RunLock), output-folder errors, and the clean-up of temp files of
killed saves. The cross-process cases use real processes: a holder that is SIGKILLed must leave
no stale lock behind."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from dino_fast.errors import ConfigError, RunLockError
from dino_fast.runlock import LOCK_NAME, RunLock, check_output_dir, clean_orphans, ensure_output_dir

ROOT = Path(__file__).resolve().parent.parent

# A holder process: takes the lock, says so, then waits to be killed. It imports runlock by
# file path so that the test does not wait for `import dino_fast` (torch) in the child.
_HOLDER = textwrap.dedent("""
    import importlib.util, sys, time, types
    errors = importlib.util.spec_from_file_location("dino_fast.errors", sys.argv[1] + "/dino_fast/errors.py")
    pkg = types.ModuleType("dino_fast"); pkg.__path__ = []; sys.modules["dino_fast"] = pkg
    sys.modules["dino_fast.errors"] = importlib.util.module_from_spec(errors); errors.loader.exec_module(
        sys.modules["dino_fast.errors"])
    spec = importlib.util.spec_from_file_location("dino_fast.runlock", sys.argv[1] + "/dino_fast/runlock.py")
    runlock = importlib.util.module_from_spec(spec); spec.loader.exec_module(runlock)
    try:
        lock = runlock.RunLock(sys.argv[2], command=sys.argv[3]).acquire()
    except Exception as e:
        print(f"{type(e).__name__}: {e}", flush=True)
        sys.exit(2)
    print("locked", flush=True)
    time.sleep(120)
""")


def _run_holder(folder: Path, command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(ROOT), str(folder), command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- one process
def test_second_lock_in_process_names_holder_and_folder(tmp_path):
    out = tmp_path / "run"
    with RunLock(out, command="dino-fast train --config demo") as first:
        assert first.held and out.is_dir()
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
        assert info["command"] == "dino-fast train --config demo" and info["started"]
        with pytest.raises(RunLockError) as e:
            RunLock(out).acquire()
        msg = str(e.value)
        assert f"output_dir {out} is in use by another run" in msg
        assert f"pid {os.getpid()} on host {socket.gethostname()} since {info['started']}" in msg
        assert "dino-fast train --config demo" in msg and "\n" not in msg
        assert first.held, "a refused acquirer must not disturb the holder"
    assert not first.held and (out / LOCK_NAME).read_text() == ""  # released cleanly: nothing recorded
    with RunLock(out) as again:  # free again
        assert again.held and again.previous is None


def test_acquire_twice_and_release_idempotent(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockError, match="already held"):
        lock.acquire()
    lock.release()
    lock.release()
    assert not lock.held


# ----------------------------------------------------------------------------- two processes
def test_lock_held_by_another_process_then_sigkilled(tmp_path, caplog):
    out = tmp_path / "run"
    holder = _run_holder(out, "holder-cmd --epochs 3")
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        # this process is refused, naming the holder
        with pytest.raises(RunLockError) as e:
            RunLock(out).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "holder-cmd --epochs 3" in msg, msg
        assert str(out) in msg
        # so is a third, real process
        third = _run_holder(out, "third")
        third_out, _ = third.communicate(timeout=60)
        assert third.returncode == 2, third_out
        assert third_out.startswith("RunLockError: ") and f"pid {holder.pid}" in third_out, third_out
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stderr.close()
    assert holder.returncode == -signal.SIGKILL
    # the kernel dropped the killed holder's lock: no stale lock, a warning says what happened
    with caplog.at_level(logging.WARNING, logger="dino_fast.runlock"):
        lock = RunLock(out).acquire()
    try:
        assert lock.previous is not None and lock.previous["pid"] == holder.pid
        assert any(f"pid {holder.pid}" in r.message and "without releasing" in r.message for r in caplog.records)
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_released_lock_is_free_for_another_process(tmp_path):
    RunLock(tmp_path).acquire().release()
    with RunLock(tmp_path):
        pass
    child = _run_holder(tmp_path, "after-release")
    try:
        assert child.stdout.readline().strip() == "locked"
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()


# ----------------------------------------------------------------------------- output folder problems
def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    for call in (check_output_dir, ensure_output_dir, lambda p: RunLock(p).acquire()):
        with pytest.raises(ConfigError, match=f"^output_dir {f} is a file, not a folder"):
            call(f)
    assert f.read_text() == "keep me" and _names(tmp_path) == ["out.txt"]


def test_output_dir_under_a_file(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("x")
    nested = f / "a" / "b"
    for call in (check_output_dir, ensure_output_dir, lambda p: RunLock(p).acquire()):
        with pytest.raises(ConfigError) as e:
            call(nested)
        assert str(e.value) == (f"output_dir {nested} lies under {f}, which is a file, not a folder: "
                                f"choose another output_dir")
    assert _names(tmp_path) == ["out.txt"]
    with pytest.raises(ConfigError, match="empty"):
        check_output_dir("")


def test_output_dir_created_with_parents(tmp_path):
    out = tmp_path / "a" / "b"
    assert check_output_dir(out) == out and not (tmp_path / "a").exists()  # check creates nothing
    assert ensure_output_dir(out) == out and out.is_dir()


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores permissions")
def test_output_dir_not_creatable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match=f"cannot create output_dir {ro / 'run'}: Permission denied"):
            RunLock(ro / "run").acquire()
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- orphans
def _fake_leftovers(out: Path) -> tuple[list[str], list[str]]:
    """Temp names as the checkpoint writers make them, next to things that must stay."""
    ck = out / "checkpoints"
    ck.mkdir(parents=True)
    fd, tmp_file = tempfile.mkstemp(prefix="checkpoint-00000020.pth.tmp", dir=ck)  # atomic_torch_save's name
    os.close(fd)
    (ck / "step-00000040.tmp").mkdir()
    (ck / "step-00000040.tmp" / "__0_0.distcp").write_bytes(b"half")
    (ck / "snapshot-epoch0002.tmp").mkdir()
    removed = sorted([Path(tmp_file).name, "step-00000040.tmp", "snapshot-epoch0002.tmp"])
    (ck / "checkpoint-00000010.pth").write_bytes(b"complete")
    (ck / "step-00000030").mkdir()
    (ck / "step-00000030" / ".metadata").write_bytes(b"m")
    (ck / "snapshot-epoch0001").mkdir()
    (ck / "step-00000050.tmp").write_bytes(b"a file, not a save folder")
    (ck / "checkpoint-00000060.pth.tmpdir").mkdir()  # a folder, not a save file
    (ck / "notes.tmp").write_text("user file")
    (ck / "backup.tmp").mkdir()  # a user's folder
    (ck / "checkpoint-x.pth.tmp1").write_text("not a step number")
    (out / "metrics.csv").write_text("step\n")
    kept = sorted(["checkpoint-00000010.pth", "step-00000030", "snapshot-epoch0001", "step-00000050.tmp",
                   "checkpoint-00000060.pth.tmpdir", "notes.tmp", "backup.tmp", "checkpoint-x.pth.tmp1"])
    return removed, kept


def test_clean_orphans_removes_only_temp_names(tmp_path):
    out = tmp_path / "run"
    removed, kept = _fake_leftovers(out)
    with RunLock(out) as lock:
        got = lock.clean_orphans()
        assert [p.name for p in got] == removed and all(p.parent == out / "checkpoints" for p in got)
        assert _names(out / "checkpoints") == kept
        assert (out / "checkpoints" / "step-00000030" / ".metadata").read_bytes() == b"m"
        assert _names(out) == sorted([LOCK_NAME, "checkpoints", "metrics.csv"])
        assert clean_orphans(out) == []  # nothing left to do
    with RunLock(tmp_path / "empty") as lock:  # no checkpoints folder yet
        assert lock.clean_orphans() == []


def test_clean_orphans_needs_the_lock(tmp_path):
    out = tmp_path / "run"
    removed, kept = _fake_leftovers(out)
    with pytest.raises(RunLockError, match=f"clean_orphans\\({out}\\): take the RunLock"):
        clean_orphans(out)
    lock = RunLock(out).acquire()
    lock.release()
    with pytest.raises(RunLockError, match="take the RunLock"):
        clean_orphans(out)  # released: no longer ours
    assert _names(out / "checkpoints") == sorted(removed + kept)
