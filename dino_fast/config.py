"""Training configuration: one dataclass with the official DINO argument names.

Every field is a flag of ``dino-fast train`` (``--lr 1e-3``) and a key of a YAML
config (``--config file.yaml``); flags given on the command line win over the file.
Unknown keys and bad values are rejected with one line that names them.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dino_fast.errors import ConfigError

__all__ = ["TrainConfig", "ConfigError", "load_config"]


@dataclass
class TrainConfig:
    # --- model ---------------------------------------------------------------
    arch: str = "vit_small"
    """Backbone: vit_tiny | vit_small | vit_base."""
    patch_size: int = 16
    """ViT patch size (16 or 8)."""
    depth: int = 0
    """Number of transformer blocks (0: the arch's own, 12)."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate of the student."""
    out_dim: int = 65536
    """K, the dimension of the DINO head output."""
    head_hidden_dim: int = 2048
    """Hidden width of the head MLP."""
    head_bottleneck_dim: int = 256
    """Bottleneck width before the weight-normed last layer."""
    norm_last_layer: bool = True
    """Fix the weight-norm gain of the head's last layer to 1 (stabilises training)."""
    attn_backend: str = "auto"
    """Attention backend: auto | sdpa | xformers | math."""
    packed_multicrop: bool = False
    """Run all crops in one backbone pass with a block-diagonal mask."""
    # --- DINO loss / teacher -------------------------------------------------
    momentum_teacher: float = 0.996
    """Base EMA momentum of the teacher, cosine-scheduled to 1."""
    teacher_temp: float = 0.04
    """Final teacher temperature."""
    warmup_teacher_temp: float = 0.04
    """Initial teacher temperature (linear warm-up)."""
    warmup_teacher_temp_epochs: int = 30
    """Epochs of teacher-temperature warm-up."""
    student_temp: float = 0.1
    """Student temperature."""
    center_momentum: float = 0.9
    """EMA momentum of the teacher-output center."""
    loss_impl: str = "auto"
    """DINO loss implementation: auto | triton | torch."""
    ema_impl: str = "auto"
    """Teacher EMA implementation: auto | triton | foreach."""
    # --- optimisation --------------------------------------------------------
    epochs: int = 100
    """Training epochs."""
    batch_size_per_gpu: int = 64
    """Images per process and step."""
    lr: float = 5e-4
    """Peak learning rate at batch 256 (scaled linearly by the global batch)."""
    min_lr: float = 1e-6
    """Final learning rate of the cosine schedule."""
    warmup_epochs: int = 10
    """Linear learning-rate warm-up epochs."""
    weight_decay: float = 0.04
    """Initial weight decay (cosine-scheduled)."""
    weight_decay_end: float = 0.4
    """Final weight decay."""
    clip_grad: float = 3.0
    """Per-parameter gradient-norm clip (0 disables)."""
    freeze_last_layer: int = 1
    """Epochs during which the head's last layer is not updated."""
    optimizer: str = "adamw"
    """Optimizer: adamw | sgd."""
    # --- data ----------------------------------------------------------------
    data_path: str = ""
    """ImageFolder root (folder per class). Empty with --demo: the built-in demo dataset."""
    val_path: str = ""
    """Labeled ImageFolder root for k-NN evaluation (optional)."""
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    """Scale range of the 2 global crops."""
    local_crops_number: int = 8
    """Number of local crops."""
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    """Scale range of the local crops."""
    global_crops_size: int = 224
    """Side of the global crops in pixels."""
    local_crops_size: int = 96
    """Side of the local crops in pixels."""
    data_backend: str = "auto"
    """Loader: auto (DALI when CUDA and DALI are present) | dali | torchvision."""
    num_workers: int = 4
    """Loader worker processes (threads for DALI)."""
    # --- run -----------------------------------------------------------------
    output_dir: str = "output"
    """Where checkpoints, metrics.csv and TensorBoard logs go."""
    seed: int = 0
    """Seed of everything (model init, data order, augmentations)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32."""
    max_steps: int = 0
    """Stop after this many steps (0: run all epochs); schedules still span all epochs."""
    time_budget_min: float = 0.0
    """Wall-clock budget in minutes (0: none): epochs are sized to fit it after timing a few steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and at the end)."""
    log_every: int = 10
    """Log metrics every N steps."""
    knn_every_min: float = 0.0
    """Run k-NN on val_path every N minutes during training (0: only at the end)."""
    knn_k: int = 20
    """k of the end-of-training k-NN evaluation."""
    eval_size: int = 0
    """Resize+center-crop side for k-NN features (0: global_crops_size)."""
    resume: str = ""
    """'' (fresh), 'auto' (newest checkpoint in output_dir) or a checkpoint path."""
    compile: bool = False
    """torch.compile the backbone blocks."""
    fsdp: bool = False
    """Shard student and teacher with FSDP2 even on one process (always on under torchrun with > 1 rank)."""
    activation_checkpointing: bool = False
    """Recompute the student's block activations in backward (less memory, about one more forward of compute)."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        self.global_crops_scale = tuple(float(x) for x in self.global_crops_scale)  # type: ignore[assignment]
        self.local_crops_scale = tuple(float(x) for x in self.local_crops_scale)  # type: ignore[assignment]
        choices = {
            "arch": ("vit_tiny", "vit_small", "vit_base"),
            "attn_backend": ("auto", "sdpa", "xformers", "math"),
            "loss_impl": ("auto", "triton", "torch"),
            "ema_impl": ("auto", "triton", "foreach"),
            "optimizer": ("adamw", "sgd"),
            "data_backend": ("auto", "dali", "torchvision"),
            "precision": ("auto", "bf16", "fp32"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config {name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        if self.patch_size not in (8, 16):
            raise ConfigError(f"config patch_size={self.patch_size}: must be 8 or 16")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if len(getattr(self, name)) != 2 or not 0 < lo <= hi <= 1:
                raise ConfigError(f"config {name}={getattr(self, name)}: need 0 < low <= high <= 1")
        for name in ("global_crops_size", "local_crops_size"):
            if getattr(self, name) % self.patch_size:
                raise ConfigError(f"config {name}={getattr(self, name)} is not a multiple of "
                                  f"patch_size={self.patch_size}")
        positive = ("out_dim", "epochs", "batch_size_per_gpu", "lr", "checkpoint_every", "log_every",
                    "student_temp", "teacher_temp", "warmup_teacher_temp", "knn_k")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"config {name}={getattr(self, name)}: must be > 0")
        nonneg = ("local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer",
                  "max_steps", "time_budget_min", "depth", "clip_grad", "num_workers", "knn_every_min", "drop_path_rate",
                  "min_lr", "weight_decay", "weight_decay_end")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"config {name}={getattr(self, name)}: must be >= 0")
        if not 0 <= self.momentum_teacher <= 1 or not 0 <= self.center_momentum <= 1:
            raise ConfigError("config momentum_teacher and center_momentum must lie in [0, 1]")

    # ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key '{key}' in {source}{hint}")
        return cls(**{k: _coerce(cls, k, v, source) for k, v in d.items()})

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})


def _field_type(cls: type, name: str) -> str:
    return str(next(f.type for f in fields(cls) if f.name == name))


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """Turn a YAML/CLI value into the field's type, with one clear line when it cannot."""
    typ = _field_type(cls, name)
    try:
        if typ == "bool":
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ == "float":
            return float(value)
        if typ.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            return tuple(float(v) for v in value)
        return str(value) if value is not None else ""
    except (TypeError, ValueError):
        raise ConfigError(f"config {name}={value!r} in {source}: expected {typ}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from an optional YAML file, then ``overrides`` on top."""
    data: dict[str, Any] = {}
    if path:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys to values")
        TrainConfig.from_dict(loaded, source=str(p))  # key check with the file named
        data.update(loaded)
    data.update(overrides or {})
    return TrainConfig.from_dict(data, source=str(path) if path else "arguments")
