"""Hyena for timm Vision Transformers: ``swap_attention_for_hyena(model)`` and ``configure_hyena(model)``.

``swap_attention_for_hyena`` replaces the ``attn`` of every block of a timm ``VisionTransformer`` by a
:class:`visiontools.layers.hyena.HyenaAttention` (new, randomly initialised weights) and tells each one the
number of prefix tokens and the patch grid. For ``dynamic_img_size`` models a forward hook on
``patch_embed`` updates the grid for every input (any H x W, not only squares); otherwise the grid is
``patch_embed.grid_size``. Prefix (class/register) tokens read the grid mean in every block (see
:class:`visiontools.layers.hyena.Hyena2d`), so ``global_pool='token'`` keeps working.

The registered Hyena ViTs (``hyena_vit_cifar``, its attention twin ``attn_vit_cifar``, ...) are
built from these functions in :mod:`visiontools.models`, the project's one model registry.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from visiontools.layers.hyena import HyenaAttention
from visiontools.patches.timm_grid import configure_grid

__all__ = ["swap_attention_for_hyena", "configure_hyena", "hyena_layers"]


def hyena_layers(model: nn.Module) -> list[HyenaAttention]:
    """All :class:`HyenaAttention` modules of a model."""
    return [m for m in model.modules() if isinstance(m, HyenaAttention)]


def configure_hyena(model: VisionTransformer) -> VisionTransformer:
    """Tell every Hyena layer (every grid layer) of a timm ViT its prefix-token count and patch grid
    (and keep the grid current for ``dynamic_img_size`` models): :func:`visiontools.patches.timm_grid.configure_grid`.
    Idempotent; returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"configure_hyena needs a timm VisionTransformer, got {type(model).__name__}")
    return configure_grid(model)


def swap_attention_for_hyena(model: nn.Module, order: int = 2, **hyena_kwargs) -> VisionTransformer:
    """Replace the attention of every block of a timm ``VisionTransformer`` by a Hyena operator of
    the same width (new random weights; the rest of the model is kept). ``order`` and
    ``hyena_kwargs`` (``filter_hidden``, ``filter_bands``, ``filter_layers``, ``short_kernel``) go to
    :class:`visiontools.layers.hyena.Hyena2d`. Works in place and returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"swap_attention_for_hyena needs a timm VisionTransformer (blocks with an .attn "
                        f"on a patch grid), got {type(model).__name__} from {type(model).__module__}")
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.Module):
            raise TypeError(f"block {i} ({type(blk).__name__}) has no .attn module to replace; "
                            "only Block/ResPostBlock-style ViTs are supported")
        if isinstance(attn, HyenaAttention):
            continue
        qkv = getattr(attn, "qkv", None)
        proj = getattr(attn, "proj", None)
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
            raise TypeError(f"block {i}: {type(attn).__name__} is not a timm Attention with qkv/proj "
                            "Linear layers; cannot infer the width")
        ref = qkv.weight
        blk.attn = HyenaAttention(
            qkv.in_features, qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None,
            attn_drop=float(getattr(getattr(attn, "attn_drop", None), "p", 0.0)),
            proj_drop=float(getattr(getattr(attn, "proj_drop", None), "p", 0.0)),
            order=order, device=ref.device, dtype=ref.dtype, **hyena_kwargs)
    return configure_hyena(model)
