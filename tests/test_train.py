"""The trainer end to end on CPU: a short run, exact resume, and every failure's message."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from dino_fast.checkpoint import latest_checkpoint
from dino_fast.cli import main
from dino_fast.config import TrainConfig
from dino_fast.data.demo import make_demo_dataset
from dino_fast.train import NonFiniteLossError, Trainer


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=4, n_val_per_class=2, size=32)


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(arch="vit_tiny", depth=2, patch_size=8, drop_path_rate=0.1, out_dim=256, head_hidden_dim=64,
                head_bottleneck_dim=32, global_crops_size=32, local_crops_size=16, local_crops_number=2,
                batch_size_per_gpu=8, epochs=2, warmup_epochs=1, warmup_teacher_temp_epochs=1, num_workers=0,
                log_every=1, checkpoint_every=2, progress=False, loss_impl="torch", ema_impl="foreach",
                precision="fp32", attn_backend="sdpa", data_path=str(data / "train"), output_dir=str(out), lr=1e-3)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    out.update({f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()})
    out["center"] = trainer.loss_fn.center
    return out


def test_two_steps_train(demo_root, tmp_path):
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=2))
    before = {k: v.clone() for k, v in _params(trainer).items()}
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["loss"] == summary["loss"]  # finite, not NaN
    after = _params(trainer)
    assert not torch.equal(before["student.backbone.cls_token"], after["student.backbone.cls_token"])
    assert not torch.equal(before["teacher.backbone.cls_token"], after["teacher.backbone.cls_token"])
    assert not torch.equal(before["center"], after["center"])
    # freeze_last_layer=1: the head's last layer does not move during epoch 0
    assert torch.equal(before["student.head.last_layer.weight_v"], after["student.head.last_layer.weight_v"])
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["img_per_s"]) > 0 and float(r["lr"]) >= 0 for r in rows)
    assert summary["checkpoint"].endswith("checkpoint-00000002.pth")
    assert any((tmp_path / "tb").iterdir())


def test_resume_is_bit_identical(demo_root, tmp_path):
    straight = Trainer(tiny_cfg(demo_root, tmp_path / "a", max_steps=7))
    straight.fit()
    first = Trainer(tiny_cfg(demo_root, tmp_path / "b", max_steps=4))  # stops at step 4 (ckpt at 4)
    first.fit()
    resumed = Trainer(tiny_cfg(demo_root, tmp_path / "b", max_steps=7, resume="auto"))
    resumed.fit()
    assert resumed.step == straight.step == 7  # crosses the epoch boundary (5 batches per epoch)
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in opt_a:
        assert torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"])


def test_nonfinite_loss_stops_and_saves_nothing(demo_root, tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=6, log_every=10, checkpoint_every=2))
    real = trainer.loss_fn.forward
    calls = {"n": 0}

    def poisoned(s, t, epoch):
        calls["n"] += 1
        loss = real(s, t, epoch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer.loss_fn, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf \(between step 1 and step 4\).*checkpoint-00000002.pth"):
        trainer.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-00000002.pth"]  # step 4's save refused; nothing corrupt written
    state = torch.load(tmp_path / "checkpoints" / names[0], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def _cli_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_data_folder(tmp_path, capsys):
    err = _cli_error(["train", "--data_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o"),
                      "--num_workers", "0"], capsys)
    assert "data folder not found" in err and "nope" in err


def test_empty_class_folder(demo_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "train", data)
    (data / "zz_empty").mkdir()
    err = _cli_error(["train", "--data_path", str(data), "--output_dir", str(tmp_path / "o")], capsys)
    assert "zz_empty" in err and "no images" in err


def test_corrupt_image_is_skipped_and_training_goes_on(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "train", data)
    victim = sorted((data / sorted(p.name for p in data.iterdir())[0]).iterdir())[0]
    victim.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    trainer = Trainer(tiny_cfg(demo_root, tmp_path / "o", data_path=str(data), max_steps=5))
    with pytest.warns(UserWarning, match=victim.name):
        summary = trainer.fit()
    assert summary["steps"] == 5
    assert trainer.data.dataset.num_corrupt >= 1


def test_time_budget_sizes_the_schedules(demo_root, tmp_path):
    # A budget of ~6 steps' worth: after the calibration steps, epochs and schedules are resized.
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, epochs=50, warmup_epochs=10, time_budget_min=0.2))
    summary = trainer.fit()
    cfg = trainer.cfg
    assert cfg.max_steps == summary["steps"] >= 6 and cfg.epochs < 50
    assert cfg.warmup_epochs == min(cfg.epochs, round(10 * cfg.epochs / 50))
    assert trainer.sched.total_steps == cfg.max_steps and trainer.sched.at(cfg.max_steps - 1)[0] == cfg.min_lr
    saved = torch.load(summary["checkpoint"], weights_only=False)["config"]
    assert saved["max_steps"] == cfg.max_steps and saved["epochs"] == cfg.epochs


def test_time_budget_counts_steady_steps_and_time_spent(demo_root, tmp_path):
    """Sizing arithmetic: 7 timed steps in 14 s = 2 s/step; 30 s of a 60 s budget spent by step 10,
    so 15 more steps fit: 25 in all (5 batches per epoch: 5 epochs), warm-ups scaled with them."""
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, epochs=50, warmup_epochs=10, time_budget_min=1.0))
    trainer.step = 10
    trainer._fit_to_budget(elapsed_s=30.0, timed_s=14.0, timed_steps=7)
    assert trainer.cfg.max_steps == 25 and trainer.cfg.epochs == 5 and trainer.cfg.warmup_epochs == 1
    assert trainer.sched.total_steps == 25
    trainer._fit_to_budget(elapsed_s=90.0, timed_s=14.0, timed_steps=7)  # already over: one more step
    assert trainer.cfg.max_steps == 11


def test_demo_command_end_to_end(tmp_path, capsys):
    """The README's main job, shortened: demo data, k-NN of the random teacher, training, k-NN again."""
    rc = main(["demo", "--data_root", str(tmp_path / "demo"), "--output_dir", str(tmp_path / "out"),
               "--depth", "1", "--max_steps", "2", "--num_workers", "0", "--progress", "false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| random init |" in out and "| DINO-trained teacher |" in out and "2 steps" in out
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-00000002.pth").is_file()


def test_knn_tracked_in_csv(demo_root, tmp_path):
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=3, log_every=10, knn_every_min=1.0,
                               val_path=str(demo_root / "val"), eval_size=32, knn_k=5))
    trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    knn = [(int(r["step"]), float(r["knn_top1"])) for r in rows if r["knn_top1"]]
    assert [s for s, _ in knn] == [0, 3]  # random-init baseline, then the end of training
    assert all(0 <= top1 <= 100 for _, top1 in knn)


TINY_IMAGENET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny-imagenet-10"


@pytest.mark.skipif(not (TINY_IMAGENET / "train").is_dir(), reason="../shared/data/tiny-imagenet-10 is absent")
def test_tiny_imagenet_recipe_runs_on_the_real_photos(tmp_path):
    """The documented small-data command, cut to 2 steps: the preset loads, the real JPEGs (some
    grayscale) decode, and the CSV gets the random-init and final k-NN on the val split."""
    out = tmp_path / "tin"
    assert main(["train", "--config", "tiny_imagenet", "--data_path", str(TINY_IMAGENET / "train"),
                 "--val_path", str(TINY_IMAGENET / "val"), "--max_steps", "2", "--knn_every_min", "1",
                 "--batch_size_per_gpu", "16", "--num_workers", "0", "--progress", "false",
                 "--output_dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    knn = [(int(r["step"]), float(r["knn_top1"])) for r in rows if r["knn_top1"]]
    assert [s for s, _ in knn] == [0, 2]
    assert all(5.0 < top1 < 100.0 for _, top1 in knn)  # 10 classes: near chance or above, never 0


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(demo_root, tmp_path):
    """A real crash: `dino-fast train` in a subprocess gets SIGKILL once its first checkpoint is
    on disk; `--resume auto` continues from the newest complete one and ends exactly where an
    uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    long_run = tiny_cfg(demo_root, tmp_path / "killed", epochs=400, checkpoint_every=2, log_every=1)
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(long_run.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log_file = tmp_path / "killed.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dino_fast", "train", "--config", str(cfg_file)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    first = tmp_path / "killed" / "checkpoints" / "checkpoint-00000002.pth"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"training exited early: {log_file.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and first.exists()

    newest = latest_checkpoint(tmp_path / "killed")
    resumed_from = torch.load(newest, weights_only=False)["step"]
    resumed = Trainer(long_run.replace(max_steps=8, resume="auto"))
    resumed.fit()
    straight = Trainer(long_run.replace(output_dir=str(tmp_path / "straight"), max_steps=8))
    straight.fit()
    assert 2 <= resumed_from < 8 and resumed.step == straight.step == 8
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after SIGKILL + resume"
