"""Token merging (ToMe): bipartite soft matching, size-weighted merging, source maps, unmerging.

Library-agnostic tensor code for "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023).
Tokens are ``(B, N, C)``; the first ``num_protected`` tokens (class, distillation, register tokens)
never merge and always stay, in order, at the front. The merges are those of the paper's reference
implementation (facebookresearch/ToMe), see :func:`bipartite_soft_matching`.

One merge step is described by a :class:`Merge` (index tensors only, no closures), so the same
step can be applied to several tensors (features, sizes, the source map) and undone again.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

RSchedule = Union[int, tuple, Sequence[int]]


@dataclass(frozen=True)
class Merge:
    """One bipartite merge step over the whole sequence split alternately (even positions form set
    A, odd positions set B): which unprotected A tokens stay (``unm_idx``), which merge
    (``src_idx``) into which B token (``dst_idx``). Index tensors are ``(B, n, 1)`` into the A half
    ``x[:, ::2]`` or the B half ``x[:, 1::2]``; protected tokens appear in none of them."""

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


def applied_schedule(r: RSchedule, num_layers: int, num_tokens: int, num_protected: int = 0) -> list[int]:
    """The r each of ``num_layers`` blocks applies to ``num_tokens`` tokens entering the first: the
    requested :func:`parse_r` schedule, each block's r capped by :func:`max_r` at the tokens it sees."""
    out = []
    for requested in parse_r(num_layers, r):
        out.append(max_r(requested, num_tokens, num_protected))
        num_tokens -= out[-1]
    return out


def match(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matching rule shared by ToMe and ToMe-SD: each token of ``a`` ``(B, Na, C)`` picks its most
    similar token of ``b`` (dot product; pass normalised vectors for cosine), and the ``r`` best
    matched ``a`` tokens merge. Returns ``(unm_idx, src_idx, dst_idx)``, ``(B, n)`` long: the ``a``
    tokens kept, the ``a`` tokens merged, and the ``b`` token each merged one goes to."""
    return match_scores(a @ b.transpose(-1, -2), r)


def match_scores(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`match` from a precomputed ``(B, Na, Nb)`` score matrix (``-inf`` forbids an edge)."""
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    return unm_idx, src_idx, node_idx.gather(1, src_idx)


def split_sizes(num_tokens: int, num_protected: int) -> tuple[int, int, int, int]:
    """Sizes of the alternate split of ``num_tokens`` tokens whose first ``num_protected`` are
    protected: ``(len(A), len(B), protected in A, protected in B)``."""
    return (num_tokens + 1) // 2, num_tokens // 2, (num_protected + 1) // 2, num_protected // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 0) -> Merge:
    """Plan one ToMe merge step from ``metric`` ``(B, N, C)`` (the keys averaged over heads), with
    the reference implementation's rules (facebookresearch/ToMe ``bipartite_soft_matching``):

    - the whole sequence alternates into sets A (even positions) and B (odd), so a class token is
      in A, patch 0 (or a distillation token) in B;
    - each A token picks its most cosine-similar B token and the ``r`` most similar edges merge A
      into B; the first ``num_protected`` tokens (class, distillation, register) get ``-inf``
      scores: never a source, never a destination;
    - with protected tokens, the unmerged A tokens keep their original order (the reference sorts
      them when there is a class token); without, they stay in similarity order, as there.

    ``r`` is capped at half of the unprotected tokens.
    """
    B, N, _ = metric.shape
    r = max_r(r, N, num_protected)
    _, _, pa, pb = split_sizes(N, num_protected)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        scores[:, :pa, :] = -math.inf
        scores[:, :, :pb] = -math.inf
        unm_idx, src_idx, dst_idx = match_scores(scores, r)
        if num_protected:
            unm_idx = unm_idx.sort(dim=1)[0][:, pa:]  # the protected A tokens sort first: drop them
    return Merge(num_protected, unm_idx[..., None], src_idx[..., None], dst_idx[..., None], N)


def merge(m: Merge, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Apply merge step ``m`` to ``x`` ``(B, N, C)``; merged tokens are reduced with ``mode``
    (``"sum"``, ``"mean"``, ``"amax"``, ...). Output order: protected tokens as they were, unmerged
    A tokens, then the unprotected B tokens (the reference implementation's order)."""
    P, C = m.num_protected, x.shape[-1]
    _, _, _, pb = split_sizes(x.shape[1], P)
    a, b = x[:, ::2], x[:, 1::2]
    unm = a.gather(1, m.unm_idx.expand(-1, -1, C))
    if m.r:
        src = a.gather(1, m.src_idx.expand(-1, -1, C))
        b = b.scatter_reduce(1, m.dst_idx.expand(-1, -1, C), src, reduce=mode)
    return torch.cat([x[:, :P], unm, b[:, pb:]], dim=1)


def merge_wavg(m: Merge, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` as a size-weighted average; ``size`` ``(B, N, 1)`` counts the patches behind each
    token (ones when ``None``). Returns the merged tokens and their new sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    merged = merge(m, torch.cat([x * size, size], dim=-1), mode="sum")
    x, size = merged[..., :-1], merged[..., -1:]
    return x / size, size


@functools.lru_cache(maxsize=64)  # a schedule uses one entry per block and batch size
def _step_tables(B: int, N: int, P: int, r: int, device: str, dtype: torch.dtype):
    """Constant index tensors of one merge step (a pure memo of its shapes, never of data): the flat
    rows ``b * N + position`` of the unprotected A tokens ``(B, n_a - pa)``, of the protected tokens
    and of the unprotected B tokens (both ``(B, .)``), the flat output row of the first unprotected B token
    ``(B, 1)``, and sizes of one for a first step (kept ``B * (N - r)``, merged ``B * r``)."""
    _, _, pa, pb = split_sizes(N, P)
    rows = torch.arange(B, device=device)[:, None] * N
    a_rows = rows + torch.arange(2 * pa, N, 2, device=device)
    pre_rows = rows + torch.arange(P, device=device)
    b_rows = rows + torch.arange(2 * pb + 1, N, 2, device=device)
    n_unm = (N + 1) // 2 - pa - r
    out_b0 = torch.arange(B, device=device)[:, None] * (N - r) + (P + n_unm)
    ones = torch.ones(B * (N - r), device=device, dtype=dtype), torch.ones(B * r, device=device, dtype=dtype)
    return a_rows, pre_rows, b_rows, out_b0, ones


def merge_step(x: torch.Tensor, metric: torch.Tensor, r: int, num_protected: int = 0,
               size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole ToMe step, :func:`bipartite_soft_matching` then :func:`merge_wavg`, with the same
    merges and output order, in fewer operations and memory passes (the engine's path when no
    source map or rotary embeddings ride along). Returns the merged tokens and their sizes.

    The matching runs on the unprotected halves only (no ``-inf`` fills). The output is one row
    gather (``index_select``) of the kept tokens with a precomputed flat index, and the merged
    destinations are corrected in place with ``r`` rows: ``x_d + sum_s w_s (x_s - x_d)``, with
    ``w_s = size_s / new size_d``; unmerged tokens are copied exactly. No host synchronisation, and
    every shape depends only on ``(B, N, r)``, so a fixed schedule has static shapes."""
    B, N, C = x.shape
    P = num_protected
    r = max_r(r, N, P)
    _, _, pa, pb = split_sizes(N, P)
    tables = _step_tables.__wrapped__ if torch.compiler.is_compiling() else _step_tables  # compiled: traced constants
    a_rows, pre_rows, b_rows, out_b0, ones = tables(B, N, P, r, str(x.device), x.dtype)
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        node_max, node_idx = (m[:, 2 * pa::2] @ m[:, 2 * pb + 1::2].transpose(1, 2)).max(dim=-1)
        edge = node_max.argsort(dim=-1, descending=True)
        dst = (node_idx.gather(1, edge[:, :r]) + out_b0).view(-1)  # flat output rows of the destinations
        rows = a_rows.gather(1, edge)  # flat input rows of the A tokens, most similar first
        src, unm = rows[:, :r].reshape(-1), rows[:, r:]
        if P:
            unm = unm.sort(dim=-1)[0]  # rows grow with positions: the reference's sorted order
        keep = torch.cat([pre_rows, unm, b_rows] if P else [unm, b_rows], 1).view(-1)
    xf = x.reshape(B * N, C)
    out = xf.index_select(0, keep)
    if size is None:
        kept_size, src_size = ones
    else:
        sf = size.reshape(B * N)
        kept_size, src_size = sf.index_select(0, keep), sf.index_select(0, src)
    new_size = kept_size.index_add(0, dst, src_size)
    w = (src_size / new_size.index_select(0, dst)).unsqueeze(1)
    out.index_add_(0, dst, (xf.index_select(0, src) - out.index_select(0, dst)) * w)
    return out.view(B, N - r, C), new_size.view(B, N - r, 1)


def index_map(m: Merge) -> torch.Tensor:
    """For every token before merge step ``m``, the index of the token it ends in: ``(B, N)`` long."""
    B = m.unm_idx.shape[0]
    P, N = m.num_protected, m.num_tokens
    device = m.unm_idx.device
    n_a, n_b, pa, pb = split_sizes(N, P)
    n_unm = m.unm_idx.shape[1]
    first_b = P + n_unm - pb  # output index of B token j (j >= pb) is first_b + j
    a_new = torch.empty(B, n_a, dtype=torch.long, device=device)
    a_new[:, :pa] = 2 * torch.arange(pa, device=device)  # protected A tokens stay where they were
    a_new.scatter_(1, m.unm_idx[..., 0], P + torch.arange(n_unm, device=device).expand(B, -1))
    if m.r:
        a_new.scatter_(1, m.src_idx[..., 0], first_b + m.dst_idx[..., 0])
    b_new = (first_b + torch.arange(n_b, device=device)).expand(B, -1).clone()
    b_new[:, :pb] = 2 * torch.arange(pb, device=device) + 1
    out = torch.empty(B, N, dtype=torch.long, device=device)
    out[:, ::2] = a_new
    out[:, 1::2] = b_new
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
    return size.log().reshape(size.shape[0], 1, 1, size.shape[1])


def merge_dst(m: Merge, x: torch.Tensor) -> torch.Tensor:
    """Apply merge step ``m`` to ``x`` keeping, for each merged group, its destination's value (the
    sources are dropped); same output order as :func:`merge`."""
    _, _, _, pb = split_sizes(x.shape[1], m.num_protected)
    unm = x[:, ::2].gather(1, m.unm_idx.expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :m.num_protected], unm, x[:, 1::2][:, pb:]], dim=1)


ROPE_RULES = ("mean", "circular", "dst")


def merge_rope(m: Merge, rope: torch.Tensor, size: torch.Tensor | None, rule: str = "circular") -> torch.Tensor:
    """Rotary embeddings ``(B, N, 2D)`` (``cat([sin, cos], -1)`` per token, as timm's
    ``RotaryEmbeddingCat`` makes them) for the tokens after merge step ``m``:

    - ``"mean"``: the size-weighted mean of the group's sin and cos. Rotation is linear, so the merged
      token's rotated query/key is the size-weighted mean of the members' rotated ones;
    - ``"circular"``: that mean scaled back to unit length per frequency (a rotation by the circular
      mean angle of the group);
    - ``"dst"``: the destination token's embedding.
    """
    if rule == "dst":
        return merge_dst(m, rope)
    return rope_from_mean(merge_wavg(m, rope, size)[0], rule)


def rope_from_mean(mean: torch.Tensor, rule: str) -> torch.Tensor:
    """The merged tokens' rotary embeddings from their size-weighted mean ``cat([sin, cos], -1)``:
    unchanged for ``"mean"``, rescaled to unit length per frequency for ``"circular"``."""
    if rule == "circular":
        sin, cos = mean.chunk(2, dim=-1)
        norm = (sin * sin + cos * cos).sqrt().clamp_min(1e-12)
        return torch.cat([sin / norm, cos / norm], dim=-1)
    if rule != "mean":
        raise ValueError(f"unknown rope rule {rule!r}; choose one of {ROPE_RULES}")
    return mean
