"""What the demo's merge tab computes: one image through the unpatched and the ToMe-patched model,
the picture of which patches merged after a chosen block, tokens per block, and top-5 predictions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from visiontools.demos.images import square_resized
from visiontools.demos.model_cache import DemoModel
from visiontools.data import normalize

SCHEDULES = {"constant": "{r}", "decreasing": "{r},-0.5", "increasing": "{r},+0.5"}  # as `--r` writes them
DISPLAY_SIDE = 384
TOKEN_TABLE_HEADERS = ["block", "tokens in", "merged", "tokens out"]


def r_setting(r: int, schedule: str = "constant"):
    """The ``tome_r`` value for a slider r and a schedule name, read by the command line's grammar
    (:func:`visiontools.tome.r_text.parse_r_text` of ``SCHEDULES[schedule]``): ``r`` for ``constant``,
    ``(r, -0.5)`` for ``decreasing`` (merge more early), ``(r, 0.5)`` for ``increasing``."""
    from visiontools.tome.r_text import parse_r_text

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r must be a non-negative integer, got {r!r}")
    return parse_r_text(SCHEDULES[schedule].format(r=r))


def model_input(dm: DemoModel, image: Image.Image) -> torch.Tensor:
    """``image`` as the model sees it: centre square crop, resized to the input size, normalised; ``(1, 3, H, W)``."""
    h, w = dm.input_size
    x = torch.from_numpy(np.array(square_resized(image, w, h))).permute(2, 0, 1)[None]  # uint8
    return normalize(x, dm.mean, dm.std)


def top_k(logits: torch.Tensor, classes: list[str], k: int = 5) -> dict[str, float]:
    """The ``k`` most likely classes of one image's logits, ``{class name: probability}``."""
    probs = logits.float().softmax(-1).reshape(-1)
    vals, idx = probs.topk(min(k, probs.numel()))
    return {classes[i] if i < len(classes) else f"class {i}": float(v) for v, i in zip(vals.tolist(), idx.tolist())}


def prefix_words(model: torch.nn.Module) -> str:
    """What the demo's token counts include besides the patches, worded for this model: ``"class token
    included"`` for a ViT with one, ``"no class token: patch tokens only"`` for a model without one
    (e.g. conformer_cifar10), and register tokens named as such."""
    n = int(getattr(model, "num_prefix_tokens", 0) or 0)
    has_cls = getattr(model, "cls_token", None) is not None and n > 0
    extra = n - int(has_cls)
    if has_cls:
        return "class token included" if extra == 0 else f"class token and {extra} register token(s) included"
    return "no class token: patch tokens only" if n == 0 else f"no class token; {n} register token(s) included"


def token_table(tokens_per_layer: list[int]) -> list[list[int]]:
    """Rows ``[block, tokens in, merged, tokens out]`` (prefix tokens such as a class token included) from
    ``ToMeInfo.tokens_per_layer``."""
    return [[i + 1, a, a - b, b] for i, (a, b) in enumerate(zip(tokens_per_layer[:-1], tokens_per_layer[1:]))]


@dataclass
class MergeResult:
    """Everything the merge tab shows for one image and one setting."""

    visualisation: Image.Image      # merged groups after ``layer`` blocks, mean colour + outline
    layer: int                      # 0 = before the first block, i = after block i
    tokens_per_layer: list[int]     # tokens entering each block, then after the last one
    groups: int                     # patch groups (tokens) at ``layer``, class token not counted
    before: dict[str, float]        # top-5 of the unpatched model
    after: dict[str, float]         # top-5 of the ToMe model

    @property
    def table(self) -> list[list[int]]:
        return token_table(self.tokens_per_layer)

    def summary(self, dm: DemoModel, r, schedule: str) -> str:
        """A short markdown summary of the token counts, written as ``bench`` and ``eval`` write them
        (``65 -> 25``: entering the first -> the last block), worded for the model (class token or not);
        when nothing merges (r=0, or r too small to merge anything) it says so."""
        from visiontools.tome.r_text import token_span

        t = self.tokens_per_layer
        where = "before the first block" if self.layer == 0 else f"after block {self.layer} of {dm.depth}"
        head = f"**{self.groups} of {dm.num_patches} patch groups {where}** (r={r}, {schedule} schedule). "
        what = prefix_words(dm.model)
        if t[0] == t[-1]:
            return head + f"Nothing is merged at this setting: every block sees all {t[0]} tokens ({what})."
        return (head + f"Tokens ({what}): {token_span(t)} (entering the first -> the last block); "
                f"per block: {' -> '.join(str(n) for n in t)}.")


def analyse(dm: DemoModel, image: Image.Image, r: int, schedule: str = "constant", layer: int | None = None,
            display_side: int = DISPLAY_SIDE, opacity: float = 1.0) -> MergeResult:
    """Run ``image`` through ``dm`` without and with ToMe (r, schedule); draw the merged patch groups
    after block ``layer`` (default: the last; 0 = no block yet) on a ``display_side`` px square view.
    ``opacity`` < 1 blends the drawing (group colours and outlines) with the photo."""
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
    from visiontools.patches.timm import tome_forward
    from visiontools.tome.vis import group_count, render_merges

    layer = dm.depth if layer is None else int(layer)
    if not 0 <= layer <= dm.depth:
        raise ValueError(f"layer must be between 0 and {dm.depth} (the model has {dm.depth} blocks), got {layer}")
    x = model_input(dm, image)
    patched = dm.patched(r_setting(r, schedule))
    with torch.inference_mode():
        logits_before = dm.model(x)
        logits_after, info = tome_forward(patched, x, trace_source=True)
    source = torch.arange(dm.num_patches) if layer == 0 else info.layer_sources[layer - 1][0]
    view = square_resized(image, display_side, display_side)
    vis = render_merges(view, source, grid_size=dm.grid_size)
    if opacity < 1.0:
        vis = Image.blend(view, vis, float(opacity))
    return MergeResult(vis, layer, list(info.tokens_per_layer), group_count(source),
                       top_k(logits_before, dm.classes), top_k(logits_after, dm.classes))
