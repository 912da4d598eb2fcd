"""What a resume checks before training goes on: that the checkpoint fits the model (the flags
that differ are named), and that the run continues on the data and the batch it was planned for.

A checkpoint records what its run trained on (:meth:`dino_fast.data.build.TrainData.identity`:
root, classes, number of images, a fingerprint of the file list) and its plan (steps per epoch,
global batch, lr). Resuming with other data, classes or batch changes what every later step means
(a step's epoch, the sample order, the lr scaling); so the resume stops and says exactly what
differs, unless ``--allow_data_change true``, which re-plans from the new data and says how.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dino_fast.checkpoint_read import read_checkpoint_values
from dino_fast.plan import RunPlan

__all__ = ["MODEL_KEYS", "mismatch_hint", "data_changes", "plan_changes"]

log = logging.getLogger("dino_fast")

# Config keys that fix the model's shapes: named when a checkpoint does not fit.
MODEL_KEYS = ("arch", "patch_size", "depth", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "norm_last_layer",
              "use_bn_in_head", "optimizer", "ibot_weight", "ibot_separate_head", "ibot_out_dim")


def mismatch_hint(path: Path, ours: dict[str, Any]) -> str:
    """'. The checkpoint was trained with --arch vit_small; this run has --arch vit_tiny: ...' for
    the model-shaping keys that differ ('' when none does or the config cannot be read)."""
    try:
        saved = json.loads(read_checkpoint_values(path, {"train.config": ""})["train.config"])
    except Exception:
        return ""
    diff = [(k, saved[k], ours[k]) for k in MODEL_KEYS if k in saved and saved[k] != ours[k]]
    if not diff:
        return ""
    theirs = " ".join(f"--{k} {a}" for k, a, _ in diff)
    mine = " ".join(f"--{k} {b}" for k, _, b in diff)
    return f". The checkpoint was trained with {theirs}; this run has {mine}: change those flags"


def _names(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def data_changes(saved: dict[str, Any] | None, ours: dict[str, Any]) -> list[str]:
    """What differs between the data a checkpoint was trained on and this run's (empty: the same
    files, possibly under another root). ``saved`` None: the checkpoint predates the record."""
    if not saved:
        return []
    out = []
    if saved["classes"] != ours["classes"]:
        gone = [c for c in saved["classes"] if c not in ours["classes"]]
        new = [c for c in ours["classes"] if c not in saved["classes"]]
        what = "; ".join(filter(None, [gone and f"missing {_names(gone)}", new and f"new {_names(new)}"])) or "reordered"
        out.append(f"classes {len(saved['classes'])} -> {len(ours['classes'])} ({what})")
    if saved["images"] != ours["images"]:
        out.append(f"images {saved['images']:,} -> {ours['images']:,}")
    elif saved["fingerprint"] != ours["fingerprint"]:
        out.append("the same number of images but other files")
    if out and saved["root"] != ours["root"]:
        out.insert(0, f"data_path {saved['root']} -> {ours['root']}")
    return out


def plan_changes(saved: RunPlan | None, ours: RunPlan, saved_cfg: dict[str, Any] | None, saved_world: int,
                 cfg: dict[str, Any], world: int) -> list[str]:
    """How this run's batch differs from the checkpoint's: the global batch (what the lr scales
    with) and the steps per epoch (what a step means). Another GPU count giving the same global
    batch is no change (checkpoints reshard)."""
    if saved is None or saved_cfg is None:
        return []

    def global_batch(c: dict[str, Any], w: int) -> int:
        return int(c["batch_size_per_gpu"]) * int(c.get("accum_steps", 1)) * w

    out = []
    before, after = global_batch(saved_cfg, saved_world), global_batch(cfg, world)
    if before != after:
        parts = [f"--{k} {saved_cfg.get(k, 1)} -> {cfg[k]}" for k in ("batch_size_per_gpu", "accum_steps")
                 if saved_cfg.get(k, 1) != cfg[k]] + ([f"{saved_world} -> {world} processes"] if saved_world != world
                                                      else [])
        out.append(f"global batch {before} -> {after} ({', '.join(parts)})")
    if saved.niter_per_epoch != ours.niter_per_epoch:
        out.append(f"steps per epoch {saved.niter_per_epoch} -> {ours.niter_per_epoch}")
    return out
