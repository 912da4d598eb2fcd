"""Training configuration: one dataclass with the official DINO argument names.

Every field is a flag of ``dino-fast train`` (``--lr 1e-3``) and a key of a YAML
config (``--config file.yaml``); flags given on the command line win over the file.
Unknown keys and bad values are rejected with one line that names them.
"""
from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dino_fast.errors import ConfigError

__all__ = ["TrainConfig", "ConfigError", "load_config", "resolve_config_path", "PRESETS", "CHOICES", "OFFICIAL_FLAGS"]


# Values each choice field accepts (one place: validation, -h and the docs read it).
CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ("vit_tiny", "vit_small", "vit_base", "deit_tiny", "deit_small", "resnet50"),
    "attn_backend": ("auto", "sdpa", "varlen", "flex", "xformers", "math"),
    "loss_impl": ("auto", "triton", "torch", "fused_head"),
    "ema_impl": ("auto", "triton", "foreach"),
    "optimizer": ("adamw", "sgd", "lars"),
    "data_backend": ("auto", "dali", "torchvision"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "centering": ("center", "sinkhorn_knopp"),
}
# The official main_dino.py flags (name, type and default are the official ones, except where a
# field's docstring says how and why it differs).
OFFICIAL_FLAGS = (
    "arch", "patch_size", "out_dim", "norm_last_layer", "momentum_teacher", "use_bn_in_head", "warmup_teacher_temp",
    "teacher_temp", "warmup_teacher_temp_epochs", "use_fp16", "weight_decay", "weight_decay_end", "clip_grad",
    "batch_size_per_gpu", "epochs", "freeze_last_layer", "lr", "warmup_epochs", "min_lr", "optimizer",
    "drop_path_rate", "global_crops_scale", "local_crops_number", "local_crops_scale", "data_path", "output_dir",
    "saveckp_freq", "seed", "num_workers", "dist_url", "local_rank",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run is built from; immutable (a changed run is a new config, ``replace``)."""

    # --- model ---------------------------------------------------------------
    arch: str = "vit_small"
    """Backbone: vit_tiny | vit_small | vit_base (deit_tiny / deit_small: official aliases) | resnet50."""
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
    use_bn_in_head: bool = False
    """BatchNorm after the hidden linears of the head (official; meant for convnets)."""
    attn_backend: str = "auto"
    """Attention kernel: auto (the fastest that runs here, logged at start) | sdpa | varlen | flex | xformers | math."""
    packed_multicrop: bool = False
    """Run all crops in one backbone pass with a block-diagonal mask."""
    # --- DINO loss / teacher -------------------------------------------------
    momentum_teacher: float = 0.996
    """Base EMA momentum of the teacher, cosine-scheduled to 1."""
    teacher_temp: float = 0.04
    """Final teacher temperature."""
    warmup_teacher_temp: float = 0.04
    """Initial teacher temperature (linear warm-up)."""
    warmup_teacher_temp_epochs: int = 0
    """Epochs of teacher-temperature warm-up (official default 0; the paper's recipe uses 30)."""
    student_temp: float = 0.1
    """Student temperature."""
    center_momentum: float = 0.9
    """EMA momentum of the teacher-output center."""
    centering: str = "center"
    """Teacher centering: center (official DINO EMA center) | sinkhorn_knopp (DINOv2, 3 iterations)."""
    koleo_weight: float = 0.0
    """Weight of the KoLeo regulariser on the student's global-view CLS features (DINOv2: 0.1; 0: off)."""
    ibot_weight: float = 0.0
    """Weight of iBOT's masked-patch loss on the student's global views (DINOv2: 1.0; 0: off; ViTs only)."""
    ibot_separate_head: bool = False
    """iBOT: a patch head of its own (true) or the DINO head shared (DINOv2's default)."""
    ibot_out_dim: int = 0
    """iBOT: output dimension of a separate patch head (0: out_dim; a shared head has out_dim)."""
    ibot_mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    """iBOT: range of the fraction of patches masked in a masked sample."""
    ibot_mask_sample_probability: float = 0.5
    """iBOT: fraction of the global-view samples that are masked."""
    loss_impl: str = "auto"
    """DINO loss: auto (fused Triton kernel on CUDA) | triton | torch | fused_head (the head's last layer
    fused into the loss: the B x V x K student logits are never written)."""
    ema_impl: str = "auto"
    """Teacher EMA implementation: auto | triton | foreach."""
    # --- optimisation --------------------------------------------------------
    epochs: int = 100
    """Training epochs."""
    batch_size_per_gpu: int = 64
    """Images per process and step (per micro-batch with accum_steps > 1)."""
    accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation; EMA, schedules, center once per step)."""
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
    """Optimizer: adamw | sgd | lars (LARS as the official: no decay or adaptation on biases and norms)."""
    # --- data ----------------------------------------------------------------
    data_path: str = ""
    """ImageFolder root (folder per class); required (the official default is a placeholder path)."""
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
    """Loader: auto (DALI where it is installed, on GPU or CPU) | dali | torchvision."""
    num_workers: int = 10
    """Loader worker processes (threads for DALI)."""
    # --- run -----------------------------------------------------------------
    output_dir: str = "."
    """Where checkpoints, metrics.csv, log.txt and TensorBoard logs go (one run per folder: locked)."""
    seed: int = 0
    """Seed of everything (model init, data order, augmentations)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 (with GradScaler) | fp32."""
    use_fp16: bool = False
    """Official flag: fp16 autocast + GradScaler (= --precision fp16). Official default true; here
    false, because --precision auto already runs bf16 on CUDA, which needs no loss scaling."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace, cuDNN): resume is
    then bit-identical on CUDA too. Costs speed on CUDA (deterministic cuBLAS/cuDNN/scatter kernels)."""
    max_steps: int = 0
    """Stop after this many steps (0: run all epochs); schedules still span all epochs."""
    time_budget_min: float = 0.0
    """Wall-clock budget in minutes (0: none): epochs are sized to fit it after timing a few steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and at the end and every epoch end); the newest 2 are kept."""
    saveckp_freq: int = 20
    """Keep a numbered snapshot every N epochs (0: none), besides the rolling latest checkpoints."""
    save_official_checkpoint: bool = False
    """Also write checkpoint.pth (and checkpointNNNN.pth snapshots) in the official main_dino.py layout."""
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
    dist_url: str = "env://"
    """Official flag, accepted: torchrun's environment sets up the process group."""
    local_rank: int = 0
    """Official flag, accepted and ignored: torchrun sets LOCAL_RANK."""

    def __post_init__(self) -> None:
        for name in ("global_crops_scale", "local_crops_scale", "ibot_mask_ratio_min_max"):
            value = tuple(float(x) for x in getattr(self, name))
            object.__setattr__(self, name, value)  # frozen: normalised once, here
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config {name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        if self.patch_size not in (8, 16):
            raise ConfigError(f"config patch_size={self.patch_size}: must be 8 or 16")
        for name in ("global_crops_scale", "local_crops_scale"):
            if len(getattr(self, name)) != 2 or not 0 < getattr(self, name)[0] <= getattr(self, name)[1] <= 1:
                raise ConfigError(f"config {name}={getattr(self, name)}: need two numbers 0 < low <= high <= 1")
        if not self.arch.startswith("resnet"):
            for name in ("global_crops_size", "local_crops_size"):
                if getattr(self, name) % self.patch_size:
                    raise ConfigError(f"config {name}={getattr(self, name)} is not a multiple of "
                                      f"patch_size={self.patch_size}")
        positive = ("out_dim", "epochs", "batch_size_per_gpu", "accum_steps", "lr", "checkpoint_every", "log_every",
                    "student_temp", "teacher_temp", "warmup_teacher_temp", "knn_k")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"config {name}={getattr(self, name)}: must be > 0")
        nonneg = ("local_crops_number", "warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer",
                  "max_steps", "time_budget_min", "depth", "clip_grad", "num_workers", "knn_every_min", "drop_path_rate",
                  "min_lr", "weight_decay", "weight_decay_end", "saveckp_freq", "koleo_weight", "local_rank",
                  "ibot_weight", "ibot_out_dim")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"config {name}={getattr(self, name)}: must be >= 0")
        if not 0 <= self.momentum_teacher <= 1 or not 0 <= self.center_momentum <= 1:
            raise ConfigError("config momentum_teacher and center_momentum must lie in [0, 1]")
        if self.use_fp16 and self.precision not in ("auto", "fp16"):
            raise ConfigError(f"config use_fp16=true contradicts precision={self.precision!r}: give one of them")
        if self.packed_multicrop and self.arch.startswith("resnet"):
            raise ConfigError("config packed_multicrop=true needs a ViT (token sequences); resnet50 runs one "
                              "pass per resolution: drop --packed_multicrop")
        if self.ibot_weight > 0:
            lo, hi = self.ibot_mask_ratio_min_max
            if self.arch.startswith("resnet"):
                raise ConfigError("config ibot_weight > 0 masks patch tokens: it needs a ViT arch, not resnet50")
            if not 0 <= lo <= hi < 1 or not 0 <= self.ibot_mask_sample_probability <= 1:
                raise ConfigError("config ibot_mask_ratio_min_max needs 0 <= low <= high < 1 and "
                                  "ibot_mask_sample_probability a probability")
            if self.global_crops_size // self.patch_size < 2:
                raise ConfigError(f"config ibot_weight > 0 needs >= 2 patches per side of a global crop, got "
                                  f"{self.global_crops_size} px / patch {self.patch_size}")
            if not self.ibot_separate_head and self.ibot_out_dim not in (0, self.out_dim):
                raise ConfigError("config ibot_out_dim differs from out_dim but the DINO head is shared: set "
                                  "ibot_separate_head true")
            if self.loss_impl == "fused_head" and not self.ibot_separate_head:
                raise ConfigError("config loss_impl fused_head with a shared iBOT head: the patch logits need the "
                                  "head's last layer; set ibot_separate_head true or another loss_impl")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, name) < 1e-3:
                warnings.warn(f"config {name}={getattr(self, name)} is below 1e-3: logits / temperature will "
                              f"overflow fp32 softmax inputs (official values: 0.04-0.1)", UserWarning, stacklevel=3)

    @property
    def amp_precision(self) -> str:
        """``precision`` with the official ``use_fp16`` folded in."""
        return "fp16" if self.use_fp16 else self.precision

    @property
    def backbone_arch(self) -> str:
        """``arch`` with the official DeiT aliases mapped (main_dino.py: ``arch.replace("deit", "vit")``)."""
        return self.arch.replace("deit", "vit")

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
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):  # + official bool_flag's
                    raise ValueError(value)
                return low in ("true", "1", "yes", "on")
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


PRESETS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or the name of a preset in ``dino_fast/configs`` (``demo``, ``tiny_imagenet``...)."""
    p = Path(path)
    if not p.exists() and (PRESETS / f"{path}.yaml").exists():
        return PRESETS / f"{path}.yaml"
    return p


def _read_yaml(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The keys of a config file; ``base: <file or preset>`` in it loads that one first (its keys
    are overridden by this file's)."""
    import yaml

    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"config file {p} is its own base (base: chain {' -> '.join(map(str, seen))})")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    base = loaded.pop("base", None)
    TrainConfig.from_dict(loaded, source=str(p))  # key check with the file named
    data = _read_yaml(base, seen + (p.resolve(),)) if base else {}
    return {**data, **loaded}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from an optional YAML file (or preset name), then ``overrides`` on top."""
    data = _read_yaml(path) if path else {}
    data.update(overrides or {})
    return TrainConfig.from_dict(data, source=str(path) if path else "arguments")
