"""The checkpoints shipped inside the package, loading any model by name or path (:func:`load`, the one
loader the CLI commands, the demo and the library use), and shipping a new checkpoint.

``DEFAULT_CHECKPOINT`` (``cifar10_cct``, a CCT-style ViT: convolutional tokens into plain transformer
blocks, where ToMe pays on a CPU) is the one default of the library (:func:`load_default_model`),
``visiontools eval``/``video``/``export`` and the demo.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from visiontools.defaults import CHECKPOINT_DIR, DEFAULT_ARCHITECTURE, DEFAULT_CHECKPOINT  # noqa: F401 (re-exported)
from visiontools.errors import UserError, did_you_mean
from visiontools.models.checkpoint import META_KEY, read_checkpoint  # META_KEY: metadata entry holding the model description
from visiontools.models.registry import create_model, is_registered_here

SHIPPED = {
    "cifar10_cct": CHECKPOINT_DIR / "cifar10_cct.safetensors",  # cct_vit_cifar: the default
    "cifar10_cct_tome": CHECKPOINT_DIR / "cifar10_cct_tome.safetensors",  # cifar10_cct fine-tuned at ToMe r=13
    "cifar10_vit": CHECKPOINT_DIR / "cifar10_vit.safetensors",  # vit_cifar_mini_p4: the first default (a plain ViT)
    "conformer_cifar10": CHECKPOINT_DIR / "conformer_cifar10.safetensors",  # the most accurate (ToMe slower on CPUs)
    "hyena_cifar10": CHECKPOINT_DIR / "hyena_cifar10.safetensors",
    "attn_cifar10": CHECKPOINT_DIR / "attn_cifar10.safetensors",  # attention twin of hyena_cifar10
    "lsh_cifar10": CHECKPOINT_DIR / "lsh_cifar10.safetensors",  # LSH twin of attn_cifar10, same recipe
    "rev_cifar10": CHECKPOINT_DIR / "rev_cifar10.safetensors",  # reversible twin of attn_cifar10, same recipe
}


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
    _check_fits(model, state, path, desc["model"])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.to(device=device, dtype=dtype).eval()
    side = path.with_suffix(".json")
    if side.is_file():
        desc = {**json.loads(side.read_text()), **desc}
    desc["path"] = str(path)
    return model, desc


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """One-line ``UserError`` when the checkpoint's tensors do not fit the model its metadata names:
    missing or unexpected keys, or a tensor of another shape (a few named, and how many in all)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)} in all)"
                for what, keys in (("missing", missing), ("unexpected", extra), ("mis-shaped", shapes)) if keys]
    if problems:
        raise UserError(f"checkpoint {path} does not fit the model its metadata names ({name}): "
                        f"{'; '.join(problems)}; was it written by another version of that model, or edited?")


def load_default_model(device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The default CIFAR-10 model shipped with visiontools (``cifar10_cct``, trained by the project
    itself). Returns ``(model, description)``: the model in eval mode, and a dict with its class names,
    mean/std, training summary and ``visiontools eval`` table (the card ``checkpoints/cifar10_cct.json``)."""
    return load_checkpoint_model(DEFAULT_CHECKPOINT, device=device)


def is_checkpoint(name_or_path: str | os.PathLike) -> bool:
    """Whether :func:`load` reads ``name_or_path`` as a checkpoint (a shipped name, a ``.safetensors``
    path, or any existing file) rather than as a timm model name."""
    text = str(name_or_path)
    return text in SHIPPED or text.endswith(".safetensors") or Path(text).is_file()


def _class_names(model: torch.nn.Module, name: str) -> list[str] | None:
    """CIFAR-10's classes for this package's 10-class models, ImageNet's (timm's label lists) for
    ImageNet heads, else None."""
    n = getattr(model, "num_classes", 0)
    if is_registered_here(name) and n == 10:
        from visiontools.data import CIFAR10_CLASSES
        return list(CIFAR10_CLASSES)
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return None
        info = ImageNetInfo(subset)
        return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    except Exception:  # an old timm, or a head timm cannot place
        return None


def _check_loadable(text: str, pretrained: bool) -> None:
    """One-line ``UserError`` for a name that is neither a checkpoint nor a timm model."""
    import timm

    if text.startswith("hf-hub:") and pretrained:
        return
    if not text:
        raise UserError("no model given: name a shipped checkpoint (e.g. cifar10_vit), a .safetensors file or a "
                        "timm model name")
    if not timm.is_model(text):
        from visiontools.models.vit import REGISTERED

        hint = did_you_mean(text, [*SHIPPED, *timm.list_models()])
        raise UserError(f"unknown model {text!r}: not a shipped checkpoint ({', '.join(SHIPPED)}), a .safetensors "
                        f"file or a timm model name{hint}; visiontools registers {', '.join(REGISTERED)}")


def checkpoint_card(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's description (safetensors metadata) merged over its card (the sibling ``.json``),
    read without loading the weights; ``{}`` for a timm model name."""
    from safetensors import safe_open

    if not is_checkpoint(name_or_path):
        return {}
    path = resolve_checkpoint(name_or_path)
    try:
        with safe_open(str(path), framework="pt") as f:
            desc = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    side = path.with_suffix(".json")
    return {**(json.loads(side.read_text()) if side.is_file() else {}), **desc}


def recommended_r(name_or_path: str | os.PathLike | None = None):
    """The r setting (a ``tome_r`` value) to run a model at when the user names none: the one its
    checkpoint was trained with (``visiontools train`` with a ``tome:`` section), else its card's
    ``recommended_r``, else the default checkpoint's (:func:`visiontools.defaults.default_r_text`).
    ``eval``, ``video``, ``export`` and the demo take their default r from here."""
    return _recommended_in(checkpoint_card(name_or_path) if name_or_path is not None else {})


def _recommended_in(card: dict):
    """:func:`recommended_r` of a description or card already read."""
    from visiontools.defaults import card_r, default_r_text
    from visiontools.tome.r_text import parse_r_text

    return parse_r_text(card_r(card) or default_r_text())


def _apply_trained_tome(model: torch.nn.Module, desc: dict, tome) -> None:
    """``load``'s ``tome``: apply the setting the checkpoint was trained with (``"auto"``), or none (``False``)."""
    if tome is False or not desc.get("tome"):
        return
    import visiontools
    from visiontools.tome.r_text import parse_r_text

    t = desc["tome"]
    r = parse_r_text(t["r"])
    from visiontools.layers.grid import GridTokens  # grid models merge on their own grid rule: left as recorded

    token_vit = hasattr(model, "blocks") and hasattr(getattr(model, "patch_embed", None), "num_patches")
    if token_vit and not any(isinstance(m, GridTokens) for m in model.modules()):
        from visiontools.tome.merge import applied_schedule, parse_r

        # the schedule training ran: r capped where a block had too few tokens (no cap warning per load)
        prefix = getattr(model, "num_prefix_tokens", 0)
        capped = applied_schedule(r, len(model.blocks), model.patch_embed.num_patches + prefix, prefix)
        r = capped if capped != parse_r(len(model.blocks), r) else r
    visiontools.apply_tome(model, r=r, method=t.get("method", "tome"), prop_attn=t.get("prop_attn", True))


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
         *, pretrained: bool = False, seed: int | None = 0, tome="auto",
         **model_kwargs) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The one way visiontools loads a model. ``name_or_path``: a shipped checkpoint name
    (:data:`SHIPPED`, e.g. ``cifar10_vit``) or a visiontools ``.safetensors`` file (its model with its
    trained weights), or a timm model name, this package's registered ones included: random weights
    (initialised under ``seed``, so runs repeat) unless ``pretrained`` (timm's weights; ``hf-hub:``
    names too); ``model_kwargs`` (``img_size``, ``num_classes``...) go to ``timm.create_model``.
    ``dtype``: a ``torch.dtype`` or a name (``visiontools.timing.resolve_dtype``).

    ``tome``: a checkpoint trained with token merging (its description records ``tome``, the setting of
    ``visiontools train``'s ``tome:`` section) comes back patched at that setting (``"auto"``, the
    default; ``model.tome_r`` changes it, ``visiontools.remove_tome`` undoes it); ``False`` returns the
    unpatched model.

    Returns ``(model in eval mode on device, description)``; the description holds ``model`` (the
    architecture), ``classes`` (or None), ``mean``, ``std``, ``trained``, ``recommended_r`` (see
    :func:`recommended_r`) and, for checkpoints, their card. Anything else is a one-line ``UserError``
    (a missing file: ``FileNotFoundError``)."""
    from visiontools.timing import resolve_dtype

    if tome is not False and tome != "auto":  # checked for every model, not only checkpoints trained with ToMe
        raise ValueError(f"tome must be 'auto' (apply the setting the checkpoint was trained with) or False, got {tome!r}")
    dtype = resolve_dtype(dtype, device)
    text = str(name_or_path).strip()
    if is_checkpoint(text):
        if model_kwargs:
            raise UserError(f"{', '.join(model_kwargs)} cannot be changed for checkpoint {text}: it holds a "
                            "trained model of fixed shape (leave the option out, or name a timm model)")
        model, desc = load_checkpoint_model(text, device=device, dtype=dtype)
        _apply_trained_tome(model, desc, tome)
        return model, {**desc, "trained": True, "recommended_r": _recommended_in(desc)}  # desc holds the card
    _check_loadable(text, pretrained)
    with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's random stream untouched
        if seed is not None:
            torch.manual_seed(seed)
        model = create_model(text, pretrained=pretrained, **model_kwargs)
    model.to(device=device, dtype=dtype).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return model, {"model": text, "model_kwargs": dict(model_kwargs), "classes": _class_names(model, text),
                   "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
                   "std": list(cfg.get("std", (0.229, 0.224, 0.225))), "pretrained": bool(pretrained),
                   "trained": bool(pretrained), "recommended_r": _recommended_in({})}


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
