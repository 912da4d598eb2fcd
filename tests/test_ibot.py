"""iBOT / DINOv2 masked-patch objective: block masks (dino_fast.ibot_masks) against DINOv2's
``MaskingGenerator`` + collate run draw for draw, their ranges and determinism; the patch loss
(dino_fast.ibot) against its definition written as a plain loop, its gradient, the center update
and the Sinkhorn-Knopp teacher on patches (over ranks with different patch counts)."""
from __future__ import annotations

import math
import random
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_fast.center import sinkhorn_knopp_teacher
from dino_fast.ibot import iBOTPatchLoss, ibot_patch_loss_from_probs
from dino_fast.ibot_masks import MaskingGenerator, PatchMasks, mask_rng, sample_masks
from tests.helpers import assert_close, dinov2_sinkhorn


def _seed(*case) -> int:
    s = zlib.crc32(repr(case).encode())
    torch.manual_seed(s)
    return s


# ----------------------------------------------------------------------------- DINOv2, verbatim
class _DinoV2MaskingGenerator:
    """dinov2/data/masking.py ``MaskingGenerator`` as released (python ``random``), the RNG made
    an argument."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None, rnd=random):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.random = rnd

    def get_shape(self):
        return self.height, self.width

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = self.random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.random.randint(0, self.height - h)
                left = self.random.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta
        return mask


def _dinov2_collate_masks(B, N, mask_ratio_tuple, mask_probability, mask_generator, rnd):
    """The mask part of dinov2/data/collate.py ``collate_data_and_cast``."""
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_min = probs[i]
        prob_max = probs[i + 1]
        masks_list.append(torch.BoolTensor(mask_generator(int(N * rnd.uniform(prob_min, prob_max)))))
    for i in range(n_samples_masked, B):
        masks_list.append(torch.BoolTensor(mask_generator(0)))
    rnd.shuffle(masks_list)
    collated_masks = torch.stack(masks_list).flatten(1)
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return collated_masks, collated_masks.flatten().nonzero().flatten(), masks_weight


class _PyRandomAsNumpy:
    """A python ``random.Random`` behind the numpy Generator methods dino_fast.ibot_masks calls, so both
    implementations consume one stream draw for draw."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def random(self) -> float:
        return self.r.random()

    def integers(self, low: int, high: int) -> int:
        return self.r.randint(low, high - 1)

    def permutation(self, n: int) -> np.ndarray:
        order = list(range(n))
        self.r.shuffle(order)
        return np.array(order, dtype=np.int64)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("grid", [(14, 14), (4, 4), (7, 5), (2, 2), (1, 1), (16, 16)])
@pytest.mark.parametrize("n,p,ratio", [(16, 0.5, (0.1, 0.5)), (7, 1.0, (0.3, 0.3)), (10, 0.3, (0.0, 0.9))])
def test_masks_equal_dinov2_draw_for_draw(grid, n, p, ratio):
    seed = _seed("dinov2-masks", grid, n, p, ratio)
    N = grid[0] * grid[1]
    max_patches = 0.5 * N  # dinov2/train/train.py (for even grids its expression is exactly this)
    ref_gen = _DinoV2MaskingGenerator(grid, max_num_patches=max_patches, rnd=random.Random(seed))
    masks_ref, indices_ref, weights_ref = _dinov2_collate_masks(n, N, ratio, p, ref_gen, ref_gen.random)
    ours = sample_masks(n, grid, _PyRandomAsNumpy(seed), mask_ratio_min_max=ratio, mask_sample_probability=p,
                        masking=MaskingGenerator(grid, max_num_patches=max_patches))
    assert ours.dtype == torch.bool and ours.shape == (n, N)
    assert torch.equal(ours, masks_ref)
    pm = PatchMasks.from_masks(ours)
    assert torch.equal(pm.indices, indices_ref)
    assert_close(pm.weights, weights_ref, name="masks_weight", rtol=0, atol=0)


def test_default_masking_is_dinov2_train_setting():
    gen = MaskingGenerator(14)
    assert gen.get_shape() == (14, 14) and gen.max_num_patches == 98 and gen.min_num_patches == 4
    assert gen.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
    a = sample_masks(9, 14, np.random.default_rng(3))
    b = sample_masks(9, 14, np.random.default_rng(3), masking=MaskingGenerator((14, 14), max_num_patches=98))
    assert torch.equal(a, b)


@pytest.mark.parametrize("grid", [14, 4, (6, 3)])
def test_mask_ratios_and_masked_sample_count_over_many_draws(grid):
    _seed("ranges", grid)
    lo, hi, n, p = 0.1, 0.5, 12, 0.5
    h, w = (grid, grid) if isinstance(grid, int) else grid
    N = h * w
    k = int(n * p)
    bounds = [int(N * float(b)) for b in torch.linspace(lo, hi, k + 1)[1:]]  # each stratum's largest target
    rng = np.random.default_rng(5)
    ratios = []
    for _ in range(200):
        masks = sample_masks(n, grid, rng, mask_ratio_min_max=(lo, hi), mask_sample_probability=p)
        counts = masks.sum(-1)
        assert int((counts > 0).sum()) <= k
        # the i-th smallest count stays under the i-th stratum's target (targets are never exceeded)
        top = counts.sort().values[n - k:]
        assert all(int(c) <= b for c, b in zip(top, bounds)), (top.tolist(), bounds)
        ratios += (counts[counts > 0].float() / N).tolist()
    ratios_t = torch.tensor(ratios)
    assert ratios_t.max() <= hi + 1e-6
    if N >= 100:  # large grids reach their targets: every masked sample masked, ratios spread over the range
        assert len(ratios) == 200 * k
        assert ratios_t.min() >= 0.5 * lo and ratios_t.mean() == pytest.approx((lo + hi) / 2, abs=0.05)


@pytest.mark.parametrize("p,n,expected", [(0.0, 8, 0), (0.5, 8, 4), (0.5, 7, 3), (1.0, 5, 5), (0.25, 3, 0)])
def test_mask_sample_probability(p, n, expected):
    masks = sample_masks(n, 14, np.random.default_rng(11), mask_sample_probability=p)
    assert int((masks.sum(-1) > 0).sum()) == expected


@pytest.mark.parametrize("grid", [1, 2, 3, 4, (1, 8), (8, 1)])
def test_small_grids_terminate(grid):
    """4x4 patches (32-px crops, patch 8) and smaller: the generator stops below its target
    instead of looping; a block never spans a whole side (DINOv2), so 1-wide grids stay empty."""
    rng = np.random.default_rng(0)
    for ratio in [(0.1, 0.5), (0.9, 1.0), (1.0, 1.0)]:
        masks = sample_masks(32, grid, rng, mask_ratio_min_max=ratio, mask_sample_probability=1.0)
        h, w = (grid, grid) if isinstance(grid, int) else grid
        assert masks.shape == (32, h * w)
        assert int(masks.sum(-1).max()) <= int(h * w * ratio[1])
        if min(h, w) == 1:
            assert not masks.any()
    if grid == 4:  # 16 patches: the 0.1..0.5 range masks something
        assert sample_masks(8, 4, np.random.default_rng(1), mask_sample_probability=1.0,
                            mask_ratio_min_max=(0.3, 0.5)).any()


def test_masks_deterministic_from_the_generator_and_never_the_global_rng():
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    a = sample_masks(16, 14, mask_rng(0, 7, rank=1))
    b = sample_masks(16, 14, mask_rng(0, 7, rank=1))
    assert torch.equal(a, b) and a.any()
    assert not torch.equal(a, sample_masks(16, 14, mask_rng(0, 8, rank=1)))  # next step
    assert not torch.equal(a, sample_masks(16, 14, mask_rng(0, 7, rank=0)))  # other rank
    assert not torch.equal(a, sample_masks(16, 14, mask_rng(0, 7, rank=1, micro_batch=1)))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c1, c2 = sample_masks(16, 14, g1), sample_masks(16, 14, g2)
    assert torch.equal(c1, c2)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(c1, sample_masks(16, 14, g1))  # the torch stream advanced
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_masks_bad_inputs_raise():
    with pytest.raises(TypeError, match="global RNG"):
        sample_masks(4, 4, None)
    with pytest.raises(TypeError, match="Generator"):
        sample_masks(4, 4, 123)
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        sample_masks(4, 4, np.random.default_rng(0), mask_ratio_min_max=(0.5, 0.1))
    with pytest.raises(ValueError, match="mask_sample_probability"):
        sample_masks(4, 4, np.random.default_rng(0), mask_sample_probability=1.5)
    with pytest.raises(ValueError, match="n_samples"):
        sample_masks(-1, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="differs"):
        sample_masks(4, 4, np.random.default_rng(0), masking=MaskingGenerator(5))
    with pytest.raises(ValueError, match="mask_rng"):
        mask_rng(0, -1)
    assert sample_masks(0, 4, np.random.default_rng(0)).shape == (0, 16)


def test_patch_masks_order_and_weights():
    masks = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    pm = PatchMasks.from_masks(masks)
    assert pm.indices.tolist() == [1, 3, 8, 9, 10] and pm.n_masked == 5 and pm.n_samples == 3
    assert_close(pm.weights, torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3]), name="weights")
    from_list = PatchMasks.from_masks([masks[:2], masks[2:]])
    assert torch.equal(from_list.masks, masks) and torch.equal(from_list.indices, pm.indices)
    assert PatchMasks.from_masks(pm) is pm
    with pytest.raises(ValueError, match="bool"):
        PatchMasks.from_masks(masks.float())


# ----------------------------------------------------------------------------- loss
def _loss_loop(student, teacher, masks, center, student_temp, teacher_temp):
    """iBOT's patch loss from the paper's definition, one sample and one patch at a time, float64:
    for each global-view sample i with masked set P_i, L_i = mean_{p in P_i} -sum_k
    softmax((t_p - c) / tau_t)_k log softmax(s_p / tau_s)_k (0 when P_i is empty); the loss is
    mean_i L_i. Rows of student/teacher are the masked patches in sample-major, patch order."""
    total, row = 0.0, 0
    for i in range(masks.shape[0]):
        patch_losses = []
        for j in range(masks.shape[1]):
            if not masks[i, j]:
                continue
            t = (teacher[row].double() - center.double().reshape(-1)) / teacher_temp
            s = student[row].double() / student_temp
            q = torch.exp(t - t.max())
            q = q / q.sum()
            log_p = s - (s.max() + torch.log(torch.exp(s - s.max()).sum()))
            patch_losses.append(-(q * log_p).sum())
            row += 1
        if patch_losses:
            total = total + sum(patch_losses) / len(patch_losses)
    assert row == student.shape[0]
    return total / masks.shape[0]


def _toy(n, N, K, seed, p=0.4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, N, generator=g) < p
    masks[0] = False  # one sample without masked patches (counts in the mean with 0)
    masks[-1, 0] = True
    M = int(masks.sum())
    student = (3 * torch.randn(M, K, generator=g)).to(dtype)
    teacher = (3 * torch.randn(M, K, generator=g)).to(dtype)
    center = 0.5 * torch.randn(1, K, generator=g)
    return masks, student, teacher, center


@pytest.mark.parametrize("n,N,K", [(2, 4, 3), (6, 16, 65), (5, 49, 128), (8, 7, 1000)])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (0.1, 0.07), (0.2, 0.5)])
def test_ibot_loss_equals_plain_loop(n, N, K, temps):
    seed = _seed("loop", n, N, K, temps)
    masks, student, teacher, center = _toy(n, N, K, seed)
    loss_fn = iBOTPatchLoss(K, student_temp=temps[0])
    loss_fn.center.copy_(center)
    loss = loss_fn(student, teacher, masks, temps[1])
    expected = _loss_loop(student, teacher, masks, center, *temps)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, expected, torch.float32, name="ibot loss")


def test_ibot_loss_gradient_equals_autograd_of_the_loop():
    seed = _seed("grad")
    masks, student, teacher, center = _toy(4, 9, 17, seed, p=0.5)
    student64 = student.double().requires_grad_(True)
    _loss_loop(student64, teacher, masks, center, 0.1, 0.05).backward()
    s = student.clone().requires_grad_(True)
    loss_fn = iBOTPatchLoss(17)
    loss_fn.center.copy_(center)
    loss_fn(s, teacher, masks, 0.05).backward()
    assert_close(s.grad, student64.grad, torch.float32, name="d loss / d student")
    # and the library function itself against finite differences, in float64
    probs = loss_fn.teacher_probs(teacher.double(), 0.05).double()
    weights = PatchMasks.from_masks(masks).weights.double()
    x = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ibot_patch_loss_from_probs(z, probs, weights, 4, 0.1), (x,))


def test_ibot_loss_bf16_inputs_in_fp32():
    seed = _seed("bf16")
    masks, student, teacher, center = _toy(4, 16, 33, seed)
    loss_fn = iBOTPatchLoss(33)
    ref = loss_fn(student.bfloat16().float(), teacher.bfloat16().float(), masks, 0.04, update_center=False)
    got = loss_fn(student.bfloat16(), teacher.bfloat16(), masks, 0.04, update_center=False)
    assert got.dtype == torch.float32
    assert_close(got, ref, torch.float32, name="bf16 inputs")


def test_no_masked_patches_gives_zero_loss_and_keeps_the_center():
    loss_fn = iBOTPatchLoss(5)
    loss_fn.center.fill_(0.3)
    s = torch.zeros(0, 5, requires_grad=True)
    loss = loss_fn(s, torch.zeros(0, 5), torch.zeros(3, 4, dtype=torch.bool), 0.04)
    loss.backward()
    assert float(loss.detach()) == 0.0 and s.grad.shape == (0, 5)
    assert torch.equal(loss_fn.center, torch.full((1, 5), 0.3))


def test_center_update_equals_its_definition():
    seed = _seed("center")
    masks, student, teacher, center = _toy(6, 16, 11, seed)
    loss_fn = iBOTPatchLoss(11, center_momentum=0.9)
    loss_fn.center.copy_(center)
    loss_before = _loss_loop(student, teacher, masks, center, 0.1, 0.04)
    storage = loss_fn.center.data_ptr()
    assert_close(loss_fn(student, teacher, masks, 0.04), loss_before, torch.float32, name="uses the old center")
    expected = 0.9 * center + 0.1 * teacher.double().mean(0, keepdim=True)
    assert_close(loss_fn.center, expected, torch.float32, name="center")
    assert loss_fn.center.data_ptr() == storage  # updated in place
    assert "center" in loss_fn.state_dict() and loss_fn.state_dict()["center"].shape == (1, 11)


def test_deferred_center_is_one_update_over_all_micro_batches():
    seed = _seed("defer")
    parts = [_toy(3, 9, 7, seed + i) for i in range(3)]
    loss_fn = iBOTPatchLoss(7)
    center0 = parts[0][3]
    loss_fn.center.copy_(center0)
    for masks, s, t, _ in parts:
        loss_fn(s, t, masks, 0.04, update_center=False)
        assert torch.equal(loss_fn.center, center0)
    loss_fn.flush_center()
    teachers = torch.cat([t for _, _, t, _ in parts])
    assert_close(loss_fn.center, 0.9 * center0 + 0.1 * teachers.mean(0, keepdim=True), torch.float32,
                 name="deferred center")
    loss_fn.flush_center()  # nothing pending: no second step
    assert_close(loss_fn.center, 0.9 * center0 + 0.1 * teachers.mean(0, keepdim=True), torch.float32,
                 name="second flush")


@pytest.mark.parametrize("M,K", [(5, 3), (37, 64), (200, 17)])
def test_sinkhorn_knopp_teacher_on_patches(M, K):
    _seed("sk", M, K)
    t = torch.randn(M, K)
    q = sinkhorn_knopp_teacher(t, 0.07)
    assert q.shape == (M, K) and q.dtype == torch.float32
    assert_close(q, dinov2_sinkhorn(t, 0.07, M), torch.float32, rtol=1e-4, atol=1e-7, name="vs dinov2")
    assert_close(q.sum(1), torch.ones(M), torch.float32, rtol=1e-5, atol=1e-5, name="patch rows sum to 1")
    # many iterations: every prototype gets M/K of the mass (the equipartition constraint)
    q_many = sinkhorn_knopp_teacher(t, 0.07, n_iterations=200)
    assert_close(q_many.sum(0), torch.full((K,), M / K), torch.float32, rtol=1e-3, atol=1e-4, name="prototypes")
    # logits DINOv2's fp32 exp overflows on (and patches it underflows to 0/0): finite, rows sum to 1
    q_big = sinkhorn_knopp_teacher(50 * t, 0.04)
    assert torch.isfinite(q_big).all()
    assert_close(q_big.sum(1), torch.ones(M), torch.float32, rtol=1e-5, atol=1e-5, name="large logits")
    assert_close(sinkhorn_knopp_teacher(t + 100.0, 0.07), q, torch.float32, rtol=1e-3, atol=1e-6,
                 name="shift invariance")


def test_sinkhorn_centering_in_the_loss():
    seed = _seed("sk-loss")
    masks, student, teacher, _ = _toy(4, 16, 9, seed)
    teacher = teacher / 4  # DINOv2's fp32 exp(t / tau) overflows past t / tau = 88
    loss_fn = iBOTPatchLoss(9, centering="sinkhorn_knopp")
    loss = loss_fn(student, teacher, masks, 0.05)
    probs = dinov2_sinkhorn(teacher, 0.05, teacher.shape[0])
    pm = PatchMasks.from_masks(masks)
    expected = -(probs * F.log_softmax(student / 0.1, -1)).sum(-1).mul(pm.weights).sum() / 4
    assert_close(loss, expected, torch.float32, rtol=1e-4, name="sk loss")
    assert torch.count_nonzero(loss_fn.center) == 0  # not used, not updated


def test_ibot_loss_bad_inputs_raise():
    loss_fn = iBOTPatchLoss(4)
    masks = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    ok = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"expected \(masked patches, patch_out_dim\) = \(3, 4\)"):
        loss_fn(torch.randn(2, 4), ok, masks, 0.04)
    with pytest.raises(ValueError, match="patch_out_dim"):
        loss_fn(torch.randn(3, 5), torch.randn(3, 5), masks, 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(ok, ok, masks, 0.0)
    with pytest.raises(ValueError, match="centering"):
        iBOTPatchLoss(4, centering="sinkhorn")
    with pytest.raises(ValueError, match="patch_out_dim"):
        iBOTPatchLoss(0)


# ----------------------------------------------------------------------------- two ranks (gloo)
_CASES = ((5, 3), (4, 0))  # masked patches per rank: ranks mask different numbers, one rank none


def _two_rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for case in _CASES:
            t_all, s_all, center0 = _two_rank_inputs(case)
            start, rows = sum(case[:rank]), case[rank]
            mine, student = t_all[start:start + rows], s_all[start:start + rows]
            loss_fn = iBOTPatchLoss(t_all.shape[1])
            loss_fn.center.copy_(center0)
            masks = torch.ones(1, rows, dtype=torch.bool)
            loss_fn(student, mine, masks, 0.04)
            results[case] = {"q": sinkhorn_knopp_teacher(mine, 0.07), "center": loss_fn.center.clone()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_rank_inputs(case):
    g = torch.Generator().manual_seed(sum(case))
    n = sum(case)
    return torch.randn(n, 7, generator=g), torch.randn(n, 7, generator=g), torch.randn(1, 7, generator=g)


def test_two_ranks_pool_center_and_sinkhorn_over_all_masked_patches(tmp_path):
    """2 gloo ranks with different numbers of masked patches (one with none) give the center and
    the Sinkhorn-Knopp probabilities of one process holding every rank's patches."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for case in _CASES:
        t_all, _, center0 = _two_rank_inputs(case)
        expected_center = 0.9 * center0 + 0.1 * t_all.mean(0, keepdim=True)
        q_all = sinkhorn_knopp_teacher(t_all, 0.07)
        for r in range(2):
            got = ranks[r][case]
            assert_close(got["center"], expected_center, torch.float32, name=f"center rank {r} {case}")
            start = sum(case[:r])
            assert_close(got["q"], q_all[start:start + case[r]], torch.float32, rtol=1e-5, atol=1e-6,
                         name=f"sinkhorn rank {r} {case}")
