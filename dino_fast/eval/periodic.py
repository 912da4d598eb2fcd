"""The k-NN evaluation of the teacher during training: when it is due and what it adds to a log row.

``--knn_every_min N`` with ``--val_path``: the teacher's k-NN top-1/top-5 on the val folder at
step 0 (the random-init baseline), every N minutes of training time and at the end, written into
``metrics.csv`` beside the loss. The training loop asks :meth:`PeriodicKnn.due` at each log row
and calls the evaluator when it says so; the cadence lives here, not in the loop.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["PeriodicKnn"]

log = logging.getLogger("dino_fast")


class PeriodicKnn:
    """k-NN of a backbone every ``every_min`` minutes of training time (``cfg``: official names plus
    knn_every_min, knn_k, val_path, eval_size). ``compute_dtype`` is the run's: a run in fp32
    evaluates in fp32."""

    def __init__(self, cfg: Any, device: torch.device, compute_dtype: torch.dtype) -> None:
        self.cfg, self.device, self.compute_dtype = cfg, device, compute_dtype
        self.every_s = 60.0 * cfg.knn_every_min
        self.last_s = 0.0

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device, compute_dtype: torch.dtype) -> "PeriodicKnn | None":
        """The evaluator ``cfg`` asks for, or None (no ``knn_every_min`` or no ``val_path``)."""
        return cls(cfg, device, compute_dtype) if cfg.knn_every_min and cfg.val_path else None

    def due(self, train_s: float, done: bool) -> bool:
        """True at the end and once ``every_min`` minutes of training time passed since the last
        evaluation (``train_s``: the training seconds every rank agrees on)."""
        return done or train_s - self.last_s >= self.every_s

    def __call__(self, backbone: nn.Module, step: int, train_s: float) -> dict[str, float]:
        """Evaluate now; returns the log-row fields ``knn_top1`` / ``knn_top5``."""
        from dino_fast.eval.knn import knn_eval

        cfg = self.cfg
        size = cfg.eval_size or cfg.global_crops_size
        res = knn_eval(backbone, cfg.data_path, cfg.val_path, size, ks=(cfg.knn_k,), num_workers=cfg.num_workers,
                       device=self.device, compute_dtype=self.compute_dtype)
        top1, top5 = res[cfg.knn_k]
        self.last_s = train_s
        log.info("step %d: k-NN (k=%d) top-1 %.2f top-5 %.2f", step, cfg.knn_k, top1, top5)
        return {"knn_top1": top1, "knn_top5": top5}

