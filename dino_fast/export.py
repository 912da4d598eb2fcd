"""Single-file exports of a training run: the official ``main_dino.py`` checkpoint layout (for the
official ``eval_knn.py`` / ``eval_linear.py``), a timm ViT state dict, or the officially released
backbone layout. ``dino-fast export`` on a checkpoint directory; ``--save_official_checkpoint true``
writes the official file during training (:func:`write_official_checkpoint`).

    dino-fast export --checkpoint out/checkpoints/step-00001000 --format official --output checkpoint.pth
    dino-fast export --checkpoint out/checkpoints/step-00001000 --format timm --output vit_small_dino.pth
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence


from dino_fast.checkpoint import atomic_torch_save, consolidate, read_checkpoint_values
from dino_fast.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from dino_fast.train import Trainer

__all__ = ["main", "export_checkpoint", "write_official_checkpoint"]

FORMATS = ("official", "timm", "released")


def _epochs_done(path: Path, step: int) -> int:
    import json

    plan = json.loads(read_checkpoint_values(path, {"train.plan": ""})["train.plan"])
    return step // plan["niter_per_epoch"]


def export_checkpoint(checkpoint: str | Path, fmt: str, output: str | Path, key: str = "teacher") -> Path:
    """Write ``checkpoint`` (a checkpoint directory) as one ``.pth`` file in ``fmt``; returns the path."""
    from dino_fast.official import to_official_checkpoint
    from dino_fast.pretrained import load_pretrained, save_official_backbone, save_timm_state_dict

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (step-XXXXXXXX/ in <output_dir>/checkpoints)")
    full = consolidate(path)
    if fmt == "official":
        # Optimizer state is not exported: the official evaluations read the teacher only.
        save = to_official_checkpoint(full["student"], full["teacher"], {"state": {}, "param_groups": []},
                                      _epochs_done(path, full["step"]), full["config"], full["dino_loss"])
        return atomic_torch_save(save, output)
    backbone = load_pretrained(full, key=key)
    return (save_timm_state_dict if fmt == "timm" else save_official_backbone)(backbone, output)


def write_official_checkpoint(trainer: "Trainer", snapshot_epoch: int | None) -> None:
    """Collective: ``output_dir/checkpoint.pth`` in the official layout (and
    ``checkpoint{epoch:04}.pth`` at a snapshot epoch, as main_dino.py's ``saveckp_freq``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dino_fast.official import to_official_checkpoint

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = get_model_state_dict(trainer.student, options=full)
    teacher = get_model_state_dict(trainer.teacher, options=full)
    if not trainer.main:
        return
    # a sharded optimizer's full state would need gathering: the official evaluations never read it
    optimizer: dict[str, Any] = ({"state": {}, "param_groups": []} if trainer.sharded
                                 else trainer.optimizer.state_dict())
    save = to_official_checkpoint(student, teacher, optimizer, trainer.epoch, trainer.cfg.to_dict(),
                                  trainer.loss_fn.state_dict(),
                                  trainer.scaler.state_dict() if trainer.scaler is not None else None)
    atomic_torch_save(save, trainer.out / "checkpoint.pth")
    if snapshot_epoch is not None:
        atomic_torch_save(save, trainer.out / f"checkpoint{snapshot_epoch:04d}.pth")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dino-fast export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (<output_dir>/checkpoints/step-*)")
    p.add_argument("--format", default="official", choices=FORMATS,
                   help="official: main_dino.py checkpoint layout; timm: timm ViT state dict; released: the "
                        "officially released backbone weights layout")
    p.add_argument("--output", required=True, help="the .pth file to write (atomically)")
    p.add_argument("--key", default="teacher", help="which model to export for timm / released")
    args = p.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.format, args.output, args.key)
    print(f"wrote {out}")
    return 0
