"""Token merging (ToMe): bipartite soft matching, size-weighted merging, source maps, unmerging.

Library-agnostic tensor code for "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023).
Tokens are ``(B, N, C)``; the first ``num_protected`` tokens (class, distillation, register tokens)
never merge and always stay, in order, at the front.

One merge step is described by a :class:`Merge` (index tensors only, no closures), so the same
step can be applied to several tensors (features, sizes, the source map) and undone again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

RSchedule = Union[int, tuple, Sequence[int]]


@dataclass(frozen=True)
class Merge:
    """One bipartite merge step: which A tokens stay (``unm_idx``), which merge (``src_idx``) into
    which B token (``dst_idx``). Index tensors are ``(B, n, 1)`` into the A or B half."""

    num_protected: int
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    num_tokens: int  # tokens before the merge, protected ones included

    @property
    def r(self) -> int:
        """Number of tokens this step removes."""
        return self.src_idx.shape[1]


def check_r(r: RSchedule) -> None:
    """Raise ``ValueError`` unless ``r`` is a valid r or r schedule (see :func:`parse_r`)."""
    def _int(v, what):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{what} must be a non-negative integer, got {v!r} ({type(v).__name__})")
        if v < 0:
            raise ValueError(f"{what} must be >= 0, got {v}")

    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"an r schedule tuple must be (r, inflection), got {r!r}")
        _int(r[0], "r")
        if isinstance(r[1], bool) or not isinstance(r[1], (int, float)) or not math.isfinite(r[1]):
            raise ValueError(f"inflection must be a finite number, got {r[1]!r}")
    elif isinstance(r, list):
        for i, v in enumerate(r):
            _int(v, f"r[{i}]")
    else:
        _int(r, "r")


def parse_r(num_layers: int, r: RSchedule) -> list[int]:
    """Expand an r setting into the requested number of merged tokens for each of ``num_layers``.

    - ``int``: the same r in every layer;
    - ``(r, inflection)``: the paper's schedule; ``inflection=-0.5`` merges more early on and less
      later (the "decreasing" schedule), 0 is constant, positive values increase;
    - a list of ints: one r per layer (its length must equal ``num_layers``).

    Anything else (floats, negative numbers, strings) raises ``ValueError``.

    The r actually applied in a layer is capped at half of its unprotected tokens.
    """
    check_r(r)
    if isinstance(r, tuple):
        r0, inflect = r
        lo = int(r0 * (1.0 - inflect))
        hi = 2 * r0 - lo
        step = (hi - lo) / max(num_layers - 1, 1)
        return [max(int(lo + step * i), 0) for i in range(num_layers)]
    if isinstance(r, int):
        return [r] * num_layers
    r = list(r)
    if len(r) != num_layers:
        raise ValueError(f"an explicit r list needs one entry per layer ({num_layers}), got {len(r)}")
    return r


def max_r(r: int, num_tokens: int, num_protected: int = 0) -> int:
    """The r a merge step can apply: at most half of the unprotected tokens (the size of set B)."""
    return min(int(r), (num_tokens - num_protected) // 2)


def match(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matching rule shared by ToMe and ToMe-SD: each token of ``a`` ``(B, Na, C)`` picks its most
    similar token of ``b`` (dot product; pass normalised vectors for cosine), and the ``r`` best
    matched ``a`` tokens merge. Returns ``(unm_idx, src_idx, dst_idx)``, ``(B, n)`` long: the ``a``
    tokens kept, the ``a`` tokens merged, and the ``b`` token each merged one goes to."""
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    return unm_idx, src_idx, node_idx.gather(1, src_idx)


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 0) -> Merge:
    """Plan one ToMe merge step from ``metric`` ``(B, N, C)`` (the keys averaged over heads).

    Unprotected tokens alternate into sets A (even) and B (odd); each A token finds its most
    cosine-similar B token; the ``r`` most similar such edges merge A into B. ``r`` is capped at
    half of the unprotected tokens (the size of A).
    """
    B, N, _ = metric.shape
    r = max_r(r, N, num_protected)
    with torch.no_grad():
        metric = metric[:, num_protected:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        unm_idx, src_idx, dst_idx = match(metric[:, ::2], metric[:, 1::2], r)
    return Merge(num_protected, unm_idx[..., None], src_idx[..., None], dst_idx[..., None], N)


def merge(m: Merge, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Apply merge step ``m`` to ``x`` ``(B, N, C)``; merged tokens are reduced with ``mode``
    (``"sum"``, ``"mean"``, ``"amax"``, ...). Output order: protected, unmerged A, then B."""
    P, C = m.num_protected, x.shape[-1]
    prefix, t = x[:, :P], x[:, P:]
    a, b = t[:, ::2], t[:, 1::2]
    unm = a.gather(1, m.unm_idx.expand(-1, -1, C))
    if m.r:
        src = a.gather(1, m.src_idx.expand(-1, -1, C))
        b = b.scatter_reduce(1, m.dst_idx.expand(-1, -1, C), src, reduce=mode)
    return torch.cat([prefix, unm, b], dim=1)


def merge_wavg(m: Merge, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` as a size-weighted average; ``size`` ``(B, N, 1)`` counts the patches behind each
    token (ones when ``None``). Returns the merged tokens and their new sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    merged = merge(m, torch.cat([x * size, size], dim=-1), mode="sum")
    x, size = merged[..., :-1], merged[..., -1:]
    return x / size, size


def index_map(m: Merge) -> torch.Tensor:
    """For every token before merge step ``m``, the index of the token it ends in: ``(B, N)`` long."""
    B = m.unm_idx.shape[0]
    P, N = m.num_protected, m.num_tokens
    device = m.unm_idx.device
    n_a, n_b = (N - P + 1) // 2, (N - P) // 2
    n_unm = n_a - m.r
    a_new = torch.empty(B, n_a, dtype=torch.long, device=device)
    a_new.scatter_(1, m.unm_idx[..., 0], P + torch.arange(n_unm, device=device).expand(B, -1))
    if m.r:
        a_new.scatter_(1, m.src_idx[..., 0], P + n_unm + m.dst_idx[..., 0])
    b_new = (P + n_unm + torch.arange(n_b, device=device)).expand(B, -1)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    out[:, :P] = torch.arange(P, device=device)
    out[:, P::2] = a_new
    out[:, P + 1::2] = b_new
    return out


def init_source(batch: int, num_tokens: int, device=None) -> torch.Tensor:
    """The identity source map: every input token is its own output token, ``(B, N)`` long."""
    return torch.arange(num_tokens, device=device).expand(batch, -1).clone()


def merge_source(m: Merge, source: torch.Tensor) -> torch.Tensor:
    """Update a source map ``(B, N0)`` (input token -> current token) through merge step ``m``.

    O(N0) per image: an index map, never an N x N matrix."""
    return index_map(m).gather(1, source)


def unmerge(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Spread merged tokens ``x`` ``(B, M, C)`` back to ``index.shape[1]`` positions, where
    ``index`` ``(B, N)`` says which merged token each position came from (a source map for the full
    patch grid, or :func:`index_map` for one step)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention: ``log(size)`` as an additive attention mask ``(B, 1, 1, N)``."""
    return size.log()[:, None, None, :, 0]
