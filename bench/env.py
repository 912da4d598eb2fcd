"""The suite's first step: what this machine is. Writes ``env.json``: bench.common.env_info() plus
the driver, more library versions, where the kernels import from, whether xformers' kernels run,
and the device's datasheet peaks (None for a GPU not in bench.common.DEVICE_PEAKS).

    python3 -m bench.env OUT/env.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import device_peaks, env_info, module_version


def collect() -> dict[str, Any]:
    import torch

    info = env_info()
    info["torch_cuda"] = torch.version.cuda
    for mod, key in (("torchvision", "torchvision"), ("timm", "timm"), ("numpy", "numpy"),
                     ("nvidia.dali", "dali"), ("PIL", "pillow")):
        info[key] = module_version(mod) or "not importable"
    try:
        import dino_fast
        import dino_fast.kernels.dino_loss as k

        info["dino_fast"] = getattr(dino_fast, "__version__", None)
        info["kernels"] = f"dino_fast.kernels from {Path(k.__file__).parent}"
    except Exception as e:  # noqa: BLE001 - a broken import is the fact to report
        info["kernels"] = f"NOT importable: {type(e).__name__}: {e}"
    info["xformers_usable"] = False
    if info["cuda"]:
        info["peaks"] = device_peaks()
        try:
            from dino_fast.models import xformers_usable

            info["xformers_usable"] = xformers_usable(torch.cuda.current_device())
        except Exception as e:  # noqa: BLE001
            info["xformers_usable"] = f"probe failed: {type(e).__name__}"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="env.json to write")
    args = p.parse_args(argv)
    text = json.dumps(collect(), indent=2, default=str)
    args.path.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
