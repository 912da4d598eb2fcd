"""Triton kernels of dino_fast, one per file, each with its launcher and its torch custom op
(``dino_fast::<name>``: a fake implementation and, for the losses, an autograd formula).

Installed as ``dino_fast.kernels``. Nothing here imports ``dino_fast``: the engine
reaches these kernels through ``dino_fast.ops`` only.
"""
