"""ResNet backbones (official ``--arch resnet50``) and the arch dispatch with the official
``deit_*`` aliases. References: torchvision itself and the official ``utils.MultiCropWrapper``
transcribed below (facebookresearch/dino utils.py)."""
import pytest
import torch
import torchvision
from torch import nn

from dino_fast.models import (ARCH_ALIASES, RESNET_ARCHS, DINOHead, DinoViT, MultiCropWrapper, build_backbone,
                              build_resnet, canonical_arch, infer_resnet_arch, is_resnet_arch)
from tests.helpers import assert_close


class OfficialMultiCropWrapper(nn.Module):
    """facebookresearch/dino utils.MultiCropWrapper, verbatim."""

    def __init__(self, backbone, head):
        super(OfficialMultiCropWrapper, self).__init__()
        # disable layers dedicated to ImageNet labels classification
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        # convert to list
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]),
            return_counts=True,
        )[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx: end_idx]))
            # The output is a tuple with XCiT model. See:
            # https://github.com/facebookresearch/xcit/blob/master/xcit.py#L404-L405
            if isinstance(_out, tuple):
                _out = _out[0]
            # accumulate outputs
            output = torch.cat((output, _out))
            start_idx = end_idx
        # Run the head forward on the concatenated features.
        return self.head(output)


def official_arch(arch: str) -> str:
    """main_dino.py: ``args.arch = args.arch.replace("deit", "vit")``."""
    return arch.replace("deit", "vit")


def _views(seed: int, batch: int, sizes: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return build_resnet("resnet50")


# ----------------------------------------------------------------------------- layout
def test_resnet50_is_torchvision_without_fc(resnet50):
    """Same keys and outputs as torchvision resnet50 with fc = Identity (official eval scripts /
    hubconf build exactly that); embed_dim = fc.weight.shape[1] = 2048 (main_dino.py)."""
    assert resnet50.embed_dim == 2048 == torchvision.models.resnet50().fc.weight.shape[1]
    assert isinstance(resnet50.fc, nn.Identity)
    ref = torchvision.models.resnet50()
    ref.fc = nn.Identity()
    ref.load_state_dict(resnet50.state_dict(), strict=True)
    assert not any(k.startswith("fc.") for k in resnet50.state_dict())
    x = _views(1, 2, [32])[0]
    resnet50.eval(), ref.eval()
    with torch.no_grad():
        assert_close(resnet50(x), ref(x), name="resnet50 features vs torchvision")


@pytest.mark.parametrize("size", [32, 16])
def test_forward_backward_small_inputs(resnet50, size):
    """Global average pooling: 32 and 16 px inputs give (B, 2048) features; a DINO head with
    BatchNorm (--use_bn_in_head) trains through them."""
    torch.manual_seed(size)
    head = DINOHead(2048, 37, use_bn=True, hidden_dim=64, bottleneck_dim=16)
    model = MultiCropWrapper(resnet50, head).train()
    views = _views(size, 3, [size, size, size // 2])  # two "global" and one "local" view
    out = model(views)
    assert out.shape == (9, 37)
    feats = resnet50(views[0])
    assert feats.shape == (3, 2048)
    model.zero_grad(set_to_none=True)
    out.logsumexp(dim=-1).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert resnet50.conv1.weight.grad.abs().sum() > 0


def test_multicrop_matches_official_wrapper(resnet50):
    """Our wrapper around a ResNet = official MultiCropWrapper, in train mode too (BatchNorm
    statistics depend on which views are batched together)."""
    torch.manual_seed(3)
    head = DINOHead(2048, 23, use_bn=True, hidden_dim=32, bottleneck_dim=8)
    ours = MultiCropWrapper(resnet50, head)
    ref = OfficialMultiCropWrapper(resnet50, head)
    assert set(ours.state_dict()) == set(ref.state_dict())
    views = _views(4, 2, [32, 32, 16, 16, 16])
    for mode in (True, False):
        ours.train(mode)
        with torch.no_grad():
            assert_close(ours(views), ref(views), name=f"multi-crop output (train={mode})")


# ----------------------------------------------------------------------------- arch names
@pytest.mark.parametrize("arch", ["deit_tiny", "deit_small", "vit_tiny", "vit_small", "vit_base"])
def test_official_vit_aliases(arch):
    assert canonical_arch(arch) == official_arch(arch)
    torch.manual_seed(5)
    model = build_backbone(arch, 16, drop_path_rate=0.1, depth=2, attn_backend="sdpa")
    assert isinstance(model, DinoViT) and not is_resnet_arch(arch)
    assert model.attn_backend == "sdpa" and model.attn_head_dim == 64
    assert model.embed_dim == {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}[official_arch(arch)]
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)  # the stochastic-depth rate reaches the ViT
    assert set(ARCH_ALIASES) == {"deit_tiny", "deit_small"}


def test_build_backbone_resnet_ignores_vit_options():
    """As main_dino.py, a torchvision convnet ignores --patch_size and --drop_path_rate."""
    model = build_backbone("resnet18", patch_size=8, drop_path_rate=0.3, attn_backend="sdpa")
    assert model.embed_dim == 512 and isinstance(model.fc, nn.Identity)
    wrapper = MultiCropWrapper(model, DINOHead(512, 8, hidden_dim=16, bottleneck_dim=8))
    assert wrapper.attn_backend is None and wrapper.attn_head_dim is None  # a convnet has no attention
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert is_resnet_arch("resnet50") and not is_resnet_arch("vit_small")


def test_unknown_arch_and_no_download(monkeypatch):
    with pytest.raises(ValueError, match="unknown arch 'vit_huge'.*deit_small.*resnet50"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="never downloads"):
        build_resnet("resnet50", weights="IMAGENET1K_V2")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    build_resnet("resnet18")


@pytest.mark.parametrize("arch", list(RESNET_ARCHS))
def test_infer_resnet_arch(arch):
    with torch.device("meta"):  # keys and shapes only: no allocation
        sd = getattr(torchvision.models, arch)().state_dict()
    assert infer_resnet_arch(sd) == arch
    assert infer_resnet_arch({k: v for k, v in sd.items() if not k.startswith("fc.")}) == arch


def test_infer_resnet_arch_rejects_others():
    with pytest.raises(ValueError, match="not a ResNet"):
        infer_resnet_arch({"patch_embed.proj.weight": torch.zeros(1)})
    with torch.device("meta"):
        sd = torchvision.models.resnet50().state_dict()
    cut = {k: v for k, v in sd.items() if not k.startswith("layer3.5.")}
    with pytest.raises(ValueError, match=r"Bottleneck stages of \[3, 4, 5, 3\] blocks"):
        infer_resnet_arch(cut)
