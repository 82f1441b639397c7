"""LSH attention for timm Vision Transformers: ``swap_attention_for_lsh(model)`` and ``configure_lsh(model)``.

:class:`visiontools.layers.lsh.LSHAttention` is a drop-in ``attn_layer`` for timm's ``VisionTransformer``
(``VisionTransformer(attn_layer=LSHAttention.bound(n_hashes=4), ...)``); ``configure_lsh`` then tells
every LSH layer how many prefix (class/register) tokens lead the sequence: those attend exactly to
all tokens, the patch tokens through LSH (see :class:`~visiontools.layers.lsh.LSHAttention`). This is the
role ``configure_hyena`` plays for Hyena; LSH needs no patch grid.

``swap_attention_for_lsh`` converts an existing (e.g. pretrained) ViT. LSH attention is shared-QK
(keys are the normalised queries), so there is no place for the key projection: the swap keeps the
query, value and output projections and drops the key projection. **That changes the model** (its
outputs and accuracy); fine-tune after swapping. The swap warns about this.

The registered ``lsh_vit_*`` models are built in :mod:`visiontools.models`.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from visiontools.layers.lsh import LSHAttention

__all__ = ["swap_attention_for_lsh", "configure_lsh", "lsh_layers"]


def lsh_layers(model: nn.Module) -> list[LSHAttention]:
    """All :class:`LSHAttention` modules of a model."""
    return [m for m in model.modules() if isinstance(m, LSHAttention)]


def configure_lsh(model: VisionTransformer) -> VisionTransformer:
    """Set every LSH layer's prefix-token count from the timm ViT. Idempotent; returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"configure_lsh needs a timm VisionTransformer, got {type(model).__name__}")
    for layer in lsh_layers(model):
        layer.num_prefix_tokens = int(model.num_prefix_tokens)
    return model


def swap_attention_for_lsh(model: nn.Module, bucket_size: int = 64, n_hashes: int = 4, seed: int = 0,
                           **lsh_kwargs) -> VisionTransformer:
    """Replace the attention of every block of a timm ``VisionTransformer`` by shared-QK LSH attention
    of the same width and heads, keeping its query, value and output projections (the key projection
    is dropped: shared-QK changes the model, so this warns). Layer ``i`` gets seed ``seed + i``.
    ``lsh_kwargs`` (``n_buckets``, ``chunks_before``, ``chunks_after``) go to :class:`LSHAttention`.
    Works in place and returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"swap_attention_for_lsh needs a timm VisionTransformer, got "
                        f"{type(model).__name__} from {type(model).__module__}")
    swapped = 0
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if isinstance(attn, LSHAttention):
            continue
        qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
            raise TypeError(f"block {i}: {type(attn).__name__} is not a timm Attention with qkv/proj "
                            "Linear layers; cannot convert it")
        if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity):
            raise TypeError(f"block {i}: attention with qk_norm has no shared-QK LSH counterpart")
        dim = qkv.in_features
        ref = qkv.weight
        new = LSHAttention(dim, num_heads=attn.num_heads, qkv_bias=qkv.bias is not None,
                           proj_bias=proj.bias is not None,
                           attn_drop=float(getattr(getattr(attn, "attn_drop", None), "p", 0.0)),
                           proj_drop=float(getattr(getattr(attn, "proj_drop", None), "p", 0.0)),
                           bucket_size=bucket_size, n_hashes=n_hashes, seed=seed + i,
                           device=ref.device, dtype=ref.dtype, **lsh_kwargs)
        with torch.no_grad():  # timm's qkv rows are [q; k; v]; LSH's are [qk; v]
            new.qkv.weight.copy_(torch.cat([ref[:dim], ref[2 * dim:]]))
            if qkv.bias is not None:
                new.qkv.bias.copy_(torch.cat([qkv.bias[:dim], qkv.bias[2 * dim:]]))
            new.proj.load_state_dict(proj.state_dict())
        blk.attn = new
        swapped += 1
    if swapped:
        warnings.warn(f"swap_attention_for_lsh: {swapped} attention layers now use shared-QK LSH attention "
                      "(keys = normalised queries, key projection dropped): the model's outputs change; "
                      "fine-tune it before trusting its accuracy", UserWarning, stacklevel=2)
    return configure_lsh(model)
