"""What a run writes as it goes, on rank 0: ``metrics.csv`` (every ``log_every`` steps, appended
across resumes), TensorBoard scalars, the official ``log.txt`` (one JSON line per epoch with
``train_loss``, ``train_lr``, ``train_wd``, ``epoch``, as main_dino.py writes it) and a progress bar.

The writer also owns the logging cadence (:meth:`MetricsWriter.should_log`), the images/s window
between two rows, and the per-epoch averages of the schedules for ``log.txt``: the training loop
only tells it what happened."""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["CSV_FIELDS", "MetricsWriter", "progress_bar"]

log = logging.getLogger("dino_fast")

CSV_FIELDS = ["step", "epoch", "loss", "lr", "wd", "momentum", "teacher_temp", "img_per_s", "train_min",
              "knn_top1", "knn_top5"]


class MetricsWriter:
    """metrics.csv, TensorBoard and log.txt; writes nothing where ``enabled`` is False (ranks > 0),
    but keeps the cadence there too (every rank must log, and so reduce, at the same steps).

    ``clock`` (seconds) times the images/s window; time spent writing a row is not in the next.
    ``wandb_project``: also log the same scalars to Weights & Biases (``config``: the run's config,
    recorded there), when the ``wandb`` package is installed; said in one line when it is not."""

    def __init__(self, out: Path, enabled: bool, log_every: int = 10,
                 clock: Callable[[], float] = time.perf_counter, wandb_project: str = "",
                 config: dict[str, Any] | None = None) -> None:
        self.enabled, self.out, self.log_every, self.clock = enabled, out, log_every, clock
        self.tb = self.wandb = None
        self._images, self._t_window = 0, clock()
        self._epoch = {"lr": 0.0, "wd": 0.0, "steps": 0}
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
        if wandb_project:
            self.wandb = _wandb_run(wandb_project, out, config or {})

    # -- what the loop tells the writer ---------------------------------------------------
    def should_log(self, step: int, force: bool = False) -> bool:
        """A row every ``log_every`` steps, and whenever the loop forces one (epoch end, the end)."""
        return force or step % self.log_every == 0

    def observe_step(self, images: int, lr: float, wd: float) -> None:
        """One optimizer step of ``images`` images (all ranks) at these schedule values."""
        self._images += images
        self._epoch["lr"] += lr
        self._epoch["wd"] += wd
        self._epoch["steps"] += 1

    def images_per_s(self) -> float:
        """Images/s since the last row (or since the writer was made)."""
        return self._images / max(self.clock() - self._t_window, 1e-9)

    def write(self, row: dict[str, Any]) -> None:
        """One metrics.csv row (+ TensorBoard scalars); starts the next images/s window."""
        self._images, self._t_window = 0, self.clock()
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        self.file.flush()
        scalars = {f"train/{k}": v for k, v in row.items()
                   if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log({**scalars, "train/epoch": row.get("epoch", 0)}, step=int(row["step"]))
        log.debug("%s", row)

    def write_epoch(self, epoch: int, loss_sum: float) -> None:
        """One official log.txt line, ``{"train_loss", "train_lr", "train_wd", "epoch"}``: the means
        of the loss (``loss_sum`` over the epoch's steps seen by this run) and of the schedules."""
        n = max(1, self._epoch["steps"])
        stats = {"loss": loss_sum / n, "lr": self._epoch["lr"] / n, "wd": self._epoch["wd"] / n}
        self._epoch = {"lr": 0.0, "wd": 0.0, "steps": 0}
        if not self.enabled:
            return
        line = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
        with open(self.out / "log.txt", "a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self, quiet: bool = False) -> None:
        """Flush and close. ``quiet``: a failure to close (a full disk) is logged, not raised, so
        that it never replaces the error that stopped the run."""
        if not self.enabled:
            return
        closers = [self.file.close]
        if self.tb is not None:
            closers.append(self.tb.close)
        if self.wandb is not None:
            closers.append(self.wandb.finish)
        for closer in closers:
            try:
                closer()
            except Exception as e:
                if not quiet:
                    raise
                log.warning("could not close the metrics files in %s: %s", self.out, e)


def _wandb_run(project: str, out: Path, config: dict[str, Any]) -> Any:
    """A W&B run for ``project`` (resumed across restarts of this output folder: its id is kept in
    ``out/wandb_id``), or None with one warning when the ``wandb`` package is missing."""
    try:
        import wandb
    except ImportError:
        log.warning("wandb_project=%s but the wandb package is not installed (pip install wandb): logging to "
                    "metrics.csv and TensorBoard only", project)
        return None
    id_file = out / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=project, dir=str(out), id=run_id, resume="allow", config=config, name=out.name)


class _NoBar:
    total = 0

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
