"""Reversible timm Vision Transformers: ``make_reversible(model)``.

Turns the ``blocks`` of a timm ``VisionTransformer`` into a
:class:`visiontools.layers.reversible.ReversibleSequence`: block ``i``'s attention sub-block
(``norm1 -> attn -> ls1 -> drop_path1``) becomes ``F`` and its MLP sub-block
(``norm2 -> mlp -> ls2 -> drop_path2``) ``G`` of a two-stream RevNet coupling; the token sequence
enters both streams and their mean goes on to timm's final norm and head. The weights are kept, but
the function changes (two coupled streams instead of one residual stream), so it is meant for
training from scratch (the registered ``rev_vit_*`` models in :mod:`visiontools.models`).
Any token mixer works as ``attn`` (timm attention, Hyena, LSH). Do not also turn on timm's
activation checkpointing (``set_grad_checkpointing``): the reversible backward already recomputes.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from visiontools.layers.reversible import RevCoupling, ReversibleSequence

__all__ = ["make_reversible"]


def make_reversible(model: VisionTransformer, reversible: bool = True) -> VisionTransformer:
    """Replace ``model.blocks`` (timm ``Block`` s) by a :class:`ReversibleSequence` in place; returns the model."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"make_reversible needs a timm VisionTransformer, got {type(model).__name__}")
    if isinstance(model.blocks, ReversibleSequence):
        return model
    couplings = []
    for i, b in enumerate(model.blocks):
        if not all(hasattr(b, a) for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")):
            raise TypeError(f"block {i} ({type(b).__name__}) is not a pre-norm timm Block; cannot split it into F and G")
        couplings.append(RevCoupling(nn.Sequential(b.norm1, b.attn, b.ls1, b.drop_path1),
                                     nn.Sequential(b.norm2, b.mlp, b.ls2, b.drop_path2)))
    model.blocks = ReversibleSequence(couplings, reversible=reversible)

    return model
