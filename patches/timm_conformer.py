"""Conv-augmented ViTs in timm: the convolutional tokenizer as a timm ``PatchEmbed``, and the builder
of a timm ``VisionTransformer`` made of :class:`visiontools.layers.conformer.ConformerBlock` s.

The blocks are plain ``block_fn`` s of timm's ``VisionTransformer`` (its forward, position
embeddings, pooling and head are kept); :func:`visiontools.patches.timm_grid.configure_grid` tells
them the prefix count and keeps the grid current for every input size (``dynamic_img_size``). The
registered models (``conformer_vit_*``) are in :mod:`visiontools.models`.
"""
from __future__ import annotations

from typing import Optional

from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from visiontools.layers.conformer import ConformerBlock, conv_stem
from visiontools.patches.timm_grid import configure_grid

__all__ = ["ConvTokenizer", "conformer_vit"]


class ConvTokenizer(PatchEmbed):
    """timm ``PatchEmbed`` whose ``proj`` is :func:`visiontools.layers.conformer.conv_stem` (CCT-style
    conv/BN/ReLU/max-pool stages, total stride ``patch_size``) instead of one strided convolution.
    Everything else (grid size, ``dynamic_img_size`` output, padding checks) is timm's."""

    def __init__(self, *args, stem_hidden: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        dd = {"device": self.proj.weight.device, "dtype": self.proj.weight.dtype}
        self.proj = conv_stem(self.proj.in_channels, self.proj.out_channels, self.patch_size[0],
                              hidden=stem_hidden, **dd)

    @classmethod
    def bound(cls, **fixed):
        """A subclass that always passes ``fixed`` (e.g. ``stem_hidden``), for timm's ``embed_layer``."""
        class Bound(cls):
            def __init__(self, *args, **kw):
                super().__init__(*args, **{**kw, **fixed})

        Bound.__name__ = Bound.__qualname__ = cls.__name__
        return Bound


def conformer_vit(kernel_size: int = 3, conv_norm: str = "batch", conv_ffn: bool = False,
                  conv_tokenizer: bool = False, stem_hidden: Optional[int] = None, **vit_kwargs) -> VisionTransformer:
    """A timm ``VisionTransformer`` of Conformer blocks (depthwise ``kernel_size`` convolution module,
    ``conv_norm`` ``"batch"``/``"layer"``), optionally with ConvFFNs (``conv_ffn``) and the
    convolutional tokenizer (``conv_tokenizer``, needs a power-of-2 patch size). ``vit_kwargs`` go to
    ``VisionTransformer`` (``dynamic_img_size=True`` is the default, so any image size runs)."""
    vit_kwargs.setdefault("dynamic_img_size", True)
    if vit_kwargs.get("patch_size", 16) & (vit_kwargs.get("patch_size", 16) - 1) and conv_tokenizer:
        raise ValueError(f"conv_tokenizer needs a power-of-2 patch_size, got {vit_kwargs['patch_size']}")
    block = ConformerBlock.bound(kernel_size=kernel_size, conv_norm=conv_norm, conv_ffn=conv_ffn)
    if conv_tokenizer:
        vit_kwargs["embed_layer"] = ConvTokenizer.bound(stem_hidden=stem_hidden)
    model = VisionTransformer(block_fn=block, **vit_kwargs)
    return configure_grid(model)

