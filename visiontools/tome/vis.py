"""Pictures of token merging: every merged group of patches filled with its mean colour and outlined,
as in the figures of the ToMe paper."""
from __future__ import annotations

import numpy as np
from PIL import Image


def _as_group_map(source, grid_size: int | tuple[int, int]) -> np.ndarray:
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, (int, np.integer)) else grid_size
    ids = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source)
    if ids.ndim != 1:
        raise ValueError(f"source must be one image's map of shape (num_patches,), got shape {ids.shape}")
    if ids.size != gh * gw:
        raise ValueError(f"source has {ids.size} entries but the patch grid {gh}x{gw} has {gh * gw}")
    return ids.reshape(gh, gw)


def render_merges(image: Image.Image, source, grid_size: int | tuple[int, int],
                  outline=(255, 255, 255), outline_width: int = 1, removed=(0, 0, 0)) -> Image.Image:
    """Draw which patches merged: ``source[i]`` is the token that patch ``i`` (row-major over the
    ``grid_size = (rows, cols)`` patch grid, or ``grid_size`` = side of a square grid) ended in, or
    ``-1`` when it was pruned. Returns an RGB image of ``image``'s size in which each group is filled
    with its mean colour and outlined with ``outline``; pruned patches are filled with ``removed``."""
    img = np.asarray(image.convert("RGB"), dtype=np.float64)
    H, W = img.shape[:2]
    groups = _as_group_map(source, grid_size)
    gh, gw = groups.shape
    # pixel -> patch cell, robust to image sizes that are not multiples of the grid
    rows = np.minimum(np.arange(H) * gh // H, gh - 1)
    cols = np.minimum(np.arange(W) * gw // W, gw - 1)
    pix = groups[rows[:, None], cols[None, :]]
    _, inverse = np.unique(pix, return_inverse=True)
    inverse = inverse.reshape(H, W)
    counts = np.bincount(inverse.ravel())
    means = np.stack([np.bincount(inverse.ravel(), weights=img[..., c].ravel()) / counts for c in range(3)], -1)
    out = means[inverse]
    if outline is not None and outline_width > 0:
        edge = np.zeros((H, W), dtype=bool)
        edge[:, :-1] |= inverse[:, 1:] != inverse[:, :-1]
        edge[:-1, :] |= inverse[1:, :] != inverse[:-1, :]
        for _ in range(outline_width - 1):
            edge[:, 1:] |= edge[:, :-1]
            edge[1:, :] |= edge[:-1, :]
        out[edge] = outline
    out[pix < 0] = removed
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def group_count(source) -> int:
    """Number of distinct tokens that a source map's patches ended in (pruned patches, ``-1``, not counted)."""
    ids = np.unique(np.asarray(source.detach().cpu() if hasattr(source, "detach") else source))
    return int((ids >= 0).sum())
