"""``--arch`` as official main_dino.py takes it (issue 30 row 5): every torchvision classification
model (classifier Linear -> Identity, the head on its in_features), the XCiT models through timm,
the refusals in one line, the small-image ResNet stem (issue 31), and xformers' import warning
folded into the start-up line (issue 30 row 7). References: torchvision's own models, official
main_dino.py's ``torchvision_archs`` / ``embed_dim`` lines transcribed below."""
import importlib.util
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dino_fast.config import CHOICES, ConfigError, TrainConfig
from dino_fast.models import (ARCH_CHOICES, TORCHVISION_ARCHS, XCIT_ARCHS, DINOHead, MultiCropWrapper, arch_family,
                              build_backbone, build_torchvision, canonical_arch)
from tests.helpers import assert_close
from tests.test_resnet import OfficialMultiCropWrapper

# facebookresearch/xcit hubconf.py's models (torch.hub.list("facebookresearch/xcit:main"), xcit.py)
OFFICIAL_XCIT = [f"xcit_{s}_p{p}" for s in ("nano_12", "tiny_12", "small_12", "tiny_24", "small_24", "medium_24",
                                            "large_24") for p in (16, 8)]


def official_torchvision_archs() -> list[str]:
    """main_dino.py, verbatim but for the module name."""
    torchvision_models = torchvision.models
    return sorted(name for name in torchvision_models.__dict__
                  if name.islower() and not name.startswith("__")
                  and callable(torchvision_models.__dict__[name]))


def _images(seed: int, batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the list
def test_arch_choices_cover_the_official_ones():
    """Every official --arch choice that is a classification model is ours, the rest (torchvision's
    get_model & co, fixed-size ViTs, SqueezeNet) is refused in one line; config validates against
    the models package's one list."""
    assert CHOICES["arch"] is ARCH_CHOICES
    assert {"vit_tiny", "vit_small", "vit_base", "deit_tiny", "deit_small"} <= set(ARCH_CHOICES)
    assert set(OFFICIAL_XCIT) == set(XCIT_ARCHS) <= set(ARCH_CHOICES)
    classification = set(torchvision.models.list_models(module=torchvision.models))
    assert set(TORCHVISION_ARCHS) <= classification and {"resnet50", "resnet18", "convnext_tiny"} <= set(ARCH_CHOICES)
    for name in official_torchvision_archs():
        if name in ARCH_CHOICES:
            continue
        with pytest.raises(ValueError) as e:
            canonical_arch(name)
        assert "\n" not in str(e.value) and repr(name) in str(e.value)
        assert name in classification or name.startswith(("get_", "list_")), name


@pytest.mark.parametrize("arch", [a for a in TORCHVISION_ARCHS if not a.startswith("regnet")] + ["regnet_x_400mf"])
def test_every_torchvision_arch_builds_without_classifier(arch):
    """Same keys as torchvision's model minus the classifier Linear, ``embed_dim`` = that Linear's
    in_features (official: ``student.fc.weight.shape[1]``). On the meta device (no allocation);
    RegNet computes its widths with tensors, so one RegNet is built for real."""
    device = "cpu" if arch.startswith("regnet") else "meta"
    with torch.device(device):
        ours = build_torchvision(arch)
        ref = torchvision.models.get_model(arch, weights=None, **({"aux_logits": False, "init_weights": True}
                                                                   if arch in ("googlenet", "inception_v3") else {}))
    layer = next(getattr(ref, n) for n in ("fc", "classifier", "head") if hasattr(ref, n))
    linear = layer[-1] if isinstance(layer, nn.Sequential) else layer
    assert isinstance(linear, nn.Linear) and ours.embed_dim == linear.in_features
    if hasattr(ref, "fc"):
        assert ours.embed_dim == ref.fc.weight.shape[1]  # main_dino.py
    name = next(n for n, m in ref.named_modules() if m is linear)
    linear_keys = {f"{name}.{k}" for k in linear.state_dict()}
    assert set(ours.state_dict()) == set(ref.state_dict()) - linear_keys
    assert arch_family(arch) == "torchvision"


@pytest.mark.parametrize("arch", ["resnet18", "regnet_x_400mf"])
def test_fc_models_match_the_official_wrapper(arch):
    """For the models official DINO trains (an ``fc``): our wrapper = official MultiCropWrapper
    around torchvision's model, train mode, two resolutions."""
    torch.manual_seed(0)
    backbone = build_backbone(arch)
    head = DINOHead(backbone.embed_dim, 17, use_bn=True, hidden_dim=32, bottleneck_dim=8)
    ref_backbone = torchvision.models.get_model(arch, weights=None)
    ref = OfficialMultiCropWrapper(ref_backbone, head)
    ref_backbone.load_state_dict(backbone.state_dict(), strict=True)
    ours = MultiCropWrapper(backbone, head).train()
    views = [_images(i, 2, s) for i, s in enumerate([32, 32, 16, 16])]
    with torch.no_grad():
        assert_close(ours(views), ref.train()(views), name=f"{arch} multi-crop vs official")


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5"])
def test_other_classifiers_train_under_dino(arch):
    """classifier[-1] models: (B, embed_dim) features at DINO's two crop sizes, gradients everywhere."""
    torch.manual_seed(1)
    backbone = build_backbone(arch, patch_size=8, drop_path_rate=0.3)  # ignored by a torchvision model
    model = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, 11, hidden_dim=16, bottleneck_dim=8)).train()
    out = model([_images(2, 2, 32), _images(3, 2, 32), _images(4, 2, 16)])
    assert out.shape == (6, 11) and torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch,what", [
    ("fasterrcnn_resnet50_fpn", "object-detection"), ("fcn_resnet50", "segmentation"), ("r3d_18", "video"),
    ("quantized_resnet50", "quantized"), ("raft_small", "optical-flow"), ("vit_b_16", "vit_small"),
    ("squeezenet1_1", "1x1 convolution"), ("resnet5", "did you mean 'resnet50'"),
])
def test_refusals_are_one_line(arch, what):
    with pytest.raises(ValueError, match=what) as e:
        build_backbone(arch)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=f"config arch='{arch}': .*{what}") as e:
        TrainConfig(arch=arch)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400  # not the list of 90 names


# ----------------------------------------------------------------------------- XCiT
def test_xcit_is_timms_with_dino_options():
    """timm's XCiT without classifier; official main_dino.py passes drop_path_rate to the student."""
    import timm

    backbone = build_backbone("xcit_small_12_p16", patch_size=8, drop_path_rate=0.2, depth=1)
    assert isinstance(backbone, timm.models.xcit.Xcit) and backbone.embed_dim == 384
    assert isinstance(backbone.head, nn.Identity) and not any(k.startswith("head.") for k in backbone.state_dict())
    assert backbone.patch_embed.patch_size == 16  # the name's patch: official ignores --patch_size for XCiT
    assert backbone.blocks[0].drop_path1.drop_prob == pytest.approx(0.2)
    torch.manual_seed(2)
    model = MultiCropWrapper(backbone, DINOHead(384, 13, hidden_dim=16, bottleneck_dim=8)).train()
    views = [_images(5, 2, 32), _images(6, 2, 32), _images(7, 2, 16)]
    out = model(views)
    assert out.shape == (6, 13)
    backbone.eval()
    with torch.no_grad():  # per resolution, as the official wrapper
        assert_close(model.eval()(views), model.head(torch.cat([backbone(torch.cat(views[:2])), backbone(views[2])])),
                     name="xcit multi-crop")
    assert arch_family("xcit_medium_24_p8") == "xcit"


@pytest.mark.parametrize("changes,match", [
    ({"packed_multicrop": True}, "packed_multicrop=true needs a ViT"),
    ({"ibot_weight": 1.0}, "needs a ViT arch, not xcit_small_12_p16"),
    ({"small_image_stem": True}, "small_image_stem=true replaces a torchvision ResNet's stem"),
])
def test_xcit_refuses_vit_options_in_one_line(changes, match):
    with pytest.raises(ConfigError, match=match) as e:
        TrainConfig(arch="xcit_small_12_p16", **changes)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- small-image stem
def test_small_image_stem_keeps_a_4x4_map_at_32px():
    """3x3 stride-1 conv1 and no max-pool: 32 px -> 4x4 before the pool (the ImageNet stem: 1x1)."""
    maps = {}
    for stem in (False, True):
        torch.manual_seed(3)
        model = build_backbone("resnet18", small_image_stem=stem).eval()
        model.layer4.register_forward_hook(lambda m, i, o, stem=stem: maps.__setitem__(stem, o.shape))
        with torch.no_grad():
            assert model(_images(8, 2, 32)).shape == (2, 512)
    assert maps == {False: (2, 512, 1, 1), True: (2, 512, 4, 4)}
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    assert model.conv1.weight.std() > 0  # initialised (torchvision's Kaiming fan-out)


def test_small_image_stem_refused_for_vits_and_other_convnets():
    for arch in ("vit_small", "deit_tiny", "mobilenet_v3_small"):
        with pytest.raises(ConfigError, match=f"small_image_stem=true replaces .*{arch} has none") as e:
            TrainConfig(arch=arch, small_image_stem=True)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="small_image_stem replaces a torchvision ResNet's stem; vit_tiny is a VIT"):
        build_backbone("vit_tiny", small_image_stem=True, depth=1)
    TrainConfig(arch="resnext50_32x4d", small_image_stem=True)  # every ResNet-class model has the stem


def test_small_image_stem_weights_load_back():
    """load_pretrained reads the stem off conv1's kernel (3x3): a k-NN of such a run loads it."""
    from dino_fast.pretrained import load_pretrained

    torch.manual_seed(4)
    model = build_backbone("resnet18", small_image_stem=True).eval()
    loaded = load_pretrained({f"backbone.{k}": v for k, v in model.state_dict().items()})
    x = _images(9, 2, 32)
    with torch.no_grad():
        assert_close(loaded(x), model(x), name="small-stem resnet18 reloaded")


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("changes", [dict(arch="xcit_nano_12_p16", depth=1),
                                     dict(arch="resnet18", small_image_stem=True, use_bn_in_head=True)])
def test_one_training_step(demo_root, tmp_path, changes):
    """DINO trains them: one step of the real trainer moves student and teacher."""
    from dino_fast.train import Trainer
    from tests.test_train import tiny_cfg

    trainer = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=1, **changes))
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] == 1 and summary["loss"] == summary["loss"]
    after = trainer.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))


# ----------------------------------------------------------------------------- start-up noise
XFORMERS_PROBE = textwrap.dedent("""
    import logging
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger().addHandler(Keep())
    from dino_fast.models.attention import xformers_build_problem
    from dino_fast.models.varlen import _xops
    problem = xformers_build_problem()
    try:
        _xops()
    except ImportError:
        pass
    print(repr(problem))
    print(sum("WARNING[XFORMERS]" in r for r in records))
""")


def test_xformers_import_warning_is_folded_into_the_startup_line():
    """xformers logs 6 lines at import when its C++/CUDA extension does not load; our probe says it
    in the one ``attention:`` line instead. A fresh interpreter: xformers warns on first import only."""
    if importlib.util.find_spec("xformers") is None:  # find, not import: importing here would warn here
        pytest.skip("xformers is not installed")
    res = subprocess.run([sys.executable, "-c", XFORMERS_PROBE], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    problem, warned = res.stdout.strip().splitlines()[-2:]
    assert warned == "0", f"xformers' load warning reached logging ({problem}): {res.stderr[-1000:]}"
    assert "WARNING[XFORMERS]" not in res.stderr


def test_other_xformers_records_pass():
    """Only the extension-load warning is dropped; any other xformers record is logged."""
    from dino_fast.models.varlen import _XformersLoadWarning

    def record(msg: str, module: str = "_cpp_lib", level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("xformers", level, f"/x/xformers/{module}.py", 1, msg, None, None)

    keep = _XformersLoadWarning().filter
    assert not keep(record("WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions. xFormers was built for:"))
    assert keep(record("WARNING[XFORMERS]: something else", module="ops"))
    assert keep(record("WARNING[XFORMERS]: xFormers can't load", level=logging.ERROR))
    assert keep(record("Triton is not available"))
