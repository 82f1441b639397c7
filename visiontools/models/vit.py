"""The architectures visiontools registers with timm (``timm.create_model("hyena_vit_cifar")`` works once
``visiontools.models`` is imported), built the way timm builds its own: ``build_model_with_cfg`` with
default configs from ``generate_default_cfgs``, so every model has a real timm ``pretrained_cfg``
(input size, mean/std, classes; updated to the arguments it was built with).

- ``vit_cifar_tiny_p4``: ViT-Tiny shape (dim 192, depth 12, 3 heads) with 4x4 patches: 64 tokens + cls.
- ``vit_cifar_mini_p4``: dim 192, depth 6, 3 heads, 4x4 patches; trains on a 2-core CPU in about an hour.
  The shipped ``cifar10_vit`` checkpoint is this model.
- ``hyena_vit_cifar`` / ``attn_vit_cifar``: 32x32 images, 4x4 patches (8x8 grid), dim 64, depth 6,
  MLP ratio 2 (2 heads of 32 for the twin), no class token, average pooling, 10 classes (0.30M /
  0.21M parameters; small enough to train on a CPU, near the 202k of the Hyena paper's CIFAR model).
- ``hyena_vit_cifar_p2`` / ``attn_vit_cifar_p2``: the same with 2x2 patches (16x16 grid).
- ``hyena_vit_small_224`` / ``attn_vit_small_224``: ViT-S/16 shape (dim 384, depth 12) on 224x224.
- ``eva_cifar_mini_p4``: the same size as an EVA-02 (``timm.models.eva.Eva``: rotary position embeddings,
  SwiGLU MLP, class token, average pooling); used to choose ToMe's rule for rotary embeddings.
- ``lsh_vit_*``: the attention twins with shared-QK LSH attention (:mod:`visiontools.layers.lsh`);
  ``rev_vit_*``: the same ViTs with reversible two-stream blocks (:mod:`visiontools.layers.reversible`).
- ``cct_vit_cifar``: a CCT-style ViT (Hassani et al., 2021): the convolutional tokenizer (32x32 -> 8x8)
  feeding 7 plain timm blocks (dim 192), so ToMe saves the blocks' full cost.
- ``conformer_vit_cifar`` / ``conformer_vit_cifar_cct`` / ``conformer_vit_small_224``: conv-augmented
  ViTs (:class:`visiontools.layers.conformer.ConformerBlock` as ``block_fn``; the ``_cct`` one with the
  convolutional tokenizer and ConvFFNs), built by ``visiontools.patches.timm_conformer.conformer_vit``.

All but the EVA are plain ``timm`` ``VisionTransformer`` instances (the Hyena ones with
:class:`visiontools.layers.hyena.HyenaAttention` as ``attn_layer``, configured by
``visiontools.patches.timm_hyena``), so timm tooling and ``visiontools.patches.timm`` (ToMe) apply.
The Hyena models and twins use ``dynamic_img_size=True``: other image sizes (multiples of the patch
size) work, with position embeddings resampled by timm and Hyena filters generated per grid.
There are no downloadable weights: ``pretrained=True`` is refused (load a shipped checkpoint instead).
"""
from __future__ import annotations

from typing import Callable, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from visiontools.data import CIFAR_STATS
from visiontools.layers.hyena import HyenaAttention
from visiontools.patches.timm_conformer import ConvTokenizer, conformer_vit
from visiontools.patches.timm_hyena import configure_hyena


def _stats(num_classes: int, img_size: int) -> tuple[tuple, tuple]:
    """Normalisation of a model's input: CIFAR-100's or CIFAR-10's for small images, ImageNet's above 64 px."""
    if img_size > 64:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    mean, std = CIFAR_STATS["cifar100" if num_classes == 100 else "cifar10"]
    return tuple(mean), tuple(std)


def _input_cfg(num_classes: int, img_size) -> dict:
    """The ``pretrained_cfg`` fields that follow from the classes and the input size."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    mean, std = _stats(num_classes, max(h, w))
    return {"num_classes": num_classes, "input_size": (3, h, w), "crop_pct": 1.0 if max(h, w) <= 64 else 0.9,
            "mean": mean, "std": std}


def _cfg(num_classes: int = 10, img_size: int = 32, **kwargs) -> dict:
    """A default cfg: no weights (empty url), the input it was designed for, timm's usual keys."""
    return {"url": "", "pool_size": None, "interpolation": "bicubic", "first_conv": "patch_embed.proj",
            "classifier": "head", "license": "apache-2.0", **_input_cfg(num_classes, img_size), **kwargs}


_CIFAR = ("vit_cifar_tiny_p4", "vit_cifar_mini_p4", "eva_cifar_mini_p4", "hyena_vit_cifar", "attn_vit_cifar",
          "hyena_vit_cifar_p2", "attn_vit_cifar_p2", "lsh_vit_cifar", "lsh_vit_cifar_p2", "rev_vit_cifar",
          "rev_vit_cifar_p2", "conformer_vit_cifar")
_SMALL_224 = ("hyena_vit_small_224", "attn_vit_small_224", "lsh_vit_small_224", "rev_vit_small_224",
              "conformer_vit_small_224")
# timm's register_model reads this module-level name: every entrypoint below gets its cfg from here.
default_cfgs = generate_default_cfgs({
    **{name: _cfg() for name in _CIFAR},
    **{name: _cfg(1000, 224) for name in _SMALL_224},
    "conformer_vit_cifar_cct": _cfg(first_conv="patch_embed.proj.0"),
    "cct_vit_cifar": _cfg(first_conv="patch_embed.proj.0"),
})


def build_registered(model_cls: Callable, variant: str, pretrained: bool, dims: dict, kwargs: dict,
                     **cfg_fields):
    """``model_cls(**dims updated by kwargs)`` through timm's ``build_model_with_cfg``, its
    ``pretrained_cfg`` (the default one of ``variant``) updated to the classes and input size it was
    built with (and ``cfg_fields``). There are no downloadable weights, so ``pretrained=True`` is refused."""
    if pretrained:
        raise ValueError(f"{variant} has no downloadable weights; load a visiontools checkpoint instead "
                         "(visiontools.models.load, e.g. load('cifar10_vit'))")
    cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    kwargs.pop("cache_dir", None)
    args = {**dims, **kwargs}
    mine = {**_input_cfg(args.get("num_classes", 1000), args["img_size"]), **cfg_fields}
    return build_model_with_cfg(model_cls, variant, pretrained=False, pretrained_cfg=cfg,
                                pretrained_cfg_overlay={**mine, **overlay}, **args)


@register_model
def vit_cifar_tiny_p4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny (dim 192, depth 12, 3 heads) with 4x4 patches on 32x32 images (65 tokens)."""
    dims = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=12, num_heads=3)
    return build_registered(VisionTransformer, "vit_cifar_tiny_p4", pretrained, dims, kwargs)


@register_model
def vit_cifar_mini_p4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Half-depth ViT-Tiny (dim 192, depth 6, 3 heads) with 4x4 patches on 32x32 images (65 tokens)."""
    dims = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3)
    return build_registered(VisionTransformer, "vit_cifar_mini_p4", pretrained, dims, kwargs)


@register_model
def eva_cifar_mini_p4(pretrained: bool = False, **kwargs):
    """EVA-02-style ViT (rotary position embeddings, SwiGLU, dim 192, depth 6, 3 heads) with 4x4 patches on
    32x32 images (65 tokens), shaped like ``eva02_tiny_patch14_224`` but half as deep."""
    from timm.models.eva import Eva

    dims = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3,
                mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(8, 8))
    return build_registered(Eva, "eva_cifar_mini_p4", pretrained, dims, kwargs)


# ----------------------------------------------------------------------------- Hyena ViTs and attention twins

CIFAR_DIMS = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=2, mlp_ratio=2.0,
                  class_token=False, global_pool="avg", num_classes=10, dynamic_img_size=True)
SMALL_224_DIMS = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000,
                      dynamic_img_size=True)


def _build_hyena_or_twin(variant: str, pretrained: bool, dims: dict, hyena: bool, order: int = 2,
                         hyena_kwargs: Optional[dict] = None, **kwargs) -> VisionTransformer:
    if hyena:
        default = {} if order == 2 and not hyena_kwargs else dict(order=order, **(hyena_kwargs or {}))
        dims = {**dims, "attn_layer": HyenaAttention.bound(**default)}
    model = build_registered(VisionTransformer, variant, pretrained, dims, kwargs)
    if hyena:
        configure_hyena(model)
    return model


@register_model
def hyena_vit_cifar(pretrained: bool = False, order: int = 2, hyena_kwargs: Optional[dict] = None,
                    **kwargs) -> VisionTransformer:
    """Hyena ViT for CIFAR: 4x4 patches (8x8 grid), dim 64, depth 6, order-2 Hyena, avg pooling."""
    return _build_hyena_or_twin("hyena_vit_cifar", pretrained, CIFAR_DIMS, True, order, hyena_kwargs, **kwargs)


@register_model
def attn_vit_cifar(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Attention twin of ``hyena_vit_cifar`` (same width, depth, patching and head; 2 heads)."""
    return _build_hyena_or_twin("attn_vit_cifar", pretrained, CIFAR_DIMS, False, **kwargs)


@register_model
def hyena_vit_cifar_p2(pretrained: bool = False, order: int = 2, hyena_kwargs: Optional[dict] = None,
                       **kwargs) -> VisionTransformer:
    """``hyena_vit_cifar`` with 2x2 patches (16x16 grid, 4x the tokens)."""
    return _build_hyena_or_twin("hyena_vit_cifar_p2", pretrained, {**CIFAR_DIMS, "patch_size": 2}, True, order,
                                hyena_kwargs, **kwargs)


@register_model
def attn_vit_cifar_p2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Attention twin of ``hyena_vit_cifar_p2``."""
    return _build_hyena_or_twin("attn_vit_cifar_p2", pretrained, {**CIFAR_DIMS, "patch_size": 2}, False, **kwargs)


@register_model
def hyena_vit_small_224(pretrained: bool = False, order: int = 2, hyena_kwargs: Optional[dict] = None,
                        **kwargs) -> VisionTransformer:
    """ViT-S/16 shape (dim 384, depth 12, class token) with Hyena instead of attention, 224x224."""
    return _build_hyena_or_twin("hyena_vit_small_224", pretrained, SMALL_224_DIMS, True, order, hyena_kwargs,
                                **kwargs)


@register_model
def attn_vit_small_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Attention twin of ``hyena_vit_small_224`` (timm ``vit_small_patch16_224`` shape, 6 heads)."""
    return _build_hyena_or_twin("attn_vit_small_224", pretrained, SMALL_224_DIMS, False, **kwargs)


# ----------------------------------------------------------------------------- LSH ViTs and reversible ViTs (Reformer)

LSH_DEFAULTS = {"cifar": dict(bucket_size=16, n_hashes=2), "cifar_p2": dict(bucket_size=32, n_hashes=2),
                "small_224": dict(bucket_size=32, n_hashes=4)}
_SIZES = {"cifar": CIFAR_DIMS, "cifar_p2": {**CIFAR_DIMS, "patch_size": 2}, "small_224": SMALL_224_DIMS}


def _build_lsh_or_rev(variant: str, pretrained: bool, size: str, mixer: str, reversible: bool,
                      mixer_kwargs: Optional[dict], **kwargs) -> VisionTransformer:
    from visiontools.layers.lsh import LSHAttention
    from visiontools.patches.timm_lsh import configure_lsh, lsh_layers
    from visiontools.patches.timm_reversible import make_reversible

    dims = dict(_SIZES[size])
    if mixer == "lsh":
        dims["attn_layer"] = LSHAttention.bound(**{**LSH_DEFAULTS[size], **(mixer_kwargs or {})})
    elif mixer == "hyena":
        dims["attn_layer"] = HyenaAttention.bound(**(mixer_kwargs or {}))
    elif mixer != "attention":
        raise ValueError(f"unknown mixer {mixer!r}: use 'attention', 'hyena' or 'lsh'")
    elif mixer_kwargs:
        raise ValueError("mixer_kwargs is only for mixer='hyena' or 'lsh'")
    model = build_registered(VisionTransformer, variant, pretrained, dims, kwargs)
    if mixer == "hyena":
        configure_hyena(model)
    configure_lsh(model)
    for i, layer in enumerate(lsh_layers(model)):  # independent eval-mode rotations per layer, as the swap gives;
        layer.seed.fill_(i)                        # a checkpoint's load_state_dict restores the seeds it saved
    return make_reversible(model) if reversible else model


@register_model
def lsh_vit_cifar(pretrained: bool = False, lsh_kwargs: Optional[dict] = None, **kwargs) -> VisionTransformer:
    """``attn_vit_cifar`` with shared-QK LSH attention (64 tokens; bucket 16, 2 hashes by default)."""
    return _build_lsh_or_rev("lsh_vit_cifar", pretrained, "cifar", "lsh", False, lsh_kwargs, **kwargs)


@register_model
def lsh_vit_cifar_p2(pretrained: bool = False, lsh_kwargs: Optional[dict] = None, **kwargs) -> VisionTransformer:
    """``attn_vit_cifar_p2`` (2x2 patches, 256 tokens) with LSH attention (bucket 32, 2 hashes)."""
    return _build_lsh_or_rev("lsh_vit_cifar_p2", pretrained, "cifar_p2", "lsh", False, lsh_kwargs, **kwargs)


@register_model
def lsh_vit_small_224(pretrained: bool = False, lsh_kwargs: Optional[dict] = None, **kwargs) -> VisionTransformer:
    """ViT-S/16 shape on 224x224 with LSH attention (bucket 32, 4 hashes; the class token attends exactly)."""
    return _build_lsh_or_rev("lsh_vit_small_224", pretrained, "small_224", "lsh", False, lsh_kwargs, **kwargs)


@register_model
def rev_vit_cifar(pretrained: bool = False, mixer: str = "attention", mixer_kwargs: Optional[dict] = None,
                  **kwargs) -> VisionTransformer:
    """Reversible ``attn_vit_cifar`` (same parameters; ``mixer`` 'attention', 'hyena' or 'lsh' as F)."""
    return _build_lsh_or_rev("rev_vit_cifar", pretrained, "cifar", mixer, True, mixer_kwargs, **kwargs)


@register_model
def rev_vit_cifar_p2(pretrained: bool = False, mixer: str = "attention", mixer_kwargs: Optional[dict] = None,
                     **kwargs) -> VisionTransformer:
    """Reversible ``attn_vit_cifar_p2`` (2x2 patches, 256 tokens)."""
    return _build_lsh_or_rev("rev_vit_cifar_p2", pretrained, "cifar_p2", mixer, True, mixer_kwargs, **kwargs)


@register_model
def rev_vit_small_224(pretrained: bool = False, mixer: str = "attention", mixer_kwargs: Optional[dict] = None,
                      **kwargs) -> VisionTransformer:
    """Reversible ViT-S/16 shape on 224x224 (Rev-ViT-S layout: dim 384, depth 12)."""
    return _build_lsh_or_rev("rev_vit_small_224", pretrained, "small_224", mixer, True, mixer_kwargs, **kwargs)


# ----------------------------------------------------------------------------- conv-augmented (Conformer) ViTs

CONFORMER_CIFAR_DIMS = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
                            class_token=False, global_pool="avg", num_classes=10)
_CONV_DEFAULTS = dict(kernel_size=3, conv_norm="batch", conv_ffn=False, conv_tokenizer=False, stem_hidden=None)


def _build_conformer(variant: str, pretrained: bool, dims: dict, conv: dict, **kwargs) -> VisionTransformer:
    """A registered Conformer ViT: ``conv`` (kernel_size, conv_norm, conv_ffn, conv_tokenizer,
    stem_hidden) overridable through ``kwargs``, the rest as :func:`build_registered`."""
    conv = {**conv, **{k: kwargs.pop(k) for k in list(kwargs) if k in conv}}
    first_conv = "patch_embed.proj" + (".0" if conv["conv_tokenizer"] else "")
    return build_registered(conformer_vit, variant, pretrained, {**dims, **conv}, kwargs, first_conv=first_conv)


@register_model
def conformer_vit_cifar(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Conformer ViT for 32x32 images: linear 4x4 patches (8x8 grid), dim 128, depth 6, 4 heads, half-step
    FFNs of ratio 2, 3x3 depthwise convolution module with BatchNorm, average pooling."""
    return _build_conformer("conformer_vit_cifar", pretrained, CONFORMER_CIFAR_DIMS, _CONV_DEFAULTS, **kwargs)


@register_model
def conformer_vit_cifar_cct(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """``conformer_vit_cifar`` with the CCT-style convolutional tokenizer (2 conv/BN/ReLU/max-pool
    stages: 32x32 -> 8x8) and ConvFFNs (depthwise 3x3 in both half-step FFNs): the CPU CIFAR-10 recipe's model."""
    return _build_conformer("conformer_vit_cifar_cct", pretrained, CONFORMER_CIFAR_DIMS,
                            {**_CONV_DEFAULTS, "conv_ffn": True, "conv_tokenizer": True, "stem_hidden": 64}, **kwargs)


@register_model
def cct_vit_cifar(pretrained: bool = False, stem_hidden: int = 32, **kwargs) -> VisionTransformer:
    """CCT-style ViT for 32x32 images: the convolutional tokenizer of ``conformer_vit_cifar_cct`` (2
    conv/BN/ReLU/max-pool stages, 3 -> ``stem_hidden`` -> 192 channels, 32x32 -> 8x8 tokens) feeding plain
    timm ``Block`` s (dim 192, depth 7, 3 heads, MLP ratio 3, no class token, average pooling): no grid
    operation inside the blocks, so token merging saves their full cost. ``configs/cct_cifar10_cpu.yaml``
    trains it on CIFAR-10."""
    dims = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=7, num_heads=3, mlp_ratio=3.0,
                class_token=False, global_pool="avg", dynamic_img_size=True,
                embed_layer=ConvTokenizer.bound(stem_hidden=stem_hidden))
    return build_registered(VisionTransformer, "cct_vit_cifar", pretrained, dims, kwargs,
                            first_conv="patch_embed.proj.0")


@register_model
def conformer_vit_small_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 shape (dim 384, depth 12, 6 heads, class token) with Conformer blocks (half-step FFNs
    of ratio 2, 7x7 depthwise convolution module), 224x224."""
    dims = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=2.0, num_classes=1000)
    return _build_conformer("conformer_vit_small_224", pretrained, dims, {**_CONV_DEFAULTS, "kernel_size": 7}, **kwargs)


REGISTERED = tuple(default_cfgs)  # every model name this module registers
