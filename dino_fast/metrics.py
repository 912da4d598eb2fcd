"""What a run writes as it goes, on rank 0: ``metrics.csv`` (every ``log_every`` steps, appended
across resumes), TensorBoard scalars, the official ``log.txt`` (one JSON line per epoch with
``train_loss``, ``train_lr``, ``train_wd``, ``epoch``, as main_dino.py writes it) and a progress bar."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["CSV_FIELDS", "MetricsWriter", "progress_bar"]

log = logging.getLogger("dino_fast")

CSV_FIELDS = ["step", "epoch", "loss", "lr", "wd", "momentum", "teacher_temp", "img_per_s", "train_min",
              "knn_top1", "knn_top5"]


class MetricsWriter:
    """metrics.csv, TensorBoard and log.txt; a no-op where ``enabled`` is False (ranks > 0)."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled, self.out = enabled, out
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

    def write_epoch(self, epoch: int, stats: dict[str, float]) -> None:
        """One official log.txt line: ``{"train_loss": ..., "train_lr": ..., "train_wd": ..., "epoch": e}``."""
        if not self.enabled:
            return
        line = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
        with open(self.out / "log.txt", "a") as f:
            f.write(json.dumps(line) + "\n")

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


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
