"""Grid layers in timm ViTs: ``configure_grid(model)`` gives every
:class:`visiontools.layers.grid.GridTokens` layer (Hyena, Conformer, ConvFFN) its prefix count and the
per-call patch grid.

Token merging through grid operations is the ToMe adapter's (``visiontools.patches.timm``, block
function ``_grid_block``): each block merges after its token mixer, and each grid operation after that
sees the merged tokens spread over the grid with the call's source map
(:meth:`visiontools.tome.engine.TokenState.layout`, :mod:`visiontools.tome.merge_grid`).
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from visiontools.layers.grid import GridKey, GridTokens, set_call_grid

__all__ = ["configure_grid", "grid_layers", "has_grid_layers"]


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
