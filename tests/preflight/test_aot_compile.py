"""Every Triton kernel, kept autotune config and dtype compiled ahead of time for sm_90 (and sm_80,
sm_100 where this Triton has them) with no GPU (bench/aot_compile.py): no compile error, no
register spill, registers and shared memory within a block's limits. CI runs the quick set (what
the vit_small_h200 preset launches, plus the no-grad loss); ``python3 -m bench.aot_compile --cc 90``
compiles the full set (every shape and dtype, ~160 compiles). The tool patches torch.cuda and
Triton's launch entry points, so it runs in a subprocess. Plus the grad kernel's tuners: the
spilling config is gone, and only the in-place call restores what trial runs overwrite."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TARGETS = (90, 80, 100)


@pytest.fixture(scope="module")
def aot(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "bench.aot_compile", "--quick", "--cc", *map(str, TARGETS),
                          "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"bench.aot_compile wrote no JSON (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("cc", TARGETS)
def test_kernels_compile_without_spills(aot, cc):
    res = aot[f"sm_{cc}"]
    if res.get("skipped"):
        if cc == 90:
            pytest.fail(f"sm_90 must compile here: {res['skipped']}")
        pytest.skip(res["skipped"])
    bad = [f"{r['case']} {r['kernel']} {r['cfg']}: {r['problems']}" for r in res["rows"] if r["problems"]]
    assert not bad, "\n".join(bad)
    assert res["spilling"] == 0 and res["failing"] == 0


def test_grad_configs_listed_are_the_kept_ones(aot):
    """The AOT tool lists exactly the grad kernel's configs (the (512, 4) one, which spilled, is gone)."""
    from dino_fast.kernels import dino_loss as dl

    listed = {(r["cfg"]["BLOCK_K"], r["cfg"]["num_warps"]) for r in aot["sm_90"]["rows"] if r["kernel"] == "_dino_grad_kernel"}
    assert listed == set(dl._GRAD_CONFIGS) and (512, 4) not in listed, listed


def test_problems_flag_spills_and_limits():
    from bench.aot_compile import REGISTERS_PER_BLOCK, SHARED_LIMIT, problems

    ok = {"regs": 64, "num_warps": 8, "spill_st": 0, "spill_ld": 0, "shared_B": 16384}
    assert problems(ok, 90) == []
    assert problems(dict(ok, spill_st=8, spill_ld=8), 90)
    assert problems(dict(ok, regs=REGISTERS_PER_BLOCK // 256 + 1), 90)  # 8 warps = 256 threads
    assert problems(dict(ok, shared_B=SHARED_LIMIT[80] + 1), 80) and not problems(dict(ok, shared_B=SHARED_LIMIT[80] + 1), 90)
    assert problems(dict(ok, regs=None), 90)


def test_only_the_in_place_grad_launch_restores(monkeypatch):
    """Autotuning the plain call must not clone G inside every timed run; the in-place call (G is the
    logits) must restore them. The launches are recorded on a fake GPU (bench.aot_compile)."""
    from bench.aot_compile import recording
    from dino_fast.kernels import dino_loss as dl

    launches: list = []
    with recording(132, launches, ["loss"]):
        s, t, c = torch.empty(12 * 64, 65536, dtype=torch.bfloat16), torch.empty(128, 65536), torch.empty(1, 65536)
        dl._dino_loss_impl(s, t, c, 0.1, 0.04, 12, 2, True, False, None, None)
        dl._dino_loss_impl(s, t, c, 0.1, 0.04, 12, 2, True, True, None, None)
    grad = [launch.tuner for launch in launches if launch.kernel.fn.__name__ == "_dino_grad_kernel"]
    assert [tuner.restore_value for tuner in grad] == [[], ["G_ptr"]]
    assert all(tuner.configs == grad[0].configs for tuner in grad)


def test_aot_tool_covers_every_kernel(aot):
    """A kernel added to kernels/ (``@triton.jit def _foo_kernel``) but not launched by the AOT capture fails here."""
    import dino_fast.kernels as pkg

    defined = set()
    for path in Path(pkg.__path__[0]).glob("*.py"):
        mod = importlib.import_module(f"dino_fast.kernels.{path.stem}") if path.stem != "__init__" else pkg
        defined |= {name for name, obj in vars(mod).items()
                    if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")}
    assert defined == {r["kernel"] for r in aot["sm_90"]["rows"]}, defined
