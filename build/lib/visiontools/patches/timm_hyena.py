"""Hyena for timm Vision Transformers: ``swap_attention_for_hyena(model)`` and registered Hyena ViTs.

``swap_attention_for_hyena`` replaces the ``attn`` of every block of a timm ``VisionTransformer`` by a
:class:`visiontools.hyena.HyenaAttention` (new, randomly initialised weights) and tells each one the
number of prefix tokens and the patch grid. For ``dynamic_img_size`` models a forward hook on
``patch_embed`` updates the grid for every input (any H x W, not only squares); otherwise the grid is
``patch_embed.grid_size``. Prefix (class/register) tokens read the grid mean in every block (see
:class:`visiontools.hyena.Hyena2d`), so ``global_pool='token'`` keeps working.

Registered models (``timm.create_model(name)``), each Hyena model with an attention twin of equal
width, depth and recipe:

- ``hyena_vit_cifar`` / ``attn_vit_cifar``: 32x32 images, 4x4 patches (8x8 grid), dim 64, depth 6,
  MLP ratio 2 (2 heads of 32 for the twin), no class token, average pooling, 10 classes (0.30M /
  0.21M parameters; small enough to train on a CPU, near the 202k of the paper's CIFAR model).
- ``hyena_vit_cifar_p2`` / ``attn_vit_cifar_p2``: the same with 2x2 patches (16x16 grid).
- ``hyena_vit_small_224`` / ``attn_vit_small_224``: ViT-S/16 shape (dim 384, depth 12) on 224x224.

All are built with ``dynamic_img_size=True``, so they accept other image sizes (multiples of the
patch size); position embeddings are resampled by timm and Hyena filters are generated per grid.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from visiontools.hyena import GridKey, HyenaAttention, set_call_grid

__all__ = ["swap_attention_for_hyena", "configure_hyena", "hyena_layers"]


def hyena_layers(model: nn.Module) -> list[HyenaAttention]:
    """All :class:`HyenaAttention` modules of a model."""
    return [m for m in model.modules() if isinstance(m, HyenaAttention)]


def _record_grid(patch_embed: nn.Module, inputs, output) -> None:
    # dynamic_img_size: patch_embed returns NHWC, so the grid of this input is output.shape[1:3]
    if output.dim() == 4:
        set_call_grid(patch_embed._hyena_grid_key, output.shape[1:3])


def configure_hyena(model: VisionTransformer) -> VisionTransformer:
    """Tell every Hyena layer of a timm ViT its prefix-token count and patch grid (and keep the grid
    current for ``dynamic_img_size`` models). Idempotent; returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"configure_hyena needs a timm VisionTransformer, got {type(model).__name__}")
    layers = hyena_layers(model)
    pe = model.patch_embed
    grid = tuple(int(g) for g in getattr(pe, "grid_size", ()) or ())
    if getattr(pe, "_hyena_grid_key", None) is None:
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


def swap_attention_for_hyena(model: nn.Module, order: int = 2, **hyena_kwargs) -> VisionTransformer:
    """Replace the attention of every block of a timm ``VisionTransformer`` by a Hyena operator of
    the same width (new random weights; the rest of the model is kept). ``order`` and
    ``hyena_kwargs`` (``filter_hidden``, ``filter_bands``, ``filter_layers``, ``short_kernel``) go to
    :class:`visiontools.hyena.Hyena2d`. Works in place and returns the model."""
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


# ----------------------------------------------------------------------------- registered models

CIFAR_DIMS = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=2, mlp_ratio=2.0,
                  class_token=False, global_pool="avg", num_classes=10, dynamic_img_size=True)
SMALL_224_DIMS = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      dynamic_img_size=True)


def _build(variant: str, pretrained: bool, dims: dict, hyena: bool, order: int = 2,
           hyena_kwargs: Optional[dict] = None, **kwargs) -> VisionTransformer:
    from visiontools.models import build_registered_vit  # not at the top: visiontools.models imports this module

    if hyena:
        default = {} if order == 2 and not hyena_kwargs else dict(order=order, **(hyena_kwargs or {}))
        dims = {**dims, "attn_layer": HyenaAttention.bound(**default)}
    img_size = kwargs.get("img_size", dims["img_size"])
    stats = None if img_size <= 64 else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    model = build_registered_vit(variant, pretrained, dims, kwargs, stats)
    if hyena:
        configure_hyena(model)
    return model


@register_model
def hyena_vit_cifar(pretrained: bool = False, order: int = 2, hyena_kwargs: Optional[dict] = None,
                    **kwargs) -> VisionTransformer:
    """Hyena ViT for CIFAR: 4x4 patches (8x8 grid), dim 64, depth 6, order-2 Hyena, avg pooling."""
    return _build("hyena_vit_cifar", pretrained, CIFAR_DIMS, True, order, hyena_kwargs, **kwargs)


@register_model
def attn_vit_cifar(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Attention twin of ``hyena_vit_cifar`` (same width, depth, patching and head; 2 heads)."""
    return _build("attn_vit_cifar", pretrained, CIFAR_DIMS, False, **kwargs)


@register_model
def hyena_vit_cifar_p2(pretrained: bool = False, order: int = 2, hyena_kwargs: Optional[dict] = None,
                       **kwargs) -> VisionTransformer:
    """``hyena_vit_cifar`` with 2x2 patches (16x16 grid, 4x the tokens)."""
    return _build("hyena_vit_cifar_p2", pretrained, {**CIFAR_DIMS, "patch_size": 2}, True, order,
                  hyena_kwargs, **kwargs)


@register_model
def attn_vit_cifar_p2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Attention twin of ``hyena_vit_cifar_p2``."""
    return _build("attn_vit_cifar_p2", pretrained, {**CIFAR_DIMS, "patch_size": 2}, False, **kwargs)


@register_model
def hyena_vit_small_224(pretrained: bool = False, order: int = 2, hyena_kwargs: Optional[dict] = None,
                        **kwargs) -> VisionTransformer:
    """ViT-S/16 shape (dim 384, depth 12, class token) with Hyena instead of attention, 224x224."""
    return _build("hyena_vit_small_224", pretrained, SMALL_224_DIMS, True, order, hyena_kwargs, **kwargs)


@register_model
def attn_vit_small_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Attention twin of ``hyena_vit_small_224`` (timm ``vit_small_patch16_224`` shape, 6 heads)."""
    return _build("attn_vit_small_224", pretrained, SMALL_224_DIMS, False, **kwargs)
