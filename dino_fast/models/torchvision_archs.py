"""torchvision classification backbones (``--arch resnet18``, ``convnext_tiny``, ``efficientnet_b0``...).

Official ``main_dino.py`` accepts every name of ``torchvision_archs`` (the callables of
``torchvision.models``), builds ``torchvision_models.__dict__[arch]()`` (random init), sizes the
head on ``student.fc.weight.shape[1]`` and its ``MultiCropWrapper`` sets ``backbone.fc =
nn.Identity()``; so only models with an ``fc`` train there. :func:`build_torchvision` does the
same for every torchvision classification model whose classifier is a Linear layer it can name:
``fc`` (ResNet, ResNeXt, RegNet, ShuffleNet, GoogLeNet, Inception), ``classifier`` or its last
layer ``classifier[-1]`` (DenseNet; VGG, AlexNet, ConvNeXt, EfficientNet, MobileNet, MNASNet) or
``head`` (Swin): that Linear becomes an Identity and its ``in_features`` the ``embed_dim`` the
DINO head is built on. What cannot train under DINO's two crop sizes, or is no classification
model, is refused in one line (:func:`torchvision_refusal`).

``small_image_stem=True`` (a torchvision ResNet only): the first conv becomes 3x3 stride 1 and the
max-pool goes, the usual CIFAR-style stem: a 32-px input keeps a 4x4 final feature map instead of 1x1.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn
import torchvision

__all__ = ["TORCHVISION_ARCHS", "build_torchvision", "has_resnet_stem", "torchvision_refusal"]

# torchvision's other model families: their builders are no classification backbones.
_OTHER_TASKS = {"detection": "an object-detection model", "segmentation": "a semantic-segmentation model",
                "video": "a video model", "quantization": "a quantized (int8 inference-only) model",
                "optical_flow": "an optical-flow model"}
# Classification models DINO cannot train as they are, by name prefix, and why.
_UNFIT = {
    "vit_": "takes only its one input size (224 px) and DINO's global and local crops differ: use vit_tiny, "
            "vit_small or vit_base (dino_fast's ViT, any crop size)",
    "maxvit_": "takes only input sides that are multiples of 224 px and DINO's local crops are smaller",
    "squeezenet": "classifies with a 1x1 convolution, not a Linear layer the DINO head can replace",
}
# Keyword arguments a builder needs to give one (B, D) output in training too.
_BUILD_KW: dict[str, dict[str, Any]] = {
    # the auxiliary classifiers would make the training forward a tuple (official: output[0]); their
    # features are the same without them. init_weights=True is the builders' default said aloud (it
    # silences their FutureWarning about it).
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")


def _classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


TORCHVISION_ARCHS: tuple[str, ...] = tuple(sorted(
    n for n in _classification_models() if not n.startswith(tuple(_UNFIT))))


def torchvision_refusal(arch: str) -> str:
    """Why torchvision's ``arch`` is no DINO backbone (one line), '' when it is one or is no
    torchvision name at all."""
    if arch in TORCHVISION_ARCHS:
        return ""
    for prefix, why in _UNFIT.items():
        if arch.startswith(prefix) and arch in _classification_models():
            return f"torchvision's {arch} {why}"
    for module, what in _OTHER_TASKS.items():
        if arch in torchvision.models.list_models(module=getattr(torchvision.models, module)):
            return f"torchvision's {arch} is {what}, not a classification model: DINO trains classification backbones"
    return ""


def has_resnet_stem(arch: str) -> bool:
    """True for the torchvision ResNet-class models (resnet*, resnext*, wide_resnet*): a
    ``conv1`` + ``maxpool`` stem that ``small_image_stem`` can replace."""
    return arch in TORCHVISION_ARCHS and arch.startswith(_RESNET_PREFIXES)


def build_torchvision(arch: str, small_image_stem: bool = False, **kw: Any) -> nn.Module:
    """torchvision ``arch`` with random init (never downloads), its classifier Linear replaced by
    ``nn.Identity`` and ``embed_dim`` set to that Linear's ``in_features``: forward (B, 3, H, W) ->
    (B, embed_dim). ``kw`` goes to the torchvision builder (e.g. ``zero_init_residual``)."""
    why = torchvision_refusal(arch)
    if why or arch not in TORCHVISION_ARCHS:
        raise ValueError(why or f"unknown torchvision classification model {arch!r}")
    if kw.pop("weights", None) is not None:
        raise ValueError("dino_fast never downloads weights: build the model, then load a local file "
                         "(dino_fast.load_pretrained or hubconf weights=<path>)")
    if small_image_stem and not has_resnet_stem(arch):
        raise ValueError(f"small_image_stem replaces a torchvision ResNet's conv1 + maxpool; {arch} has no such stem")
    model = torchvision.models.get_model(arch, weights=None, **{**_BUILD_KW.get(arch, {}), **kw})
    model.embed_dim = _remove_classifier(model, arch)
    if small_image_stem:
        _small_image_stem_(model)
    return model


def _remove_classifier(model: nn.Module, arch: str) -> int:
    """Replace the classifier Linear by ``nn.Identity`` (official MultiCropWrapper: ``backbone.fc =
    nn.Identity()``); returns its ``in_features``, the backbone's feature size."""
    for name in ("fc", "classifier", "head"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            setattr(model, name, nn.Identity())
            return layer.in_features
        if isinstance(layer, nn.Sequential) and isinstance(layer[-1], nn.Linear):
            features = layer[-1].in_features
            layer[-1] = nn.Identity()
            return features
    raise ValueError(f"torchvision's {arch} has no Linear classifier (fc, classifier[-1] or head) to remove")


def _small_image_stem_(model: nn.Module) -> None:
    """3x3 stride-1 ``conv1`` (torchvision's ResNet init: Kaiming normal, fan-out) and no max-pool."""
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False,
                            device=old.weight.device, dtype=old.weight.dtype)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
