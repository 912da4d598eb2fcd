"""The DINO trainer: one process per device (``python`` or ``torchrun``); bf16 on CUDA (and on AMX CPUs), else fp32.

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
from torch import nn

from dino_fast.checkpoint import Checkpointer
from dino_fast.config import TrainConfig, write_config
from dino_fast.cuda_graphs import graphed_step
from dino_fast.data.build import build_train_data
from dino_fast.distributed import get_rank, get_world_size, init_distributed, is_distributed, is_main_process
from dino_fast.ema import TeacherEMA
from dino_fast.eval.periodic import PeriodicKnn
from dino_fast.errors import DataError, DinoFastError, NonFiniteLossError, RunLockError, UnreadableCheckpointError
from dino_fast.metrics import MetricsWriter, progress_bar
from dino_fast.models import arch_family, build_models, describe_attention
from dino_fast.objective import Objective
from dino_fast.optim import build_optimizer, cancel_last_layer_gradients_, clip_gradients_, set_schedule_
from dino_fast.parallel import all_reduce_max, check_config_agrees, init_single_process_group, parallelize
from dino_fast.plan import RunPlan, StepValues, TimeBudget
from dino_fast.precision import autocast, resolve_compute_dtype, configure_determinism
from dino_fast.resume import data_changes, mismatch_hint, plan_changes
from dino_fast.runlock import RunLock, check_output_dir
from dino_fast.signals import GracefulStop, Interrupted
from dino_fast.state import ModelState, OptimizerState, TrainState

__all__ = ["Trainer", "NonFiniteLossError", "train_main"]

log = logging.getLogger("dino_fast")


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
        self.compute_dtype = resolve_compute_dtype(cfg.precision, self.device)
        self.data = build_train_data(cfg, self.device, self.rank, self.world, self.compute_dtype)
        niter = self.data.num_batches // cfg.accum_steps
        if niter < 1:
            raise DataError(f"{self.data.num_batches} batches per epoch is fewer than accum_steps={cfg.accum_steps}")
        self.plan = RunPlan.from_config(cfg, niter, self.world)
        student, teacher = build_models(cfg, self.device, self.compute_dtype)
        sharded = parallelize(student, teacher, cfg, self.device, self.compute_dtype)
        self._build_step(student, teacher, sharded, data=self.data.identity())
        self.checkpointer = Checkpointer(self.out, every=cfg.checkpoint_every, snapshot_every=cfg.saveckp_freq)
        self._last_ckpt: Path | None = None
        self._last_log_step = 0

    def _build_step(self, student: nn.Module, teacher: nn.Module, sharded: bool,
                    data: dict[str, Any] | None = None) -> None:
        """What :meth:`train_step` needs, around the two models: EMA, optimizer, objective (losses and
        their centers), loss scaler, train state and the on-device loss accumulators."""
        cfg = self.cfg
        self.student, self.teacher, self.sharded = student, teacher, sharded
        self.ema = TeacherEMA(self.student, self.teacher, impl=cfg.ema_impl, compute_dtype=self.compute_dtype)
        self.optimizer = build_optimizer(self.student, cfg.optimizer)
        self.graphed = graphed_step(cfg, self._step, self.optimizer, self.device, sharded)  # None: eager steps
        self.objective = Objective(cfg, self.device, self.rank)
        # fp16 needs loss scaling (bf16 has fp32's range and does not)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.compute_dtype == torch.float16 else None
        self.state = TrainState(cfg.to_dict(), self.plan, cfg.seed, data=data)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self._epoch_loss = torch.zeros((), dtype=torch.float32, device=self.device)

    @classmethod
    def for_step(cls, cfg: TrainConfig, device: torch.device, student: nn.Module, teacher: nn.Module,
                 niter_per_epoch: int = 100) -> "Trainer":
        """A Trainer that can run :meth:`train_step` and nothing else, on prebuilt models: no data,
        output folder, process group or checkpointer. For looking at the step on its own (the
        fake-CUDA trace in tests/preflight, the CPU proxies of bench/preflight.py)."""
        self = cls.__new__(cls)
        self.cfg, self.clock, self.device = cfg, time.perf_counter, torch.device(device)
        self.rank, self.world, self.main = 0, 1, True
        self.compute_dtype = resolve_compute_dtype(cfg.precision, self.device)
        self.plan = RunPlan.from_config(cfg, niter_per_epoch, 1)
        self._build_step(student, teacher, sharded=False)
        return self

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
        backend, head_dim = self.student.attn_backend, self.student.attn_head_dim
        attention = (f"the backbone's own ({type(self.student.backbone).__name__}: attn_backend is for the ViTs)"
                     if backend is None else f"{backend} (requested)" if backend != "auto"
                     else describe_attention(self.device, self.compute_dtype, head_dim))
        arch = f"{self.cfg.arch}/{self.cfg.patch_size}" if arch_family(self.cfg.arch) == "vit" else self.cfg.arch
        return [f"model: {arch}, compute dtype "
                f"{str(self.compute_dtype).replace('torch.', '')}{', FSDP2' if self.sharded else ''}, "
                f"{self.plan.stop_step} steps ({self.plan.run_epochs} epochs x {self.plan.niter_per_epoch})",
                f"attention: {attention}",
                f"loss: {self.objective.describe(self.device)}",
                f"ema: {self.ema.impl}", f"loader: {self.data.describe()}"]

    # ------------------------------------------------------------------ one step
    def train_step(self, *micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """One optimizer step over one or more micro-batches (lists of 2 + N view batches);
        returns the mean loss (a device tensor)."""
        v = self.plan.at(self.step)
        if self.graphed is not None:  # cuda_graphs: _step from static buffers, captured and replayed (cuda_graphs.py)
            loss = self.graphed(micro_batches, v)
        else:
            set_schedule_(self.optimizer, v.lr, v.wd)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._step(micro_batches, v, v.momentum)
        self.state.step += 1
        return loss

    def _step(self, micro_batches: Any, v: StepValues, momentum: float | torch.Tensor) -> torch.Tensor:
        """The step's device work, lr and weight decay already in the optimizer: forward, backward,
        clip, optimizer, EMA, center and the loss accumulators (what a CUDA graph captures)."""
        cfg, n = self.cfg, len(micro_batches)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, views in enumerate(micro_batches):
            with self.autocast():
                # accumulation: the centers move once per optimizer step, from every micro-batch
                loss = self.objective(self.student, self.ema.forward_teacher, views, v, self.step, i,
                                      update_center=n == 1)
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
        self.ema.step(momentum)
        loss = total / n
        self._nonfinite |= ~torch.isfinite(loss)
        self._loss_sum += loss
        self._epoch_loss += loss
        return loss

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.compute_dtype, self.device)

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
            if self.main:  # the resolved config beside the run: `--config <output_dir>/config.yaml` reads it
                write_config(self.cfg, self.out / "config.yaml")
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
        """Optimizer steps to the plan's end. After each: the time budget may re-size the plan,
        then a log row, the epoch's log.txt line and a checkpoint, each when its owner says so
        (the metrics writer, the periodic k-NN, the checkpointer)."""
        writer = MetricsWriter(self.out, enabled=self.main, log_every=self.cfg.log_every, clock=self.clock,
                               wandb_project=self.cfg.wandb_project, config=self.cfg.to_dict())
        knn = PeriodicKnn.from_config(self.cfg, self.device, self.compute_dtype)
        budget = self._time_budget()
        bar = progress_bar(self.plan.stop_step, self.step, enabled=self.main and self.cfg.progress)
        self._last_log_step = self.step
        try:
            if knn is not None and self.step == 0:  # the random-init baseline
                writer.write({"step": 0, "epoch": 0, "train_min": 0.0, **knn(self.teacher.backbone, 0, 0.0)})
            t_step = self.clock()
            for micro in self._step_batches():
                values = self.plan.at(self.step)
                self.train_step(*micro)
                self.state.train_seconds += self.clock() - t_step
                writer.observe_step(sum(v[0].shape[0] for v in micro) * self.world, values.lr, values.wd)
                if budget is not None and (sized := budget.observe(self.step, self.state.train_seconds,
                                                                   self.plan)) is not None:
                    self.set_plan(sized)
                    bar.total = self.plan.stop_step
                done = self.step >= self.plan.stop_step
                epoch_end = self.step % self.plan.niter_per_epoch == 0
                # under torchrun the ranks agree to stop at a log step (a collective), else at once
                interrupt = stop.requested and not is_distributed()
                if writer.should_log(self.step, force=done or epoch_end):
                    interrupt = self._log(writer, knn, stop.requested, done)
                    bar.set_postfix(loss=f"{self.state.last_loss:.4f}")
                if epoch_end:
                    self._end_epoch(writer)
                if self.checkpointer.should_save(self.step, force=done or epoch_end or interrupt):
                    self.save(snapshot_epoch=self.checkpointer.snapshot_epoch(self.epoch - 1 if epoch_end else None))
                bar.update(1)
                if interrupt:
                    raise Interrupted(stop.signum or 15, self.step, str(self._last_ckpt))
                if done:
                    break
                t_step = self.clock()  # logging and saving are not training time
        except BaseException:
            bar.close()
            writer.close(quiet=True)  # a close error (a full disk) must not hide what stopped the run
            raise
        bar.close()
        writer.close()
        return {"steps": self.step, "epochs": self.epoch, "loss": self.state.last_loss,
                "train_minutes": self.state.train_seconds / 60,
                "checkpoint": str(self._last_ckpt) if self._last_ckpt else None}

    def _step_batches(self) -> Iterator[list[list[torch.Tensor]]]:
        """The micro-batches (``accum_steps`` lists of views) of each optimizer step, from the
        current step to the plan's end (which a time budget may move meanwhile), epoch after epoch."""
        accum = self.cfg.accum_steps
        while self.step < self.plan.stop_step:
            micro: list[list[torch.Tensor]] = []
            for views in self.data.epoch(self.epoch, (self.step % self.plan.niter_per_epoch) * accum):
                micro.append(views)
                if len(micro) == accum:
                    yield micro
                    micro = []
                    if self.step >= self.plan.stop_step:
                        return

    def _time_budget(self) -> TimeBudget | None:
        if self.cfg.time_budget_min <= 0:
            return None  # a resumed budget run keeps its plan, and its budget goes on re-sizing it
        return TimeBudget(self.cfg.time_budget_min, agree=lambda x: all_reduce_max(x, self.device))

    def _log(self, writer: MetricsWriter, knn: PeriodicKnn | None, stop_requested: bool, done: bool) -> bool:
        """One metrics row (one all-reduce, one host sync); returns whether any rank asked to stop."""
        images_per_s = writer.images_per_s()
        loss_sum, nonfinite, stopping = self._reduced_stats(float(stop_requested))
        self._check_finite(nonfinite)
        self.state.last_loss = loss_sum / max(1, self.step - self._last_log_step)
        self._loss_sum.zero_()
        v = self.plan.at(self.step - 1)
        row = dict(step=self.step, epoch=self.epoch, loss=self.state.last_loss, lr=v.lr, wd=v.wd, momentum=v.momentum,
                   teacher_temp=v.teacher_temp, img_per_s=images_per_s, train_min=self.state.train_seconds / 60)
        if knn is not None:
            run_s = all_reduce_max(self.state.train_seconds, self.device)  # the ranks must agree
            if knn.due(run_s, done):
                row.update(knn(self.teacher.backbone, self.step, run_s))
        writer.write(row)
        self._last_log_step = self.step
        return stopping > 0

    def _end_epoch(self, writer: MetricsWriter) -> None:
        """The official log.txt line of the epoch that just ended."""
        loss = self._epoch_loss.clone()
        if is_distributed():
            torch.distributed.all_reduce(loss)
        writer.write_epoch(self.epoch - 1, loss_sum=loss.item() / self.world)
        self._epoch_loss.zero_()

    # ------------------------------------------------------------------ checkpoints
    def save(self, snapshot_epoch: int | None = None) -> Path:
        """Check the loss is finite, then write a checkpoint (collective; atomic); at a snapshot
        epoch also keep a numbered copy. Writes the official-layout file too when configured."""
        self._check_finite()
        snapshot = f"epoch{snapshot_epoch:04d}" if snapshot_epoch is not None else None
        self._last_ckpt = self.checkpointer.save(self.parts(), self.step, snapshot=snapshot)
        if self.cfg.save_official_checkpoint:
            from dino_fast.export import write_official_checkpoint

            write_official_checkpoint(  # collective: gathers the full models when sharded
                self.out, student=self.student, teacher=self.teacher,
                optimizer_sd=None if self.sharded else self.optimizer.state_dict(), epoch=self.epoch,
                config=self.cfg.to_dict(), dino_loss_sd=self.objective.dino_loss.state_dict(),
                scaler_sd=self.scaler.state_dict() if self.scaler is not None else None,
                write=self.main, snapshot_epoch=snapshot_epoch)
        return self._last_ckpt

    def resume(self, which: str) -> None:
        """``which``: 'auto' (the newest readable checkpoint in output_dir; a fresh start if none) or
        a checkpoint path. A checkpoint is checked (format, keys, shapes) before any state is
        touched; with 'auto', a damaged newest one is skipped (and named) for the one before it."""
        candidates = self.checkpointer.candidates() if which == "auto" else [Path(which)]
        if not candidates:
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.out)
            return
        failures: list[str] = []
        for path in candidates:
            try:
                self._load(path)
                break
            except UnreadableCheckpointError as e:
                if which != "auto":
                    raise
                failures.append(str(e))
                log.warning("resume=auto: skipping %s: %s", path.name, e)
        else:
            raise UnreadableCheckpointError(f"no readable checkpoint in {self.checkpointer.folder}: "
                                            + "; ".join(failures))
        self._continue_plan(path)
        self._last_ckpt = path
        if failures:
            log.warning("resumed from %s, the newest readable checkpoint (%d newer skipped)", path, len(failures))
        log.info("resumed from %s at step %d", path, self.step)
        if self.step >= self.plan.stop_step:
            log.info("the run in %s is finished (step %d of %d); its last logged loss was %.4f. Nothing to train: "
                     "raise --epochs or --max_steps to train further", self.out, self.step, self.plan.stop_step,
                     self.state.last_loss)

    def _load(self, path: Path) -> None:
        if path.is_file():  # the single file of earlier versions: converted as it is read
            from dino_fast.checkpoint_legacy import load_legacy

            load_legacy(path, self.parts(), hint="")
        else:
            self.checkpointer.load(path, self.parts(), hint=mismatch_hint(path, self.cfg.to_dict()))

    def _continue_plan(self, path: Path) -> None:
        """Keep the saved plan (a time budget's size) when the run goes on as planned; stop, saying
        what differs, when the data or the batch changed, unless ``allow_data_change``."""
        st = self.state
        changes = data_changes(st.saved_data, st.data) + plan_changes(
            st.saved_plan, self.plan, st.saved_config, st.saved_world, self.cfg.to_dict(), self.world)
        if changes and not self.cfg.allow_data_change:
            raise DataError(f"--resume {path}: the run changed since that checkpoint: {'; '.join(changes)}. Resume "
                            "with the same data and batch, or give --allow_data_change true to continue on these "
                            "(the run is re-planned)")
        if changes:
            log.warning("data changed since %s (%s): re-planned, %d steps per epoch; step %d continues in epoch %d "
                        "of %d", path, "; ".join(changes), self.plan.niter_per_epoch, self.step, self.epoch,
                        self.plan.run_epochs)
            return
        if st.saved_data and st.saved_data["root"] != st.data["root"]:
            log.info("the data moved: %s -> %s (the same files)", st.saved_data["root"], st.data["root"])
        saved = st.saved_plan
        if saved is not None and saved.budget_sized and saved.niter_per_epoch == self.plan.niter_per_epoch:
            self.set_plan(saved)  # a time-budget run keeps the size it was given


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def train_main(cfg: TrainConfig) -> dict[str, Any]:
    """Build a Trainer for ``cfg`` and run it."""
    return Trainer(cfg).fit()
