"""One-way converter: resume from the single-file ``checkpoint-XXXXXXXX.pth`` of earlier versions.

The file is read with ``torch.load(weights_only=True)`` (numpy's RNG-state arrays allowed), its
format and the models' keys and shapes are checked, then each part is loaded; the run goes on
and writes checkpoint directories from then on."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dino_fast.checkpoint_read import safe_load_pth
from dino_fast.errors import CheckpointError

__all__ = ["load_legacy", "LEGACY_FORMAT"]

LEGACY_FORMAT = "dino_fast"


def _check_shapes(path: Path, name: str, saved: dict[str, Any], part: Any, hint: str) -> None:
    ours = {k: tuple(v.shape) for k, v in part.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in saved.items()}
    problems = [f"{name}.{k} missing" for k in sorted(ours.keys() - theirs.keys())]
    problems += [f"{name}.{k} unexpected" for k in sorted(theirs.keys() - ours.keys())]
    problems += [f"{name}.{k}: checkpoint {theirs[k]}, this model {ours[k]}" for k in sorted(ours.keys() & theirs.keys())
                 if ours[k] != theirs[k]]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(problems[:4])}{more}{hint}")


def load_legacy(path: Path, parts: dict[str, Any], hint: str = "") -> None:
    obj = safe_load_pth(path)
    if not isinstance(obj, dict) or obj.get("format") != LEGACY_FORMAT:
        raise CheckpointError(f"{path} is not a dino_fast training checkpoint")
    needed = ("student", "teacher", "optimizer", "dino_loss", "step", "config", "rng")
    missing = [k for k in needed if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a complete dino_fast training checkpoint (no {', '.join(missing)})")
    for name in ("student", "teacher"):
        _check_shapes(path, name, obj[name], parts[name], hint)
    parts["student"].load_state_dict(obj["student"], full=True)
    parts["teacher"].load_state_dict(obj["teacher"], full=True)
    parts["optimizer"].load_legacy(obj["optimizer"])
    parts["dino_loss"].load_state_dict(obj["dino_loss"])
    parts["train"].load_legacy(obj["step"], obj["config"], obj["rng"])
