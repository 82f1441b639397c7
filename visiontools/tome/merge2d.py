"""Token merging and token downsampling on a 2D token grid (ToMe for Stable Diffusion, ToDo).

Library-agnostic tensor code for "Token Merging for Fast Stable Diffusion" (Bolya & Hoffman, 2023)
and "ToDo: Token Downsampling for Efficient Generation of High-Resolution Images" (2024).
Tokens are ``(B, N, C)`` in row-major order of an ``h x w`` grid, ``N == h * w``.

ToMe-SD: one destination token per ``sy x sx`` window (fixed top-left or pseudo-random), every other
token is a source that is averaged into its most similar destination or kept; :func:`unmerge` (from
:mod:`visiontools.tome.merge`) copies each merged token back to every grid position it came from.
Everything is gather/scatter on index tensors, with no Python loop over tokens and no
``torch.Generator``, so it traces under ``torch.compile(fullgraph=True)``.

The token reduction methods of :mod:`visiontools.tome.methods` on this grid (:func:`plan_merge_2d`'s
``energy_margin`` and ``reduce``): ``tofu`` keeps ToMe-SD's matching and either prunes the merged
sources (``reduce="keep"``: a destination keeps its own value) or merges with MLERP
(``reduce="mlerp"``); ``pitome`` picks the sources to merge by PiToMe's energy instead of by their best
similarity (:func:`energy_match`). Unmerging is the same for all: every grid position gets the output
of the token it went to.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from visiontools.tome.merge import match_scores, unmerge
from visiontools.tome.methods import mlerp

__all__ = [
    "Merge2d", "grid_at", "max_merge_ratio", "check_ratio", "num_merged", "window_offsets",
    "destinations", "energy_match", "plan_merge_2d", "merge_2d", "unmerge", "kv_grid_size", "downsample_tokens",
]

DOWNSAMPLE_METHODS = ("nearest-exact", "nearest", "area", "bilinear", "bicubic", "avg")
#: How :func:`merge_2d` forms a destination from its group: ``"mean"`` (ToMe-SD, PiToMe), ``"keep"`` (the
#: destination's own value: the merged sources are pruned, ToFu's early blocks), ``"mlerp"`` (the mean
#: rescaled to the group's largest norm, ToFu's later blocks).
REDUCE_RULES = ("mean", "keep", "mlerp")


class Merge2d(NamedTuple):
    """One 2D merge step. ``unm_pos``/``src_pos`` ``(B, n)``: grid positions of the kept and the
    merged source tokens; ``dst_pos`` ``(Nd,)``: positions of the destinations; ``dst_idx`` ``(B, r)``:
    which destination each merged source goes to; ``index`` ``(B, N)``: merged token of each position;
    ``reduce``: how :func:`merge_2d` forms a destination from its group (:data:`REDUCE_RULES`).
    Merged order: kept sources, then destinations."""

    unm_pos: torch.Tensor
    src_pos: torch.Tensor
    dst_pos: torch.Tensor
    dst_idx: torch.Tensor
    index: torch.Tensor
    reduce: str = "mean"

    @property
    def r(self) -> int:
        """Number of tokens this step removes."""
        return self.src_pos.shape[1]


def grid_at(height: int, width: int, downsample: int) -> tuple[int, int]:
    """Token grid of a feature map ``downsample`` times smaller than ``height x width``, as stride-2
    convolutions with padding 1 produce it (ceil division at each halving)."""
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    return -(-height // downsample), -(-width // downsample)


def max_merge_ratio(sx: int, sy: int) -> float:
    """Largest merge ratio with one destination per ``sy x sx`` window: ``1 - 1/(sx*sy)``."""
    return 1.0 - 1.0 / (sx * sy)


def check_ratio(ratio: float, upper: float, inclusive: bool = True, what: str = "ratio") -> float:
    """Return ``ratio`` as a float, or raise ``ValueError``/``TypeError`` unless ``0 <= ratio <= upper``
    (``< upper`` when not ``inclusive``)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{what} must be a number, got {ratio!r} ({type(ratio).__name__})")
    ratio = float(ratio)
    ok = 0.0 <= ratio <= upper if inclusive else 0.0 <= ratio < upper
    if not math.isfinite(ratio) or not ok:
        bound = f"<= {upper:g}" if inclusive else f"< {upper:g}"
        raise ValueError(f"{what} must be >= 0 and {bound}, got {ratio!r}")
    return ratio


def num_merged(num_tokens: int, ratio: float, sx: int, sy: int, h: int, w: int) -> int:
    """Tokens removed from an ``h x w`` grid at ``ratio`` (``int(N * ratio)``, capped at the number of
    sources; 0 when the grid is smaller than one window)."""
    num_dst = (h // sy) * (w // sx)
    if num_dst == 0:
        return 0
    return min(int(num_tokens * ratio), num_tokens - num_dst)


def window_offsets(num_windows: int, window: int, seed: torch.Tensor | int, device=None) -> torch.Tensor:
    """Pseudo-random offsets in ``[0, window)``, one per window, from an integer hash of
    (window index, ``seed``). Deterministic, identical on every device, no ``torch.Generator``."""
    if not torch.is_tensor(seed):
        seed = torch.tensor(seed, dtype=torch.int64, device=device)
    mask = 0xFFFFFFFF
    x = torch.arange(num_windows, device=device, dtype=torch.int64)
    s = (seed.to(device=device, dtype=torch.int64) & mask) * 0x27D4EB2F
    x = (x * 0x7FEB352D + s + 0x165667B1) & mask
    for mul in (0x846CA68B, 0x2C1B3C6D):  # murmur3-style finaliser, kept within 63 bits
        x = x ^ (x >> 16)
        x = ((x & 0x7FFFFFFF) * mul) & mask
    x = x ^ (x >> 16)
    return x % window


def destinations(h: int, w: int, sx: int, sy: int, seed: torch.Tensor | int | None = None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid positions of the destination tokens (one per full ``sy x sx`` window: its top-left when
    ``seed`` is None, else pseudo-random) and of the source tokens (all others, rows and columns
    left over at the bottom/right included). Returns ``(dst_pos, src_pos)``, 1-D long tensors."""
    hsy, wsx = h // sy, w // sx
    num_dst = hsy * wsx
    if seed is None:
        off = torch.zeros(num_dst, dtype=torch.int64, device=device)
    else:
        off = window_offsets(num_dst, sx * sy, seed, device=device)
    win = torch.arange(num_dst, device=device, dtype=torch.int64)
    row = (win // wsx) * sy + off // sx
    col = (win % wsx) * sx + off % sx
    dst_pos = row * w + col
    is_dst = torch.zeros(h * w, dtype=torch.int8, device=device).index_fill(0, dst_pos, 1)
    order = torch.argsort(is_dst, stable=True)  # sources (0) first, in grid order
    return dst_pos, order[: h * w - num_dst]


def energy_match(scores: torch.Tensor, r: int, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiToMe's choice of sources on the grid, from the ``(B, Na, Nd)`` cosine similarities of the
    sources to the destinations: the ``r`` sources of highest energy ``mean_j ELU(cos - margin)``
    (those in dense, redundant regions) merge into their most similar destination; isolated sources
    stay. The energy is taken against the destinations (one per window, a regular sample of the
    grid) rather than all tokens, which keeps it at the cost of ToMe-SD's own matching.
    Returns ``(unm_idx, src_idx, dst_idx)`` as :func:`visiontools.tome.merge.match_scores` does.
    The ELU runs in the scores' dtype (in place on one temporary) and only the mean accumulates in
    float32: at 2048² on SD 1.5 the matrix is 49,152 x 16,384, and float32 copies of it cost an
    H200 about a quarter of PiToMe's speed-up."""
    energy = F.elu(scores - margin, inplace=True).mean(dim=-1, dtype=torch.float32)
    order = energy.argsort(dim=-1, descending=True, stable=True)
    src_idx = order[:, :r]
    return order[:, r:], src_idx, scores.argmax(dim=-1).gather(1, src_idx)


def plan_merge_2d(metric: torch.Tensor, h: int, w: int, r: int, sx: int = 2, sy: int = 2,
                  seed: torch.Tensor | int | None = None, sim_dtype: torch.dtype | None = None,
                  energy_margin: float | None = None, reduce: str = "mean") -> Merge2d:
    """Plan a ToMe-SD merge of ``r`` tokens on an ``h x w`` grid from ``metric`` ``(B, N, C)``:
    each source finds its most cosine-similar destination; the ``r`` best-matched sources merge
    (with ``energy_margin``: the ``r`` sources of highest PiToMe energy, :func:`energy_match`).
    ``sim_dtype``: dtype of the similarity matmul (e.g. bf16 on CPUs with AMX; default: metric's);
    ``reduce``: how the plan's merge forms each destination (:data:`REDUCE_RULES`)."""
    if reduce not in REDUCE_RULES:
        raise ValueError(f"reduce must be one of {REDUCE_RULES}, got {reduce!r}")
    B, N, _ = metric.shape
    if N != h * w:
        raise ValueError(f"metric has {N} tokens, but the grid is {h}x{w} = {h * w}")
    device = metric.device
    dst_pos, a_pos = destinations(h, w, sx, sy, seed, device=device)
    n_dst, n_a = dst_pos.shape[0], a_pos.shape[0]
    r = max(0, min(int(r), n_a))
    if n_dst == 0 and r > 0:
        raise ValueError(f"cannot merge on a {h}x{w} grid: it is smaller than one {sy}x{sx} window")
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        if sim_dtype is not None:
            m = m.to(sim_dtype)
        scores = m.index_select(1, a_pos) @ m.index_select(1, dst_pos).transpose(-1, -2)
        if energy_margin is None:
            unm_idx, src_idx, dst_idx = match_scores(scores, r)
        else:
            unm_idx, src_idx, dst_idx = energy_match(scores, r, energy_margin)
        unm_pos, src_pos = a_pos[unm_idx], a_pos[src_idx]
        n_unm = n_a - r
        index = torch.empty(B, N, dtype=torch.int64, device=device)
        index.scatter_(1, unm_pos, torch.arange(n_unm, device=device).expand(B, -1))
        index.scatter_(1, src_pos, n_unm + dst_idx)
        index.index_copy_(1, dst_pos, (n_unm + torch.arange(n_dst, device=device)).expand(B, -1))
    return Merge2d(unm_pos, src_pos, dst_pos, dst_idx, index, reduce)


def merge_2d(m: Merge2d, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Apply 2D merge step ``m`` to ``x`` ``(B, N, C)``: kept sources, then destinations formed from
    their groups by ``mode`` (default: the plan's ``reduce``; :data:`REDUCE_RULES`, or a
    ``scatter_reduce`` mode such as ``"sum"``). Returns ``(B, N - r, C)``."""
    mode = m.reduce if mode is None else mode
    C = x.shape[-1]
    unm = x.gather(1, m.unm_pos[..., None].expand(-1, -1, C))
    dst = x.index_select(1, m.dst_pos)
    if m.r and mode != "keep":
        src = x.gather(1, m.src_pos[..., None].expand(-1, -1, C))
        dst = dst.scatter_reduce(1, m.dst_idx[..., None].expand(-1, -1, C), src,
                                 reduce="mean" if mode == "mlerp" else mode)
    out = torch.cat([unm, dst], dim=1)
    if m.r and mode == "mlerp":
        out = mlerp(out, x, m.index[..., None], out.shape[1])
    return out


def kv_grid_size(h: int, w: int, ratio: float) -> tuple[int, int]:
    """Grid a ``h x w`` grid is downsampled to so that about ``ratio`` of its tokens go:
    each side scaled by ``sqrt(1 - ratio)`` and rounded up (``ratio=0.75`` halves each side)."""
    s = math.sqrt(1.0 - ratio)
    return max(1, math.ceil(h * s - 1e-6)), max(1, math.ceil(w * s - 1e-6))


def downsample_tokens(x: torch.Tensor, h: int, w: int, size: tuple[int, int],
                      method: str = "nearest-exact") -> torch.Tensor:
    """Resample tokens ``(B, h*w, C)`` of an ``h x w`` grid to a ``size`` grid, ``(B, sh*sw, C)``.
    ``method`` is an ``F.interpolate`` mode, or ``"avg"`` (average pooling; needs integer factors,
    the last window may be partial)."""
    B, N, C = x.shape
    if N != h * w:
        raise ValueError(f"x has {N} tokens, but the grid is {h}x{w} = {h * w}")
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"unknown downsample method {method!r}; choose from {DOWNSAMPLE_METHODS}")
    if tuple(size) == (h, w):
        return x
    grid = x.transpose(1, 2).reshape(B, C, h, w)
    if method == "avg":
        fy, fx = -(-h // size[0]), -(-w // size[1])
        if (-(-h // fy), -(-w // fx)) != tuple(size):
            raise ValueError(f"'avg' downsampling needs an integer factor: {h}x{w} -> {size[0]}x{size[1]}")
        grid = F.avg_pool2d(grid, (fy, fx), ceil_mode=True, count_include_pad=False)
    elif method in ("bilinear", "bicubic"):
        grid = F.interpolate(grid, size=size, mode=method, align_corners=False, antialias=True)
    else:
        grid = F.interpolate(grid, size=size, mode=method)
    return grid.flatten(2).transpose(1, 2)
