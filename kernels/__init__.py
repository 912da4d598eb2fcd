"""Triton kernels of dino_fast, one per file, each with its thin autograd.Function.

Installed as ``dino_fast.kernels``. Nothing here imports ``dino_fast``: the engine
reaches these kernels through ``dino_fast.ops`` only.
"""
