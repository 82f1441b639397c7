"""The project's one model registry (every model visiontools registers with timm is defined here),
and loading of visiontools checkpoints, including the CIFAR-10 ViT shipped inside the package
(``load_default_model``).

Registered models (``timm.create_model(name)`` works once this module is imported):

- ``vit_cifar_tiny_p4``: ViT-Tiny shape (dim 192, depth 12, 3 heads) with 4x4 patches: 64 tokens + cls.
- ``vit_cifar_mini_p4``: dim 192, depth 6, 3 heads, 4x4 patches; trains on a 2-core CPU in about an hour.
  The shipped checkpoint is this model.
- ``hyena_vit_cifar`` / ``attn_vit_cifar``: 32x32 images, 4x4 patches (8x8 grid), dim 64, depth 6,
  MLP ratio 2 (2 heads of 32 for the twin), no class token, average pooling, 10 classes (0.30M /
  0.21M parameters; small enough to train on a CPU, near the 202k of the Hyena paper's CIFAR model).
- ``hyena_vit_cifar_p2`` / ``attn_vit_cifar_p2``: the same with 2x2 patches (16x16 grid).
- ``hyena_vit_small_224`` / ``attn_vit_small_224``: ViT-S/16 shape (dim 384, depth 12) on 224x224.
- ``eva_cifar_mini_p4``: the same size as an EVA-02 (``timm.models.eva.Eva``: rotary position embeddings,
  SwiGLU MLP, class token, average pooling); used to choose ToMe's rule for rotary embeddings.
- ``conformer_vit_cifar`` / ``conformer_vit_cifar_cct`` / ``conformer_vit_small_224``: conv-augmented
  ViTs (:class:`visiontools.layers.conformer.ConformerBlock` as ``block_fn``; the ``_cct`` one with the
  convolutional tokenizer and ConvFFNs), built by ``visiontools.patches.timm_conformer.conformer_vit``.

All but the EVA are plain ``timm`` ``VisionTransformer`` instances (the Hyena ones with
:class:`visiontools.layers.hyena.HyenaAttention` as ``attn_layer``, configured by
``visiontools.patches.timm_hyena``), so timm tooling and ``visiontools.patches.timm`` (ToMe) apply.
The Hyena models and twins use ``dynamic_img_size=True``: other image sizes (multiples of the patch
size) work, with position embeddings resampled by timm and Hyena filters generated per grid.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from visiontools.models.checkpoint import META_KEY, read_checkpoint  # META_KEY: metadata entry holding the model description
from visiontools.data import CIFAR_STATS, CIFAR10_CLASSES

from visiontools.layers.hyena import HyenaAttention
from visiontools.patches.timm_hyena import configure_hyena

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED = {
    "cifar10_vit": CHECKPOINT_DIR / "cifar10_vit.safetensors",
    "hyena_cifar10": CHECKPOINT_DIR / "hyena_cifar10.safetensors",
    "attn_cifar10": CHECKPOINT_DIR / "attn_cifar10.safetensors",  # attention twin of hyena_cifar10
}
DEFAULT_CHECKPOINT = "cifar10_vit"


def build_registered_vit(variant: str, pretrained: bool, dims: dict, kwargs: dict, stats=None) -> VisionTransformer:
    """A ``VisionTransformer`` for a model this project registers with timm: ``dims`` updated by the
    caller's ``kwargs``, with a ``pretrained_cfg`` giving its input size and normalisation (``stats``
    ``(mean, std)``; default: CIFAR-100's for 100 classes, else CIFAR-10's). There are no downloadable
    weights, so ``pretrained=True`` is refused."""
    if pretrained:
        raise ValueError(f"{variant} has no downloadable weights; load a visiontools checkpoint instead "
                         "(visiontools.models.load_checkpoint_model)")
    args = {**dims, **{k: v for k, v in kwargs.items()
                       if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}}  # from timm.create_model
    model = VisionTransformer(**args)
    num_classes = args.get("num_classes", 1000)
    mean, std = stats or CIFAR_STATS["cifar100" if num_classes == 100 else "cifar10"]
    img = args["img_size"]
    cfg = {"url": "", "num_classes": num_classes, "input_size": (3, img, img), "pool_size": None,
           "crop_pct": 1.0 if img <= 64 else 0.9, "interpolation": "bicubic", "mean": tuple(mean),
           "std": tuple(std), "first_conv": "patch_embed.proj", "classifier": "head"}
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


def _create_cifar_vit(variant: str, pretrained: bool, dims: dict, **kwargs) -> VisionTransformer:
    return build_registered_vit(variant, pretrained, dict(img_size=32, patch_size=4, num_classes=10, **dims), kwargs)


@register_model
def vit_cifar_tiny_p4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny (dim 192, depth 12, 3 heads) with 4x4 patches on 32x32 images (65 tokens)."""
    return _create_cifar_vit("vit_cifar_tiny_p4", pretrained, dict(embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_cifar_mini_p4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Half-depth ViT-Tiny (dim 192, depth 6, 3 heads) with 4x4 patches on 32x32 images (65 tokens)."""
    return _create_cifar_vit("vit_cifar_mini_p4", pretrained, dict(embed_dim=192, depth=6, num_heads=3), **kwargs)


# ----------------------------------------------------------------------------- Hyena ViTs and attention twins

CIFAR_DIMS = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=2, mlp_ratio=2.0,
                  class_token=False, global_pool="avg", num_classes=10, dynamic_img_size=True)
SMALL_224_DIMS = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      dynamic_img_size=True)


def _build_hyena_or_twin(variant: str, pretrained: bool, dims: dict, hyena: bool, order: int = 2,
           hyena_kwargs: Optional[dict] = None, **kwargs) -> VisionTransformer:
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
    return _build_hyena_or_twin("hyena_vit_small_224", pretrained, SMALL_224_DIMS, True, order, hyena_kwargs, **kwargs)


@register_model
def attn_vit_small_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Attention twin of ``hyena_vit_small_224`` (timm ``vit_small_patch16_224`` shape, 6 heads)."""
    return _build_hyena_or_twin("attn_vit_small_224", pretrained, SMALL_224_DIMS, False, **kwargs)


@register_model
def eva_cifar_mini_p4(pretrained: bool = False, **kwargs):
    """EVA-02-style ViT (rotary position embeddings, SwiGLU, dim 192, depth 6, 3 heads) with 4x4 patches on
    32x32 images (65 tokens), shaped like ``eva02_tiny_patch14_224`` but half as deep."""
    from timm.models.eva import Eva

    if pretrained:
        raise ValueError("eva_cifar_mini_p4 has no downloadable weights; load a visiontools checkpoint instead "
                         "(visiontools.models.load_checkpoint_model)")
    args = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3,
                mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(8, 8))
    args.update({k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")})
    model = Eva(**args)
    mean, std = CIFAR_STATS["cifar100" if args["num_classes"] == 100 else "cifar10"]
    cfg = {"url": "", "num_classes": args["num_classes"], "input_size": (3, 32, 32), "pool_size": None,
           "crop_pct": 1.0, "interpolation": "bicubic", "mean": tuple(mean), "std": tuple(std),
           "first_conv": "patch_embed.proj", "classifier": "head"}
    model.pretrained_cfg = model.default_cfg = cfg
    return model


# ----------------------------------------------------------------------------- LSH ViTs and reversible ViTs (Reformer)
# lsh_vit_*: the attention twins above with shared-QK LSH attention (visiontools.layers.lsh) as attn_layer.
# rev_vit_*: the same ViTs with reversible two-stream blocks (visiontools.layers.reversible); any mixer as F.

SHIPPED["lsh_cifar10"] = CHECKPOINT_DIR / "lsh_cifar10.safetensors"  # LSH twin of attn_cifar10, same recipe
SHIPPED["rev_cifar10"] = CHECKPOINT_DIR / "rev_cifar10.safetensors"  # reversible twin of attn_cifar10, same recipe

LSH_DEFAULTS = {"cifar": dict(bucket_size=16, n_hashes=2), "cifar_p2": dict(bucket_size=32, n_hashes=2),
                "small_224": dict(bucket_size=32, n_hashes=4)}
_SIZES = {"cifar": CIFAR_DIMS, "cifar_p2": {**CIFAR_DIMS, "patch_size": 2}, "small_224": SMALL_224_DIMS}


def _lsh_layer(size: str, lsh_kwargs: Optional[dict]):
    from visiontools.layers.lsh import LSHAttention
    return LSHAttention.bound(**{**LSH_DEFAULTS[size], **(lsh_kwargs or {})})


def _build_lsh_or_rev(variant: str, pretrained: bool, size: str, mixer: str, reversible: bool,
                      mixer_kwargs: Optional[dict], **kwargs) -> VisionTransformer:
    from visiontools.patches.timm_lsh import configure_lsh, lsh_layers
    from visiontools.patches.timm_reversible import make_reversible

    dims = dict(_SIZES[size])
    if mixer == "lsh":
        dims["attn_layer"] = _lsh_layer(size, mixer_kwargs)
    elif mixer == "hyena":
        dims["attn_layer"] = HyenaAttention.bound(**(mixer_kwargs or {}))
    elif mixer != "attention":
        raise ValueError(f"unknown mixer {mixer!r}: use 'attention', 'hyena' or 'lsh'")
    elif mixer_kwargs:
        raise ValueError("mixer_kwargs is only for mixer='hyena' or 'lsh'")
    img_size = kwargs.get("img_size", dims["img_size"])
    stats = None if img_size <= 64 else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    model = build_registered_vit(variant, pretrained, dims, kwargs, stats)
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


def check_model_name(name: str) -> None:
    """``UserError`` naming the closest registered model unless timm knows ``name``."""
    if not timm.is_model(name):  # every name timm.list_models() gives passes this too
        from visiontools.errors import UserError, did_you_mean
        raise UserError(f"unknown model {name!r}: not a registered timm model{did_you_mean(name, timm.list_models())} "
                        f"(visiontools adds {', '.join(timm.list_models(['vit_cifar_*', 'eva_cifar_*', 'hyena_vit_*', 'attn_vit_*', 'lsh_vit_*', 'rev_vit_*', 'conformer_vit_*']))})")


def create_model(name: str, num_classes: int | None = None, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with a clear error for unknown names (this module's models included)."""
    check_model_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained:  # fails fast, in one line, without a network
        from visiontools.models.hub import create_pretrained
        return create_pretrained(name, **kwargs)
    return timm.create_model(name, **kwargs)


def model_description(name: str, model_kwargs: dict, classes: list[str], mean, std, **extra) -> dict:
    """The JSON description stored with every checkpoint: enough to rebuild and feed the model."""
    return {"model": name, "model_kwargs": dict(model_kwargs), "classes": list(classes),
            "mean": list(mean), "std": list(std), **extra}


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A shipped checkpoint name (e.g. ``cifar10_vit``) or an existing file path -> the file path."""
    if str(path_or_name) in SHIPPED:
        return SHIPPED[str(path_or_name)]
    path = Path(path_or_name)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a .safetensors file written by "
                                f"`visiontools train`, or one of the shipped names {sorted(SHIPPED)})")
    return path


def load_checkpoint_model(path_or_name: str | os.PathLike = DEFAULT_CHECKPOINT, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model described in a visiontools checkpoint (a training checkpoint or an exported
    one), load its weights, and return ``(model in eval mode, description)``. The description holds
    ``model``, ``model_kwargs``, ``classes``, ``mean``, ``std`` and, for shipped files, the contents of
    the sibling ``.json`` (training summary, evaluation table). A training checkpoint of a run with
    ``ema_decay`` loads its EMA weights (the ones it evaluated and exports)."""
    path = resolve_checkpoint(path_or_name)
    tensors, meta = read_checkpoint(path)
    if META_KEY not in meta:
        raise ValueError(f"{path} has no '{META_KEY}' metadata; it was not written by visiontools "
                         "(expected the model name, kwargs, classes, mean and std in the safetensors metadata)")
    desc = json.loads(meta[META_KEY])
    model = create_model(desc["model"], **desc.get("model_kwargs", {}))
    use = "ema." if any(k.startswith("ema.") for k in tensors) else "model."  # EMA weights when trained with them
    state = {k[len(use):]: v for k, v in tensors.items() if k.startswith(use)}
    if not state:
        state = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng.", "ema."))}
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.to(device=device, dtype=dtype).eval()
    side = path.with_suffix(".json")
    if side.is_file():
        desc = {**json.loads(side.read_text()), **desc}
    desc["path"] = str(path)
    return model, desc


def load_default_model(device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The CIFAR-10 ViT shipped with visiontools (trained by the project itself). Returns
    ``(model, description)``: the model in eval mode, and a dict with its class names, mean/std,
    training summary and ``visiontools eval`` table (the card ``checkpoints/cifar10_vit.json``)."""
    return load_checkpoint_model(DEFAULT_CHECKPOINT, device=device)


__all__ = ["vit_cifar_tiny_p4", "vit_cifar_mini_p4", "create_model", "load_checkpoint_model",
           "load_default_model", "read_checkpoint", "model_description", "CIFAR10_CLASSES"]


# ----------------------------------------------------------------------------- shipping a checkpoint

def subset_accuracy(model: torch.nn.Module, desc: dict, data_dir: str | os.PathLike, per_class: int | None = 20,
                    batch_size: int = 500) -> dict:
    """Top-1/top-5 (%) and per-class top-1 (%) on the first ``per_class`` CIFAR test images of every
    class (``None``: the whole test split), fp32 activations on the CPU: the fixed subset whose accuracy
    is recorded with a shipped checkpoint and checked by the tests."""
    from visiontools.data import load_cifar, normalize

    ds = load_cifar(desc.get("dataset", "cifar10"), "test", data_dir, max_per_class=per_class)
    with torch.no_grad():
        top5 = torch.cat([model(normalize(ds.images[i:i + batch_size], desc["mean"], desc["std"])).topk(5, 1).indices
                          for i in range(0, len(ds), batch_size)])
    hit = top5[:, 0] == ds.labels
    classes = desc.get("classes") or [str(c) for c in range(int(ds.labels.max()) + 1)]
    return {"per_class": per_class, "n": len(ds), "top1": 100.0 * hit.float().mean().item(),
            "top5": 100.0 * (top5 == ds.labels[:, None]).any(1).float().mean().item(),
            "per_class_top1": {name: 100.0 * hit[ds.labels == c].float().mean().item()
                               for c, name in enumerate(classes) if (ds.labels == c).any()}}


def ship_checkpoint(train_checkpoint: str | os.PathLike, dst: str | os.PathLike, data_dir: str | os.PathLike,
                    eval_json: str | os.PathLike | None = None, notes: dict | None = None) -> dict:
    """Export a training checkpoint as fp16 weights to ``dst`` and write ``dst.json`` beside it (config,
    training log, subset accuracy, accuracy and per-class accuracy on the whole test split with the
    fp16 weights, the machine, the ``visiontools eval`` result and ``notes``). Returns that JSON."""
    from visiontools.models.checkpoint import atomic_write_text, export_for_inference, load_training_state
    from visiontools.timing import machine_description

    _, desc, state = load_training_state(train_checkpoint)
    dst = Path(dst)
    export_for_inference(train_checkpoint, dst, dtype=torch.float16)
    model32, _ = load_checkpoint_model(train_checkpoint)
    model16, _ = load_checkpoint_model(dst)
    card = {
        "name": dst.stem, "file": dst.name, "weights_dtype": "float16", "description": desc,
        "config": state["config"], "epochs_completed": state["epoch"], "steps": state["step"],
        "world_size": state.get("world_size", 1), "history": state["history"],
        "training_minutes": round(sum(r["seconds"] for r in state["history"]) / 60, 1),
        "subset_accuracy": subset_accuracy(model16, desc, data_dir),
        "subset_accuracy_fp32_weights": subset_accuracy(model32, desc, data_dir),
        "test_accuracy": subset_accuracy(model16, desc, data_dir, per_class=None),
        "machine": machine_description(torch.device("cpu")),
        **(notes or {}),
    }
    if eval_json is not None:
        ev = json.loads(Path(eval_json).read_text())
        for row in ev["rows"]:
            row.pop("times_s", None)
        card["eval"] = ev
    atomic_write_text(dst.with_suffix(".json"), json.dumps(card, indent=1))
    return card


# ----------------------------------------------------------------------------- conv-augmented (Conformer) ViTs

from visiontools.patches.timm_conformer import conformer_vit  # noqa: E402

CONFORMER_CIFAR_DIMS = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
                            class_token=False, global_pool="avg", num_classes=10)


def _build_conformer(variant: str, pretrained: bool, dims: dict, conv: dict, **kwargs) -> VisionTransformer:
    """A registered Conformer ViT: ``conv`` (kernel_size, conv_norm, conv_ffn, conv_tokenizer,
    stem_hidden) overridable through ``kwargs``, the rest as :func:`build_registered_vit`."""
    if pretrained:
        raise ValueError(f"{variant} has no downloadable weights; load a visiontools checkpoint instead "
                         "(visiontools.models.load_checkpoint_model)")
    conv = {**conv, **{k: kwargs.pop(k) for k in list(kwargs) if k in conv}}
    args = {**dims, **{k: v for k, v in kwargs.items()
                       if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}}
    model = conformer_vit(**conv, **args)
    img = args["img_size"]
    num_classes = args.get("num_classes", 1000)
    mean, std = (CIFAR_STATS["cifar100" if num_classes == 100 else "cifar10"] if img <= 64
                 else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    cfg = {"url": "", "num_classes": num_classes, "input_size": (3, img, img), "pool_size": None,
           "crop_pct": 1.0 if img <= 64 else 0.9, "interpolation": "bicubic", "mean": tuple(mean),
           "std": tuple(std), "first_conv": "patch_embed.proj" + (".0" if conv["conv_tokenizer"] else ""),
           "classifier": "head"}
    model.pretrained_cfg = model.default_cfg = cfg
    return model


SHIPPED["conformer_cifar10"] = CHECKPOINT_DIR / "conformer_cifar10.safetensors"  # the demo's default (most accurate)

_CONV_DEFAULTS = dict(kernel_size=3, conv_norm="batch", conv_ffn=False, conv_tokenizer=False, stem_hidden=None)


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
def conformer_vit_small_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 shape (dim 384, depth 12, 6 heads, class token) with Conformer blocks (half-step FFNs
    of ratio 2, 7x7 depthwise convolution module), 224x224."""
    dims = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=2.0)
    return _build_conformer("conformer_vit_small_224", pretrained, dims, {**_CONV_DEFAULTS, "kernel_size": 7}, **kwargs)
