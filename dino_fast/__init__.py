"""dino_fast: a performance-engineered DINO self-supervised pretraining engine.

The public API: the drop-in fused loss, the teacher EMA, the models, the trainer and
its config, evaluation, and checkpoint interop.
"""
from pathlib import Path as _Path

# kernels/ sits beside dino_fast/ in the source tree and installs as dino_fast.kernels. A checkout
# used through PYTHONPATH alone (no install, e.g. an offline GPU machine) finds it here too.
if (_Path(__file__).parent.parent / "kernels" / "__init__.py").is_file():
    __path__.append(str(_Path(__file__).parent.parent))

from dino_fast.config import ConfigError, TrainConfig, load_config
from dino_fast.data.multicrop import DINOMultiCrop
from dino_fast.errors import DinoFastError
from dino_fast.ema import TeacherEMA, update_teacher_
from dino_fast.eval.knn import knn_classifier, knn_eval
from dino_fast.dino_head_loss import DINOHeadLoss
from dino_fast.dino_loss import DINOLoss, dino_loss_reference
from dino_fast.ibot import iBOTPatchLoss
from dino_fast.koleo import koleo_loss
from dino_fast.models import DINOHead, DinoViT, MultiCropWrapper, build_backbone, set_attn_backend
from dino_fast.pretrained import load_pretrained
from dino_fast.train import Trainer, train_main

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DINOHead", "DINOHeadLoss", "DINOLoss", "DINOMultiCrop", "DinoFastError", "DinoViT", "MultiCropWrapper",
    "TeacherEMA", "TrainConfig", "Trainer", "build_backbone", "dino_loss_reference", "iBOTPatchLoss",
    "knn_classifier", "knn_eval", "koleo_loss", "load_config", "load_pretrained", "set_attn_backend", "train_main",
    "update_teacher_",
]
