"""Models for the demo: the library's default checkpoint (``visiontools.models.DEFAULT_CHECKPOINT``,
``cifar10_cct``: convolutional tokens into plain transformer blocks, where ToMe pays on a CPU) by
default, another shipped checkpoint (e.g. ``conformer_cifar10`` or the plain ViT ``cifar10_vit``) or
any timm ViT by name, loaded once by ``visiontools.models.load`` and cached (thread-safe). Every
request patches a shallow copy of the cached model, so users with different ToMe settings never change
each other's model."""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from visiontools import models
from visiontools.models import DEFAULT_ARCHITECTURE, DEFAULT_CHECKPOINT, SHIPPED
from visiontools.tome.r_text import first_r

DEFAULT_MODEL = "default"
DEFAULT_ALIASES = ("default", DEFAULT_CHECKPOINT)
SUGGESTED_MODELS = ["default", "conformer_cifar10", "cifar10_vit", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
                    "vit_small_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224"]
MAX_CACHED = 3  # models kept in memory besides the default one


# The first view's r: the default checkpoint's recommended r (visiontools.models.recommended_r), the one
# default r of eval, video, export and the demo. A checkpoint that recommends its own opens at that one.
DEFAULT_R = first_r(models.recommended_r())


@dataclass
class DemoModel:
    """A loaded, unpatched model in eval mode with what the demo needs to feed and explain it."""

    name: str
    model: torch.nn.Module
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    notice: str = ""          # shown in the UI, e.g. "random weights: predictions are meaningless"
    trained: bool = True      # False when the weights are random
    description: str = ""
    recommended_r: int = DEFAULT_R  # the r the demo opens at: the checkpoint's trained or recommended r

    @property
    def input_size(self) -> tuple[int, int]:
        """Input ``(height, width)`` in pixels."""
        return tuple(self.model.patch_embed.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)``."""
        return tuple(self.model.patch_embed.grid_size)

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.model.blocks)

    @property
    def num_patches(self) -> int:
        """Patch tokens (prefix tokens such as the class token not included)."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def picture(self) -> tuple[torch.nn.Module, int]:
        """``(model, k)`` for the merge pictures: :func:`visiontools.pictures.picture_model` of the model,
        its input ``k`` times larger so that the patch grid has at least 14x14 patches (built once)."""
        if "_picture" not in self.__dict__:
            from visiontools.pictures import picture_model

            self.__dict__["_picture"] = picture_model(self.model)
        return self.__dict__["_picture"]

    @property
    def picture_grid(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of the merge pictures (at least 14x14)."""
        return tuple(self.picture[0].patch_embed.grid_size)

    def patched(self, r) -> torch.nn.Module:
        """A ToMe-patched view of the model sharing its weights (a shallow copy: the cached model
        itself stays unpatched, and concurrent requests get their own ``tome_r``)."""
        from visiontools.patches.timm import apply_tome

        return apply_tome(copy.copy(self.model), r=r)


def check_tome_supported(model: torch.nn.Module, name: str) -> None:
    """Raise ``ValueError`` naming the problem when ToMe cannot patch ``model``."""
    from visiontools.patches.timm import apply_tome

    try:
        apply_tome(copy.copy(model), r=0)
    except TypeError as e:
        raise ValueError(f"{name} cannot be used in this demo: {e}") from None
    if not hasattr(model, "patch_embed") or getattr(model.patch_embed, "dynamic_img_size", False):
        raise ValueError(f"{name} cannot be used in this demo: it needs a fixed-size patch grid")


def _load_default() -> DemoModel:
    """The default checkpoint; if its file cannot be read, its architecture with random weights and a notice."""
    try:
        return _load_checkpoint(DEFAULT_CHECKPOINT, "default")
    except (FileNotFoundError, ValueError) as e:
        model, desc = models.load(DEFAULT_ARCHITECTURE)
        return DemoModel(
            "default", model, list(desc["classes"]), tuple(desc["mean"]), tuple(desc["std"]), trained=False,
            notice=(f"The shipped CIFAR-10 checkpoint could not be loaded, so {DEFAULT_ARCHITECTURE} runs "
                    "with random weights: its predictions are meaningless (merging and speed are "
                    f"still real). Reason: {e}"),
            description=f"{DEFAULT_ARCHITECTURE} (random weights)")


def accuracy_note(desc: dict) -> str:
    """``", test top-1 NN.N%"`` from a checkpoint description, or ``""``: the unpatched row of the
    ``visiontools eval`` result stored in a shipped checkpoint's card (the number the README quotes),
    else the last test accuracy of its training history."""
    top1 = desc.get("test_top1")
    rows = (desc.get("eval") or {}).get("rows") or []
    if top1 is None and rows and rows[0].get("name") == "unpatched":
        top1 = rows[0].get("top1")
    history = desc.get("history") or []
    if top1 is None and history and isinstance(history[-1], dict):
        top1 = history[-1].get("test_top1")
    if not isinstance(top1, (int, float)):
        return ""
    pct = top1 * 100 if top1 <= 1 else top1
    note = f", CIFAR-10 test top-1 {pct:.1f}%" if desc.get("dataset", "cifar10") == "cifar10" else f", test top-1 {pct:.1f}%"
    return note + (" (provisional checkpoint)" if desc.get("provisional") else "")


def _load_checkpoint(path: str, name: str | None = None) -> DemoModel:
    model, desc = models.load(path, tome=False)  # cached unpatched; requests patch a copy at their r
    what = (f"shipped CIFAR-10 checkpoint {path}" if path in SHIPPED and desc.get("dataset", "cifar10") == "cifar10"
            else f"shipped checkpoint {path}" if path in SHIPPED else f"checkpoint {Path(path).name}")
    h, w = model.patch_embed.img_size if hasattr(model, "patch_embed") else (0, 0)
    return DemoModel(name or path, model, list(desc["classes"]), tuple(desc["mean"]), tuple(desc["std"]),
                     description=f"{what} ({desc['model']}, {h}x{w} input){accuracy_note(desc)}",
                     recommended_r=first_r(desc["recommended_r"]))


def _weights_notice(name: str, allow_download: bool) -> str:
    """Why ``name`` runs with random weights (no downloadable weights, downloads off, hub unreachable),
    or ``""`` when its pretrained weights can be tried."""
    import timm

    from visiontools.models.hub import hub_reachable, offline_requested

    from_hub = name.startswith("hf-hub:")
    cfg = None if from_hub else timm.models.get_pretrained_cfg(name)
    if not (from_hub or (cfg and (cfg.hf_hub_id or cfg.url))):
        return f"{name} has no downloadable pretrained weights: using random weights, predictions are meaningless."
    if not allow_download:
        return f"Downloads are turned off: {name} uses random weights, predictions are meaningless."
    if offline_requested() or not hub_reachable():
        return (f"The Hugging Face hub cannot be reached from this machine, so {name}'s pretrained weights "
                "could not be downloaded: using random weights, predictions are meaningless.")
    return ""


def _load_timm(name: str, allow_download: bool) -> DemoModel:
    import timm

    from_hub = name.startswith("hf-hub:")
    if not from_hub and not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ValueError(f"{name!r} is not a timm model name.{hint}")
    notice, loaded = _weights_notice(name, allow_download), None
    if not notice:
        try:
            loaded = models.load(name, pretrained=True)
        except Exception as e:  # network errors, missing files, hub auth...
            notice = (f"Downloading pretrained weights for {name} failed ({type(e).__name__}: {str(e)[:200]}): "
                      "using random weights, predictions are meaningless.")
    if loaded is None:
        if from_hub:
            raise ValueError(f"{name} is only defined on the Hugging Face hub, which could not be used: {notice}")
        loaded = models.load(name)
    model, desc = loaded
    trained = desc["trained"]
    check_tome_supported(model, name)  # before reading patch_embed below
    classes = desc["classes"] or [f"class {i}" for i in range(getattr(model, "num_classes", 0))]
    h, w = model.patch_embed.img_size
    return DemoModel(name, model, classes, tuple(desc["mean"]), tuple(desc["std"]), notice=notice, trained=trained,
                     description=f"timm {name} ({'pretrained' if trained else 'random weights'}, {h}x{w} input)")


def load_model(name: str, allow_download: bool = True, allow_path: bool = True) -> DemoModel:
    """Load a model for the demo (no caching; use :class:`ModelCache`) with ``visiontools.models.load``.
    ``name``: ``default`` (the shipped ``DEFAULT_CHECKPOINT``), another shipped checkpoint's name
    (``conformer_cifar10``), a path to a visiontools ``.safetensors`` checkpoint (when ``allow_path``), or
    a timm model name (pretrained weights when they can be downloaded, random weights and a notice
    otherwise). Raises ``ValueError`` with a message for the user when the name cannot be used."""
    name = (name or "").strip()
    if not name:
        raise ValueError("No model name given.")
    if name in DEFAULT_ALIASES:
        dm = _load_default()
    elif name in SHIPPED:  # files of this package, not a user's path
        dm = _load_checkpoint(name)
    elif models.is_checkpoint(name):
        if not allow_path:
            raise ValueError("Checkpoint files can only be chosen when the demo is started "
                             "(visiontools demo --model PATH), not from the page.")
        dm = _load_checkpoint(name)
    else:
        dm = _load_timm(name, allow_download)
    check_tome_supported(dm.model, name)
    return dm


class ModelCache:
    """Thread-safe cache: each model is loaded once, even when several requests ask at once; the
    default model is kept, and at most ``max_cached`` others (least recently used dropped). Only the
    default (start-up) model may be a checkpoint path: names typed on the page never open files."""

    def __init__(self, allow_download: bool = True, max_cached: int = MAX_CACHED, default: str = DEFAULT_MODEL):
        self.allow_download = allow_download  # only the start-up model (``default``) may be a file path
        self.max_cached = max_cached
        self.default = DEFAULT_MODEL if default in DEFAULT_ALIASES else default  # the key get() uses
        self._models: OrderedDict[str, DemoModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0  # how many times a model was actually loaded (for tests and logs)

    def get(self, name: str | None) -> DemoModel:
        """The cached model for ``name`` (the default when empty), loading it on first use."""
        key = (name or "").strip() or self.default
        key = DEFAULT_MODEL if key in DEFAULT_ALIASES else key
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one loader per name; others wait for it
            with self._lock:
                if key in self._models:
                    return self._models[key]
            try:
                dm = load_model(key, allow_download=self.allow_download, allow_path=key == self.default)
            except BaseException:  # drop this name's load lock after a failed load too
                with self._lock:
                    self._loading.pop(key, None)
                raise
            with self._lock:
                self.loads += 1
                self._models[key] = dm
                others = [k for k in self._models if k != self.default]
                for k in others[: max(0, len(others) - self.max_cached)]:
                    del self._models[k]
                self._loading.pop(key, None)
        return dm
