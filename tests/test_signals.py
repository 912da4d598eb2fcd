"""Ctrl-C and SIGTERM on a real `dino-fast train` process: it finishes the step, saves, says so in
one line, exits 130 / 143, and `--resume auto` then ends bit-identical to an uninterrupted run."""
from __future__ import annotations

import signal

import pytest
import torch

from dino_fast.checkpoint import latest_checkpoint
from dino_fast.checkpoint_read import read_checkpoint_values
from dino_fast.signals import GracefulStop, Interrupted
from dino_fast.train import Trainer
from tests.helpers import start_train, wait_for
from tests.test_train import EXACT, _params, tiny_cfg


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_resumes_exactly(demo_root, tmp_path, sig, code):
    # checkpoint_every far away: the only checkpoint is the one the signal makes
    run = tiny_cfg(demo_root, tmp_path / "run", epochs=400, checkpoint_every=10_000, log_every=1, **EXACT)
    log_file = tmp_path / "run.log"
    proc = start_train(run, log_file)
    wait_for(tmp_path / "run" / "metrics.csv", proc, log_file)  # training has started
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code, log_file.read_text()[-2000:]
    lines = [ln for ln in log_file.read_text().splitlines() if ln.startswith("dino-fast:")]
    assert len(lines) == 2 and f"interrupted by {sig.name} at step" in lines[1], lines
    assert "Traceback" not in log_file.read_text()
    saved = latest_checkpoint(tmp_path / "run")
    step = read_checkpoint_values(saved, {"train.step": 0})["train.step"]
    assert saved.name == f"step-{step:08d}" and f"step {step};" in lines[1]
    target = step + 3
    resumed = Trainer(run.replace(max_steps=target, resume="auto"))
    resumed.fit()
    straight = Trainer(run.replace(output_dir=str(tmp_path / "straight"), max_steps=target))
    straight.fit()
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after {sig.name} + resume"


def test_in_process_stop_raises_interrupted_after_saving(demo_root, tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, epochs=50, checkpoint_every=10_000))
    real = trainer.train_step

    def step_then_signal(*micro):
        loss = real(*micro)
        if trainer.step == 3:
            signal.raise_signal(signal.SIGTERM)  # delivered to this (main) thread's handler
        return loss

    trainer.train_step = step_then_signal
    with pytest.raises(Interrupted) as e:
        trainer.fit()
    assert e.value.exit_code == 143 and e.value.step == 3
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_handlers_restored_and_noop_outside_main_thread():
    import threading

    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGINT) != before and not stop.requested
    assert signal.getsignal(signal.SIGINT) == before
    box = {}

    def in_thread():
        with GracefulStop() as s:
            box["ok"] = not s.requested

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert box["ok"]


@pytest.mark.slow
def test_launch_under_torchrun_sigterm_one_line_and_143(demo_root, tmp_path):
    """`dino-fast launch` (torchrun's own launcher code, 2 gloo ranks, FSDP2): SIGTERM to the
    launcher reaches both ranks, which save; the user gets one interrupt line from rank 0, the
    launcher's one line, status 143, and no traceback (plain torchrun exits 1 with its
    SignalException traceback: tests cannot change that, README "Reliability" says so)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    out, log_file = tmp_path / "o", tmp_path / "launch.log"
    flags = ["--arch", "vit_tiny", "--depth", "1", "--patch_size", "8", "--out_dim", "64", "--head_hidden_dim", "32",
             "--head_bottleneck_dim", "16", "--global_crops_size", "32", "--local_crops_size", "16",
             "--local_crops_number", "2", "--batch_size_per_gpu", "4", "--num_workers", "0", "--progress", "false",
             "--loss_impl", "torch", "--ema_impl", "foreach", "--data_backend", "torchvision", "--fsdp", "true",
             "--epochs", "400", "--log_every", "1", "--checkpoint_every", "10000",
             "--data_path", str(demo_root / "train"), "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dino_fast", "launch", "--nproc_per_node", "2", "train", *flags],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(out / "metrics.csv", proc, log_file, timeout_s=300)
        time.sleep(1.0)  # a step or two in
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=240) == 143, log_file.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_file.read_text()
    assert "Traceback" not in text, text[-3000:]
    interrupted = [ln for ln in text.splitlines() if "interrupted by SIGTERM at step" in ln]
    assert len(interrupted) == 1, text[-3000:]
    assert sum("dino-fast launch: stopped by SIGTERM" in ln for ln in text.splitlines()) == 1
    step = int(interrupted[0].split("at step ")[1].split(";")[0])
    assert latest_checkpoint(out).name == f"step-{step:08d}"
