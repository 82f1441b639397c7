"""What the demo's merge tab computes: one image through the unpatched and the ToMe-patched model,
the picture of which patches merged after a chosen block, tokens per block, and top-5 predictions.
The picture has at least 14x14 patches: a model with a coarser grid is drawn from a run on a larger
copy of the image (:mod:`visiontools.pictures`); tokens and predictions are at its own input."""
from __future__ import annotations

import copy
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


def model_input(dm: DemoModel, image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``image`` as the model sees it: centre square crop, resized to the input size (or ``size``,
    ``(H, W)``), normalised; ``(1, 3, H, W)``."""
    h, w = size or dm.input_size
    x = torch.from_numpy(np.array(square_resized(image, w, h))).permute(2, 0, 1)[None]  # uint8
    return normalize(x, dm.mean, dm.std)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def classes_note(dm: DemoModel) -> str:
    """The line under the predictions: which classes the model knows (for a CIFAR-10 model, that it
    knows only those 10, named, so that a photo of anything else gets one of them)."""
    if tuple(dm.classes) == CIFAR10_CLASSES:
        return ("This classifier knows only the 10 CIFAR-10 classes: " + ", ".join(CIFAR10_CLASSES)
                + ". A photo of anything else still gets one of them. It sees the photo at "
                f"{dm.input_size[0]}x{dm.input_size[1]} pixels, as it was trained.")
    return f"This classifier knows {len(dm.classes)} classes (those it was trained on)."


def first_view_block(dm: DemoModel, r, schedule: str = "constant") -> int:
    """The block the merge picture shows first: the last one after which at least a third of the
    picture's patches are still separate groups (so the picture shows many groups, not two flat shapes),
    at least block 1; the last block when nothing merges that much."""
    from visiontools.pictures import picture_r
    from visiontools.tome.merge import max_r, parse_r

    pic, k = dm.picture
    prefix = pic.num_prefix_tokens
    n = patches = dm.picture_grid[0] * dm.picture_grid[1]
    block = 0
    for i, ri in enumerate(parse_r(dm.depth, picture_r(r_setting(r, schedule), dm.depth, k)), start=1):
        n -= max_r(ri, n + prefix, prefix)
        if n * 3 < patches:
            break
        block = i
    return max(1, block)


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


def _r_list_text(rs) -> str:
    """``32`` for a list of equal r values, ``[48,40,...]`` otherwise."""
    rs = list(rs) if isinstance(rs, (list, tuple)) else [rs]
    return str(rs[0]) if len(set(rs)) == 1 else "[" + ",".join(map(str, rs)) + "]"


@dataclass
class MergeResult:
    """Everything the merge tab shows for one image and one setting."""

    visualisation: Image.Image      # merged groups after ``layer`` blocks, mean colour + outline
    layer: int                      # 0 = before the first block, i = after block i
    tokens_per_layer: list[int]     # tokens entering each block, then after the last one (own input)
    groups: int                     # patch groups (tokens) in the picture at ``layer``, class token not counted
    before: dict[str, float]        # top-5 of the unpatched model (own input)
    after: dict[str, float]         # top-5 of the ToMe model (own input)
    scale: int = 1                  # the picture's input is this many times larger (height and width)
    picture_r: object = None        # the r setting of the picture's run (r scaled by scale**2)

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
        rows, cols = dm.picture_grid
        head = f"**{self.groups} of {rows * cols} patch groups {where}** (r={r}, {schedule} schedule). "
        if self.scale > 1:
            h, w = dm.picture[0].patch_embed.img_size
            (gh, gw), (ih, iw) = dm.grid_size, dm.input_size
            head += (f"The picture shows the groups the model merged on a {h}x{w} copy of the image "
                     f"({rows}x{cols} patches; its own input is {ih}x{iw}, {gh}x{gw} patches), with each "
                     f"block's r multiplied by {self.scale ** 2} (r={_r_list_text(self.picture_r)}) so that "
                     "every block merges the same share of its tokens. The token counts and the "
                     f"predictions are the model's at its own {ih}x{iw} input. ")
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
    from visiontools.patches.timm import apply_tome, tome_forward
    from visiontools.pictures import picture_r
    from visiontools.tome.vis import group_count, render_merges

    layer = dm.depth if layer is None else int(layer)
    if not 0 <= layer <= dm.depth:
        raise ValueError(f"layer must be between 0 and {dm.depth} (the model has {dm.depth} blocks), got {layer}")
    setting = r_setting(r, schedule)
    pic, k = dm.picture
    pic_setting = picture_r(setting, dm.depth, k)
    x = model_input(dm, image)
    with torch.inference_mode():
        logits_before = dm.model(x)
        logits_after, info = tome_forward(dm.patched(setting), x, trace_source=k == 1)
        tokens = list(info.tokens_per_layer)
        if k > 1:  # the picture: the same model on a k times larger copy, every block's r times k*k
            pic_x = model_input(dm, image, tuple(pic.patch_embed.img_size))
            _, info = tome_forward(apply_tome(copy.copy(pic), r=pic_setting), pic_x, trace_source=True)
    rows, cols = dm.picture_grid
    source = torch.arange(rows * cols) if layer == 0 else info.layer_sources[layer - 1][0]
    view = square_resized(image, display_side, display_side)
    vis = render_merges(view, source, grid_size=(rows, cols))
    if opacity < 1.0:
        vis = Image.blend(view, vis, float(opacity))
    return MergeResult(vis, layer, tokens, group_count(source), top_k(logits_before, dm.classes),
                       top_k(logits_after, dm.classes), scale=k, picture_r=pic_setting)
