"""Student forward+backward throughput of the DINO ViT over multi-crop batches, per attention
backend, per-resolution vs packed; plus attention-only microbenchmarks.

One "image" = ``--n-global`` views of ``--global-size`` px + ``--n-local`` views of
``--local-size`` px (paper recipe: 2 x 224 + 10 x 96). Variants:
  timm        timm VisionTransformer(dynamic_img_size=True), its default attention, per resolution
  sdpa        DinoViT, F.scaled_dot_product_attention, per resolution (official layout)
  xformers    DinoViT, xformers memory_efficient_attention, per resolution
  sdpa-packed DinoViT.forward_packed, sdpa on runs of equal-length sequences
  xf-packed   DinoViT.forward_packed, one xformers call with a BlockDiagonalMask
  varlen-packed  DinoViT.forward_packed, one torch varlen_attn (flash / cuDNN) call per block
  flex-packed DinoViT.forward_packed, one compiled flex_attention call per block (block mask)
  auto-packed DinoViT.forward_packed with attn_backend="auto" (what the trainer runs by default)
A variant that cannot run here (kernel not usable, OOM) gets a row with the reason.
``x_sdpa`` = time of the ``sdpa`` (per-resolution) row / time of this row, same model and batch.

FLOP count (multiply-add = 2 FLOPs), one view of N = 1 + (S/p)^2 tokens, width D, L blocks:
  patch embed     2 * (N - 1) * (3 p^2) * D
  per block       24 N D^2 (qkv 6, proj 2, mlp 16)  +  4 N^2 D (q k^T and attn v)
  DINO head       2 * (D h + h h + h b + b K), h = 2048, b = 256 (with --head)
training step = 3 x forward (backward = 2 x forward); teacher forward, optimizer, loss not counted.
MFU = counted FLOPs / time / --peak-tflops (default: the device's bf16 dense datasheet peak from
bench.common.device_peaks; none on CPU or an unlisted GPU, and the notes say so).
Attention microbenchmarks count the useful block-diagonal work only: forward 4 * H * Dh * sum_i N_i^2,
forward+backward = 3.5 x forward (backward = 2.5 x forward: five matmuls vs two).

Usage (GPU):  python -m bench.bench_model --archs vit_small vit_base --batch-sizes 64 128 --head
CPU runs use tiny sizes and are NOT GPU figures.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `dino-fast bench model` runs this file

from bench.common import Results, device_peaks, oom_as_reason, peak_memory, peak_note, time_fn  # noqa: E402
from dino_fast.models import ARCHS, DINOHead, MultiCropWrapper, PackedSeqlens, build_backbone  # noqa: E402
from dino_fast.models import attention as attention_mod  # noqa: E402
from dino_fast.models import varlen as varlen_mod  # noqa: E402

# flex last: it compiles fwd+bwd first (tens of seconds), so a run cut at its cap keeps the others
VARIANTS = ("timm", "sdpa", "xformers", "sdpa-packed", "xf-packed", "varlen-packed", "auto-packed", "flex-packed")
BACKEND_OF = {"sdpa": "sdpa", "xformers": "xformers", "sdpa-packed": "sdpa", "xf-packed": "xformers",
              "varlen-packed": "varlen", "flex-packed": "flex", "auto-packed": "auto"}
HEAD_HIDDEN, HEAD_BOTTLENECK = 2048, 256

# --- FLOP counting -----------------------------------------------------------------------------
def vit_forward_flops(n_tokens: int, dim: int, depth: int, patch: int) -> int:
    """Forward FLOPs of one view with ``n_tokens`` tokens (CLS included); formula in module doc."""
    patch_embed = 2 * (n_tokens - 1) * 3 * patch * patch * dim
    return patch_embed + depth * (24 * n_tokens * dim * dim + 4 * n_tokens * n_tokens * dim)


def head_forward_flops(dim: int, out_dim: int) -> int:
    h, b = HEAD_HIDDEN, HEAD_BOTTLENECK
    return 2 * (dim * h + h * h + h * b + b * out_dim)


def step_flops(args: argparse.Namespace, arch: str, batch: int) -> int:
    """Forward + backward FLOPs of one student step over ``batch`` multi-crop images."""
    cfg = ARCHS[arch]
    depth = args.depth or cfg["depth"]
    per_image = 0
    for size, count in ((args.global_size, args.n_global), (args.local_size, args.n_local)):
        n = 1 + (size // args.patch_size) ** 2
        per_image += count * vit_forward_flops(n, cfg["embed_dim"], depth, args.patch_size)
        if args.head:
            per_image += count * head_forward_flops(cfg["embed_dim"], args.out_dim)
    return 3 * batch * per_image


# --- models and inputs -------------------------------------------------------------------------
def make_views(args: argparse.Namespace, batch: int, device: torch.device) -> list[torch.Tensor]:
    sizes = [args.global_size] * args.n_global + [args.local_size] * args.n_local
    return [torch.randn(batch, 3, s, s, device=device) for s in sizes]


def timm_baseline(arch: str, args: argparse.Namespace) -> nn.Module:
    """timm's own ViT with DINO's shape; dynamic_img_size so it takes 96-px crops."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(ARCHS[arch])
    if args.depth:
        cfg["depth"] = args.depth
    return VisionTransformer(img_size=224, patch_size=args.patch_size, num_classes=0, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), dynamic_img_size=True, **cfg)


def build_variant(variant: str, arch: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    kw = {"depth": args.depth} if args.depth else {}
    if variant == "timm":
        backbone = timm_baseline(arch, args)
    else:
        backbone = build_backbone(arch, patch_size=args.patch_size, attn_backend=BACKEND_OF[variant], **kw)
    head = DINOHead(backbone.embed_dim, args.out_dim) if args.head else nn.Identity()
    return MultiCropWrapper(backbone, head, packed=variant.endswith("packed")).to(device)


def skip_reason(variant: str, device: torch.device) -> str | None:
    """Why ``variant`` cannot run here (one line), or None."""
    backend = BACKEND_OF.get(variant, variant)
    if backend not in ("xformers", "varlen", "flex"):
        return None
    if device.type != "cuda":
        return f"{backend} needs CUDA" + (" (no CPU backward)" if backend == "flex" else "")
    problem = getattr(attention_mod, f"{backend}_problem")(torch.cuda.current_device())
    return f"{backend}: {problem}" if problem else None


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast on GPU (how DINO trains); fp32 on CPU where bf16 matmuls are slow and uninformative.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_step_fn(model: nn.Module, views: list[torch.Tensor], device: torch.device) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast(device):
            out = model(views)
        # A sum stands in for the loss: its backward is negligible next to the model's.
        out.float().sum().backward()
        for p in params:
            p.grad = None

    return step


# --- benchmarks --------------------------------------------------------------------------------
def add_x_sdpa(rows: list[dict[str, Any]]) -> None:
    """Speed-up of each row over one sdpa pass per resolution (the official layout), same model and batch."""
    for row in rows:
        base = next((r for r in rows if r["variant"] == "sdpa" and r["model"] == row["model"]
                     and r["batch"] == row["batch"] and r.get("ms")), None)
        if base and row.get("ms"):
            row["x_sdpa"] = base["ms"] / row["ms"]


def bench_models(args: argparse.Namespace, device: torch.device, results: Results) -> None:
    """One row per (arch, variant, batch) into ``results``, written as it is measured."""
    for arch in args.archs:
        for variant in args.variants:
            reason = skip_reason(variant, device)
            model = None if reason else build_variant(variant, arch, args, device)
            for batch in args.batch_sizes:
                row: dict[str, Any] = {"model": f"{arch}/{args.patch_size}" + ("+head" if args.head else ""),
                                       "variant": variant, "batch": batch}
                if reason is None:
                    with oom_as_reason(row):
                        step = train_step_fn(model, make_views(args, batch, device), device)
                        step()  # first call: kernel probes, flex compile, cuDNN plans
                        ms = time_fn(step, warmup=args.warmup, rep=args.rep)
                        tflops = step_flops(args, arch, batch) / (ms * 1e-3) / 1e12
                        mem = peak_memory(step)
                        row.update(ms=ms, img_s=batch / (ms * 1e-3), tflops=tflops,
                                   mfu=tflops / args.peak_tflops if args.peak_tflops else None,
                                   peak_gib=None if mem is None else mem / 2**30)
                else:
                    row["reason"] = reason
                results.add(row)
            del model


def attention_inputs(arch: str, args: argparse.Namespace, batch: int, device: torch.device, dtype: torch.dtype):
    """Per-resolution (B*views, H, N, Dh) q/k/v and the packed (1, T, H, Dh) equivalent."""
    heads = ARCHS[arch]["num_heads"]
    dh = ARCHS[arch]["embed_dim"] // heads
    groups = []
    for size, count in ((args.global_size, args.n_global), (args.local_size, args.n_local)):
        n = 1 + (size // args.patch_size) ** 2
        groups.append((batch * count, n))
    per_res = [[torch.randn(b, heads, n, dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
               for b, n in groups]
    seqs = PackedSeqlens([n for b, n in groups for _ in range(b)])
    packed = [torch.randn(1, seqs.total, heads, dh, device=device, dtype=dtype, requires_grad=True)
              for _ in range(3)]  # (1, T, H, Dh): xformers' layout; [0] is varlen's (T, H, Dh)
    useful_fwd = 4 * heads * dh * sum(b * n * n for b, n in groups)
    return per_res, packed, seqs, useful_fwd


def bench_attention(args: argparse.Namespace, device: torch.device, results: Results) -> None:
    """One row per (arch, attention call) into ``results``, written as it is measured."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def math_attn(q, k, v):
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v

    for arch in args.archs:
        batch = max(args.batch_sizes)
        per_res, packed, seqs, useful_fwd = attention_inputs(arch, args, batch, device, dtype)
        xops = None
        if skip_reason("xformers", device) is None:
            import xformers.ops as xops
        scale = packed[0].shape[-1] ** -0.5

        def sdpa_runs():  # what the sdpa backend does with a packed row: one call per run of equal lengths
            return [F.scaled_dot_product_attention(*(t[0, t0:t0 + c * n].view(c, n, *t.shape[2:]).transpose(1, 2)
                                                     for t in packed)) for t0, _, c, n in seqs.runs]

        def varlen_packed():
            cu = seqs.cu_seqlens(device)
            return [varlen_mod.varlen_attention(varlen_mod.get_varlen_attn(device), *(t[0] for t in packed), cu,
                                                seqs.max_seqlen, scale)]

        def flex_packed():
            flex = varlen_mod.get_flex_attention(device)
            return [flex(*(t.transpose(1, 2) for t in packed), block_mask=seqs.flex_block_mask(device), scale=scale)]

        cases: dict[str, tuple[Callable[[], Any], str | None]] = {
            "math per-res": (lambda: [math_attn(*qkv) for qkv in per_res], None),
            "sdpa per-res": (lambda: [F.scaled_dot_product_attention(*qkv) for qkv in per_res], None),
            "sdpa packed runs": (sdpa_runs, None),
            "varlen packed": (varlen_packed, skip_reason("varlen", device)),
            "xformers per-res": (lambda: [xops.memory_efficient_attention(*(t.transpose(1, 2) for t in qkv))
                                          for qkv in per_res], skip_reason("xformers", device)),
            "xformers packed": (lambda: [xops.memory_efficient_attention(*packed,
                                                                         attn_bias=seqs.to_xformers(device))],
                                skip_reason("xformers", device)),
            "flex packed": (flex_packed, skip_reason("flex", device)),  # last: it compiles first
        }
        for name, (fn, reason) in cases.items():
            row: dict[str, Any] = {"model": f"{arch}/{args.patch_size}", "variant": name, "batch": batch}
            if reason is None:
                with oom_as_reason(row):
                    fn()  # first call: flex compile, cuDNN plans
                    fwd_ms = time_fn(lambda: fn(), warmup=args.warmup, rep=args.rep)

                    def fwd_bwd(fn=fn):
                        outs = fn()
                        torch.autograd.backward([o.float().sum() for o in outs])

                    both_ms = time_fn(fwd_bwd, warmup=args.warmup, rep=args.rep)
                    row.update(fwd_ms=fwd_ms, fwd_tflops=useful_fwd / (fwd_ms * 1e-3) / 1e12, fwd_bwd_ms=both_ms,
                               fwd_bwd_tflops=3.5 * useful_fwd / (both_ms * 1e-3) / 1e12)
            else:
                row["reason"] = reason
            results.add(row)
        del per_res, packed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["vit_small", "vit_base"] if cuda else ["vit_small"],
                   choices=sorted(ARCHS))
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=None if cuda else 2, help="override depth (CPU default 2)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128] if cuda else [2])
    p.add_argument("--global-size", type=int, default=224 if cuda else 32)
    p.add_argument("--local-size", type=int, default=96 if cuda else 16)
    p.add_argument("--n-global", type=int, default=2)
    p.add_argument("--n-local", type=int, default=10 if cuda else 3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--head", action="store_true", help="add the DINO head (out_dim --out-dim)")
    p.add_argument("--out-dim", type=int, default=65536 if cuda else 1024)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s for MFU (default: the device's bf16 dense datasheet peak, "
                        "e.g. 989 for H100 SXM / H200, 312 for A100; none on CPU)")
    p.add_argument("--skip-attention", action="store_true", help="skip the attention microbenchmarks")
    p.add_argument("--warmup", type=int, default=1 if not cuda else 3, help="CPU warm-up calls")
    p.add_argument("--rep", type=int, default=3 if not cuda else 10, help="CPU timed calls")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads on CPU (1 keeps tiny CPU runs steady on shared machines)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given_peak = args.peak_tflops is not None
    if args.peak_tflops is None:
        args.peak_tflops = (device_peaks() or (None, None))[1]
    shape = (f"{args.n_global}x{args.global_size} + {args.n_local}x{args.local_size} px views per image, "
             f"patch {args.patch_size}" + (f", depth {args.depth}" if args.depth else ""))
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    precision = "bf16 autocast" if device.type == "cuda" else f"fp32 (CPU, {args.cpu_threads} thread(s))"
    auto_line = attention_mod.describe_attention(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                                 ARCHS[args.archs[0]]["embed_dim"] // ARCHS[args.archs[0]]["num_heads"])
    print(auto_line)
    peak = f"mfu against {peak_note(args.peak_tflops, 'bf16 dense TFLOP/s', given_peak)}"
    results = Results("model", ["model", "variant", "batch", "ms", "img_s", "x_sdpa", "tflops", "mfu", "peak_gib",
                                "reason"],
                      notes=f"student forward+backward; {shape}; {precision}; tflops = counted FLOPs (formula in "
                            f"bench/bench_model.py) / time; {peak}; x_sdpa = sdpa per-resolution ms / this row's ms; "
                            f"{auto_line}", out_dir=args.out, derive=add_x_sdpa)
    bench_models(args, device, results)
    results.close()
    if not args.skip_attention:
        results = Results("model_attention", ["model", "variant", "batch", "fwd_ms", "fwd_tflops", "fwd_bwd_ms",
                                              "fwd_bwd_tflops", "reason"],
                          notes=f"attention core only (q, k, v given), all views of a batch; {shape}; {precision}; "
                                "useful block-diagonal FLOPs, fwd+bwd = 3.5 x fwd", out_dir=args.out)
        bench_attention(args, device, results)
        results.close()


if __name__ == "__main__":
    main()
