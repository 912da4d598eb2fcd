"""Packaging metadata (pyproject.toml): the extras and their pins, the kernels mapping, the console
script, the single-sourced version. Offline and cheap: nothing is downloaded; one wheel is built
from a copy of the sources with the setuptools already installed."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
# The newest torch / torchvision on this machine's disk (pip is capped there): no requirement may
# force a newer one, or every later install downloads gigabytes.
NEWEST_LOCAL = {"torch": Version("2.14.1"), "torchvision": Version("0.29.1")}


def reqs(items: list[str]) -> dict[str, Requirement]:
    """Requirements by normalized name (PEP 503: dino_fast == dino-fast)."""
    return {re.sub(r"[-_.]+", "-", r.name).lower(): r for r in map(Requirement, items)}


def admits_local(req: Requirement, candidates: list[str]) -> bool:
    return any(req.specifier.contains(v) for v in candidates if Version(v) <= NEWEST_LOCAL[req.name])


def test_base_torch_bounds_what_was_tested():
    base = reqs(PROJECT["dependencies"])
    torch = base["torch"].specifier
    # tested: 2.11.0 (+cu130) on an H200, 2.14.1 (CPU) here; nothing past the tested minor
    for v in ("2.6.0", "2.10.0", "2.11.0", "2.14.1"):
        assert torch.contains(v), f"base torch {torch} must admit {v}"
    assert not torch.contains("2.15.0"), f"base torch {torch} admits untested 2.15"
    assert "<=2.14.1" not in str(torch), "the machine's pip cap is not the project's bound"
    tv = base["torchvision"].specifier
    assert tv.contains("0.29.1") and tv.contains("0.26.0") and not tv.contains("0.30.0")


@pytest.mark.parametrize("extra", ["test", "cu128", "cu130", "dev"])
def test_extra_exists(extra):
    assert EXTRAS.get(extra), f"extra [{extra}] missing or empty"


def test_cu128_is_torch_2_10_with_xformers_and_dali_cuda120():
    r = reqs(EXTRAS["cu128"])
    assert r["torch"].specifier.contains("2.10.1") and not r["torch"].specifier.contains("2.11.0")
    assert not r["torch"].specifier.contains("2.9.1")
    assert r["torchvision"].specifier.contains("0.25.0") and not r["torchvision"].specifier.contains("0.26.0")
    assert str(r["xformers"].specifier) == "==0.0.35"  # built for torch 2.10.0+cu128
    assert "nvidia-dali-cuda120" in r and "nvidia-dali-cuda130" not in r


def test_cu130_is_torch_2_11_up_with_dali_cuda130_and_no_xformers():
    r = reqs(EXTRAS["cu130"])
    assert r["torch"].specifier.contains("2.11.0") and not r["torch"].specifier.contains("2.10.1")
    assert "nvidia-dali-cuda130" in r and "nvidia-dali-cuda120" not in r
    assert "xformers" not in r, "no xformers release has kernels for a CUDA 13 torch"


def test_test_and_dev_extras():
    test = reqs(EXTRAS["test"])
    assert {"pytest", "pytest-benchmark"} <= set(test)
    dev = reqs(EXTRAS["dev"])
    assert dev["dino-fast"].extras == {"test"}, "dev = test + the CPU-safe extras"
    assert "nvidia-dali-cuda130" in dev, "the DALI CPU tests need DALI"
    assert "nvidia-dali-cuda120" not in dev and "torch" not in dev, "dev must stay CPU-safe, any torch"


def test_no_requirement_forces_a_torch_newer_than_the_local_wheels():
    for where, items in [("dependencies", PROJECT["dependencies"]), *EXTRAS.items()]:
        for req in map(Requirement, items):
            if req.name in NEWEST_LOCAL:
                assert admits_local(req, ["2.10.1", "2.11.0", "2.14.1", "0.25.0", "0.26.0", "0.29.1"]), \
                    f"[{where}] {req} admits no {req.name} <= {NEWEST_LOCAL[req.name]}"


def test_console_script_declared():
    assert PROJECT["scripts"]["dino-fast"] == "dino_fast.cli:main"


def test_version_single_sourced():
    assert "version" not in PROJECT and "version" in PROJECT.get("dynamic", [])
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "dino_fast.__version__"
    tree = ast.parse((ROOT / "dino_fast" / "__init__.py").read_text())
    literal = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
               and any(getattr(t, "id", None) == "__version__" for t in n.targets)]
    # setuptools reads a literal without importing dino_fast (which needs torch)
    assert len(literal) == 1, "dino_fast/__init__.py needs exactly one literal __version__"
    _assert_setup_py_is_a_shim()
    try:
        installed = importlib.metadata.version("dino_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dino_fast is not installed")
    assert installed == literal[0]


def _assert_setup_py_is_a_shim() -> None:
    """setup.py (the card's layout lists it) only calls ``setup()``: pyproject.toml stays the one
    source of metadata."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1 and not calls[0].args and not calls[0].keywords, \
        "setup.py must call setup() with no arguments: metadata lives in pyproject.toml"


def test_every_package_listed_and_kernels_mapped():
    tool = PYPROJECT["tool"]["setuptools"]
    assert tool["package-dir"] == {"dino_fast.kernels": "kernels"}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dino_fast").rglob("__init__.py")}
    listed = set(tool["packages"])
    assert on_disk | {"dino_fast.kernels"} == listed, f"packages out of date: on disk {sorted(on_disk)}"
    assert "kernels" not in listed, "kernels/ installs as dino_fast.kernels, never as a top-level package"
    assert (ROOT / "kernels" / "__init__.py").is_file()
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["dino_fast"] == ["configs/*.yaml"]


def test_kernels_import_as_dino_fast_kernels_from_another_directory(tmp_path):
    code = "import dino_fast.kernels.dino_loss as m, dino_fast.kernels.ema; print(m.__name__, m.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"dino_fast.kernels not importable outside the checkout:\n{run.stderr[-2000:]}"
    name, path = run.stdout.split()
    assert name == "dino_fast.kernels.dino_loss" and Path(path).name == "dino_loss.py"


def test_wheel_from_the_sources_has_kernels_configs_extras_and_script(tmp_path):
    """Build a wheel offline (no build isolation, no dependencies) from a copy of what it packs."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("dino_fast", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dino_fast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {"dino_fast/kernels/__init__.py", "dino_fast/kernels/dino_loss.py", "dino_fast/kernels/ema.py",
            "dino_fast/configs/demo.yaml", "dino_fast/configs/tiny_imagenet.yaml"} <= names
    assert not any(n.startswith("kernels/") for n in names)
    for extra in ("test", "cu128", "cu130", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    assert "dino-fast = dino_fast.cli:main" in entry
