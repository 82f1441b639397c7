"""The project's one model registry: the names timm knows once :mod:`visiontools.models.vit` has
registered this package's architectures, ``create_model`` (``timm.create_model`` with one-line errors
and a fast offline failure for pretrained weights) and the description stored with every checkpoint.

Loading a model by any name or path (shipped checkpoint, checkpoint file, timm name) is
:func:`visiontools.models.load` (in :mod:`visiontools.models.shipped`).
"""
from __future__ import annotations

import timm
import torch

from visiontools.data import CIFAR10_CLASSES  # noqa: F401 (re-exported: the shipped models' classes)
from visiontools.errors import UserError, did_you_mean
from visiontools.models.vit import REGISTERED


def is_registered_here(name: str) -> bool:
    """Whether ``name`` is one of the architectures this package registers with timm."""
    return name in REGISTERED


def check_model_name(name: str) -> None:
    """``UserError`` naming the closest registered model unless timm knows ``name``."""
    if not timm.is_model(name):  # every name timm.list_models() gives passes this too
        raise UserError(f"unknown model {name!r}: not a registered timm model{did_you_mean(name, timm.list_models())} "
                        f"(visiontools adds {', '.join(REGISTERED)})")


def create_model(name: str, num_classes: int | None = None, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with a clear error for unknown names (this package's models included)."""
    if not name.startswith("hf-hub:"):  # hub-only names are known to timm only with their weights
        check_model_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained:  # fails fast, in one line, without a network
        from visiontools.models.hub import create_pretrained
        return create_pretrained(name, **kwargs)
    if name.startswith("hf-hub:"):
        raise UserError(f"{name} is defined on the Hugging Face hub only: it needs pretrained=True (--pretrained)")
    return timm.create_model(name, **kwargs)


def model_description(name: str, model_kwargs: dict, classes: list[str], mean, std, **extra) -> dict:
    """The JSON description stored with every checkpoint: enough to rebuild and feed the model."""
    return {"model": name, "model_kwargs": dict(model_kwargs), "classes": list(classes),
            "mean": list(mean), "std": list(std), **extra}
