"""ToMe for timm Vision Transformers: ``apply_tome(model, r=16)`` and ``remove_tome(model)``.

The patch swaps the model's class for a subclass whose ``forward_features``/``forward`` run the
blocks with token merging between attention and MLP (as in the ToMe paper). Everything a forward
pass needs (token sizes, source map) lives in local variables of that call, so the model can be
called from several threads, with different batch or image sizes, or through ``forward_features``.
Settings live on the model as plain attributes: ``model.tome_r`` (int, ``(r, inflection)`` or a
per-layer list) and ``model.tome_prop_attn``.

Supported: timm ``VisionTransformer`` (and subclasses that keep its forward, such as DeiT's
distilled model) built from ``Block`` + ``Attention``: LayerScale, drop-path, qk-norm, scale-norm,
gated attention, any number of prefix tokens (all protected), ``global_pool`` ``token``/``avg``/``''``.
Anything else raises ``TypeError`` naming the class it cannot handle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from visiontools.grid import GridTokens
from visiontools.merge import (
    bipartite_soft_matching, check_r, init_source, max_r, merge_source, merge_wavg, parse_r, size_bias,
)

SUPPORTED_POOLS = ("token", "avg", "")


@dataclass
class ToMeInfo:
    """What one ToMe forward pass did: tokens entering each block and after the last one, the
    final token sizes ``(B, N, 1)`` and, when traced, the source map ``(B, num_patches)``
    (for each input patch, the index of the output token it ended in; prefix tokens included in
    that numbering) plus one such map after every block in ``layer_sources``."""

    tokens_per_layer: list[int] = field(default_factory=list)
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    layer_sources: list[torch.Tensor] = field(default_factory=list)
    num_prefix_tokens: int = 0


def _attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None):
    """timm ``Attention.forward`` with an additive float mask, also returning the keys averaged
    over heads (the ToMe similarity metric). Fused SDPA stays on where timm uses it."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if bias is not None:
        bias = bias.to(q.dtype)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(1)


def _block(blk: Block, x, size, source, r: int, num_prefix: int, prop_attn: bool):
    """One timm ``Block`` with a ToMe merge between attention and MLP."""
    bias = size_bias(size) if prop_attn and size is not None else None
    y, metric = _attention(blk.attn, blk.norm1(x), bias)
    x = x + blk.drop_path1(blk.ls1(y))
    if max_r(r, x.shape[1], num_prefix) > 0:
        m = bipartite_soft_matching(metric, r, num_prefix)
        x, size = merge_wavg(m, x, size)
        if source is not None:
            source = merge_source(m, source)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size, source


class ToMeVisionTransformer(VisionTransformer):
    """Mixin body for the patched class; ``apply_tome`` builds ``type(name, (this, original))``."""

    def tome_forward_features(self, x: torch.Tensor, trace_source: bool = False):
        """Features and a :class:`ToMeInfo` for one forward pass with token merging."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        P = self.num_prefix_tokens
        B, N, _ = x.shape
        rs = parse_r(len(self.blocks), self.tome_r)
        size = None
        source = init_source(B, N, x.device) if trace_source else None
        info = ToMeInfo(num_prefix_tokens=P)
        for blk, r in zip(self.blocks, rs):
            info.tokens_per_layer.append(x.shape[1])
            args = (x, size, source, r, P, self.tome_prop_attn)
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x, size, source = checkpoint(_block, blk, *args, use_reentrant=False)
            else:
                x, size, source = _block(blk, *args)
            if source is not None:
                info.layer_sources.append(source[:, P:])
        info.tokens_per_layer.append(x.shape[1])
        x = self.norm(x)
        info.size = size if size is not None else torch.ones_like(x[..., :1])
        if source is not None:
            info.source = source[:, P:]
        return x, info

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        """Merged output tokens (protected prefix tokens first). For ``global_pool='avg'`` models
        pass ``size`` from :meth:`tome_forward_features` to ``forward_head``."""
        _no_masks(attn_mask, is_causal)
        return self.tome_forward_features(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None):
        """timm's head; average pooling is weighted by token ``size`` so merged tokens count for
        the patches they hold."""
        if self.global_pool == "avg" and self.attn_pool is None:
            P = 0 if self.pool_include_prefix else self.num_prefix_tokens
            if size is None:
                if x.shape[1] != self.patch_embed.num_patches + self.num_prefix_tokens or self.patch_embed.dynamic_img_size:
                    raise ValueError(
                        "forward_head of a ToMe-patched model with global_pool='avg' needs the token "
                        "sizes: use `x, info = model.tome_forward_features(img)` then "
                        "`model.forward_head(x, size=info.size)`, or call the model directly")
                size = torch.ones_like(x[..., :1])
            w = size[:, P:]
            x = (x[:, P:] * w).sum(dim=1) / w.sum(dim=1)
            x = self.fc_norm(x)
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)
        return super().forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        _no_masks(attn_mask, is_causal)
        x, info = self.tome_forward_features(x)
        if self.global_pool == "avg" and self.attn_pool is None:
            return self.forward_head(x, size=info.size)
        return self.forward_head(x)


def _no_masks(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("token merging changes the token count, so it cannot be combined with "
                         "attn_mask or is_causal; remove_tome(model) first")


def _check_supported(model) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"ToMe supports timm VisionTransformer models; got {type(model).__name__}")
    for name in ("forward_features", "forward"):
        if getattr(type(model), name) is not getattr(VisionTransformer, name):
            raise TypeError(f"ToMe cannot patch {type(model).__name__}: it overrides {name}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise TypeError(f"ToMe cannot patch block {i} of type {type(blk).__name__} "
                            f"(supported: timm.models.vision_transformer.Block)")
        if type(blk.attn) is not Attention:
            raise TypeError(f"ToMe cannot patch block {i}: attention {type(blk.attn).__name__} "
                            f"is not timm.layers.Attention")
    if model.attn_pool is not None or model.global_pool not in SUPPORTED_POOLS:
        pool = "map" if model.attn_pool is not None else model.global_pool
        raise TypeError(f"ToMe does not support global_pool={pool!r} (supported: {SUPPORTED_POOLS})")


_PATCHED: dict[type, type] = {}


def apply_tome(model: VisionTransformer, r=16, prop_attn: bool = True) -> VisionTransformer:
    """Patch a timm ViT in place for token merging and return it.

    ``r``: tokens merged per block (int), ``(r, inflection)`` for the paper's schedule (e.g.
    ``(16, -0.5)`` merges more early), or a per-layer list. Change it later via ``model.tome_r``.
    ``prop_attn``: proportional attention (adds ``log(size)`` to the attention logits).
    """
    check_r(r)
    if isinstance(model, ToMeVisionTransformer):
        model.tome_r, model.tome_prop_attn = r, prop_attn
        return model
    if any(isinstance(m, GridTokens) for m in model.modules()):  # Conformer / Hyena / ConvFFN blocks
        from visiontools.patches.timm_grid import apply_tome_grid  # (lazy: timm_grid builds on this module)
        return apply_tome_grid(model, r, prop_attn)
    _check_supported(model)
    base = type(model)
    if base not in _PATCHED:
        _PATCHED[base] = type(f"ToMe{base.__name__}", (ToMeVisionTransformer, base), {})
    model.__class__ = _PATCHED[base]
    model.tome_r, model.tome_prop_attn = r, prop_attn
    return model


def remove_tome(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`apply_tome`: restore the original class; weights were never touched."""
    if not isinstance(model, ToMeVisionTransformer):
        raise ValueError(f"{type(model).__name__} is not ToMe-patched")
    model.__class__ = next(c for c in type(model).__mro__[1:]
                           if c is not ToMeVisionTransformer and not issubclass(c, ToMeVisionTransformer))
    del model.tome_r, model.tome_prop_attn
    return model


def tome_forward(model: VisionTransformer, x: torch.Tensor, trace_source: bool = False):
    """Logits and a :class:`ToMeInfo` (token counts per layer, sizes, source map) for a patched model."""
    if not isinstance(model, ToMeVisionTransformer):
        raise ValueError("tome_forward needs a model patched with apply_tome")
    feats, info = model.tome_forward_features(x, trace_source=trace_source)
    return model.forward_head(feats, size=info.size), info
