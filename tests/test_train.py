"""The trainer end to end on CPU: a short run, exact resume, and every failure's message."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from dino_fast.checkpoint import consolidate, latest_checkpoint
from dino_fast.checkpoint_read import read_checkpoint_values
from dino_fast.cli import main
from dino_fast.config import TrainConfig
from dino_fast.train import NonFiniteLossError, Trainer
from tests.helpers import requires_cuda, start_train, wait_for


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(arch="vit_tiny", depth=2, patch_size=8, drop_path_rate=0.1, out_dim=256, head_hidden_dim=64,
                head_bottleneck_dim=32, global_crops_size=32, local_crops_size=16, local_crops_number=2,
                batch_size_per_gpu=8, epochs=2, warmup_epochs=1, warmup_teacher_temp_epochs=1, num_workers=0,
                log_every=1, checkpoint_every=2, progress=False, loss_impl="torch", ema_impl="foreach",
                precision="fp32", attn_backend="sdpa", data_path=str(data / "train"), output_dir=str(out), lr=1e-3,
                data_backend="torchvision")
    base.update(kw)
    return TrainConfig.from_dict(base)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    out.update({f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()})
    out["center"] = trainer.objective.dino_loss.center
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
    assert summary["checkpoint"].endswith("step-00000002")
    assert any((tmp_path / "tb").iterdir())


# CUDA kernels are not deterministic unless asked: resume is bit-identical there with --deterministic
EXACT = {"deterministic": torch.cuda.is_available()}


@pytest.mark.slow
def test_resume_is_bit_identical(demo_root, tmp_path):
    straight = Trainer(tiny_cfg(demo_root, tmp_path / "a", max_steps=7, **EXACT))
    straight.fit()
    first = Trainer(tiny_cfg(demo_root, tmp_path / "b", max_steps=4, **EXACT))  # stops at step 4 (ckpt at 4)
    first.fit()
    resumed = Trainer(tiny_cfg(demo_root, tmp_path / "b", max_steps=7, resume="auto", **EXACT))
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
    real = trainer.objective.dino_loss.forward
    calls = {"n": 0}

    def poisoned(s, t, epoch, **kw):
        calls["n"] += 1
        loss = real(s, t, epoch, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer.objective.dino_loss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf \(between step 1 and step 4\).*step-00000002"):
        trainer.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002"]  # step 4's save refused; nothing corrupt written
    state = consolidate(tmp_path / "checkpoints" / names[0])
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


class FakeClock:
    """Training time that passes only when a test says so: each optimizer step takes ``step_s``."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 1000.0, step_s

    def __call__(self) -> float:
        return self.now

    def drive(self, trainer: Trainer) -> Trainer:
        real = trainer.train_step

        def timed_step(*micro):
            self.now += self.step_s
            return real(*micro)

        trainer.train_step = timed_step
        return trainer


def test_time_budget_sizes_the_schedules(demo_root, tmp_path):
    """A 1-minute budget at 2 s per step, on any machine: 3 warm-up steps, timing until step 10
    (the window is 5 % of the budget = 3 s, fewer steps than the minimum), 20 s spent by then,
    so 20 more steps fit: 30 in all; the schedules go on from step 10's values and end at their
    final ones at step 29; the later checks find the speed unchanged."""
    clock = FakeClock(2.0)
    trainer = clock.drive(Trainer(tiny_cfg(demo_root, tmp_path, epochs=50, warmup_epochs=10, time_budget_min=1.0,
                                           checkpoint_every=100), clock=clock))
    summary = trainer.fit()
    plan = trainer.plan
    assert summary["steps"] == plan.stop_step == 30 and plan.budget_sized and plan.anchors == ((10, 10.0),)
    assert summary["train_minutes"] == pytest.approx(1.0)
    from dino_fast.schedules import cosine_scheduler

    lr = cosine_scheduler(plan.base_lr, plan.min_lr, 50, 5, warmup_epochs=10)
    assert [plan.at(i).lr for i in range(10)] == pytest.approx(list(lr[:10]), rel=1e-12)
    assert plan.at(29).lr == pytest.approx(lr[-1], rel=1e-12)
    saved = json.loads(read_checkpoint_values(summary["checkpoint"], {"train.plan": ""})["train.plan"])
    assert saved["stop_step"] == 30 and saved["anchors"] == [[10, 10.0]] and saved["budget_sized"]


def test_time_budget_end_to_end_on_the_real_clock(demo_root, tmp_path):
    """The wall clock, a 3-second budget: whatever the machine's speed, the run is sized (after at
    least 10 steps), stops where its plan says and saves that plan."""
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, epochs=50, time_budget_min=0.05, checkpoint_every=1000))
    summary = trainer.fit()
    plan = trainer.plan
    assert plan.budget_sized and summary["steps"] == plan.stop_step >= 11
    saved = json.loads(read_checkpoint_values(summary["checkpoint"], {"train.plan": ""})["train.plan"])
    assert saved == plan.to_dict()


def test_time_budget_with_resume_auto_on_a_fresh_folder(demo_root, tmp_path):
    """--time_budget_min with --resume auto and nothing to resume sizes the run (it did not)."""
    clock = FakeClock(2.0)
    trainer = clock.drive(Trainer(tiny_cfg(demo_root, tmp_path, epochs=50, time_budget_min=1.0, resume="auto",
                                           checkpoint_every=100), clock=clock))
    assert trainer.fit()["steps"] == 30 and trainer.plan.budget_sized


def test_resumed_budget_run_keeps_its_size(demo_root, tmp_path):
    clock = FakeClock(2.0)
    first = clock.drive(Trainer(tiny_cfg(demo_root, tmp_path, epochs=50, time_budget_min=1.0, max_steps=0,
                                         checkpoint_every=12), clock=clock))
    first.fit()
    (tmp_path / "checkpoints" / "step-00000030").rename(tmp_path / "checkpoints" / "gone")  # as if killed at 29
    resumed = clock.drive(Trainer(tiny_cfg(demo_root, tmp_path, epochs=50, time_budget_min=1.0, resume="auto"),
                                  clock=clock))  # the same speed: the budget, still checking, finds nothing to change
    assert resumed.fit()["steps"] == 30 and resumed.plan == first.plan


def test_demo_command_end_to_end(tmp_path, capsys):
    """The README's main job, shortened: demo data, k-NN of the random teacher, training, k-NN again."""
    rc = main(["demo", "--data_root", str(tmp_path / "demo"), "--output_dir", str(tmp_path / "out"),
               "--depth", "1", "--max_steps", "2", "--num_workers", "0", "--progress", "false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| random init |" in out and "| DINO-trained teacher |" in out and "2 steps" in out
    assert (tmp_path / "out" / "checkpoints" / "step-00000002" / ".metadata").is_file()


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


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(demo_root, tmp_path):
    """A real crash: `dino-fast train` in a subprocess gets SIGKILL once its first checkpoint is
    on disk; `--resume auto` continues from the newest complete one and ends exactly where an
    uninterrupted run ends."""
    import signal

    long_run = tiny_cfg(demo_root, tmp_path / "killed", epochs=400, checkpoint_every=2, log_every=1, **EXACT)
    log_file = tmp_path / "killed.log"
    proc = start_train(long_run, log_file)
    wait_for(tmp_path / "killed" / "checkpoints" / "step-00000002", proc, log_file)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    newest = latest_checkpoint(tmp_path / "killed")
    resumed_from = read_checkpoint_values(newest, {"train.step": 0})["train.step"]
    resumed = Trainer(long_run.replace(max_steps=8, resume="auto"))
    resumed.fit()
    straight = Trainer(long_run.replace(output_dir=str(tmp_path / "straight"), max_steps=8))
    straight.fit()
    assert 2 <= resumed_from < 8 and resumed.step == straight.step == 8
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after SIGKILL + resume"


# ----------------------------------------------------------------------------- the official recipe
def test_accumulation_equals_one_big_batch(demo_root, tmp_path):
    """2 micro-batches of 4 per optimizer step = 1 batch of 8 (same images, same augmentations;
    center, EMA and schedules once per optimizer step); drop path off (its draws differ). SGD: its
    step is linear in the gradient, so the two summation orders stay within float rounding; AdamW
    divides by sqrt(v) and turns the rounding of near-zero gradients into differences of up to lr."""
    big = Trainer(tiny_cfg(demo_root, tmp_path / "big", batch_size_per_gpu=8, drop_path_rate=0.0, max_steps=3,
                           optimizer="sgd"))
    big.fit()
    acc = Trainer(tiny_cfg(demo_root, tmp_path / "acc", batch_size_per_gpu=4, accum_steps=2, drop_path_rate=0.0,
                           max_steps=3, optimizer="sgd"))
    assert acc.plan.niter_per_epoch == big.plan.niter_per_epoch and acc.plan.base_lr == big.plan.base_lr
    acc.fit()
    a, b = _params(big), _params(acc)
    from tests.helpers import assert_close

    for k in a:
        assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, name=k)
    assert not torch.equal(a["center"], torch.zeros_like(a["center"]))


def test_fp16_with_grad_scaler_on_cpu(demo_root, tmp_path):
    """The official mixed precision: fp16 autocast + GradScaler (scale, unscale before the clip,
    step, update); its state is saved and resumed with the rest."""
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, use_fp16=True, precision="auto", max_steps=2))
    assert trainer.compute_dtype == torch.float16 and trainer.scaler is not None
    summary = trainer.fit()
    assert summary["loss"] == summary["loss"]
    resumed = Trainer(tiny_cfg(demo_root, tmp_path, use_fp16=True, precision="auto", max_steps=3, resume="auto"))
    resumed.fit()
    assert resumed.step == 3 and resumed.scaler.get_scale() > 0


def test_official_log_snapshots_and_checkpoint(demo_root, tmp_path):
    """log.txt as main_dino.py writes it, numbered snapshots every saveckp_freq epochs kept besides
    the rolling two, and checkpoint.pth in the official layout read by an official-style loader."""
    cfg = tiny_cfg(demo_root, tmp_path, epochs=3, saveckp_freq=2, checkpoint_every=100, save_official_checkpoint=True)
    trainer = Trainer(cfg)
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    assert set(lines[0]) == {"train_loss", "train_lr", "train_wd", "epoch"}
    assert lines[1]["train_lr"] == pytest.approx(sum(trainer.plan.at(s).lr for s in range(5, 10)) / 5)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["snapshot-epoch0000", "snapshot-epoch0002", "step-00000010", "step-00000015"]
    assert (tmp_path / "checkpoint.pth").is_file() and (tmp_path / "checkpoint0002.pth").is_file()
    official = torch.load(tmp_path / "checkpoint.pth", map_location="cpu")  # as official eval_knn.py reads it
    assert official["epoch"] == 3 and set(official) >= {"student", "teacher", "optimizer", "args", "dino_loss"}
    teacher = {k.replace("module.", "").replace("backbone.", ""): v for k, v in official["teacher"].items()}
    backbone = trainer.teacher.backbone.state_dict()
    from dino_fast.models import interpolate_pos_encoding

    side = 224 // cfg.patch_size  # the official 224-px grid, whatever the crop size trained (issue 30 row 1)
    backbone_224 = {**backbone, "pos_embed": interpolate_pos_encoding(backbone["pos_embed"], side, side)}
    assert all(torch.equal(teacher[k], v) for k, v in backbone_224.items())
    from dino_fast.pretrained import load_pretrained

    model = load_pretrained(tmp_path / "checkpoint.pth")
    assert torch.equal(model.cls_token, backbone["cls_token"])


def test_dali_views_follow_the_compute_dtype(demo_root, monkeypatch):
    """--precision fp32 on CUDA with DALI fed bf16 views to fp32 weights: the loader's dtype was
    decided apart from the compute dtype. Now the one compute dtype goes to the loader."""
    import dino_fast.data.dali as dali
    from dino_fast.data.build import build_train_data
    from dino_fast.precision import resolve_compute_dtype

    seen = {}

    class Fake:
        def __init__(self, *a, **kw):
            seen.update(kw)

        def __len__(self):
            return 5

    monkeypatch.setattr(dali, "DALIMultiCropLoader", Fake)
    cuda = torch.device("cuda", 0)
    for precision, expected in (("fp32", torch.float32), ("auto", torch.bfloat16), ("fp16", torch.float16)):
        cfg = tiny_cfg(demo_root, Path("unused"), data_backend="dali", precision=precision)
        build_train_data(cfg, cuda, compute_dtype=resolve_compute_dtype(cfg.precision, cuda))
        assert seen["dtype"] == expected, precision


def test_start_up_log_says_what_runs(demo_root, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="dino_fast"):
        Trainer(tiny_cfg(demo_root, tmp_path, max_steps=1)).fit()
    text = caplog.text
    assert "attention: sdpa (requested)" in text and "loss: torch reference (requested)" in text
    assert "ema: foreach" in text and "loader: torchvision" in text


def test_deterministic_flag(demo_root, tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(tiny_cfg(demo_root, tmp_path, deterministic=True, max_steps=1))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        trainer.fit()
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("changes", [{"loss_impl": "fused_head"}, {"centering": "sinkhorn_knopp"},
                                     {"loss_impl": "fused_head", "centering": "sinkhorn_knopp"}],
                         ids=["fused_head", "sinkhorn_knopp", "both"])
def test_loss_options_train_like_the_reference(demo_root, tmp_path, changes, monkeypatch):
    """fused_head (last layer inside the loss) and Sinkhorn-Knopp centering through the trainer: the
    Triton paths (interpreter) give the parameters of the reference path after 2 steps."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref = Trainer(tiny_cfg(demo_root, tmp_path / "ref", max_steps=2, drop_path_rate=0.0,
                           **{k: v for k, v in changes.items() if k != "loss_impl"}))
    ref.fit()
    impl = "fused_head" if changes.get("loss_impl") == "fused_head" else "triton"
    fused = Trainer(tiny_cfg(demo_root, tmp_path / "fused", max_steps=2, drop_path_rate=0.0,
                             **{**changes, "loss_impl": impl}))
    if impl == "fused_head":
        fused.objective.dino_loss.impl = "triton"  # auto picks the kernel on CUDA only; the interpreter runs it here
    fused.fit()
    from tests.helpers import assert_close

    a, b = _params(ref), _params(fused)
    for k in a:
        assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, name=k)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{"koleo_weight": 0.1}, {"ibot_weight": 1.0},
                                     {"ibot_weight": 1.0, "ibot_separate_head": True, "ibot_out_dim": 128,
                                      "koleo_weight": 0.1, "centering": "sinkhorn_knopp"}],
                         ids=["koleo", "ibot-shared", "ibot-separate+koleo+sk"])
def test_dinov2_options_train_and_resume_exactly(demo_root, tmp_path, changes):
    """KoLeo and iBOT (masks drawn from (seed, step, rank, micro-batch)) through the trainer; the
    iBOT center and patch head are saved and resumed, so a resumed run is the uninterrupted one."""
    cfg = tiny_cfg(demo_root, tmp_path / "a", max_steps=4, **changes)
    straight = Trainer(cfg)
    assert "KoLeo" in straight.objective.describe(straight.device) or "iBOT" in straight.objective.describe(
        straight.device)
    straight.fit()
    Trainer(cfg.replace(output_dir=str(tmp_path / "b"), max_steps=2)).fit()
    resumed = Trainer(cfg.replace(output_dir=str(tmp_path / "b"), resume="auto"))
    resumed.fit()
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    if "ibot_weight" in changes:
        assert torch.equal(straight.objective.ibot.center, resumed.objective.ibot.center)
        assert not torch.equal(straight.student.backbone.mask_token, torch.zeros_like(straight.student.backbone.mask_token))


@requires_cuda
def test_fast_step_has_no_host_sync(demo_root, tmp_path):
    """The fast path's step (bf16, fused loss and EMA, packed crops, fused AdamW) never waits for
    the GPU: torch raises on any synchronizing call inside it."""
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, precision="bf16", loss_impl="triton", ema_impl="triton",
                               attn_backend="auto", packed_multicrop=True, clip_grad=3.0, max_steps=3))
    views = next(iter(trainer.data.epoch(0)))
    trainer.train_step(views)  # first step: allocations, autotuning, lazy inits may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(views)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_resume_on_other_data_or_batch_says_what_differs(demo_root, tmp_path, caplog):
    """Issue 29 row 5: --resume auto with another data folder (fewer classes and images) or another
    batch stopped nowhere before (loss nan, plan silently re-sized); now it names what differs and
    stops, unless allow_data_change, which re-plans and says how."""
    import shutil

    from dino_fast.errors import DataError

    Trainer(tiny_cfg(demo_root, tmp_path / "o", max_steps=2)).fit()
    other = tmp_path / "other"
    classes = sorted(p.name for p in (demo_root / "train").iterdir())
    for c in classes[:5]:
        shutil.copytree(demo_root / "train" / c, other / c)
    with pytest.raises(DataError, match=r"classes 10 -> 5 \(missing .*\); images 40 -> 20.*allow_data_change"):
        Trainer(tiny_cfg(demo_root, tmp_path / "o", max_steps=4, resume="auto", data_path=str(other))).fit()
    with pytest.raises(DataError, match=r"global batch 8 -> 4 \(--batch_size_per_gpu 8 -> 4\); steps per epoch 5 -> 10"):
        Trainer(tiny_cfg(demo_root, tmp_path / "o", max_steps=4, resume="auto", batch_size_per_gpu=4)).fit()
    moved = Trainer(tiny_cfg(demo_root, tmp_path / "o", max_steps=3, resume="auto", data_path=str(other),
                             allow_data_change=True))
    with caplog.at_level("WARNING", logger="dino_fast"):
        summary = moved.fit()
    assert summary["steps"] == 3 and moved.plan.niter_per_epoch == 2
    assert any("re-planned, 2 steps per epoch" in r.getMessage() for r in caplog.records)


def test_resumed_finished_run_says_so_with_its_last_loss(demo_root, tmp_path, caplog):
    """Issue 29 row 10: resuming a finished run printed loss: nan."""
    done = Trainer(tiny_cfg(demo_root, tmp_path, epochs=1)).fit()
    again = Trainer(tiny_cfg(demo_root, tmp_path, epochs=1, resume="auto"))
    with caplog.at_level("INFO", logger="dino_fast"):
        summary = again.fit()
    assert summary["steps"] == done["steps"] == 5 and summary["loss"] == done["loss"]
    assert any("is finished (step 5 of 5)" in r.getMessage() for r in caplog.records)


def test_config_yaml_beside_the_run_and_wandb_scalars(demo_root, tmp_path, monkeypatch):
    """Issue 30 rows 8 and 9: the resolved config is written beside the run and reads back equal;
    with --wandb_project the same scalars as TensorBoard go to W&B (a fake ``wandb`` module here:
    no network), and without the package the run goes on with one warning."""
    import sys
    import types

    from dino_fast.config import load_config

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"].append(True)

    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_cfg(demo_root, tmp_path / "o", max_steps=2, wandb_project="dino-tests")
    Trainer(cfg).fit()
    assert load_config(tmp_path / "o" / "config.yaml") == cfg
    (init,) = calls["init"]
    assert init["project"] == "dino-tests" and init["id"] == "abc123" and init["config"]["lr"] == cfg.lr
    assert [step for step, _ in calls["log"]] == [1, 2] and calls["finish"] == [True]
    rows = list(csv.DictReader(open(tmp_path / "o" / "metrics.csv")))
    assert calls["log"][1][1]["train/loss"] == pytest.approx(float(rows[1]["loss"]))
    assert {"train/lr", "train/img_per_s", "train/teacher_temp"} <= set(calls["log"][0][1])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: ImportError
    Trainer(tiny_cfg(demo_root, tmp_path / "p", max_steps=1, wandb_project="dino-tests")).fit()
