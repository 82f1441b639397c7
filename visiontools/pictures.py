"""Merge pictures at the ToMe paper's scale: the paper draws merged groups on a 14x14 (ViT-B/16 at
224 px) or 24x24 grid of patches, while the CIFAR-10 models shipped with visiontools see 32x32 images
as an 8x8 grid, too coarse to show groups that follow objects.

:func:`picture_model` gives such a model a larger input: a copy sharing its weights whose patch
embedding takes ``k`` times the height and width (``k`` the smallest integer that makes the grid at
least ``min_grid`` patches a side), with its position embeddings interpolated to the new grid as
timm does for ``dynamic_img_size`` models. The convolutional tokenizer of the default ``cifar10_cct``
works at any size, so the picture shows the groups the model really merges at that resolution.
:func:`picture_r` scales an r setting by ``k * k``, so that each block merges the same share of its
tokens as the setting does at the model's own input. ``visiontools video`` and the demo's merge and
video tabs draw with both; predictions stay at the model's own input (a CIFAR-10 model classifies
less well at other sizes).
"""
from __future__ import annotations

import copy
import math

import torch

MIN_PICTURE_GRID = 14  # merge pictures have at least this many patches a side by default (the paper's 14x14)


def picture_scale(model: torch.nn.Module, min_grid: int = MIN_PICTURE_GRID) -> int:
    """The integer factor ``k`` by which :func:`picture_model` enlarges ``model``'s input: the smallest
    that gives at least ``min_grid`` patches a side (1 when the grid is that large already, when
    ``min_grid`` is 0, or when the model cannot take another input size: only timm
    ``VisionTransformer`` models with a learned or no position embedding can)."""
    from timm.models.vision_transformer import VisionTransformer

    if min_grid < 0:
        raise ValueError(f"min_grid must be at least 0, got {min_grid}")
    if not isinstance(model, VisionTransformer) or not hasattr(model.patch_embed, "grid_size"):
        return 1
    rows, cols = model.patch_embed.grid_size
    return max(1, math.ceil(min_grid / min(rows, cols)))


def picture_model(model: torch.nn.Module, min_grid: int = MIN_PICTURE_GRID) -> tuple[torch.nn.Module, int]:
    """``(model, k)``: ``model`` itself and 1 when :func:`picture_scale` is 1, else a copy (sharing
    every weight with ``model``, which stays unchanged) whose input is ``k`` times larger in height and
    width, whose ``patch_embed.grid_size`` is ``k`` times larger and whose position embedding is
    resampled to it (bicubic, timm's ``resample_abs_pos_embed``, as timm resamples it for other input
    sizes). Patch it with ToMe like the original (``apply_tome(copy.copy(pic), r=...)``)."""
    k = picture_scale(model, min_grid)
    if k == 1:
        return model, 1
    from timm.layers import resample_abs_pos_embed

    pe = model.patch_embed
    pic = copy.copy(model)
    pic._modules = dict(model._modules)          # new dicts: setting a module or a parameter on the copy
    pic._parameters = dict(model._parameters)    # leaves the original's untouched
    pic.patch_embed = copy.copy(pe)
    pic.patch_embed.img_size = tuple(s * k for s in pe.img_size)
    pic.patch_embed.grid_size = tuple(g * k for g in pe.grid_size)
    pic.patch_embed.num_patches = pic.patch_embed.grid_size[0] * pic.patch_embed.grid_size[1]
    if model.pos_embed is not None:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        with torch.no_grad():
            pos = resample_abs_pos_embed(model.pos_embed, new_size=pic.patch_embed.grid_size,
                                         old_size=pe.grid_size, num_prefix_tokens=prefix)
        pic.pos_embed = torch.nn.Parameter(pos, requires_grad=False)
    return pic, k


def picture_r(r, depth: int, k: int):
    """The r setting for a :func:`picture_model` copy enlarged ``k`` times: ``r`` itself when ``k`` is 1,
    else the per-block list of ``r`` (any ``tome_r`` form: an int, ``(r, inflection)`` or a list)
    multiplied by ``k * k``, so that every block merges the same share of its tokens."""
    if k == 1:
        return r
    from visiontools.tome.merge import parse_r

    return [v * k * k for v in parse_r(depth, r)]
