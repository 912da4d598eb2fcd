"""DINO ViT backbone: timm's ``VisionTransformer`` with the official DINO behaviour.

What differs from a plain timm ViT, and why:
- position embeddings are resized per input with the official DINO interpolation
  (``pos_embed.interpolate_pos_encoding``), so 96-px local crops and official checkpoints
  see exactly the embeddings they see in the official code;
- inputs whose side is not a multiple of the patch are cropped at the right/bottom, which is
  what the official stride-``p`` convolution does (timm would assert);
- ``Attention`` with a backend switch (auto | sdpa | varlen | flex | xformers | math) and
  packed multi-crop forward (``forward_packed``): one token row, one block-diagonal attention
  call per block (varlen / xformers / flex) or one per resolution (sdpa);
- optional iBOT / DINOv2 masked-image-modelling input (``masked_im_modeling=True``): a
  ``mask_token`` replaces masked patch tokens (``prepare_tokens(x, masks)``), and
  ``forward_tokens`` returns the CLS and patch tokens for a patch-level loss;
- official init (class token ~ trunc_normal(.02), timm draws it with std 1e-6) and the
  official API: ``forward -> CLS``, ``get_last_selfattention``, ``get_intermediate_layers``;
- drop path with its rate in a buffer (``layers.DropPath``: one compiled graph for all blocks);
- ``recompute_norm_gelu=True``: backward rebuilds each block's LayerNorm and GELU outputs from
  their inputs instead of keeping them (``layers.norm_linears`` / ``act_linear``): 10 of the 16
  stream-widths a block keeps per token (ViT-S/16, 2 x 224 + 10 x 96, bf16: 72 MB per image
  kept for backward instead of 114; bench/preflight.py);
- ``low_precision_stream=True``: under autocast the residual stream stays in the compute dtype
  (class token and pos-embed cast to it, ``layers.LayerNorm`` returning its input's dtype), so
  adds, norms and saved activations move 2-byte values; off, it is fp32 as in timm.
State-dict keys are timm's ``VisionTransformer(num_classes=0)`` keys, which equal the official
DINO backbone keys (``masked_im_modeling=True`` adds one: ``mask_token``, see ``DinoViT``).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from .attention import Attention, PackedSeqlens, _check_backend, _is_packed, set_attn_backend
from .layers import DropPath, LayerNorm, act_linear, norm_linears, recomputable_norm
from .pos_embed import interpolate_pos_encoding

__all__ = ["ARCHS", "DinoViT", "DinoBlock", "build_vit"]

ARCHS: dict[str, dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}

# Arguments DINO fixes; passing them through **kw would build a different model.
_FIXED = ("num_classes", "global_pool", "class_token", "reg_tokens", "no_embed_class", "pre_norm",
          "dynamic_img_size", "dynamic_img_pad", "embed_layer", "block_fn", "attn_layer", "norm_layer",
          "fc_norm", "final_norm", "pos_embed")


class _FloorPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` that drops the right/bottom remainder like a plain stride-p conv
    (official DINO) instead of asserting that the size divides by the patch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.patch_size
        H, W = x.shape[-2:]
        if H % ph or W % pw:
            x = x[..., : H - H % ph, : W - W % pw]
        return super().forward(x)


class DinoBlock(Block):
    """timm ``Block`` (same parameters and keys) whose drop path holds its rate in a buffer and,
    on packed input, drops per sequence (per image view, as unpacked timm / official DINO drop
    per sample; a per-sample drop on the (1, T, D) row would drop every view at once).

    ``recompute_norm_gelu`` (set by ``DinoViT``): with gradients on, the MLP keeps the input of
    norm2 and of the GELU only (``layers.norm_linears`` / ``act_linear``), and on the varlen
    backend the attention keeps norm1's input instead of its output; backward rebuilds the rest."""

    recompute_norm_gelu = False

    def __init__(self, *args: Any, drop_path: float = 0.0, device: Any = None, **kw: Any) -> None:
        super().__init__(*args, drop_path=drop_path, device=device, **kw)
        if drop_path > 0.0:  # timm's DropPath holds a float, which torch.compile specialises per block
            self.drop_path1 = DropPath(drop_path, device=device)
            self.drop_path2 = DropPath(drop_path, device=device)

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        per_seq = _is_packed(attn_mask) and self.training and isinstance(self.drop_path1, DropPath)
        recompute = self.recompute_norm_gelu and torch.is_grad_enabled()
        if not (per_seq or recompute):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if _is_packed(attn_mask):
            attn_mask = PackedSeqlens.from_any(attn_mask)
        x = x + self._drop(self.drop_path1, self.ls1(self._attention(x, attn_mask, is_causal, recompute)), per_seq,
                           attn_mask)
        x = x + self._drop(self.drop_path2, self.ls2(self._mlp(x, recompute)), per_seq, attn_mask)
        return x

    @staticmethod
    def _drop(drop: nn.Module, y: torch.Tensor, per_seq: bool, seqs: Any) -> torch.Tensor:
        return drop(y, seqs) if per_seq else drop(y)

    def _attention(self, x: torch.Tensor, attn_mask: Any, is_causal: bool, recompute: bool) -> torch.Tensor:
        attn = self.attn
        if (recompute and getattr(attn, "gate", None) is None and recomputable_norm(self.norm1, x)
                and attn._resolve(x, attn_mask, is_causal) == "varlen"):
            return self._varlen_recompute(x, attn_mask)
        return attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)

    def _varlen_recompute(self, x: torch.Tensor, seqs: PackedSeqlens | None) -> torch.Tensor:
        """``Attention._varlen`` with norm1 inside ``norm_linears``: the same three q/k/v GEMMs and
        varlen call, with norm1's output rebuilt in backward instead of kept. (B, N, C) -> (B, N, C)."""
        attn = self.attn
        weights = attn.qkv.weight.split(attn.attn_dim)
        biases = (None,) * 3 if attn.qkv.bias is None else attn.qkv.bias.split(attn.attn_dim)
        q, k, v = norm_linears(x, self.norm1, list(weights), list(biases))  # (B, N, H * Dh) each
        return attn.proj_drop(attn.proj(attn.norm(attn.varlen_qkv(q, k, v, seqs))))

    def _mlp(self, x: torch.Tensor, recompute: bool) -> torch.Tensor:
        mlp = self.mlp
        if (recompute and recomputable_norm(self.norm2, x) and isinstance(mlp.act, nn.GELU)
                and isinstance(mlp.norm, nn.Identity) and not getattr(mlp.drop1, "p", 0.0)):
            (h,) = norm_linears(x, self.norm2, [mlp.fc1.weight], [mlp.fc1.bias])
            return mlp.drop2(act_linear(h, mlp.act, mlp.fc2))
        return mlp(self.norm2(x))


class DinoViT(VisionTransformer):
    """DINO ViT backbone (see module docstring). Build it with :func:`build_vit` (or
    ``models.build_backbone`` for any arch).

    ``attn_backend`` (property, settable): the attention backend its blocks are configured with
    (``"auto"``, ``"sdpa"``...; see ``attention.BACKENDS``); ``attn_head_dim``: their head size.
    ``low_precision_stream``: see the module docstring (also settable after construction).
    ``recompute_norm_gelu``: the blocks' backward rebuilds the LayerNorm and GELU outputs instead
    of keeping them (``layers.norm_linears``; settable after construction).

    ``masked_im_modeling=True`` adds a ``mask_token`` parameter ``(1, 1, D)``, zeros at init
    (iBOT / DINOv2 init; DINOv2 stores it as ``(1, D)``: reshape when loading theirs). Default
    models keep the official keys. A checkpoint without ``mask_token`` loads into a masked
    model with ``missing, unexpected = model.load_state_dict(sd, strict=False)`` after checking
    ``set(missing) <= {"mask_token"} and not unexpected``; the token then stays at its init.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 attn_backend: str = "auto", masked_im_modeling: bool = False,
                 low_precision_stream: bool = False, recompute_norm_gelu: bool = False, **kw: Any) -> None:
        fixed = sorted(set(kw) & set(_FIXED))
        if fixed:
            raise ValueError(f"DinoViT fixes {fixed} (DINO architecture); do not pass them")
        _check_backend(attn_backend)
        super().__init__(
            img_size=img_size, patch_size=patch_size, num_classes=0, global_pool="token", class_token=True,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
            drop_path_rate=drop_path_rate, norm_layer=partial(LayerNorm, eps=1e-6),
            # NHWC patch tokens keep the grid shape for _pos_embed; no size assert in patch_embed.
            dynamic_img_size=True, embed_layer=_FloorPatchEmbed, block_fn=DinoBlock, attn_layer=Attention,
            **kw,
        )
        self.patch_size = patch_size
        trunc_normal_(self.cls_token, std=0.02)  # official DINO init (timm: normal std 1e-6)
        set_attn_backend(self, attn_backend)
        self.masked_im_modeling = masked_im_modeling
        if masked_im_modeling:  # registered only when asked: default state dicts keep official keys
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.low_precision_stream = low_precision_stream
        self.recompute_norm_gelu = recompute_norm_gelu

    # --- configuration ------------------------------------------------------------------
    @property
    def attn_backend(self) -> str:
        """The attention backend the blocks are configured with ("auto" is resolved per call);
        "mixed" when modules were switched one by one."""
        backends = {blk.attn.backend for blk in self.blocks}
        return backends.pop() if len(backends) == 1 else "mixed"

    @attn_backend.setter
    def attn_backend(self, backend: str) -> None:
        set_attn_backend(self, backend)

    @property
    def attn_head_dim(self) -> int:
        return self.blocks[0].attn.head_dim

    @property
    def low_precision_stream(self) -> bool:
        return self._low_precision_stream

    @low_precision_stream.setter
    def low_precision_stream(self, on: bool) -> None:
        self._low_precision_stream = bool(on)
        for m in self.modules():
            if isinstance(m, LayerNorm):
                m.keep_dtype = bool(on)

    @property
    def recompute_norm_gelu(self) -> bool:
        return all(blk.recompute_norm_gelu for blk in self.blocks)

    @recompute_norm_gelu.setter
    def recompute_norm_gelu(self, on: bool) -> None:
        for blk in self.blocks:
            blk.recompute_norm_gelu = bool(on)

    # --- tokens -------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, D) -> (B, 1 + h*w, D) with class token and official pos-embed."""
        B, h, w, D = x.shape
        cls, pos = self.cls_token, interpolate_pos_encoding(self.pos_embed, h, w)
        if self._low_precision_stream:  # else the fp32 parameters promote the stream to fp32
            cls, pos = cls.to(x.dtype), pos.to(x.dtype)
        x = torch.cat((cls.expand(B, -1, -1), x.reshape(B, h * w, D)), dim=1)
        x = x + pos
        return self.pos_drop(x)

    def _check_images(self, x: torch.Tensor, what: str = "input") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a Tensor, got {type(x).__name__}")
        p = self.patch_size
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[-2] < p or x.shape[-1] < p:
            raise ValueError(f"{what} must be (B, {self.in_chans}, H, W) images with H, W >= patch {p}, "
                             f"got shape {tuple(x.shape)}")

    def _mask_patches(self, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """Patch tokens (B, h, w, D) with the ``mask_token`` where ``masks`` (B, h*w) is True
        (DINOv2 ``prepare_tokens_with_masks``: before the class token and pos-embed)."""
        if masks is None:
            return x
        if not self.masked_im_modeling:
            raise ValueError("masks need a model built with masked_im_modeling=True (it has no mask_token)")
        B, h, w, _ = x.shape
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or tuple(masks.shape) != (B, h * w):
            raise ValueError(f"masks must be a bool tensor of shape (B, h*w) = ({B}, {h * w}), got "
                             f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}")
        return torch.where(masks.view(B, h, w, 1), self.mask_token.to(x.dtype).view(1, 1, 1, -1), x)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + h*w, D), as official ``prepare_tokens``;
        ``masks`` (B, h*w) bool puts the mask token on those patches (masked_im_modeling)."""
        self._check_images(x)
        x = self._pos_embed(self._mask_patches(self.patch_embed(x), masks))
        return self.norm_pre(self.patch_drop(x))

    # --- forwards -----------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False,
                         masks: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm: (B, 1 + h*w, D); ``masks`` as ``prepare_tokens``."""
        x = self.prepare_tokens(x, masks)
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """CLS token after the final norm, (B, D) (official DINO ViT forward)."""
        return self.forward_features(x)[:, 0]

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS (B, D), patch tokens (B, h*w, D)) after the final norm, for an iBOT-style patch
        loss; ``masks`` (B, h*w) bool replaces those patches by the mask token first."""
        x = self.forward_features(x, masks=masks)
        return x[:, 0], x[:, 1:]

    def forward_packed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """CLS features of all ``views`` from ONE pass through the blocks: (sum_v B_v, D).

        Each run of consecutive same-size views is patch-embedded together with its own
        pos-embed interpolation; every image's tokens then go back to back into one row
        (1, T, D), described once by a ``PackedSeqlens``, and each block attends
        block-diagonally: one kernel call for the whole row on varlen / xformers / flex, one
        per resolution on sdpa / math. Drop path acts per view, activation checkpointing per
        block. Rows come out in the given view order, same layout as
        ``torch.cat([self(v) for v in views])``.
        """
        if isinstance(views, torch.Tensor):
            views = [views]
        if not views:
            raise ValueError("forward_packed needs at least one view")
        for i, v in enumerate(views):
            self._check_images(v, f"views[{i}]")
            if v.device != views[0].device or v.dtype != views[0].dtype:
                raise ValueError(f"views[{i}] is {v.dtype} on {v.device}, views[0] is "
                                 f"{views[0].dtype} on {views[0].device}")
        if not isinstance(self.patch_drop, nn.Identity):
            raise NotImplementedError("forward_packed does not support patch dropout")
        tokens, seqlens = [], []
        for start, end in _same_size_runs(views):
            x = views[start] if end - start == 1 else torch.cat(views[start:end])
            x = self._pos_embed(self.patch_embed(x))  # (B_r, N_r, D)
            tokens.append(x.reshape(1, -1, x.shape[-1]))
            seqlens += [x.shape[1]] * x.shape[0]
        x = self.norm_pre(torch.cat(tokens, dim=1))  # (1, T, D)
        seqs = self._packed_seqlens(seqlens)
        self._prepare_packed(seqs, x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, seqs, use_reentrant=False)
            else:
                x = blk(x, attn_mask=seqs)
        # LayerNorm is per token: normalising only the CLS rows gives the same values.
        return self.norm(seqs.cls_tokens(x))

    def _packed_seqlens(self, seqlens: list[int]) -> PackedSeqlens:
        """The ``PackedSeqlens`` of this layout, kept from the last forward when it is the same: its
        device tensors (cu_seqlens, block masks) are then built once, so a steady step copies
        nothing from the host and a CUDA-graph replay reads the buffers its capture recorded. A
        fresh one under torch.compile (the compiled graph holds them as constants; a kept Python
        object would be a guard)."""
        if torch.compiler.is_compiling():
            return PackedSeqlens(seqlens)
        kept = self.__dict__.get("_kept_seqlens")
        if kept is None or kept.seqlens != tuple(seqlens):
            kept = self.__dict__["_kept_seqlens"] = PackedSeqlens(seqlens)
        return kept

    def _prepare_packed(self, seqs: PackedSeqlens, x: torch.Tensor) -> None:
        """Build the kernel inputs of ``seqs`` (cu_seqlens, flex block mask, xformers bias) for
        the backends the blocks will run, here, once per forward (inside the compiled region when
        the whole forward is compiled, outside it when blocks are compiled one by one): every
        block then reads the cached tensors."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        for backend in {blk.attn.resolve_backend(x.device, dtype, packed=True) for blk in self.blocks}:
            if backend == "varlen":
                seqs.cu_seqlens(x.device)
            elif backend == "flex":
                seqs.flex_block_mask(x.device)
            elif backend == "xformers":
                seqs.to_xformers(x.device)

    # --- official DINO evaluation API ---------------------------------------------------
    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block, (B, heads, N, N) (math backend)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:  # type: ignore[override]
        """Final-normed tokens (B, N, D) of the last ``n`` blocks (official DINO semantics,
        used by the linear probe; timm's method of the same name returns un-normed ones)."""
        depth = len(self.blocks)
        if not 1 <= n <= depth:
            raise ValueError(f"n must be in [1, {depth}], got {n}")
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if depth - i <= n:
                out.append(self.norm(x))
        return out


def _same_size_runs(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive views with the same (H, W) (official unique_consecutive,
    which keys on the width only; keying on both sides is never wrong)."""
    runs: list[tuple[int, int]] = []
    for i, v in enumerate(views):
        if runs and views[runs[-1][0]].shape[-2:] == v.shape[-2:]:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def build_vit(arch: str = "vit_small", patch_size: int = 16, drop_path_rate: float = 0.0,
              attn_backend: str = "auto", img_size: int = 224, **kw: Any) -> DinoViT:
    """A DINO ViT: ``arch`` in ``ARCHS`` (vit_tiny | vit_small | vit_base), any patch size (official: 8 or 16).

    ``kw`` goes to :class:`DinoViT` / timm (e.g. ``depth=2`` for small test models,
    ``masked_im_modeling=True`` for a mask token, ``low_precision_stream=True``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if int(patch_size) < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    cfg = {**ARCHS[arch], **kw}
    return DinoViT(img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path_rate,
                   attn_backend=attn_backend, **cfg)
