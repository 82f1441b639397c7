"""The token-count ideal of a token-reduction candidate: what its token counts alone would save.

A merged model runs each block on fewer tokens, plus the reduction step (matching, gathers, size
bookkeeping, the proportional-attention mask). The FLOP ratio is not reachable on real hardware (a
matrix with 20 rows runs less efficiently than one with 197), so ``bench vit`` also measures the
**token-count ideal**: the *unpatched* blocks, each timed alone at the token counts it sees under the
schedule, on the same batch. ToMe merges between attention and MLP, so block ``l`` runs its attention
half at ``n_l`` tokens and its MLP half at ``n_{l+1}``; both halves are timed separately.

With ``T_base`` the unpatched model's time, ``a(n)``/``m(n)`` the halves' times at ``n`` tokens and
``rest = T_base - sum_l (a(N) + m(N))`` (patch embedding, head and whatever runs between blocks):

- ideal time ``= rest + sum_l (a(n_l) + m(n_{l+1}))``; the ideal speedup is ``T_base`` over it;
- share of ideal ``=`` ideal time / the candidate's measured time (1.0: the reduction step is free);
- overhead ``=`` measured time - ideal time, shown as a share of the measured time.

Every part is timed interleaved with the models themselves (``visiontools.timing.interleaved_times``).
"""
from __future__ import annotations

from typing import Callable

import torch


def block_parts(block: torch.nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The halves of a pre-norm transformer block as the unpatched model runs them: ``attn``
    (``x + attn(norm1(x))``) and ``mlp`` (``x + mlp(norm2(x))``), with layer scale where the block has
    it. A block without these parts is timed whole: ``{"block": block}`` (its merge then counts at
    the tokens entering it)."""
    if not all(hasattr(block, k) for k in ("norm1", "attn", "norm2", "mlp")):
        return {"block": block}
    ident = torch.nn.Identity()
    ls1, ls2 = getattr(block, "ls1", ident), getattr(block, "ls2", ident)
    g1, g2 = getattr(block, "gamma_1", None), getattr(block, "gamma_2", None)  # timm's EvaBlock

    def attn(x):
        y = ls1(block.attn(block.norm1(x)))
        return x + (y if g1 is None else g1 * y)

    def mlp(x):
        y = ls2(block.mlp(block.norm2(x)))
        return x + (y if g2 is None else g2 * y)
    return {"attn": attn, "mlp": mlp}


def _signature(block: torch.nn.Module) -> tuple:
    """Blocks with the same class and parameter shapes run the same work: timed once per token count."""
    return (type(block).__name__, *(tuple(p.shape) for p in block.parameters()))


def part_counts(tokens: list[int], whole: bool) -> list[tuple[str, int]]:
    """``(part, tokens)`` for each block of a schedule, from the tokens entering each block and after
    the last (``tokens_per_layer``): the attention half at ``n_l``, the MLP half at ``n_{l+1}``."""
    if whole:
        return [("block", n) for n in tokens[:-1]]
    return [p for l in range(len(tokens) - 1) for p in (("attn", tokens[l]), ("mlp", tokens[l + 1]))]


class TokenCountIdeal:
    """The parts to time for the token-count ideal of several schedules of one model's ``blocks``,
    and the ideal times from their medians. ``schedules``: name -> tokens per layer (entering each
    block, then after the last); ``batch``, ``width``: the token tensors' batch and channels;
    ``wrap(fn)``: how a call runs (autocast). :attr:`fns` are keyed ``"ideal: <part>@<n> #<k>"``."""

    def __init__(self, blocks, schedules: dict[str, list[int]], batch: int, width: int, device,
                 wrap: Callable[[Callable[[], object]], object] = lambda f: f()):
        self.blocks = list(blocks)
        sigs = [_signature(b) for b in self.blocks]
        self.kind = {s: k for k, s in enumerate(dict.fromkeys(sigs))}
        self.layer_kind = [self.kind[s] for s in sigs]
        self.parts = [block_parts(b) for b in self.blocks]
        self.schedules = schedules
        self.fns: dict[str, Callable[[], object]] = {}
        inputs: dict[int, torch.Tensor] = {}
        for tokens in schedules.values():
            for l, (part, n) in self._layer_parts(tokens):
                key = self.key(l, part, n)
                if key not in self.fns:
                    x = inputs.setdefault(n, torch.randn(batch, n, width, device=device))
                    fn = self.parts[l][part]
                    self.fns[key] = lambda fn=fn, x=x: wrap(lambda: fn(x))

    def _layer_parts(self, tokens: list[int]):
        if len(tokens) != len(self.blocks) + 1:
            raise ValueError(f"tokens per layer must list {len(self.blocks) + 1} counts, got {len(tokens)}")
        whole = [("block" in p) for p in self.parts]
        for l in range(len(self.blocks)):
            parts = part_counts(tokens[l:l + 2], whole[l])
            yield from ((l, p) for p in parts)

    def key(self, layer: int, part: str, n: int) -> str:
        return f"ideal: {part}@{n} #{self.layer_kind[layer]}"

    def blocks_time(self, tokens: list[int], medians: dict[str, float]) -> float:
        """Seconds of the unpatched blocks at the counts ``tokens``: the sum over the schedule."""
        return sum(medians[self.key(l, part, n)] for l, (part, n) in self._layer_parts(tokens))

    def ideal(self, base_s: float, base_tokens: list[int], tokens: list[int], medians: dict[str, float]) -> float:
        """The ideal time of a schedule ``tokens``: ``rest`` (the unpatched model's ``base_s`` less its
        blocks at ``base_tokens``) plus the blocks at the schedule's counts."""
        rest = base_s - self.blocks_time(base_tokens, medians)
        return rest + self.blocks_time(tokens, medians)


def ideal_columns(measured_s: float, base_s: float, ideal_s: float, merging_blocks: int) -> dict:
    """The columns of one candidate: ideal speedup, share of the ideal reached, overhead (seconds,
    share of the measured time, and per merging block)."""
    overhead = measured_s - ideal_s
    return {"ideal_s": ideal_s, "ideal_speedup": base_s / ideal_s, "share_of_ideal": ideal_s / measured_s,
            "overhead_s": overhead, "overhead_share": overhead / measured_s,
            "overhead_per_block_s": overhead / merging_blocks if merging_blocks else 0.0}
