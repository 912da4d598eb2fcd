"""Training configuration: one dataclass with the official DINO argument names.

Every field is a flag of ``dino-fast train`` (``--lr 1e-3``) and a key of a YAML
config (``--config file.yaml``); flags given on the command line win over the file.
Unknown keys and bad values are rejected with one line that names them.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dino_fast.center import CENTERINGS
from dino_fast.data.build import DATA_BACKENDS
from dino_fast.dino_head_loss import LOSS_IMPLS, fuses_last_layer
from dino_fast.ema import IMPLS as EMA_IMPLS
from dino_fast.errors import ConfigError
from dino_fast.models.attention import BACKENDS as ATTENTION_BACKENDS
from dino_fast.models.build import ARCH_CHOICES, arch_family
from dino_fast.models.torchvision_archs import has_resnet_stem
from dino_fast.optim import OPTIMIZERS
from dino_fast.precision import PRECISIONS

__all__ = ["TrainConfig", "ConfigError", "load_config", "resolve_config_path", "PRESETS", "CHOICES", "RANGES",
           "OFFICIAL_FLAGS", "field_docs", "in_range", "suggest", "write_config"]


# Values each choice field accepts, read from the modules that implement them (validation and -h
# read this table; the modules check their own arguments with the same constants).
CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ARCH_CHOICES,
    "attn_backend": ATTENTION_BACKENDS,
    "loss_impl": LOSS_IMPLS,
    "ema_impl": EMA_IMPLS,
    "optimizer": OPTIMIZERS,
    "data_backend": DATA_BACKENDS,
    "precision": PRECISIONS,
    "centering": CENTERINGS,
}
# The range of every numeric field, in interval notation: "[" / "]" closed, "(" / ")" open, inf
# unbounded. Every value must also be finite (NaN and inf fail the comparisons). __post_init__ checks
# them and -h shows them; tests/test_config.py holds that every int and float field has a range.
RANGES: dict[str, str] = {
    "patch_size": "[1, inf)", "depth": "[0, inf)", "drop_path_rate": "[0, 1)", "out_dim": "[1, inf)",
    "head_hidden_dim": "[1, inf)", "head_bottleneck_dim": "[1, inf)",
    "momentum_teacher": "[0, 1]", "teacher_temp": "(0, inf)", "warmup_teacher_temp": "(0, inf)",
    "warmup_teacher_temp_epochs": "[0, inf)", "student_temp": "(0, inf)", "center_momentum": "[0, 1]",
    "koleo_weight": "[0, inf)", "ibot_weight": "[0, inf)", "ibot_out_dim": "[0, inf)",
    "ibot_mask_sample_probability": "[0, 1]",
    "epochs": "[1, inf)", "batch_size_per_gpu": "[1, inf)", "accum_steps": "[1, inf)", "lr": "(0, inf)",
    "min_lr": "[0, inf)", "warmup_epochs": "[0, inf)", "weight_decay": "[0, inf)", "weight_decay_end": "[0, inf)",
    "clip_grad": "[0, inf)", "freeze_last_layer": "[0, inf)",
    "local_crops_number": "[0, inf)", "global_crops_size": "[1, inf)", "local_crops_size": "[1, inf)",
    "num_workers": "[0, inf)", "seed": "[0, inf)", "max_steps": "[0, inf)", "time_budget_min": "[0, inf)",
    "checkpoint_every": "[1, inf)", "saveckp_freq": "[0, inf)", "log_every": "[1, inf)", "knn_every_min": "[0, inf)",
    "knn_k": "[1, inf)", "eval_size": "[0, inf)", "local_rank": "[0, inf)",
}


def in_range(value: float, rule: str) -> bool:
    """``value`` lies in the interval ``rule`` (RANGES notation) and is finite."""
    lo, hi = (x.strip() for x in rule[1:-1].split(","))
    if not math.isfinite(value):
        return False
    above = value >= float(lo) if rule[0] == "[" else value > float(lo)
    below = value <= float(hi) if rule[-1] == "]" else value < float(hi)
    return above and below


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

    # --- data -------------------------------------------------------------------
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
    num_workers: int = 10
    """Loader worker processes (threads for DALI)."""

    # --- model ------------------------------------------------------------------
    arch: str = "vit_small"
    """Backbone: vit_tiny | vit_small | vit_base (deit_tiny / deit_small: official aliases), an XCiT
    (xcit_small_12_p16 ...: timm's) or any torchvision classification model (resnet50, resnet18,
    convnext_tiny ...); the list: python3 -c "import dino_fast.models as m; print(*m.ARCH_CHOICES)"."""
    patch_size: int = 16
    """ViT patch size (official: 16 or 8; any size the crop sizes are multiples of, e.g. 4 on 32-px crops)."""
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
    small_image_stem: bool = False
    """A torchvision ResNet with a 3x3 stride-1 first conv and no max-pool (CIFAR-style stem for ~32-px
    inputs: a 4x4 final feature map at 32 px instead of 1x1)."""

    # --- loss -------------------------------------------------------------------
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

    # --- optimisation -----------------------------------------------------------
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
    use_fp16: bool = False
    """Official flag: fp16 autocast + GradScaler (= --precision fp16). Official default true; here
    false, because --precision auto already runs bf16 on CUDA, which needs no loss scaling."""

    # --- engine -----------------------------------------------------------------
    attn_backend: str = "auto"
    """Attention kernel: auto (the fastest that runs here, logged at start) | sdpa | varlen | flex | xformers | math."""
    packed_multicrop: bool = False
    """Run all crops in one backbone pass with a block-diagonal mask."""
    loss_impl: str = "auto"
    """DINO loss: auto (fused Triton kernel on CUDA) | triton | torch | fused_head (the head's last layer
    fused into the loss: the B x V x K student logits are never written)."""
    ema_impl: str = "auto"
    """Teacher EMA implementation: auto | triton | foreach."""
    data_backend: str = "auto"
    """Loader: auto (DALI where it is installed, on GPU or CPU) | dali | torchvision."""
    precision: str = "auto"
    """The compute dtype: auto (bf16 autocast on CUDA and on CPUs with AMX-BF16, else fp32) | bf16 | fp16 (with GradScaler) | fp32;
    training, the loader's views and the evaluations all use it (``use_fp16 true`` sets fp16)."""
    compile: bool = False
    """torch.compile each model's forward as one graph (student over all crops, teacher over the globals,
    heads included; drop path does not recompile)."""
    cuda_graphs: bool = False
    """Capture the whole step (forward, backward, clip, AdamW, EMA, center) as one CUDA graph and replay it
    (static shapes; schedules read from device buffers). On CPU the same step runs without capture. Not with
    fp16, iBOT, FSDP, activation checkpointing or another optimizer than adamw."""
    fsdp: bool = False
    """Shard student and teacher with FSDP2 even on one process (always on under torchrun with > 1 rank)."""
    activation_checkpointing: bool = False
    """Recompute the student's block activations in backward (less memory, about one more forward of compute)."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace, cuDNN): resume is
    then bit-identical on CUDA too. Costs speed on CUDA (deterministic cuBLAS/cuDNN/scatter kernels)."""

    # --- run --------------------------------------------------------------------
    output_dir: str = "."
    """Where checkpoints, metrics.csv, log.txt and TensorBoard logs go (one run per folder: locked)."""
    seed: int = 0
    """Seed of everything (model init, data order, augmentations)."""
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
    """'' (fresh), 'auto' (newest readable checkpoint in output_dir) or a checkpoint path."""
    allow_data_change: bool = False
    """Resume on other data, classes or batch than the checkpoint was trained on (re-planned, logged);
    without it such a resume stops and says what differs."""
    progress: bool = True
    """Show a tqdm progress bar."""
    wandb_project: str = ""
    """Also log the metrics to this Weights & Biases project (needs `pip install wandb`; '' = off)."""
    dist_url: str = "env://"
    """Official flag, accepted: torchrun's environment sets up the process group."""
    local_rank: int = 0
    """Official flag, accepted and ignored: torchrun sets LOCAL_RANK."""

    def __post_init__(self) -> None:
        for name in ("global_crops_scale", "local_crops_scale", "ibot_mask_ratio_min_max"):
            value = tuple(float(x) for x in getattr(self, name))
            object.__setattr__(self, name, value)  # frozen: normalised once, here
        try:  # before the choices: one line saying why (a detection model...), not the whole list
            family = arch_family(self.arch)
        except ValueError as e:
            raise ConfigError(f"config arch={self.arch!r}: {e}") from None
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config {name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        for name in ("global_crops_scale", "local_crops_scale"):
            if len(getattr(self, name)) != 2 or not 0 < getattr(self, name)[0] <= getattr(self, name)[1] <= 1:
                raise ConfigError(f"config {name}={getattr(self, name)}: need two numbers 0 < low <= high <= 1")
        if family == "vit":
            for name in ("global_crops_size", "local_crops_size"):
                if getattr(self, name) % self.patch_size:
                    raise ConfigError(f"config {name}={getattr(self, name)} is not a multiple of "
                                      f"patch_size={self.patch_size}")
        for name, rule in RANGES.items():
            if not in_range(getattr(self, name), rule):
                raise ConfigError(f"config {name}={getattr(self, name)}: must be a finite number in {rule}")
        if self.use_fp16 and self.precision not in ("auto", "fp16"):
            raise ConfigError(f"config use_fp16=true contradicts precision={self.precision!r}: give one of them")
        if self.use_fp16:  # the official flag is one way of saying precision fp16: one name from here on
            object.__setattr__(self, "precision", "fp16")
        if self.packed_multicrop and family != "vit":
            raise ConfigError(f"config packed_multicrop=true needs a ViT (token sequences); {self.arch} runs one "
                              "pass per resolution: drop --packed_multicrop")
        if self.small_image_stem and not has_resnet_stem(self.arch):
            raise ConfigError(f"config small_image_stem=true replaces a torchvision ResNet's stem (resnet*, resnext*, "
                              f"wide_resnet*); {self.arch} has none: drop --small_image_stem")
        if self.cuda_graphs:
            from dino_fast.cuda_graphs import graph_refusal

            why = graph_refusal(self)
            if why:
                raise ConfigError(f"config cuda_graphs=true {why}")
        if self.ibot_weight > 0:
            lo, hi = self.ibot_mask_ratio_min_max
            if family != "vit":
                raise ConfigError(f"config ibot_weight > 0 masks patch tokens: it needs a ViT arch, not {self.arch}")
            if not 0 <= lo <= hi < 1 or not 0 <= self.ibot_mask_sample_probability <= 1:
                raise ConfigError("config ibot_mask_ratio_min_max needs 0 <= low <= high < 1 and "
                                  "ibot_mask_sample_probability a probability")
            if self.global_crops_size // self.patch_size < 2:
                raise ConfigError(f"config ibot_weight > 0 needs >= 2 patches per side of a global crop, got "
                                  f"{self.global_crops_size} px / patch {self.patch_size}")
            if not self.ibot_separate_head and self.ibot_out_dim not in (0, self.out_dim):
                raise ConfigError("config ibot_out_dim differs from out_dim but the DINO head is shared: set "
                                  "ibot_separate_head true")
            if fuses_last_layer(self.loss_impl) and not self.ibot_separate_head:
                raise ConfigError("config loss_impl fused_head with a shared iBOT head: the patch logits need the "
                                  "head's last layer; set ibot_separate_head true or another loss_impl")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, name) < 1e-3:
                warnings.warn(f"config {name}={getattr(self, name)} is below 1e-3: logits / temperature will "
                              f"overflow fp32 softmax inputs (official values: 0.04-0.1)", UserWarning, stacklevel=3)

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
                raise ConfigError(f"unknown config key '{key}' in {source}{suggest(key, names)}")
        return cls(**{k: _coerce(cls, k, v, source) for k, v in d.items()})

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})


def field_docs() -> dict[str, tuple[str, str]]:
    """Field name -> (its section: data | model | loss | optimisation | engine | run, its docstring),
    read from this file's source (the one place they are written; ``-h`` shows them)."""
    import inspect
    import re

    out: dict[str, tuple[str, str]] = {}
    section = ""
    src = inspect.getsource(TrainConfig)
    for m in re.finditer(r'^    # --- (\w+) -+$|^    (\w+): [^\n]+\n    """(.*?)"""', src, re.M | re.S):
        if m.group(1):
            section = m.group(1)
        else:
            out[m.group(2)] = (section, " ".join(m.group(3).split()))
    return out


def suggest(word: str, choices: list[str], prefix: str = "") -> str:
    """`` (did you mean '<prefix><closest>'?)`` for the closest of ``choices``, or ''."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


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


def write_config(cfg: TrainConfig, path: str | Path) -> Path:
    """``cfg`` as a YAML file that :func:`load_config` reads back equal (written atomically)."""
    import os
    import tempfile

    import yaml

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("# the resolved config of this run (dino-fast train --config <this file> runs it again)\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
    return path


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from an optional YAML file (or preset name), then ``overrides`` on top."""
    data = _read_yaml(path) if path else {}
    data.update(overrides or {})
    return TrainConfig.from_dict(data, source=str(path) if path else "arguments")
