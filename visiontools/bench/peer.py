"""``bench vit --peer-tome PATH``: the original ToMe (facebookresearch/ToMe) in the same run.

``PATH`` is a checkout the user provides (never part of this project). Its timm patch,
``PATH/tome/patch/timm.py``, is loaded by file, without running the package's ``__init__`` (which
imports its visualisation helpers and their dependencies): ``tome``, ``tome.patch`` and the modules
the patch imports (``tome.merge``, ``tome.utils``) come from ``PATH``. The peer is used the way its
README says: ``apply_patch(model)`` then ``model.r = r``.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

PATCH = Path("tome") / "patch" / "timm.py"


def load_peer_patch(path: str | Path):
    """The ``apply_patch`` function of the ToMe checkout at ``path``; ``UserError`` (one line) when
    ``path`` is not one."""
    from visiontools.errors import UserError

    root = Path(path).expanduser()
    if not (root / PATCH).is_file():
        raise UserError(f"--peer-tome {path}: not a checkout of facebookresearch/ToMe ({root / PATCH} not found); "
                        "clone https://github.com/facebookresearch/ToMe and pass its folder")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "tome" or k.startswith("tome.")}
    try:
        for name, folder in (("tome", root / "tome"), ("tome.patch", root / "tome" / "patch")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(folder)]  # a namespace for the peer's own absolute imports, no __init__ run
            sys.modules[name] = pkg
        spec = importlib.util.spec_from_file_location("tome.patch.timm", root / PATCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["tome.patch.timm"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"--peer-tome {path}: its timm patch does not import here ({type(e).__name__}: {e})") from None
        if not callable(getattr(module, "apply_patch", None)):
            raise UserError(f"--peer-tome {path}: {root / PATCH} has no apply_patch(model); is it facebookresearch/ToMe?")
        return module.apply_patch
    finally:
        for k in [k for k in sys.modules if k == "tome" or k.startswith("tome.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def peer_model(apply_patch, model, r):
    """A copy of ``model`` patched by the peer at ``r`` (``apply_patch(m)``, then ``m.r = r``)."""
    import copy

    peer = copy.deepcopy(model)
    apply_patch(peer)
    peer.r = r
    return peer


def agreement(ours, peer, x) -> dict:
    """How closely the peer's logits follow ours on ``x``: the largest absolute difference, relative
    to the largest logit, and whether the top-1 classes agree everywhere."""
    import torch

    with torch.inference_mode():
        a, b = ours(x).float(), peer(x).float()
    diff = (a - b).abs().max().item()
    return {"peer_max_abs_diff": diff, "peer_rel_diff": diff / max(a.abs().max().item(), 1e-12),
            "peer_top1_agree": bool((a.argmax(-1) == b.argmax(-1)).all())}
