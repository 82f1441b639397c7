"""Training-free token reduction methods beyond plain ToMe, as pure tensor functions.

Library-agnostic (no timm): an adapter computes a method's inputs (keys, class attention), asks for a
:class:`Reduction` and applies it to the tokens, their sizes, the source map and rotary embeddings.
Tokens are ``(B, N, C)``; the first ``num_protected`` (class, distillation, register tokens) never
merge or drop and stay, in order, at the front. Every method removes exactly ``r`` tokens per step
(capped at half of the unprotected tokens), so an r schedule means the same token counts, and the
same FLOPs up to each method's small planning cost, for all of them.

- ``tome``: ToMe's bipartite soft matching (``visiontools.tome.merge``), unchanged.
- ``tofu``: Token Fusion (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and
  Token Merging", WACV 2024, arXiv:2312.01026). ToMe's matching; in the early layers
  (``layer <= num_layers // 2``, the split of OpenToMe's port, Westlake-AI/OpenToMe
  ``opentome/timm/tofu.py``) the matched source tokens are *pruned* (the destination keeps its
  value); in the later layers they merge with MLERP: the size-weighted average of the group, rescaled
  to the largest norm in the group (:func:`mlerp`).
- ``pitome``: PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token
  Merging", NeurIPS 2024, arXiv:2405.16148; code hchautran/PiToMe ``algo/pitome/merge.py``
  ``pitome_vision``). Energy ``E_i = mean_j ELU(cos(k_i, k_j) - margin)`` over the unprotected
  tokens; the ``2r`` highest-energy tokens (those in dense, redundant regions) are split alternately
  by energy rank into A and B and every A token merges into its most similar B token; the other,
  isolated and informative, tokens are protected. Margin ``0.75 - 0.75 * layer / num_layers``
  (OpenToMe's ``pitome_apply_patch``). Not implemented: the reference's optional BSM variant.
- ``prune``: top-k pruning by attention, the EViT criterion (Liang et al., "Not All Patches are What
  You Need", ICLR 2022) without EViT's fused token: drop the ``r`` unprotected tokens that the class
  token attends to least (attention averaged over heads). Without a class token, a token's score is
  the attention it receives averaged over all queries and heads. Dropped tokens map to ``-1`` in
  the source map.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visiontools.tome.merge import Merge, bipartite_soft_matching, index_map, max_r, rope_from_mean, split_sizes

METHODS = ("tome", "tofu", "pitome", "prune")


@dataclass(frozen=True)
class Reduction:
    """One reduction step as plain index tensors: ``index`` ``(B, N)`` gives, for every token before
    the step, the output token it goes to (``-1``: dropped); ``keep`` ``(B, M)`` gives, for every
    output token, the input token that represents it (itself, or a merge's destination).
    ``merging`` is False when no two tokens share an output (pure pruning: outputs are copies)."""

    index: torch.Tensor
    keep: torch.Tensor
    merging: bool

    @property
    def num_out(self) -> int:
        return self.keep.shape[1]


def check_method(method: str) -> None:
    """``ValueError`` naming the choices unless ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- planning

def from_merge(m: Merge, prune_sources: bool = False) -> Reduction:
    """A ToMe :class:`~visiontools.tome.merge.Merge` as a :class:`Reduction` (same output order as
    :func:`visiontools.tome.merge.merge`); ``prune_sources`` drops the merged A tokens instead."""
    index = index_map(m)
    B, N, P = index.shape[0], m.num_tokens, m.num_protected
    dev = index.device
    _, n_b, pa, pb = split_sizes(N, P)
    prot = torch.arange(P, device=dev).expand(B, -1)
    unm = 2 * m.unm_idx[..., 0]
    b = (2 * torch.arange(pb, n_b, device=dev) + 1).expand(B, -1)
    keep = torch.cat([prot, unm, b], dim=1)
    if prune_sources and m.r:
        index = index.scatter(1, 2 * m.src_idx[..., 0], -1)
    return Reduction(index, keep, merging=bool(m.r) and not prune_sources)


def _survivors(dropped: torch.Tensor, num_protected: int, num_dropped: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a ``(B, n)`` bool mask of dropped unprotected tokens (``num_dropped`` in every row): the
    output index of every token (protected first, survivors in their original order; ``-1`` for
    dropped ones) ``(B, P + n)`` and the input token of every output ``(B, M)``."""
    B, n = dropped.shape
    P, dev = num_protected, dropped.device
    pos = torch.arange(n, device=dev).expand(B, -1)
    order = torch.where(dropped, pos + n, pos).argsort(dim=1)[:, :n - num_dropped]  # survivors, in order
    out_pos = torch.cumsum(~dropped, dim=1) - 1 + P
    index = torch.cat([torch.arange(P, device=dev).expand(B, -1), torch.where(dropped, -1, out_pos)], dim=1)
    keep = torch.cat([torch.arange(P, device=dev).expand(B, -1), order + P], dim=1)
    return index, keep


def tofu_prunes(layer: int, num_layers: int) -> bool:
    """ToFu prunes (rather than merges) in the first half of the layers, as OpenToMe's port does."""
    return layer <= num_layers // 2


def plan_tofu(metric: torch.Tensor, r: int, num_protected: int, layer: int, num_layers: int) -> Reduction:
    """ToFu's step: ToMe's matching on ``metric`` (keys averaged over heads), pruning the sources in
    early layers and merging them with MLERP (:func:`mlerp`) in later ones."""
    m = bipartite_soft_matching(metric, r, num_protected)
    return from_merge(m, prune_sources=tofu_prunes(layer, num_layers))


def pitome_margin(layer: int, num_layers: int) -> float:
    """PiToMe's energy margin of a layer: 0.75 in the first, falling linearly towards 0."""
    return 0.75 - 0.75 * layer / num_layers


def pitome_energy(metric: torch.Tensor, margin: float) -> torch.Tensor:
    """PiToMe's energy ``(B, n)`` of tokens ``metric`` ``(B, n, C)``: the mean over all tokens j of
    ``ELU(cos(i, j) - margin)`` (alpha 1); high in dense, redundant regions."""
    k = F.normalize(metric, p=2, dim=-1)
    return F.elu(k @ k.transpose(-1, -2) - margin).mean(dim=-1)


def plan_pitome(metric: torch.Tensor, r: int, num_protected: int, layer: int, num_layers: int) -> Reduction:
    """PiToMe's step (see the module doc): the ``2r`` highest-energy unprotected tokens alternate
    into A and B by energy rank, each A token merges into its most cosine-similar B token."""
    P = num_protected
    B, N, _ = metric.shape
    r = max_r(r, N, P)
    with torch.no_grad():
        k = F.normalize(metric[:, P:], p=2, dim=-1)
        sim = k @ k.transpose(-1, -2)
        energy = F.elu(sim - pitome_margin(layer, num_layers)).mean(dim=-1)
        ranked = energy.argsort(dim=1, descending=True, stable=True)
        a, b = ranked[:, :2 * r:2], ranked[:, 1:2 * r:2]
        n = N - P
        ab = sim.gather(1, a[..., None].expand(-1, -1, n)).gather(2, b[:, None, :].expand(-1, r, -1))
        dst = b.gather(1, ab.argmax(dim=-1))  # (B, r): unprotected index of each A token's destination
        dropped = torch.zeros(B, n, dtype=torch.bool, device=metric.device).scatter(1, a, True)
        index, keep = _survivors(dropped, P, r)
        index = index.scatter(1, a + P, index.gather(1, dst + P))
    return Reduction(index, keep, merging=r > 0)


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                    num_protected: int) -> torch.Tensor:
    """Importance of the unprotected tokens for pruning, ``(B, N - P)``: the softmax attention that
    the class token (query 0) pays to each, averaged over heads; without protected tokens, the mean
    attention each token receives over all queries and heads. ``q``, ``k`` ``(B, H, N, D)``;
    ``bias`` an additive mask broadcastable to ``(B, H, Nq, N)`` (proportional attention)."""
    with torch.no_grad():
        q = q[:, :, :1] if num_protected else q
        logits = (q * scale) @ k.transpose(-1, -2)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        return logits.float().softmax(dim=-1).mean(dim=(1, 2))[:, num_protected:]


def plan_prune(importance: torch.Tensor, r: int, num_protected: int) -> Reduction:
    """Drop the ``r`` unprotected tokens with the least ``importance`` ``(B, N - P)`` (see
    :func:`class_attention`); the others keep their order."""
    B, n = importance.shape
    r = max_r(r, n + num_protected, num_protected)
    with torch.no_grad():
        low = importance.argsort(dim=1, stable=True)[:, :r]
        dropped = torch.zeros(B, n, dtype=torch.bool, device=importance.device).scatter(1, low, True)
        index, keep = _survivors(dropped, num_protected, r)
    return Reduction(index, keep, merging=False)


# ----------------------------------------------------------------------------- applying

def _to_slots(red: Reduction) -> torch.Tensor:
    """``index`` with dropped tokens sent to an extra slot ``M`` (sliced off afterwards)."""
    return torch.where(red.index < 0, red.num_out, red.index)


def reduce_wavg(red: Reduction, x: torch.Tensor, size: torch.Tensor | None = None, norm: str = "avg"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``red`` to ``x`` ``(B, N, C)`` with token sizes ``size`` ``(B, N, 1)`` (ones when
    ``None``): each output is the size-weighted average of its group (``norm="mlerp"``: rescaled by
    :func:`mlerp`); dropped tokens vanish, sizes add up. Pure pruning copies the kept tokens."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    if not red.merging:
        return x.gather(1, red.keep[..., None].expand(-1, -1, x.shape[-1])), size.gather(1, red.keep[..., None])
    B, _, C = x.shape
    M, slots = red.num_out, _to_slots(red)[..., None]
    summed = x.new_zeros(B, M + 1, C + 1).scatter_add(1, slots.expand(-1, -1, C + 1), torch.cat([x * size, size], -1))
    out, new_size = summed[:, :M, :C] / summed[:, :M, C:], summed[:, :M, C:]
    if norm == "mlerp":
        out = mlerp(out, x, slots, M)
    elif norm != "avg":
        raise ValueError(f"unknown norm {norm!r}; choose 'avg' or 'mlerp'")
    return out, new_size


def mlerp(avg: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, num_out: int) -> torch.Tensor:
    """ToFu's MLERP: each group's average ``avg`` ``(B, M, C)`` rescaled to the largest norm among
    its members (``x`` ``(B, N, C)``, ``slots`` ``(B, N, 1)`` their output token), so merging does not
    shrink the feature norm. Single-token groups are unchanged (up to rounding)."""
    target = x.new_zeros(x.shape[0], num_out + 1, 1).scatter_reduce(
        1, slots, x.norm(dim=-1, keepdim=True), reduce="amax", include_self=False)[:, :num_out]
    return avg * (target / avg.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def reduce_source(red: Reduction, source: torch.Tensor) -> torch.Tensor:
    """Update a source map ``(B, N0)`` (input token -> current token, ``-1`` for dropped) through ``red``."""
    ext = torch.cat([red.index, red.index.new_full((red.index.shape[0], 1), -1)], dim=1)
    return ext.gather(1, torch.where(source < 0, red.index.shape[1], source))


def reduce_keep(red: Reduction, x: torch.Tensor) -> torch.Tensor:
    """Each output token's representative's value (``keep``): ``(B, M, C)``."""
    return x.gather(1, red.keep[..., None].expand(-1, -1, x.shape[-1]))


def reduce_rope(red: Reduction, rope: torch.Tensor, size: torch.Tensor | None, rule: str = "mean") -> torch.Tensor:
    """Rotary embeddings ``(B, N, 2D)`` after ``red``, with the rules of
    :func:`visiontools.tome.merge.merge_rope` (``"dst"``: the representative's embedding)."""
    if rule == "dst":
        return reduce_keep(red, rope)
    return rope_from_mean(reduce_wavg(red, rope, size)[0], rule)


def plan(method: str, r: int, num_protected: int, layer: int, num_layers: int, metric: torch.Tensor,
         importance: torch.Tensor | None = None) -> Reduction:
    """The :class:`Reduction` of one step of ``method`` (not ``tome``, which keeps its own code path):
    ``metric`` the keys averaged over heads ``(B, N, C)``, ``importance`` (``prune`` only) from
    :func:`class_attention`."""
    if method == "tofu":
        return plan_tofu(metric, r, num_protected, layer, num_layers)
    if method == "pitome":
        return plan_pitome(metric, r, num_protected, layer, num_layers)
    if method == "prune":
        if importance is None:
            raise ValueError("method 'prune' needs the attention importance of the tokens")
        return plan_prune(importance, r, num_protected)
    check_method(method)
    raise ValueError(f"method {method!r} has no Reduction plan (tome uses visiontools.tome.merge directly)")


def merge_norm(method: str, layer: int, num_layers: int) -> str:
    """How a method averages a merged group: ``"mlerp"`` for ToFu, else ``"avg"``."""
    return "mlerp" if method == "tofu" and not tofu_prunes(layer, num_layers) else "avg"


__all__ = ["METHODS", "Reduction", "check_method", "class_attention", "from_merge", "merge_norm", "mlerp", "plan",
           "plan_pitome", "plan_prune", "plan_tofu", "pitome_energy", "pitome_margin", "reduce_keep",
           "reduce_rope", "reduce_source", "reduce_wavg", "tofu_prunes"]
