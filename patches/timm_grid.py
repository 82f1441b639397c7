"""Grid layers in timm ViTs: ``configure_grid(model)`` (prefix count and per-call grid for every
:class:`visiontools.layers.grid.GridTokens` layer) and token merging through grid operations.

ToMe on a ViT whose blocks mix tokens on the 2D grid (:class:`visiontools.layers.conformer.ConformerBlock`,
timm ``Block`` s with :class:`visiontools.layers.hyena.HyenaAttention` or a
:class:`visiontools.layers.conformer.ConvMlp`): :func:`visiontools.patches.timm.apply_tome` hands such models
to :func:`apply_tome_grid`. Every block merges after its token mixer (attention keys, or for Hyena
the mixed tokens, as the similarity metric) with ToMe's bipartite matching; each grid operation
after that spreads the merged tokens over the grid with the source map, runs, and averages back
into the same groups (:mod:`visiontools.tome.merge_grid`); attention, projections and MLPs run on the
merged tokens. The source map and sizes are local to each call (a :class:`GridLayout`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from visiontools.layers.conformer import ConformerBlock
from visiontools.layers.grid import GridKey, GridLayout, GridTokens, set_call_grid
from visiontools.layers.hyena import HyenaAttention
from visiontools.tome.merge import bipartite_soft_matching, init_source, max_r, merge_source, merge_wavg, parse_r
from visiontools.patches.timm import ToMeInfo, ToMeVisionTransformer, attention_with_metric

__all__ = ["configure_grid", "grid_layers", "has_grid_layers", "apply_tome_grid"]


def grid_layers(model: nn.Module) -> list[nn.Module]:
    """All layers of a model that need the token grid (:class:`visiontools.layers.grid.GridTokens`)."""
    return [m for m in model.modules() if isinstance(m, GridTokens)]


def has_grid_layers(model: nn.Module) -> bool:
    return any(isinstance(m, GridTokens) for m in model.modules())


def _record_grid(patch_embed: nn.Module, inputs, output) -> None:
    # dynamic_img_size: patch_embed returns NHWC, so the grid of this input is output.shape[1:3]
    if output.dim() == 4:
        set_call_grid(patch_embed._hyena_grid_key, output.shape[1:3])


def configure_grid(model: VisionTransformer) -> VisionTransformer:
    """Tell every grid layer of a timm ViT its prefix-token count and patch grid, and keep the grid
    current for ``dynamic_img_size`` models (a forward hook on ``patch_embed``). Idempotent."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"configure_grid needs a timm VisionTransformer, got {type(model).__name__}")
    layers = grid_layers(model)
    pe = model.patch_embed
    grid = tuple(int(g) for g in getattr(pe, "grid_size", ()) or ())
    if getattr(pe, "_hyena_grid_key", None) is None:  # (name kept from the Hyena adapter)
        pe._hyena_grid_key = GridKey()
    for layer in layers:
        layer.num_prefix_tokens = int(model.num_prefix_tokens)
        layer.grid_size = grid if len(grid) == 2 else None
        layer.grid_owner = pe._hyena_grid_key
    if getattr(pe, "_hyena_hook", None) is not None:
        pe._hyena_hook.remove()
        pe._hyena_hook = None
    if model.dynamic_img_size and layers:
        pe._hyena_hook = pe.register_forward_hook(_record_grid)
    return model


# ----------------------------------------------------------------------------- ToMe through grid operations

def _merge_step(r: int, num_tokens: int):
    """The merge callback of one block: ToMe's bipartite matching on ``metric``, size-weighted
    merge, source map update. ``num_tokens``: tokens entering the model (prefix + grid)."""
    def merge(x: torch.Tensor, metric: torch.Tensor, layout: GridLayout):
        P = layout.prefix
        if max_r(r, x.shape[1], P) == 0:
            return x, layout
        m = bipartite_soft_matching(metric, r, P)
        x, size = merge_wavg(m, x, layout.size)
        source = layout.source if layout.source is not None else init_source(x.shape[0], num_tokens, x.device)
        return x, GridLayout(P, layout.H, layout.W, merge_source(m, source), size)
    return merge


def _timm_block(blk: Block, x, layout: GridLayout, merge, prop_attn: bool):
    """A timm ``Block`` (attention or Hyena mixer; MLP or ConvMlp) with a merge after the mixer."""
    size = layout.size
    if isinstance(blk.attn, HyenaAttention):
        y = blk.attn.forward_layout(blk.norm1(x), layout)
        x = x + blk.drop_path1(blk.ls1(y))
        metric = x  # Hyena has no keys: the mixed tokens are the similarity metric
    else:
        bias = size.log()[:, None, None, :, 0] if prop_attn and size is not None else None
        y, metric, _ = attention_with_metric(blk.attn, blk.norm1(x), bias)
        x = x + blk.drop_path1(blk.ls1(y))
    x, layout = merge(x, metric, layout)
    h = blk.norm2(x)
    h = blk.mlp(h, layout) if isinstance(blk.mlp, GridTokens) else blk.mlp(h)
    return x + blk.drop_path2(blk.ls2(h)), layout


def _run_block(blk, x, layout, merge, prop_attn):
    if isinstance(blk, ConformerBlock):
        return blk.run(x, layout, merge, prop_attn)
    return _timm_block(blk, x, layout, merge, prop_attn)


class ToMeGridVisionTransformer(ToMeVisionTransformer):
    """The ToMe-patched class for ViTs with grid layers: carries the source map through every block."""

    def tome_forward_features(self, x: torch.Tensor, trace_source: bool = False):
        if getattr(self, "tome_method", "tome") != "tome":
            raise ValueError(f"tome_method={self.tome_method!r} is not available for ViTs with grid operations "
                             "(Conformer, Hyena, ConvFFN) yet: set it back to 'tome'")
        x = self.patch_embed(x)
        H, W = (x.shape[1], x.shape[2]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        P = self.num_prefix_tokens
        N = x.shape[1]
        if N != P + H * W:
            raise ValueError(f"{N} tokens after the embedding, expected {P} prefix + {H}x{W} grid tokens "
                             "(patch dropout cannot be combined with token merging on grid layers)")
        layout = GridLayout(P, H, W)
        info = ToMeInfo(num_prefix_tokens=P)
        full = init_source(x.shape[0], N, x.device)
        for blk, r in zip(self.blocks, parse_r(len(self.blocks), self.tome_r)):
            info.tokens_per_layer.append(x.shape[1])
            args = (blk, x, layout, _merge_step(r, N), self.tome_prop_attn)
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x, layout = checkpoint(_run_block, *args, use_reentrant=False)
            else:
                x, layout = _run_block(*args)
            if trace_source:
                info.layer_sources.append((layout.source if layout.merged else full)[:, P:])
        info.tokens_per_layer.append(x.shape[1])
        x = self.norm(x)
        info.size = layout.size if layout.size is not None else torch.ones_like(x[..., :1])
        if trace_source:
            info.source = info.layer_sources[-1] if info.layer_sources else full[:, P:]
        return x, info


def _check_grid_supported(model: VisionTransformer) -> None:
    if model.attn_pool is not None or model.global_pool not in ("token", "avg", ""):
        raise TypeError(f"ToMe does not support global_pool={'map' if model.attn_pool is not None else model.global_pool!r}")
    for name in ("forward_features", "forward"):
        if getattr(type(model), name) is not getattr(VisionTransformer, name):
            raise TypeError(f"ToMe cannot patch {type(model).__name__}: it overrides {name}")
    for i, blk in enumerate(model.blocks):
        if isinstance(blk, ConformerBlock):
            continue
        if type(blk) is not Block:
            raise TypeError(f"ToMe cannot patch block {i} of type {type(blk).__name__} (supported with grid "
                            "layers: ConformerBlock, timm Block)")
        if not isinstance(blk.attn, HyenaAttention) and type(blk.attn) is not Attention:
            raise TypeError(f"ToMe cannot patch block {i}: attention {type(blk.attn).__name__}")


_GRID_PATCHED: dict[type, type] = {}  # its own cache: plain and grid ViTs share the class VisionTransformer


def apply_tome_grid(model: VisionTransformer, r=16, prop_attn: bool = True) -> VisionTransformer:
    """:func:`visiontools.patches.timm.apply_tome` for ViTs with grid layers (use that one; it
    dispatches here). Undo with ``visiontools.patches.timm.remove_tome``."""
    _check_grid_supported(model)
    base = type(model)
    if base not in _GRID_PATCHED:
        _GRID_PATCHED[base] = type(f"ToMeGrid{base.__name__}", (ToMeGridVisionTransformer, base), {})
    model.__class__ = _GRID_PATCHED[base]
    model.tome_r, model.tome_prop_attn = r, prop_attn
    return model
