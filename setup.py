"""dino_fast: a performance-engineered DINO self-supervised pretraining engine."""
from setuptools import find_packages, setup

# `kernels/` sits at the top of the repo for visibility but installs as
# `dino_fast.kernels`: a top-level package named `kernels` belongs to others.
packages = find_packages(include=["dino_fast", "dino_fast.*"]) + ["dino_fast.kernels"]

setup(
    name="dino_fast",
    version="0.1.0",
    description="Fast DINO self-supervised ViT pretraining: fused Triton loss and EMA, "
    "xformers attention, DALI multi-crop, FSDP2/bf16 trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=packages,
    package_dir={"dino_fast.kernels": "kernels"},
    include_package_data=True,
    package_data={"dino_fast": ["configs/*.yaml"]},
    install_requires=[
        # torch/torchvision: a pair that matches (timm needs torchvision).
        "torch>=2.6,<=2.14.1",
        "torchvision",
        "triton>=3.2; platform_system == 'Linux'",
        "timm>=1.0.15",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "xformers>=0.0.30; platform_system == 'Linux'",
            "nvidia-dali-cuda130; platform_system == 'Linux'",
        ],
    },
    entry_points={"console_scripts": ["dino-fast=dino_fast.cli:main"]},
)
