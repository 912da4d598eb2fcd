"""The DINO trainer: one process per device (``python`` or ``torchrun``), bf16 on CUDA, fp32 on CPU.

Under torchrun (or with ``fsdp: true`` on one process) student and teacher are sharded with
FSDP2 (:mod:`dino_fast.parallel`); the global batch is ``batch_size_per_gpu`` x world size,
metrics are averaged over ranks at log time and written by rank 0, and checkpoints are sharded
DCP directories (:mod:`dino_fast.dist_checkpoint`) instead of single files.

Data flows one way: loader -> views -> teacher (2 globals) and student (all views) ->
DINO loss (center updated inside) -> backward -> clip -> AdamW -> teacher EMA -> log/checkpoint.

No host sync in the step loop: the loss is summed on the device and read, with the
non-finite flag, only every ``log_every`` steps and before each checkpoint; schedules are
host floats indexed by the step.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dino_fast import dist_checkpoint
from dino_fast.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save, checkpoint_path, latest_checkpoint, \
    prune_checkpoints, rng_state, set_rng_state
from dino_fast.config import TrainConfig
from dino_fast.data.build import build_train_data
from dino_fast.errors import NonFiniteLossError
from dino_fast.distributed import get_rank, get_world_size, init_distributed, is_distributed, is_main_process
from dino_fast.ema import TeacherEMA
from dino_fast.loss import DINOLoss
from dino_fast.models import DINOHead, MultiCropWrapper, build_backbone
from dino_fast.optim import build_optimizer, cancel_last_layer_gradients_, clip_gradients_, set_schedule_
from dino_fast.precision import autocast, compute_dtype
from dino_fast.parallel import all_reduce_max, check_config_agrees, init_single_process_group, parallelize
from dino_fast.schedules import Schedules

__all__ = ["Trainer", "NonFiniteLossError", "build_models", "train"]

log = logging.getLogger("dino_fast")

CSV_FIELDS = ["step", "epoch", "loss", "lr", "wd", "momentum", "teacher_temp", "img_per_s", "train_min",
              "knn_top1", "knn_top5"]


def build_models(cfg: TrainConfig, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (same weights at start; the teacher has no drop path and no gradients)."""
    kw = dict(arch=cfg.arch, patch_size=cfg.patch_size, attn_backend=cfg.attn_backend, img_size=cfg.global_crops_size)
    if cfg.depth:
        kw["depth"] = cfg.depth
    heads = dict(in_dim=None, out_dim=cfg.out_dim, norm_last_layer=cfg.norm_last_layer,
                 hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
    student_backbone = build_backbone(drop_path_rate=cfg.drop_path_rate, **kw)
    teacher_backbone = build_backbone(drop_path_rate=0.0, **kw)
    heads["in_dim"] = student_backbone.embed_dim
    student = MultiCropWrapper(student_backbone, DINOHead(**heads), packed=cfg.packed_multicrop).to(device)
    # The teacher's head keeps norm_last_layer=True-style parameters too; it only receives EMA values.
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(**heads), packed=cfg.packed_multicrop).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.eval()
    if cfg.compile:
        for m in (student, teacher):
            for block in m.backbone.blocks:
                block.compile()
    return student, teacher


class Trainer:
    """Owns models, optimizer, loss, schedules and the loop. ``state_dict``/``load_state_dict``
    hold everything a resume needs (Stateful)."""

    def __init__(self, cfg: TrainConfig, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or init_distributed()
        if cfg.fsdp and not is_distributed():
            init_single_process_group(self.device)
        self.rank, self.world = get_rank(), get_world_size()
        self.main = is_main_process()
        check_config_agrees(cfg)
        self.out = Path(cfg.output_dir)
        _seed_everything(cfg.seed)
        self.dtype = compute_dtype(cfg.precision, self.device)
        self.data = build_train_data(cfg, self.device, self.rank, self.world, self.dtype)
        self.niter = self.data.num_batches
        self.student, self.teacher = build_models(cfg, self.device)
        # Same seed on every rank -> same initial weights: sharding needs no broadcast.
        self.sharded = parallelize(self.student, self.teacher, cfg, self.device, self.dtype)
        self.ema = TeacherEMA(self.student, self.teacher, impl=cfg.ema_impl)
        self.optimizer = build_optimizer(self.student, cfg.optimizer)
        self.step = 0
        self._build_schedules()
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self._last_ckpt: Path | None = None
        self._last_log_step = 0

    # ------------------------------------------------------------------ set-up
    def _build_schedules(self) -> None:
        cfg = self.cfg
        total = cfg.epochs * self.niter
        if cfg.time_budget_min > 0 and cfg.max_steps:
            total = cfg.max_steps  # sized to the budget: the cosine ends when the budget does
        batch = cfg.batch_size_per_gpu * self.world
        self.sched = Schedules(cfg.lr * batch / 256.0, cfg.min_lr, cfg.weight_decay, cfg.weight_decay_end,
                               cfg.momentum_teacher, total, min(cfg.warmup_epochs * self.niter, total))
        center = self.loss_fn.center.clone() if hasattr(self, "loss_fn") else None
        self.loss_fn = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                min(cfg.warmup_teacher_temp_epochs, cfg.epochs), cfg.epochs,
                                student_temp=cfg.student_temp, center_momentum=cfg.center_momentum,
                                impl=cfg.loss_impl).to(self.device)
        if center is not None:
            self.loss_fn.center.copy_(center)

    @property
    def total_steps(self) -> int:
        full = self.cfg.epochs * self.niter
        return min(full, self.cfg.max_steps) if self.cfg.max_steps else full

    @property
    def epoch(self) -> int:
        return self.step // self.niter

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.dtype, self.device)

    # ------------------------------------------------------------------ one step
    def train_step(self, views: list[torch.Tensor]) -> torch.Tensor:
        """One DINO step on a list of 2 + N view batches; returns the loss (a device tensor)."""
        cfg, epoch = self.cfg, self.epoch
        lr, wd, momentum = self.sched.at(self.step)
        set_schedule_(self.optimizer, lr, wd)
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher(views[:2])  # (2B, K)
            student_out = self.student(views)  # (V*B, K)
            loss = self.loss_fn(student_out, teacher_out, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients_(self.student, cfg.clip_grad)
        cancel_last_layer_gradients_(self.student, epoch, cfg.freeze_last_layer)
        self.optimizer.step()
        self.ema.step(momentum)
        loss = loss.detach()
        self._nonfinite |= ~torch.isfinite(loss)
        self._loss_sum += loss
        self.step += 1
        return loss

    def _reduced_stats(self) -> tuple[float, bool]:
        """(loss sum since the last log averaged over ranks, any rank non-finite): one all-reduce
        and one host sync, at log/checkpoint time only."""
        stats = torch.stack([self._loss_sum, self._nonfinite.float()])
        if is_distributed():
            torch.distributed.all_reduce(stats)
        loss_sum, nonfinite = stats.tolist()
        return loss_sum / self.world, nonfinite > 0

    def _check_finite(self, nonfinite: bool | None = None) -> None:
        """The one place a non-finite loss is noticed (a host sync, only every log_every steps);
        collective: every rank raises when any rank saw one."""
        if nonfinite is None:
            nonfinite = self._reduced_stats()[1]
        if nonfinite:
            last = f"; the last good checkpoint is {self._last_ckpt}" if self._last_ckpt else ""
            raise NonFiniteLossError(
                f"loss is NaN/Inf (between step {self._last_log_step + 1} and step {self.step}): training stopped, "
                f"nothing saved after the last finite check{last}. Lower lr, raise clip_grad or check the data.")

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or the time budget); returns a summary dict."""
        cfg = self.cfg
        if cfg.resume:
            self.resume(cfg.resume)
        writer = _MetricsWriter(self.out, enabled=self.main)
        self._last_log_step = self.step
        t_log, n_log = time.perf_counter(), 0
        train_s, last_knn_s = 0.0, 0.0
        calibrate = cfg.time_budget_min > 0 and not cfg.resume
        warm_s, calib_step = 0.0, -1
        bar = _progress(self.total_steps, self.step, enabled=self.main and cfg.progress)
        last_loss = float("nan")
        track_knn = bool(cfg.knn_every_min and cfg.val_path)
        if track_knn and self.step == 0:
            writer.write({"step": 0, "epoch": 0, "train_min": 0.0, **self._knn_row()})  # the random-init baseline
        t_step0 = time.perf_counter()
        try:
            while self.step < self.total_steps:
                start_batch = self.step % self.niter
                for views in self.data.epoch(self.epoch, start_batch):
                    self.train_step(views)
                    n_log += views[0].shape[0] * self.world
                    now = time.perf_counter()
                    train_s += now - t_step0
                    t_step0 = now
                    if calibrate and self.step == _CALIBRATION_WARMUP:
                        warm_s = train_s
                    if calibrate and self.step == _CALIBRATION_MIN_STEPS:
                        # how many steps the timing window takes: decided once, the same on every rank
                        window_s = min(_CALIBRATION_MAX_S, _CALIBRATION_FRACTION * 60 * cfg.time_budget_min)
                        est = all_reduce_max(train_s - warm_s, self.device) / (self.step - _CALIBRATION_WARMUP)
                        calib_step = max(self.step, _CALIBRATION_WARMUP + math.ceil(window_s / max(est, 1e-9)))
                    if calibrate and self.step == calib_step:
                        self._fit_to_budget(train_s, train_s - warm_s, self.step - _CALIBRATION_WARMUP)
                        bar.total = self.total_steps
                        calibrate = False
                    done = self.step >= self.total_steps
                    if self.step % cfg.log_every == 0 or done:
                        loss_sum, nonfinite = self._reduced_stats()
                        self._check_finite(nonfinite)
                        last_loss = loss_sum / max(1, self.step - self._last_log_step)
                        self._loss_sum.zero_()
                        img_s = n_log / max(now - t_log, 1e-9)
                        lr, wd, momentum = self.sched.at(self.step - 1)
                        row = dict(step=self.step, epoch=self.epoch, loss=last_loss, lr=lr, wd=wd, momentum=momentum,
                                   teacher_temp=self.loss_fn.teacher_temp_at(self.epoch),
                                   img_per_s=img_s, train_min=train_s / 60)
                        if track_knn:
                            run_s = all_reduce_max(train_s, self.device)  # ranks must agree (FSDP forwards)
                            if run_s - last_knn_s >= 60 * cfg.knn_every_min or done:
                                row.update(self._knn_row())
                                last_knn_s = run_s
                        writer.write(row)
                        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{img_s:.1f}")
                        self._last_log_step = self.step
                        t_log, n_log = time.perf_counter(), 0
                    if self.step % cfg.checkpoint_every == 0 or done:
                        self.save()
                    bar.update(1)
                    t_step0 = time.perf_counter()  # logging and saving are not training time
                    if done:
                        break
        finally:
            bar.close()
            writer.close()
        return {"steps": self.step, "epochs": self.epoch, "loss": last_loss, "train_minutes": train_s / 60,
                "checkpoint": str(self._last_ckpt) if self._last_ckpt else None}

    def _fit_to_budget(self, elapsed_s: float, timed_s: float, timed_steps: int) -> None:
        """Size epochs (and so every schedule) so that training ends when the budget does: the
        steady per-step time is ``timed_s / timed_steps``, measured after the first steps (worker
        start-up, allocator warm-up), and ``elapsed_s`` of the budget is already spent."""
        cfg = self.cfg
        per_step = all_reduce_max(timed_s, self.device) / timed_steps  # every rank sizes the same run
        left_s = cfg.time_budget_min * 60 - all_reduce_max(elapsed_s, self.device)
        steps = max(self.step + 1, self.step + int(left_s / per_step))
        epochs = -(-steps // self.niter)  # ceil: the last epoch may be partial
        scale = epochs / cfg.epochs
        changes = dict(epochs=epochs, max_steps=steps,
                       warmup_epochs=min(epochs, int(round(cfg.warmup_epochs * scale))),
                       warmup_teacher_temp_epochs=min(epochs, int(round(cfg.warmup_teacher_temp_epochs * scale))))
        log.info("time budget %.1f min at %.3f s/step: %d steps, %d epochs", cfg.time_budget_min, per_step, steps,
                 epochs)
        self.cfg = cfg.replace(**changes)
        self._build_schedules()

    def _knn_row(self) -> dict[str, float]:
        from dino_fast.eval.knn import knn_eval

        size = self.cfg.eval_size or self.cfg.global_crops_size
        res = knn_eval(self.teacher.backbone, self.cfg.data_path, self.cfg.val_path, size, ks=(self.cfg.knn_k,),
                       num_workers=self.cfg.num_workers, device=self.device)
        top1, top5 = res[self.cfg.knn_k]
        log.info("step %d: k-NN (k=%d) top-1 %.2f top-5 %.2f", self.step, self.cfg.knn_k, top1, top5)
        return {"knn_top1": top1, "knn_top5": top5}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dino_loss": self.loss_fn.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "config": self.cfg.to_dict(),
            "rng": rng_state(),
        }

    def restore_config(self, saved_config: dict[str, Any]) -> None:
        """Adopt what a checkpoint's config fixes for the rest of the run, then rebuild the schedules."""
        saved = TrainConfig.from_dict(saved_config, source="checkpoint")
        if saved.time_budget_min > 0:
            # A time-budget run sized its schedules after timing its first steps: keep those sizes.
            sized = ("epochs", "max_steps", "warmup_epochs", "warmup_teacher_temp_epochs")
            self.cfg = self.cfg.replace(**{name: getattr(saved, name) for name in sized})
        self._build_schedules()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a single-file (unsharded) checkpoint dict, as written by :meth:`state_dict`."""
        if self.sharded:
            dist_checkpoint.load_full_into_sharded(self, state)
            return
        self.restore_config(state["config"])
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_fn.load_state_dict(state["dino_loss"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    def save(self) -> Path | None:
        """Check the loss is finite, then write a checkpoint atomically and keep the newest two:
        a sharded DCP directory (all ranks) when sharded, else one file."""
        self._check_finite()
        if self.sharded:
            self._last_ckpt = dist_checkpoint.save_sharded(self, keep=2)
            return self._last_ckpt
        if not self.main:
            return None
        path = atomic_torch_save(self.state_dict(), checkpoint_path(self.out, self.step))
        prune_checkpoints(self.out, keep=2)
        self._last_ckpt = path
        return path

    def resume(self, which: str) -> None:
        """``which``: 'auto' (newest in output_dir; fresh start if none) or a checkpoint path."""
        path = latest_checkpoint(self.out) if which == "auto" else Path(which)
        if path is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.out)
            return
        if path.is_dir():
            dist_checkpoint.load_sharded(self, path)
            self._last_ckpt = path
            log.info("resumed from %s at step %d", path, self.step)
            return
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a dino_fast training checkpoint")
        self.load_state_dict(state)
        self._last_ckpt = path
        log.info("resumed from %s at step %d", path, self.step)


# A time budget is sized once, from the steady per-step time: the first steps (worker start-up,
# first allocations) are not timed, then steps are timed for 5 % of the budget (at most a minute,
# at least 7 steps) so that data-loader stalls average out.
_CALIBRATION_WARMUP = 3
_CALIBRATION_MIN_STEPS = 10
_CALIBRATION_FRACTION = 0.05
_CALIBRATION_MAX_S = 60.0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class _MetricsWriter:
    """metrics.csv (appended across resumes) and TensorBoard scalars, on rank 0."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.csv"
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        if new:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard is a dependency; keep training if it is broken
            log.warning("tensorboard unavailable: writing metrics.csv only")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        log.debug("%s", row)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class _NoBar:
    total = 0

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Build a Trainer for ``cfg`` and run it."""
    return Trainer(cfg).fit()
