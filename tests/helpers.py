"""Shared test helpers: dtype tolerances, a comparison that reports the worst difference, output
poisoning, the CUDA skip mark, the old single-file checkpoint writer, a `dino-fast train`
subprocess, and image-file writers."""
from __future__ import annotations

import subprocess

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (rtol, atol) per dtype of the tensors under test.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

POISON = float("nan")


def tol(dtype: torch.dtype) -> tuple[float, float]:
    return TOL[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None, name: str = "tensor") -> None:
    """allclose that fails with the worst absolute/relative difference and its index.

    NaN anywhere in ``actual`` fails (that is how a poisoned, unwritten element shows)."""
    dtype = dtype or expected.dtype
    r, a = TOL.get(dtype, TOL[torch.float32])
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad_nan = torch.isnan(actual) & ~torch.isnan(expected)
    assert not bad_nan.any(), f"{name}: {int(bad_nan.sum())} NaN (unwritten/poisoned?) elements, first at {bad_nan.nonzero()[0].tolist()}"
    diff = (actual - expected).abs()
    limit = atol + rtol * expected.abs()
    if not bool((diff <= limit).all()):
        excess = diff - limit
        idx = int(excess.argmax())
        worst = diff.flatten()[idx].item()
        ref = expected.flatten()[idx].item()
        raise AssertionError(
            f"{name}: {int((diff > limit).sum())}/{diff.numel()} elements out of tolerance "
            f"(rtol={rtol}, atol={atol}); worst at flat index {idx}: got {actual.flatten()[idx].item():.6g}, "
            f"expected {ref:.6g}, |diff|={worst:.3g}, max |diff| overall {diff.max().item():.3g}")


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN so that unwritten elements fail the comparison."""
    return torch.full_like(t, POISON)


def dinov2_sinkhorn(teacher_output: torch.Tensor, teacher_temp: float, n_samples, n_iterations: int = 3):
    """DINOv2's two Sinkhorn-Knopp teachers on one process, as released, differing only in B:
    ``SinkhornKnoppTeacher.sinkhorn_knopp_teacher`` (B = rows * world size) and
    ``iBOTPatchLoss.sinkhorn_knopp_teacher`` (B = the all-reduced count of masked patches; it casts
    the teacher to fp32 first, so iBOT callers pass fp32). Runs in the input's dtype."""
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = n_samples
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def legacy_checkpoint(trainer) -> dict:
    """A trainer's state in the single-file format of earlier versions (``checkpoint-XXXXXXXX.pth``,
    format "dino_fast"), written as they wrote it: what the one-way converter must read."""
    import random

    import numpy as np

    return {"format": "dino_fast", "student": trainer.student.state_dict(), "teacher": trainer.teacher.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "dino_loss": trainer.objective.dino_loss.state_dict(),
            "step": trainer.step, "epoch": trainer.epoch, "config": trainer.cfg.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}


def start_train(cfg, log_file) -> subprocess.Popen:
    """``python -m dino_fast train`` on ``cfg`` (a TrainConfig) in a subprocess, output into ``log_file``."""
    import os
    import sys
    from pathlib import Path

    import yaml

    cfg_file = Path(log_file).with_suffix(".yaml")
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log_file, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "dino_fast", "train", "--config", str(cfg_file)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def wait_for(path, proc, log_file, timeout_s: float = 180.0) -> None:
    """Until ``path`` exists while ``proc`` runs; fails with the log's tail if ``proc`` ends first."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout_s
    while not Path(path).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"training exited early: {Path(log_file).read_text()[-2000:]}"
    assert Path(path).exists(), f"{path} did not appear within {timeout_s} s"


# ----------------------------------------------------------------------------- image files
def write_image(path, w: int, h: int, seed: int = 0) -> None:
    """A random RGB image of ``w`` x ``h`` pixels at ``path`` (format from the suffix)."""
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def write_image_folder(root, classes: int = 2, per_class: int = 3, seed: int = 0, size=(40, 34),
                       names=None, solid: bool = False) -> None:
    """``root/<class>/img<i>.png``: classes ``class0..`` or ``names``; random pixels, or with
    ``solid`` one flat color per class NAME (same name, same images in every folder)."""
    import zlib

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(names if names is not None else [f"class{c}" for c in range(classes)]):
        (root / name).mkdir(parents=True)
        color = np.random.default_rng(zlib.crc32(name.encode())).integers(0, 256, 3, dtype=np.uint8)
        for i in range(per_class):
            if solid:
                arr = np.broadcast_to(color, (size[1], size[0], 3)).copy()
            else:
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"img{i}.png")
