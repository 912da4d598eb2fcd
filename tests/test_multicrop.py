"""MultiCropWrapper.forward_train (iBOT / DINOv2 training forward): equal to forward without
masks, CLS features, masked positions in the documented order, the mask token on the student
only, shared vs separate patch head, EMA pairing, and one training step as the trainer runs it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from dino_fast.ema import TeacherEMA
from dino_fast.ibot import iBOTPatchLoss
from dino_fast.ibot_masks import PatchMasks, mask_rng, sample_masks
from dino_fast.dino_loss import DINOLoss
from dino_fast.models import DINOHead, MultiCropWrapper, build_backbone
from tests.helpers import assert_close

FP32 = dict(rtol=1e-5, atol=1e-5)
D, K, KP, B = 32, 23, 19, 3  # embed dim, DINO prototypes, patch prototypes, images


def _backbone(seed: int = 0, mim: bool = True, **kw) -> nn.Module:
    torch.manual_seed(seed)
    bb = build_backbone("vit_tiny", patch_size=8, depth=2, embed_dim=D, num_heads=2, img_size=32,
                        attn_backend="sdpa", masked_im_modeling=mim, **kw)
    if mim:
        with torch.no_grad():
            bb.mask_token.normal_()  # a mask token that differs from every patch embedding
    return bb.eval()


def _head(out_dim: int = K, seed: int = 1) -> DINOHead:
    torch.manual_seed(seed)
    return DINOHead(D, out_dim, hidden_dim=24, bottleneck_dim=16)


def _views(seed: int = 2, n_local: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + \
           [torch.randn(B, 3, 16, 16, generator=g) for _ in range(n_local)]


def _masks(seed: int = 3) -> torch.Tensor:
    """(2B, 16) masks of the 4x4-patch global views, every row with something masked but one."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * B, 16, generator=g) < 0.4
    masks[1] = False
    masks[0, 5] = masks[-1, 15] = True
    masks[0, 0] = False
    return masks


@pytest.mark.parametrize("packed", [False, True])
def test_without_masks_equals_forward(packed):
    wrapper = MultiCropWrapper(_backbone(), _head(), packed=packed, patch_head=_head(KP, seed=4))
    views = _views()
    with torch.no_grad():
        out = wrapper.forward_train(views)
        assert set(out) == {"logits", "cls"}
        assert_close(out["logits"], wrapper(views), name="logits", rtol=0, atol=0)
        bb = wrapper.backbone
        cls = bb.forward_packed(views) if packed else torch.cat([bb(torch.cat(views[:2])), bb(torch.cat(views[2:]))])
        assert_close(out["cls"], cls, name="cls", rtol=0, atol=0)
        assert out["cls"].shape == (4 * B, D)
        assert_close(wrapper.forward_train(views[0])["logits"], wrapper(views[0]), name="one view", rtol=0, atol=0)


@pytest.mark.parametrize("n_local", [0, 2])
def test_masked_positions_in_documented_order(n_local):
    """patch_head = Identity: masked_patch_logits are the tokens themselves, so their order is visible."""
    wrapper = MultiCropWrapper(_backbone(), _head(), patch_head=nn.Identity())
    views, masks = _views(n_local=n_local), _masks()
    with torch.no_grad():
        student = wrapper.forward_train(views, masks)
        teacher = wrapper.forward_train(views[:2], masks, mask_input=False)
        cls_m, patches_m = wrapper.backbone.forward_tokens(torch.cat(views[:2]), masks)
        cls_t, patches_t = wrapper.backbone.forward_tokens(torch.cat(views[:2]))
    rows_s, rows_t = [], []
    for v in range(2):  # view-major, then sample, then patch index
        for b in range(B):
            for j in range(16):
                if masks[v * B + b, j]:
                    rows_s.append(patches_m[v * B + b, j])
                    rows_t.append(patches_t[v * B + b, j])
    assert student["masked_patch_logits"].shape == (int(masks.sum()), D)
    assert_close(student["masked_patch_logits"], torch.stack(rows_s), name="student rows", rtol=0, atol=0)
    assert_close(teacher["masked_patch_logits"], torch.stack(rows_t), name="teacher rows", rtol=0, atol=0)
    # CLS of the global views from the masked input (DINOv2), the locals' unmasked
    assert_close(student["cls"][:2 * B], cls_m, name="masked global cls", rtol=0, atol=0)
    assert_close(teacher["cls"], cls_t, name="teacher cls", rtol=0, atol=0)
    assert student["cls"].shape == ((2 + n_local) * B, D) and student["logits"].shape == ((2 + n_local) * B, K)
    if n_local:
        with torch.no_grad():
            assert_close(student["cls"][2 * B:], wrapper.backbone(torch.cat(views[2:])), name="local cls", **FP32)
    assert_close(student["logits"], wrapper.head(student["cls"]), name="logits of the cls", **FP32)


def test_masks_as_list_tensor_or_patch_masks_agree():
    wrapper = MultiCropWrapper(_backbone(), _head(), patch_head=_head(KP, seed=4))
    views, masks = _views(), _masks()
    with torch.no_grad():
        a = wrapper.forward_train(views, masks)
        b = wrapper.forward_train(views, list(masks.chunk(2)))
        c = wrapper.forward_train(views, PatchMasks.from_masks(masks))
    for other in (b, c):
        for key in a:
            assert_close(other[key], a[key], name=key, rtol=0, atol=0)


def test_student_uses_the_mask_token_and_the_teacher_the_pixels():
    wrapper = MultiCropWrapper(_backbone(), _head(), patch_head=_head(KP, seed=4))
    views, masks = _views(n_local=0), _masks()
    # the input tokens differ from the unmasked ones exactly at the masked positions
    with torch.no_grad():
        xg = torch.cat(views)
        diff = (wrapper.backbone.prepare_tokens(xg, masks) - wrapper.backbone.prepare_tokens(xg)).abs().amax(-1)
    assert torch.equal(diff[:, 1:] > 0, masks) and not diff[:, 0].any()
    # pixels under a masked patch (view 0, image 0, patch 5 = row 1, col 1) do not reach the student
    poked = [v.clone() for v in views]
    poked[0][0, :, 8:16, 8:16] += 5.0
    with torch.no_grad():
        s, s_poked = wrapper.forward_train(views, masks), wrapper.forward_train(poked, masks)
        t = wrapper.forward_train(views, masks, mask_input=False)
        t_poked = wrapper.forward_train(poked, masks, mask_input=False)
    for key in s:
        assert_close(s_poked[key], s[key], name=f"student {key}", rtol=0, atol=0)
    assert not torch.allclose(t_poked["masked_patch_logits"], t["masked_patch_logits"])
    # pixels under an unmasked patch (image 0, patch 0) do
    poked[0][0, :, 0:8, 0:8] += 5.0
    assert not masks[0, 0]
    with torch.no_grad():
        assert not torch.allclose(wrapper.forward_train(poked, masks)["logits"][0], s["logits"][0])
        # and the mask token's value does (a random direction: LayerNorm ignores a constant shift)
        wrapper.backbone.mask_token.add_(torch.randn(D))
        assert not torch.allclose(wrapper.forward_train(views, masks)["masked_patch_logits"],
                                  s["masked_patch_logits"])


def test_shared_and_separate_patch_heads():
    views, masks = _views(), _masks()
    plain = MultiCropWrapper(_backbone(), _head())
    head = _head()
    shared = MultiCropWrapper(_backbone(), head, patch_head="shared")
    same_object = MultiCropWrapper(_backbone(), head, patch_head=head)
    patch_head = _head(KP, seed=4)
    separate = MultiCropWrapper(_backbone(), _head(), patch_head=patch_head)
    assert set(shared.state_dict()) == set(plain.state_dict()) == set(same_object.state_dict())
    assert same_object.shared_patch_head and same_object.patch_head is None
    assert set(separate.state_dict()) - set(plain.state_dict()) == {f"patch_head.{k}" for k in patch_head.state_dict()}
    with torch.no_grad():
        out_s = shared.forward_train(views, masks)
        _, patches = shared.backbone.forward_tokens(torch.cat(views[:2]), masks)
        tokens = patches.flatten(0, 1)[masks.flatten()]
        assert out_s["masked_patch_logits"].shape == (int(masks.sum()), K)
        assert_close(out_s["masked_patch_logits"], head(tokens), name="shared head patches", **FP32)
        assert_close(out_s["logits"], head(out_s["cls"]), name="shared head cls", **FP32)
        out_p = separate.forward_train(views, masks)
        _, patches = separate.backbone.forward_tokens(torch.cat(views[:2]), masks)
        tokens = patches.flatten(0, 1)[masks.flatten()]
        assert out_p["masked_patch_logits"].shape == (int(masks.sum()), KP)
        assert_close(out_p["masked_patch_logits"], patch_head(tokens), name="separate head", rtol=0, atol=0)
        assert_close(out_p["logits"], separate.head(out_p["cls"]), name="dino head", rtol=0, atol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_gradients_reach_mask_token_and_heads(shared):
    wrapper = MultiCropWrapper(_backbone(), _head(), patch_head="shared" if shared else _head(KP, seed=4))
    out = wrapper.forward_train(_views(), _masks())
    (out["logits"].square().mean() + out["masked_patch_logits"].square().mean()).backward()
    assert torch.count_nonzero(wrapper.backbone.mask_token.grad) > 0
    assert torch.count_nonzero(wrapper.head.mlp[0].weight.grad) > 0
    if not shared:
        assert torch.count_nonzero(wrapper.patch_head.mlp[0].weight.grad) > 0


def test_packed_with_masks_runs_locals_packed():
    torch.manual_seed(0)
    packed = MultiCropWrapper(_backbone(), _head(), packed=True, patch_head=_head(KP, seed=4))
    unpacked = copy.deepcopy(packed)
    unpacked.packed = False
    views, masks = _views(), _masks()
    with torch.no_grad():
        a, b = packed.forward_train(views, masks), unpacked.forward_train(views, masks)
        for key in a:
            assert_close(a[key], b[key], name=key, **FP32)
        assert_close(a["logits"][2 * B:], packed(views)[2 * B:], name="locals vs packed forward", **FP32)
        t = packed.forward_train(views[:2], masks, mask_input=False)
        assert_close(t["logits"], packed(views[:2]), name="teacher logits vs forward", **FP32)


def test_bad_inputs_raise():
    views, masks = _views(), _masks()
    with pytest.raises(ValueError, match="no patch head"):
        MultiCropWrapper(_backbone(), _head()).forward_train(views, masks)
    with pytest.raises(ValueError, match="masked_im_modeling=True"):
        MultiCropWrapper(_backbone(mim=False), _head(), patch_head="shared").forward_train(views, masks)
    # the teacher needs no mask token
    MultiCropWrapper(_backbone(mim=False), _head(), patch_head="shared").forward_train(views[:2], masks,
                                                                                      mask_input=False)
    wrapper = MultiCropWrapper(_backbone(), _head(), patch_head="shared")
    with pytest.raises(ValueError, match="rows"):
        wrapper.forward_train(views, masks[:B])
    with pytest.raises(ValueError, match="patches per view|h\\*w"):
        wrapper.forward_train(views, torch.zeros(2 * B, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="one size"):
        wrapper.forward_train([views[0], views[2]], masks)
    with pytest.raises(ValueError, match="n_global"):
        wrapper.forward_train(views, masks, n_global=5)
    with pytest.raises(ValueError, match="'shared'"):
        MultiCropWrapper(_backbone(), _head(), patch_head="share")
    with pytest.raises(TypeError, match="patch_head"):
        MultiCropWrapper(_backbone(), _head(), patch_head=3)
    fused = DINOHead(D, K, hidden_dim=24, bottleneck_dim=16, fused_loss=True)
    with pytest.raises(ValueError, match="fused_loss"):
        MultiCropWrapper(_backbone(), fused, patch_head="shared").forward_train(views, masks)


def test_resnet_backbone_refuses_masks():
    resnet = build_backbone("resnet18")
    wrapper = MultiCropWrapper(resnet, DINOHead(resnet.embed_dim, K, hidden_dim=24, bottleneck_dim=16),
                               patch_head="shared")
    views = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        assert wrapper.forward_train(views)["logits"].shape == (4, K)  # without masks: the usual forward
    with pytest.raises(TypeError, match="ResNet"):
        wrapper.forward_train(views, torch.zeros(4, 16, dtype=torch.bool))


def _pair(separate: bool) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher as build_models should make them with ibot_weight > 0."""
    student = MultiCropWrapper(_backbone(drop_path_rate=0.1).train(), _head(),
                               patch_head=_head(KP, seed=4) if separate else "shared")
    teacher = MultiCropWrapper(_backbone(), _head(), patch_head=_head(KP) if separate else "shared")
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


@pytest.mark.parametrize("separate", [False, True])
def test_teacher_ema_pairs_the_patch_head(separate):
    student, teacher = _pair(separate)
    ema = TeacherEMA(student, teacher, impl="foreach")
    assert ("patch_head.last_layer.weight_v" in ema.names) == separate
    assert "backbone.mask_token" in ema.names
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.step(0.5)
    if separate:
        assert_close(teacher.patch_head.mlp[0].weight, student.patch_head.mlp[0].weight - 0.5, name="ema")


def _train_step(student, teacher, dino_loss, ibot_loss, views, step: int, ibot_weight: float = 1.0):
    """What Trainer.train_step adds for ibot_weight > 0 (one micro-batch): masks from
    (seed, step, rank), the teacher unmasked at the same positions, both losses."""
    grid = (views[0].shape[-2] // 8, views[0].shape[-1] // 8)
    masks = PatchMasks.from_masks(sample_masks(2 * views[0].shape[0], grid, mask_rng(0, step, rank=0),
                                               mask_ratio_min_max=(0.1, 0.5), mask_sample_probability=0.5))
    with torch.no_grad():
        t = teacher.forward_train(views[:2], masks, mask_input=False)
    s = student.forward_train(views, masks)
    loss = dino_loss(s["logits"], t["logits"], 0, teacher_temp=0.04)
    ibot = ibot_loss(s["masked_patch_logits"], t["masked_patch_logits"], masks, teacher_temp=0.04)
    return loss + ibot_weight * ibot, ibot, masks


@pytest.mark.parametrize("separate", [False, True])
def test_training_step_runs_and_replays(separate):
    """Two runs of the same step draw the same masks and give the same losses (resume exactness);
    gradients reach the mask token and the patch head; both centers move."""
    results = []
    for _ in range(2):
        student, teacher = _pair(separate)
        out_dim = KP if separate else K
        dino_loss = DINOLoss(K, 4, 0.04, 0.04, 0, 1, impl="torch")
        ibot_loss = iBOTPatchLoss(out_dim)
        torch.manual_seed(7)  # drop path
        total, ibot, masks = _train_step(student, teacher, dino_loss, ibot_loss, _views(), step=5)
        total.backward()
        assert torch.isfinite(total) and masks.n_masked > 0 and float(ibot.detach()) > 0
        assert torch.count_nonzero(student.backbone.mask_token.grad) > 0
        if separate:
            assert torch.count_nonzero(student.patch_head.mlp[0].weight.grad) > 0
        assert torch.count_nonzero(ibot_loss.center) > 0 and torch.count_nonzero(dino_loss.center) > 0
        results.append((total.detach(), masks.masks, ibot_loss.center.clone()))
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])
