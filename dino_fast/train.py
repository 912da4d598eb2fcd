"""The DINO trainer: one process per device (``python`` or ``torchrun``), bf16 on CUDA, fp32 on CPU.

Data flows one way: loader -> views -> teacher (2 globals) and student (all views) -> DINO loss
-> backward (x accum_steps) -> clip -> optimizer -> teacher EMA -> center -> log / checkpoint.

State flows one way too: the config is immutable; the :class:`~dino_fast.plan.RunPlan` (length
and every schedule) is derived from it and replaced whole when a time budget has timed the step;
the trainer owns Stateful parts (:meth:`Trainer.parts`) and hands them to one
:class:`~dino_fast.checkpoint.Checkpointer`; the compute dtype is resolved once.

Under torchrun (or with ``fsdp: true`` on one process) student and teacher are sharded with
FSDP2 (:mod:`dino_fast.parallel`); metrics are averaged over ranks at log time and written by
rank 0. No host sync in the step loop: the loss is summed on the device and read, with the
non-finite flag, only every ``log_every`` steps, at epoch ends and before each checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from dino_fast.checkpoint import Checkpointer, read_checkpoint_values
from dino_fast.config import TrainConfig
from dino_fast.data.build import build_train_data
from dino_fast.distributed import get_rank, get_world_size, init_distributed, is_distributed, is_main_process
from dino_fast.ema import TeacherEMA
from dino_fast.errors import DataError, DinoFastError, NonFiniteLossError, RunLockError
from dino_fast.metrics import MetricsWriter, progress_bar
from dino_fast.models import build_models, describe_attention
from dino_fast.objective import Objective
from dino_fast.optim import build_optimizer, cancel_last_layer_gradients_, clip_gradients_, set_schedule_
from dino_fast.parallel import all_reduce_max, check_config_agrees, init_single_process_group, parallelize
from dino_fast.plan import RunPlan, TimeBudget
from dino_fast.precision import autocast, compute_dtype, configure_determinism
from dino_fast.runlock import RunLock, check_output_dir
from dino_fast.signals import GracefulStop, Interrupted
from dino_fast.state import ModelState, OptimizerState, TrainState

__all__ = ["Trainer", "NonFiniteLossError", "train_main"]

log = logging.getLogger("dino_fast")

# Config keys that fix the model's shapes: named when a checkpoint does not fit.
_MODEL_KEYS = ("arch", "patch_size", "depth", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "norm_last_layer",
               "use_bn_in_head", "optimizer", "ibot_weight", "ibot_separate_head", "ibot_out_dim")


class Trainer:
    """Builds everything a run needs from ``cfg`` and runs it (:meth:`fit`).

    ``clock`` (seconds, monotonic) is where training time comes from: the time budget, the
    k-NN cadence and img/s all read it, so tests can drive them with a fake clock."""

    def __init__(self, cfg: TrainConfig, device: torch.device | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.cfg, self.clock = cfg, clock
        configure_determinism(cfg.deterministic)  # before any CUDA kernel runs
        self.device = device or init_distributed()
        if cfg.fsdp and not is_distributed():
            init_single_process_group(self.device)
        self.rank, self.world, self.main = get_rank(), get_world_size(), is_main_process()
        check_config_agrees(cfg)
        self.out = check_output_dir(cfg.output_dir)
        _seed_everything(cfg.seed)
        self.dtype = compute_dtype(cfg.amp_precision, self.device)
        self.data = build_train_data(cfg, self.device, self.rank, self.world, self.dtype)
        niter = self.data.num_batches // cfg.accum_steps
        if niter < 1:
            raise DataError(f"{self.data.num_batches} batches per epoch is fewer than accum_steps={cfg.accum_steps}")
        self.plan = RunPlan.from_config(cfg, niter, self.world)
        self.student, self.teacher = build_models(cfg, self.device)
        self.sharded = parallelize(self.student, self.teacher, cfg, self.device, self.dtype)
        self.ema = TeacherEMA(self.student, self.teacher, impl=cfg.ema_impl)
        self.optimizer = build_optimizer(self.student, cfg.optimizer)
        self.objective = Objective(cfg, self.plan, self.device, self.rank)
        self.loss_fn = self.objective.dino
        # fp16 needs loss scaling (bf16 has fp32's range and does not)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.state = TrainState(cfg.to_dict(), self.plan, cfg.seed)
        self.checkpointer = Checkpointer(self.out)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self._epoch_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self._last_ckpt: Path | None = None
        self._last_log_step = 0

    # ------------------------------------------------------------------ views of the state
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def epoch(self) -> int:
        return self.step // self.plan.niter_per_epoch

    def parts(self) -> dict[str, Any]:
        """Everything a resume needs, by name (what the checkpointer saves and loads)."""
        parts = {"student": ModelState(self.student), "teacher": ModelState(self.teacher),
                 "optimizer": OptimizerState(self.student, self.optimizer), **self.objective.parts(),
                 "train": self.state}
        if self.scaler is not None:
            parts["scaler"] = self.scaler
        return parts

    def set_plan(self, plan: RunPlan) -> None:
        """Replace the run plan (whole); the train state records it for the next checkpoint."""
        self.plan = self.state.plan = plan

    def describe(self) -> list[str]:
        """What runs and why, for the start-up log."""
        cfg = self.cfg
        attn = next((m for m in self.student.modules() if hasattr(m, "backend") and hasattr(m, "head_dim")), None)
        attention = ("none (a convnet)" if attn is None else describe_attention(self.device, self.dtype, attn.head_dim)
                     if cfg.attn_backend == "auto" else f"{cfg.attn_backend} (requested)")
        return [f"model: {self.cfg.arch}/{self.cfg.patch_size}, compute dtype "
                f"{str(self.dtype).replace('torch.', '')}{', FSDP2' if self.sharded else ''}, "
                f"{self.plan.total_steps} steps ({self.plan.epochs} epochs x {self.plan.niter_per_epoch})",
                f"attention: {attention}",
                f"loss: {self.objective.describe(self.device)}",
                f"ema: {self.ema.impl}", f"loader: {self.data.describe()}"]

    # ------------------------------------------------------------------ one step
    def train_step(self, *micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """One optimizer step over one or more micro-batches (lists of 2 + N view batches);
        returns the mean loss (a device tensor)."""
        cfg, n = self.cfg, len(micro_batches)
        v = self.plan.at(self.step)
        set_schedule_(self.optimizer, v.lr, v.wd)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, views in enumerate(micro_batches):
            with self.autocast():
                # accumulation: the centers move once per optimizer step, from every micro-batch
                loss = self.objective(self.student, self.teacher, views, v, self.step, i, update_center=n == 1)
            scaled = loss / n if n > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach()
        if n > 1:
            self.objective.flush_center()
        if self.scaler is not None and cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (official order)
        clip_gradients_(self.student, cfg.clip_grad)
        cancel_last_layer_gradients_(self.student, v.epoch, cfg.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema.step(v.momentum)
        loss = total / n
        self._nonfinite |= ~torch.isfinite(loss)
        self._loss_sum += loss
        self._epoch_loss += loss
        self.state.step += 1
        return loss

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.dtype, self.device)

    def _reduced_stats(self, *extra: float) -> list[float]:
        """[loss sum since the last log averaged over ranks, any rank non-finite, *extra summed]:
        one all-reduce and one host sync, at log / checkpoint time only."""
        stats = torch.stack([self._loss_sum, self._nonfinite.float(),
                             *[torch.tensor(float(x), device=self.device) for x in extra]])
        if is_distributed():
            torch.distributed.all_reduce(stats)
        out = stats.tolist()
        out[0] /= self.world
        return out

    def _check_finite(self, nonfinite: float | None = None) -> None:
        """The one place a non-finite loss is noticed; collective: every rank raises when any rank saw one."""
        if nonfinite is None:
            nonfinite = self._reduced_stats()[1]
        if nonfinite:
            last = f"; the last good checkpoint is {self._last_ckpt}" if self._last_ckpt else ""
            raise NonFiniteLossError(
                f"loss is NaN/Inf (between step {self._last_log_step + 1} and step {self.step}): training stopped, "
                f"nothing saved after the last finite check{last}. Lower lr, raise clip_grad or check the data.")

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train to the plan's end (or the time budget's); returns a summary dict. Holds the
        output folder's run lock throughout; SIGINT / SIGTERM save and raise :class:`Interrupted`."""
        with self._run_lock(), GracefulStop() as stop:
            if self.cfg.resume:
                self.resume(self.cfg.resume)
            if self.main:
                for line in self.describe():
                    log.info("%s", line)
            return self._loop(stop)

    @contextlib.contextmanager
    def _run_lock(self) -> Iterator[None]:
        """Rank 0 takes the output folder's lock (and removes what killed saves left); every rank
        learns whether it got it, so all stop together when another run holds the folder."""
        lock, error = RunLock(self.out) if self.main else None, None
        if lock is not None:
            try:
                lock.acquire()
                lock.clean_orphans()
            except DinoFastError as e:
                error = e
        if is_distributed():
            failed = torch.tensor([error is not None], dtype=torch.int32, device=self.device)
            torch.distributed.broadcast(failed, src=0)
            if failed.item() and error is None:
                error = RunLockError(f"rank 0 could not take the lock of {self.out}")
        if error is not None:
            raise error
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def _loop(self, stop: GracefulStop) -> dict[str, Any]:
        cfg, accum = self.cfg, self.cfg.accum_steps
        writer = MetricsWriter(self.out, enabled=self.main)
        self._last_log_step = self.step
        budget = None
        if cfg.time_budget_min > 0 and not self.plan.budget_sized:
            budget = TimeBudget(cfg.time_budget_min, agree=lambda x: all_reduce_max(x, self.device))
        t_log, n_log, last_knn_s = self.clock(), 0, self.state.train_seconds
        epoch_sums = {"lr": 0.0, "wd": 0.0, "steps": 0}
        bar = progress_bar(self.plan.stop_step, self.step, enabled=self.main and cfg.progress)
        last_loss = float("nan")
        track_knn = bool(cfg.knn_every_min and cfg.val_path)
        if track_knn and self.step == 0:
            writer.write({"step": 0, "epoch": 0, "train_min": 0.0, **self._knn_row()})  # the random-init baseline
        t_step0 = self.clock()
        try:
            while self.step < self.plan.stop_step:
                micro: list[list[torch.Tensor]] = []
                for views in self.data.epoch(self.epoch, (self.step % self.plan.niter_per_epoch) * accum):
                    micro.append(views)
                    if len(micro) < accum:
                        continue
                    values = self.plan.at(self.step)
                    self.train_step(*micro)
                    n_log += sum(v[0].shape[0] for v in micro) * self.world
                    micro = []
                    epoch_sums["lr"] += values.lr
                    epoch_sums["wd"] += values.wd
                    epoch_sums["steps"] += 1
                    now = self.clock()
                    self.state.train_seconds += now - t_step0
                    if budget is not None and (sized := budget.observe(self.step, self.state.train_seconds,
                                                                       self.plan)) is not None:
                        self.set_plan(sized)
                        bar.total = self.plan.stop_step
                    done = self.step >= self.plan.stop_step
                    epoch_end = self.step % self.plan.niter_per_epoch == 0
                    # under torchrun the ranks agree to stop at a log step (a collective), else at once
                    interrupt = stop.requested and not is_distributed()
                    if self.step % cfg.log_every == 0 or done or epoch_end:
                        loss_sum, nonfinite, stopping = self._reduced_stats(float(stop.requested))
                        self._check_finite(nonfinite)
                        interrupt = stopping > 0
                        last_loss = loss_sum / max(1, self.step - self._last_log_step)
                        self._loss_sum.zero_()
                        img_s = n_log / max(now - t_log, 1e-9)
                        v = self.plan.at(self.step - 1)
                        row = dict(step=self.step, epoch=self.epoch, loss=last_loss, lr=v.lr, wd=v.wd,
                                   momentum=v.momentum, teacher_temp=v.teacher_temp, img_per_s=img_s,
                                   train_min=self.state.train_seconds / 60)
                        if track_knn:
                            run_s = all_reduce_max(self.state.train_seconds, self.device)  # ranks must agree
                            if run_s - last_knn_s >= 60 * cfg.knn_every_min or done:
                                row.update(self._knn_row())
                                last_knn_s = run_s
                        writer.write(row)
                        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{img_s:.1f}")
                        self._last_log_step = self.step
                        t_log, n_log = self.clock(), 0
                    if epoch_end:
                        self._end_epoch(writer, epoch_sums)
                    if self.step % cfg.checkpoint_every == 0 or done or epoch_end or interrupt:
                        finished = self.epoch - 1 if epoch_end else None
                        self.save(snapshot_epoch=finished if finished is not None and cfg.saveckp_freq
                                  and finished % cfg.saveckp_freq == 0 else None)
                    bar.update(1)
                    if interrupt:
                        raise Interrupted(stop.signum or 15, self.step, str(self._last_ckpt))
                    t_step0 = self.clock()  # logging and saving are not training time
                    if done:
                        break
        finally:
            bar.close()
            writer.close()
        return {"steps": self.step, "epochs": self.epoch, "loss": last_loss,
                "train_minutes": self.state.train_seconds / 60,
                "checkpoint": str(self._last_ckpt) if self._last_ckpt else None}

    def _end_epoch(self, writer: MetricsWriter, sums: dict[str, float]) -> None:
        """The official log.txt line of the epoch that just ended (averages over its steps)."""
        n = max(1, int(sums["steps"]))
        loss = self._epoch_loss.clone()
        if is_distributed():
            torch.distributed.all_reduce(loss)
        writer.write_epoch(self.epoch - 1, {"loss": loss.item() / self.world / n, "lr": sums["lr"] / n,
                                            "wd": sums["wd"] / n})
        self._epoch_loss.zero_()
        sums.update(lr=0.0, wd=0.0, steps=0)

    def _knn_row(self) -> dict[str, float]:
        from dino_fast.eval.knn import knn_eval

        size = self.cfg.eval_size or self.cfg.global_crops_size
        res = knn_eval(self.teacher.backbone, self.cfg.data_path, self.cfg.val_path, size, ks=(self.cfg.knn_k,),
                       num_workers=self.cfg.num_workers, device=self.device)
        top1, top5 = res[self.cfg.knn_k]
        log.info("step %d: k-NN (k=%d) top-1 %.2f top-5 %.2f", self.step, self.cfg.knn_k, top1, top5)
        return {"knn_top1": top1, "knn_top5": top5}

    # ------------------------------------------------------------------ checkpoints
    def save(self, snapshot_epoch: int | None = None) -> Path:
        """Check the loss is finite, then write a checkpoint (collective; atomic); at a snapshot
        epoch also keep a numbered copy. Writes the official-layout file too when configured."""
        self._check_finite()
        snapshot = f"epoch{snapshot_epoch:04d}" if snapshot_epoch is not None else None
        self._last_ckpt = self.checkpointer.save(self.parts(), self.step, snapshot=snapshot)
        if self.cfg.save_official_checkpoint:
            from dino_fast.export import write_official_checkpoint

            write_official_checkpoint(self, snapshot_epoch)
        return self._last_ckpt

    def resume(self, which: str) -> None:
        """``which``: 'auto' (newest in output_dir; fresh start if none) or a checkpoint path.
        The checkpoint is checked (format, keys, shapes) before any state is touched."""
        path = self.checkpointer.latest() if which == "auto" else Path(which)
        if path is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.out)
            return
        if path.is_file():  # the single file of earlier versions: converted as it is read
            from dino_fast.checkpoint_legacy import load_legacy

            load_legacy(path, self.parts(), hint="")
        else:
            self.checkpointer.load(path, self.parts(), hint=self._mismatch_hint(path))
        saved = self.state.saved_plan
        if saved is not None and saved.budget_sized and saved.niter_per_epoch == self.plan.niter_per_epoch:
            self.set_plan(saved)  # a time-budget run keeps the size it was given
        self._last_ckpt = path
        log.info("resumed from %s at step %d", path, self.step)

    def _mismatch_hint(self, path: Path) -> str:
        """'; the checkpoint has --arch vit_small, this run --arch vit_tiny' for model-shaping keys."""
        try:
            import json

            saved = json.loads(read_checkpoint_values(path, {"train.config": ""})["train.config"])
        except Exception:
            return ""
        ours = self.cfg.to_dict()
        diff = [(k, saved[k], ours[k]) for k in _MODEL_KEYS if k in saved and saved[k] != ours[k]]
        if not diff:
            return ""
        theirs = " ".join(f"--{k} {a}" for k, a, _ in diff)
        mine = " ".join(f"--{k} {b}" for k, _, b in diff)
        return f". The checkpoint was trained with {theirs}; this run has {mine}: change those flags"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def train_main(cfg: TrainConfig) -> dict[str, Any]:
    """Build a Trainer for ``cfg`` and run it."""
    return Trainer(cfg).fit()
