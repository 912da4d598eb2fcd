"""FSDP2 training on CPU (gloo): ranks spawned from pytest.

- 2 ranks x batch B give the losses and parameters of 1 process x batch 2B (same images and
  augmentations: the sampler hands rank r slice r of the 1-process batch);
- per-parameter gradient clipping uses the full parameter's norm;
- sharded (DCP) checkpoints resume on another world size, single files resume sharded;
- a crash in the middle of a save leaves a ``.tmp`` directory; ``--resume auto`` ignores it and
  continues from the last complete checkpoint exactly;
- ranks given different configs fail with a message naming the difference.

Each spawned rank writes its results to files; the assertions run in the pytest process.
"""
from __future__ import annotations

import csv
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.checkpoint import consolidate
from dino_fast.config import ConfigError
from dino_fast.distributed import is_distributed
from dino_fast.eval.knn import knn_eval
from dino_fast.pretrained import load_pretrained
from dino_fast.train import Trainer
from tests.helpers import assert_close, requires_cuda
from tests.helpers import legacy_checkpoint
from tests.test_train import tiny_cfg

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")]

STEPS = 4  # checkpoints at 2 and 4 (tiny_cfg: checkpoint_every=2); 5 batches per epoch
B = 4  # per-rank batch of the 2-rank runs; the 1-process reference uses 2 * B
CPU = torch.device("cpu")  # the in-process references run where the spawned ranks do


# ----------------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    """A torchrun-like rank: env set, so ``Trainer`` -> ``init_distributed`` joins a gloo group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if is_distributed():
            dist.destroy_process_group()
    # A rank that finished leaves without the interpreter's finalization: there, 3 runs of this file in 10 died of
    # SIGABRT ("terminate called without an active exception") after both ranks had finished and
    # destroyed the group (a C++ thread still joinable at teardown), failing a run that had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn: Callable, world: int, *args: Any, gpu: bool = False) -> None:
    """``world`` ranks running ``fn(rank, world, *args)``. Without ``gpu`` the ranks see no GPU
    (CPU + gloo, whatever the machine has), so 2 ranks never contend for one device."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the children only: CUDA here is already set up
    try:
        mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
    finally:
        if hidden is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden


def _cfg(data: Path, out: Path, batch: int, **kw):
    # drop path 0: its per-sample draws cannot match between 1 and 2 processes
    return tiny_cfg(data, out, batch_size_per_gpu=batch, drop_path_rate=0.0, **{"max_steps": STEPS, **kw})


def _full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Full (unsharded) student and teacher parameters and the center, on rank 0 (collective)."""
    if is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        student = get_model_state_dict(trainer.student, options=opts)
        teacher = get_model_state_dict(trainer.teacher, options=opts)
    else:
        student, teacher = trainer.student.state_dict(), trainer.teacher.state_dict()
    out = {f"student.{k}": v.detach().clone() for k, v in student.items()}
    out.update({f"teacher.{k}": v.detach().clone() for k, v in teacher.items()})
    out["center"] = trainer.objective.dino_loss.center.detach().cpu().clone()
    return out


def _losses(out: Path) -> dict[int, float]:
    """step -> loss from metrics.csv (the last row wins for a step logged twice across a resume)."""
    return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(open(out / "metrics.csv"))}


def _split_key_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """qkv.bias -> q/k/v parts, so the attention key bias can get its own tolerance."""
    out = {}
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            for part, chunk in zip("qkv", v.chunk(3)):
                out[k.replace("qkv.bias", f"{part}_bias")] = chunk
        else:
            out[k] = v
    return out


def _assert_states_close(actual: dict, expected: dict, what: str, lr_sum: float, rtol: float = 1e-5,
                         atol: float = 1e-6) -> None:
    """fp32 tolerance everywhere but on the student's attention key biases: their gradient is
    zero in exact arithmetic (softmax ignores a shift shared by all keys), so what they get is
    rounding noise, which Adam scales up to steps of about lr whatever its sign or size: the
    1-process and 2-rank runs may move them anywhere within 2 x (sum of the lrs)."""
    actual, expected = _split_key_bias(actual), _split_key_bias(expected)
    assert actual.keys() == expected.keys(), f"{what}: keys differ {sorted(actual.keys() ^ expected.keys())[:5]}"
    failures = []
    for k in expected:
        noise_only = k.startswith("student.") and k.endswith("attn.k_bias")
        try:
            assert_close(actual[k], expected[k], rtol=rtol, atol=2 * lr_sum if noise_only else atol,
                         name=f"{what}: {k}")
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, f"{len(failures)} tensors differ:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------- rank programs
class _InjectedCrash(BaseException):
    """A kill mid-save: like SIGKILL it is no error the save can report, so it passes every handler."""


def _rank_train_crash_resume(rank: int, world: int, data: Path, out: Path, res: Path) -> None:
    """Fresh 2-rank run whose save at step STEPS dies after the shards are written but before
    the rename; then a new trainer resumes with resume=auto and trains to STEPS again."""
    import dino_fast.checkpoint as dc
    from torch.distributed.tensor import DTensor

    cfg = _cfg(data, out, B)
    trainer = Trainer(cfg)
    assert trainer.sharded and trainer.world == world
    assert all(isinstance(p, DTensor) for p in trainer.student.parameters())
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    real_save = dc.dcp.save

    def crashing_save(state: dict, **kw: Any) -> None:
        real_save(state, **kw)
        if state["train"]["step"] == STEPS:
            raise _InjectedCrash("killed mid-save")

    dc.dcp.save = crashing_save
    try:
        trainer.fit()
        raise AssertionError("the injected crash did not happen")
    except _InjectedCrash:
        pass
    finally:
        dc.dcp.save = real_save
    crashed = _full_state(trainer)
    listing = sorted(p.name for p in (out / "checkpoints").iterdir())
    dist.barrier()
    resumed = Trainer(cfg.replace(resume="auto"))
    resumed.fit()
    final = _full_state(resumed)
    if rank == 0:
        torch.save({"crashed": crashed, "final": final, "listing_after_crash": listing,
                    "resumed_from": str(resumed._last_ckpt)}, res / "train_crash_resume.pt")
    _check_clip_full_norm(rank, world, res)


def _check_clip_full_norm(rank: int, world: int, res: Path) -> None:
    """clip_gradients_ on a sharded model == on the unsharded model (per-parameter FULL norms)."""
    from torch.distributed.fsdp import fully_shard

    from dino_fast.optim import clip_gradients_

    torch.manual_seed(0)
    # dim-0 sizes 7 and 3 split unevenly over 2 ranks; grads scaled so some norms exceed the clip and some do not
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    grads = [torch.randn_like(p) * s for p, s in zip(ref.parameters(), (3.0, 0.1, 2.0, 0.05))]
    sharded = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    sharded.load_state_dict(ref.state_dict())
    fully_shard(sharded)
    for p, g in zip(ref.parameters(), grads):
        p.grad = g.clone()
    for p, g in zip(sharded.parameters(), grads):
        p.grad = torch.distributed.tensor.distribute_tensor(g.clone(), p.device_mesh, p.placements)
    norms_ref = clip_gradients_(ref, 1.0)
    norms = clip_gradients_(sharded, 1.0)
    full = [p.grad.full_tensor() for p in sharded.parameters()]
    if rank == 0:
        torch.save({"norms": norms, "norms_ref": norms_ref, "grads": full,
                    "grads_ref": [p.grad for p in ref.parameters()]}, res / "clip.pt")


def _rank_fsdp_one_process(rank: int, world: int, data: Path, out: Path, res: Path) -> None:
    """fsdp=true on a single rank: the sharded path (DCP checkpoint) with world size 1, with
    activation checkpointing (its wrapper must not leak into checkpoint keys)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    trainer = Trainer(_cfg(data, out, 2 * B, fsdp=True, activation_checkpointing=True, max_steps=2))
    assert trainer.sharded and trainer.world == 1
    assert all(isinstance(b, CheckpointWrapper) for b in trainer.student.backbone.blocks)
    # the sharded teacher backbone runs alone (k-NN), even before any full forward
    top1, _ = knn_eval(trainer.teacher.backbone, data / "train", data / "val", 32, ks=(3,), num_workers=0)[3]
    assert 0 <= top1 <= 100
    trainer.fit()
    torch.save(_full_state(trainer), res / "one_rank_step2.pt")


def _rank_resume_on_two(rank: int, world: int, data: Path, out: Path, res: Path, file_ckpt: str,
                        dcp_ckpt: str) -> None:
    """2 ranks resume (a) a single file of earlier versions and (b) a 1-rank DCP directory."""
    for name, ckpt in (("from_file", file_ckpt), ("from_dcp1", dcp_ckpt)):
        trainer = Trainer(_cfg(data, out / name, B, resume=ckpt))
        trainer.fit()
        state = _full_state(trainer)
        if rank == 0:
            torch.save(state, res / f"{name}.pt")


def _rank_config_mismatch(rank: int, world: int, data: Path, out: Path, res: Path) -> None:
    lr = 1e-3 if rank == 0 else 2e-3
    try:
        Trainer(_cfg(data, out, B, lr=lr))
    except ConfigError as e:
        (res / f"mismatch_rank{rank}.txt").write_text(str(e))


def _cuda_cfg(data: Path, out: Path, **kw):
    return tiny_cfg(data, out, drop_path_rate=0.0, max_steps=3, checkpoint_every=3, precision="bf16",
                    loss_impl="auto", ema_impl="auto", attn_backend="auto", **kw)


def _rank_cuda_fsdp(rank: int, world: int, data: Path, out: Path, res: Path) -> None:
    """One GPU, nccl, FSDP2 with bf16 compute parameters (MixedPrecisionPolicy), Triton loss/EMA."""
    trainer = Trainer(_cuda_cfg(data, out, fsdp=True))
    assert trainer.device.type == "cuda" and trainer.sharded
    trainer.fit()
    torch.save(_full_state(trainer), res / "cuda_fsdp.pt")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo(demo_root) -> Path:
    return demo_root


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> dict[str, Any]:
    """1 process, batch 2B, not sharded: checkpoints at steps 2 and 4, and at step 2 also a
    single file in the format of earlier versions (resumed through the one-way converter)."""
    out = tmp_path_factory.mktemp("ref")
    trainer = Trainer(_cfg(demo, out, 2 * B, max_steps=2), device=CPU)
    assert not trainer.sharded
    init = _full_state(trainer)
    trainer.fit()
    legacy = out / "legacy-00000002.pth"
    torch.save(legacy_checkpoint(trainer), legacy)
    trainer = Trainer(_cfg(demo, out, 2 * B, resume="auto"), device=CPU)  # resume is exact (test_train)
    trainer.fit()
    lr_sum = sum(trainer.plan.at(step).lr for step in range(STEPS))
    return {"out": out, "init": init, "state": _full_state(trainer), "losses": _losses(out), "lr_sum": lr_sum,
            "legacy": legacy}


@pytest.fixture(scope="module")
def two_ranks(demo, tmp_path_factory) -> dict[str, Any]:
    out, res = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("two_res")
    _spawn(_rank_train_crash_resume, 2, demo, out, res)
    return {"out": out, "res": res, **torch.load(res / "train_crash_resume.pt", weights_only=False)}


# ----------------------------------------------------------------------------- tests
def test_two_ranks_match_one_process(reference, two_ranks):
    ref_losses = reference["losses"]
    losses = _losses(two_ranks["out"])  # rank 0's CSV: losses averaged over the ranks
    assert sorted(losses) == sorted(ref_losses) == list(range(1, STEPS + 1))
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), f"loss at step {step}"
    _assert_states_close(two_ranks["crashed"], reference["state"], "2 ranks vs 1 process", reference["lr_sum"])
    # the models moved: the comparison is not between two untouched initialisations
    for k in ("student.backbone.blocks.0.attn.qkv.weight", "teacher.backbone.blocks.0.attn.qkv.weight", "center"):
        assert not torch.allclose(reference["init"][k], reference["state"][k], rtol=0, atol=1e-7), k


def test_clip_uses_full_parameter_norm(two_ranks):
    r = torch.load(two_ranks["res"] / "clip.pt", weights_only=False)
    norms, norms_ref = torch.stack(r["norms"]), torch.stack(r["norms_ref"])
    assert_close(norms, norms_ref, name="per-parameter norms")
    assert (norms_ref > 1.0).any() and (norms_ref < 1.0).any()  # both branches of the clip ran
    for i, (g, g_ref) in enumerate(zip(r["grads"], r["grads_ref"])):
        assert_close(g, g_ref, name=f"clipped grad {i}")


def test_crash_mid_save_resumes_from_last_complete(two_ranks):
    assert "step-00000004.tmp" in two_ranks["listing_after_crash"]
    assert "step-00000004" not in two_ranks["listing_after_crash"]
    assert two_ranks["resumed_from"].endswith("step-00000004")  # the resumed run's own final save
    names = sorted(p.name for p in (two_ranks["out"] / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"]  # the .tmp leftover was replaced
    crashed, final = two_ranks["crashed"], two_ranks["final"]
    for k in crashed:  # same world size, same data, restored RNG: exactly the same run
        assert torch.equal(crashed[k], final[k]), f"{k} differs after resuming from step 2"


def test_dcp_from_two_ranks_resumes_on_one_process(demo, reference, two_ranks, tmp_path):
    ckpt = two_ranks["out"] / "checkpoints" / "step-00000002"
    trainer = Trainer(_cfg(demo, tmp_path, 2 * B, resume=str(ckpt)), device=CPU)
    trainer.fit()
    assert trainer.step == STEPS and not trainer.sharded
    _assert_states_close(_full_state(trainer), reference["state"], "2-rank DCP -> 1 process", reference["lr_sum"])
    # export: the full models of a sharded checkpoint on one process, loadable as pretrained weights
    full = consolidate(two_ranks["out"] / "checkpoints" / "step-00000004")
    assert full["step"] == STEPS and full["config"]["batch_size_per_gpu"] == B
    for name in ("student", "teacher"):
        for k, v in full[name].items():
            assert torch.equal(v, two_ranks["final"][f"{name}.{k}"]), f"consolidated {name}.{k}"
    backbone = load_pretrained(full)
    assert torch.equal(backbone.cls_token, full["teacher"]["backbone.cls_token"])


def test_resume_on_two_ranks_from_file_and_one_rank_dcp(demo, reference, tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    _spawn(_rank_fsdp_one_process, 1, demo, tmp_path / "one", res)
    one_rank_dcp = tmp_path / "one" / "checkpoints" / "step-00000002"
    assert (one_rank_dcp / ".metadata").is_file()
    file_ckpt = reference["legacy"]
    ref2 = consolidate(reference["out"] / "checkpoints" / "step-00000002")
    ref2 = {**{f"student.{k}": v for k, v in ref2["student"].items()},
            **{f"teacher.{k}": v for k, v in ref2["teacher"].items()}, "center": ref2["dino_loss"]["center"]}
    _assert_states_close(torch.load(res / "one_rank_step2.pt"), ref2, "1-rank FSDP + activation checkpointing",
                         reference["lr_sum"])
    _spawn(_rank_resume_on_two, 2, demo, tmp_path / "two", res, str(file_ckpt), str(one_rank_dcp))
    for name in ("from_file", "from_dcp1"):
        _assert_states_close(torch.load(res / f"{name}.pt"), reference["state"], f"2 ranks resumed {name}",
                             reference["lr_sum"])


def test_ranks_with_different_configs_fail_clearly(demo, tmp_path):
    _spawn(_rank_config_mismatch, 2, demo, tmp_path / "o", tmp_path)
    for rank in (0, 1):
        msg = (tmp_path / f"mismatch_rank{rank}.txt").read_text()
        assert "different configs" in msg and "lr: rank 0 has 0.001, rank 1 has 0.002" in msg


@requires_cuda
def test_cuda_fsdp_bf16_one_rank(demo, tmp_path):
    """The GPU path: bf16 all-gathers, fp32 reduce, nccl, DCP; close to the unsharded bf16 run,
    and its sharded checkpoint loads into an unsharded trainer exactly."""
    _spawn(_rank_cuda_fsdp, 1, demo, tmp_path / "fsdp", tmp_path, gpu=True)
    sharded = torch.load(tmp_path / "cuda_fsdp.pt", weights_only=False)
    cuda = torch.device("cuda", torch.cuda.current_device())
    ref = Trainer(_cuda_cfg(demo, tmp_path / "ref"), device=cuda)
    ref.fit()
    ref_losses, losses = _losses(tmp_path / "ref"), _losses(tmp_path / "fsdp")
    assert sorted(losses) == sorted(ref_losses) == [1, 2, 3]
    for step in ref_losses:  # bf16 weights (FSDP) vs bf16 autocast of fp32 weights
        assert losses[step] == pytest.approx(ref_losses[step], rel=2e-2), f"loss at step {step}"
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000003"
    loaded = Trainer(_cuda_cfg(demo, tmp_path / "load"), device=cuda)
    loaded.resume(str(ckpt))
    assert loaded.step == 3
    state = _full_state(loaded)
    for k in sharded:
        assert torch.equal(state[k].cpu(), sharded[k].cpu()), f"{k} differs after loading the sharded checkpoint"
