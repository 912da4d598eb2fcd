"""dino_fast: a performance-engineered DINO self-supervised pretraining engine.

The public API: the drop-in fused loss, the teacher EMA, the models, the trainer and
its config, evaluation, and checkpoint interop.
"""
from dino_fast.config import ConfigError, TrainConfig, load_config
from dino_fast.ema import TeacherEMA, update_teacher_
from dino_fast.eval.knn import knn_classifier, knn_eval
from dino_fast.loss import DINOLoss, dino_loss_reference
from dino_fast.models import DINOHead, DinoViT, MultiCropWrapper, build_backbone, set_attn_backend
from dino_fast.pretrained import load_pretrained
from dino_fast.train import Trainer, train

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DINOHead", "DINOLoss", "DinoViT", "MultiCropWrapper", "TeacherEMA", "TrainConfig", "Trainer",
    "build_backbone", "dino_loss_reference", "knn_classifier", "knn_eval", "load_config", "load_pretrained",
    "set_attn_backend", "train", "update_teacher_",
]
