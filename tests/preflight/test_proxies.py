"""The pre-flight proxies' counting functions (bench/preflight.py) on a tiny config, on the fake
CUDA device: the phases add up to the step, clipping + optimizer + EMA dispatch a fixed number of
ops whatever the parameter count (foreach / fused kernels: issue 27's launch target), saved
activation bytes are affine in the batch, and Dynamo's counts reach both models."""
from __future__ import annotations

import pytest

from bench.common import device_peaks
from bench.preflight import PATHS, PHASES, compile_counts, count_step, make_config, phase_rows, saved_bytes

pytest.importorskip("torch.nn.attention.varlen", reason="varlen attention needs torch >= 2.10")

PEAKS = {"h100": device_peaks("NVIDIA H100 80GB HBM3"), "h200": device_peaks("NVIDIA H200")}
TINY = dict(depth=1, out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32, batch_size_per_gpu=2,
            global_crops_size=32, local_crops_size=16, local_crops_number=2)
UPDATE = ("clip", "optimizer", "ema")


def _cfg(path: str = "fast", **kw):
    return make_config("vit_small_h200", **{**TINY, **PATHS[path], "compile": False, **kw})


@pytest.mark.parametrize("path", list(PATHS))
def test_phases_add_up_to_the_step(path):
    rows = {r["phase"]: r for r in phase_rows(count_step(_cfg(path), PEAKS)[0], launch_us=5.0)}
    assert set(rows) == {*PHASES, "total"}
    for key in ("ops", "launches", "gflop", "gbyte", "h100_ms", "h200_ms", "launch_ms"):
        parts = sum(rows[p][key] for p in PHASES)
        assert parts == pytest.approx(rows["total"][key], rel=1e-12), (key, parts, rows["total"][key])
    for phase in ("teacher_fwd", "student_fwd", "loss", "backward", *UPDATE):
        assert rows[phase]["launches"] > 0, f"nothing counted in {phase}: {rows[phase]}"
    assert rows["student_fwd"]["gflop"] > rows["teacher_fwd"]["gflop"] > 0  # more views through the student
    assert rows["backward"]["gflop"] > rows["student_fwd"]["gflop"]  # about twice the forward
    for gpu, (gbps, tflops) in PEAKS.items():  # each op's roofline >= its FLOP time and its byte time
        total = rows["total"]
        assert total[f"{gpu}_ms"] >= max(total["gflop"] / tflops, total["gbyte"] / gbps) - 1e-12


def test_update_ops_do_not_grow_with_the_parameter_count():
    """Clip, optimizer and EMA run over all parameters in a fixed number of ops (a per-parameter
    Python loop, like the official clip, would add ops with every block)."""
    counts = {}
    for depth in (1, 3):
        rows = {r["phase"]: r for r in phase_rows(count_step(_cfg(depth=depth), PEAKS)[0], launch_us=5.0)}
        counts[depth] = {p: rows[p]["ops"] for p in (*UPDATE, "student_fwd")}
    assert counts[3]["student_fwd"] > counts[1]["student_fwd"]  # the deeper model has more to do
    assert {p: counts[3][p] for p in UPDATE} == {p: counts[1][p] for p in UPDATE}, counts


def test_saved_bytes_are_affine_in_the_batch():
    totals = [sum(by_dtype.values()) for by_dtype in saved_bytes(_cfg(), (1, 2, 3))]
    assert 0 < totals[0] < totals[1] < totals[2]
    assert totals[2] - totals[1] == totals[1] - totals[0], totals  # a fixed part + the same per image


def test_compile_counts_reach_both_models():
    row = compile_counts(_cfg(compile=True), steps=2)
    assert row["graphs_student"] >= 1 and row["graphs_teacher"] >= 1, row
    assert row["compile_steps"] == 2
