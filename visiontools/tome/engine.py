"""One token-reduction engine under every ViT adapter.

A forward pass with token reduction carries one :class:`TokenState`: the schedule and method, and the
per-call bookkeeping (token sizes, the source map, rotary embeddings, the patch grid, the number of
protected prefix tokens). Adapters run each block as ``block_fn(block, x, state) -> x``: the host's own
modules, with one call of :meth:`TokenState.reduce` between attention and MLP (the ToMe position).
``reduce`` is the one reduction step: it plans with the chosen method from the block's similarity
metric and applies the plan to the tokens, their sizes, the source map and the rotary embeddings.

The same object is what ``tome_forward`` returns as the call's ``info`` (``ToMeInfo``): tokens per
layer, final sizes and, when traced, the source map. It lives only for one call, so a model can be
called from several threads, with different batch or image sizes.

:func:`solve_budget_for` turns a FLOP or speedup budget into a schedule for any adapter that can run
its model with a given schedule. Pure torch; no model library is imported here.
"""
from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from visiontools.tome import methods
from visiontools.tome.budget import BudgetResult, solve_budget
from visiontools.tome.merge import (
    bipartite_soft_matching, check_r, init_source, max_r, merge_rope, merge_source, merge_step, merge_wavg,
    size_bias,
)
from visiontools.tome.merge_grid import GridLayout

__all__ = ["TokenState", "ToMeInfo", "check_request", "solve_budget_for"]

BlockFn = Callable[[torch.nn.Module, torch.Tensor, "TokenState"], torch.Tensor]
_QUIET_CAPS: ContextVar[bool] = ContextVar("visiontools_tome_quiet_caps", default=False)  # set by budget solves


@dataclass
class TokenState:
    """The token state of one forward pass, and afterwards its record (``ToMeInfo``).

    Settings: ``schedule`` (tokens removed per block), ``method`` (``visiontools.tome.methods.METHODS``),
    ``prop_attn`` (proportional attention), ``rope_rule`` (rotation of merged tokens, see
    ``merge_rope``), ``trace_source`` (keep the source map), ``grid`` ((H, W) of the patch grid when
    the model has grid operations). State: ``size`` ``(B, N, 1)``, ``rope`` ``(B, 1, N - prefix, D)``
    and ``full_source`` ``(B, N0)`` (for every input token, prefix included, the index of the token
    holding it). Record: ``tokens_per_layer`` (entering each block, then after the last), ``size``,
    ``source`` and ``layer_sources`` (source maps of the patches, prefix dropped, when traced).
    """

    schedule: list[int] = field(default_factory=list)
    num_prefix_tokens: int = 0
    method: str = "tome"
    prop_attn: bool = True
    rope_rule: str = "circular"
    trace_source: bool = False
    grid: tuple[int, int] | None = None
    size: torch.Tensor | None = None
    rope: torch.Tensor | None = None
    full_source: torch.Tensor | None = None
    merged: bool = False
    layer: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    source: torch.Tensor | None = None
    layer_sources: list[torch.Tensor] = field(default_factory=list)

    # ------------------------------------------------------------------ what a block asks for
    @property
    def r(self) -> int:
        """Tokens to remove in the current block."""
        return self.schedule[self.layer] if self.layer < len(self.schedule) else 0

    def bias(self) -> torch.Tensor | None:
        """The proportional-attention mask ``log(size)`` ``(B, 1, 1, N)``, or ``None`` (off, or no merge yet)."""
        return size_bias(self.size) if self.prop_attn and self.size is not None else None

    def layout(self) -> GridLayout:
        """Where the current tokens sit on the patch grid, for grid operations (needs ``grid``)."""
        if self.grid is None:
            raise ValueError("this model has no patch grid recorded for its tokens")
        H, W = self.grid
        return GridLayout(self.num_prefix_tokens, H, W, self.full_source if self.merged else None, self.size)

    # ------------------------------------------------------------------ the reduction step
    def reduce(self, x: torch.Tensor, metric: torch.Tensor,
               importance: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Remove this block's r tokens from ``x`` ``(B, N, C)``: plan with the method from ``metric``
        ``(B, N, C')`` (``prune`` calls ``importance()`` for the tokens' attention importance), and
        apply the plan to the tokens, their sizes, the source map and the rotary embeddings."""
        P, r = self.num_prefix_tokens, self.r
        if max_r(r, x.shape[1], P) == 0:
            return x
        if self.full_source is None and self.grid is not None:  # grid operations need the map from now on
            self.full_source = init_source(x.shape[0], x.shape[1], x.device)
        if self.method == "tome" and self.rope is None and self.full_source is None:
            x, self.size = merge_step(x, metric, r, P, self.size)  # the same merges, fewer operations
            self.merged = True
            return x
        if self.method == "tome":
            return self._merge(x, bipartite_soft_matching(metric, r, P))
        if self.method == "prune" and importance is None:
            raise ValueError("method='prune' needs the tokens' attention importance, which this block does not give")
        red = methods.plan(self.method, r, P, self.layer, len(self.schedule), metric,
                           importance() if self.method == "prune" else None)
        return self._apply_reduction(x, red)

    def _merge(self, x: torch.Tensor, m) -> torch.Tensor:
        """Apply ToMe's merge ``m`` to the tokens and everything that follows them."""
        if self.rope is not None:
            self.rope = self._unpad(merge_rope(m, self._padded_rope(), self.size, self.rope_rule))
        x, self.size = merge_wavg(m, x, self.size)
        if self.full_source is not None:
            self.full_source = merge_source(m, self.full_source)
        self.merged = True
        return x

    def _apply_reduction(self, x: torch.Tensor, red: methods.Reduction) -> torch.Tensor:
        """Apply another method's reduction ``red`` to the tokens and everything that follows them."""
        if self.rope is not None:
            self.rope = self._unpad(methods.reduce_rope(red, self._padded_rope(), self.size, self.rope_rule))
        norm = methods.merge_norm(self.method, self.layer, len(self.schedule))
        x, self.size = methods.reduce_wavg(red, x, self.size, norm)
        if self.full_source is not None:
            self.full_source = methods.reduce_source(red, self.full_source)
        self.merged = True
        return x

    def _padded_rope(self) -> torch.Tensor:
        """Rotary embeddings ``(B, N, D)`` with zero rows for the prefix tokens, aligned with the tokens."""
        rope = self.rope[:, 0]
        return torch.cat([rope.new_zeros(rope.shape[0], self.num_prefix_tokens, rope.shape[-1]), rope], dim=1)

    def _unpad(self, rope: torch.Tensor) -> torch.Tensor:
        return rope[:, self.num_prefix_tokens:, None].transpose(1, 2)

    # ------------------------------------------------------------------ running blocks
    def start(self, x: torch.Tensor) -> None:
        """Begin a call on the embedded tokens ``x`` ``(B, N, C)``."""
        if self.trace_source:
            self.full_source = init_source(x.shape[0], x.shape[1], x.device)

    def run(self, block_fn: BlockFn, block: torch.nn.Module, x: torch.Tensor, use_checkpoint: bool = False):
        """One block ``block_fn(block, x, self)``, recorded; ``use_checkpoint``: activation checkpointing."""
        self.tokens_per_layer.append(x.shape[1])
        x = self._checkpointed(block_fn, block, x) if use_checkpoint else block_fn(block, x, self)
        self.layer += 1
        if self.trace_source:
            self.layer_sources.append(self.full_source[:, self.num_prefix_tokens:])
        return x

    def _checkpointed(self, block_fn: BlockFn, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``block_fn`` under non-reentrant activation checkpointing. The recomputation in backward
        runs on a copy of the state as it was before the block, so it never touches this one."""
        before = copy.copy(self)

        def step(x):
            st = copy.copy(before)
            return block_fn(block, x, st), (st.size, st.rope, st.full_source, st.merged)

        x, (self.size, self.rope, self.full_source, self.merged) = checkpoint(step, x, use_reentrant=False)
        return x

    def finish(self, x: torch.Tensor) -> None:
        """End the call on the output tokens ``x``: record the final count, sizes and source map."""
        self.tokens_per_layer.append(x.shape[1])
        if self.size is None:
            self.size = torch.ones_like(x[..., :1])
        if self.trace_source:
            self.source = self.full_source[:, self.num_prefix_tokens:]
        warn_if_capped(self.schedule, self.tokens_per_layer, self.num_prefix_tokens)


def warn_if_capped(schedule: list[int], tokens_per_layer: list[int], num_prefix_tokens: int) -> None:
    """A ``UserWarning``, shown once per setting and input size (Python's default filter), when a block's
    r was more than it can merge (half of its unprotected tokens, :func:`~visiontools.tome.merge.max_r`):
    the cap and the r each block applied. Allowed, never silent."""
    applied = [max_r(r, n, num_prefix_tokens) for r, n in zip(schedule, tokens_per_layer)]
    if applied == list(schedule[:len(applied)]) or _QUIET_CAPS.get():
        return
    import warnings

    first = next(i for i, (a, r) in enumerate(zip(applied, schedule)) if a < r)
    warnings.warn(f"ToMe r {schedule[first]} is more than block {first} can merge: a block merges at most half of its "
                  f"unprotected tokens ({(tokens_per_layer[first] - num_prefix_tokens) // 2} of "
                  f"{tokens_per_layer[first]} there), so the r applied per block is "
                  f"{','.join(map(str, applied))} (requested: {','.join(map(str, schedule[:len(applied)]))})",
                  UserWarning, stacklevel=3)


ToMeInfo = TokenState  # what tome_forward returns: the finished state of the call


def check_request(r, method: str | None, flops, speedup, calibrate: bool, current_method: str = "tome"):
    """Validated ``(r, method)`` of an ``apply_tome`` call on any ViT host: ``r`` (default 16) or a
    budget, not both; ``calibrate`` only with ``speedup``; ``method`` kept from a previous patch
    (``current_method``) when not given."""
    if (flops is not None or speedup is not None) and r is not None:
        raise ValueError("give r or a budget (flops= / speedup=), not both")
    if calibrate and speedup is None:
        raise ValueError("calibrate=True measures a speedup: use it with speedup=")
    r = 16 if r is None else r
    check_r(r)
    method = current_method if method is None else method
    methods.check_method(method)
    return r, method


def solve_budget_for(run: Callable[[Any, torch.Tensor], object], example: torch.Tensor, num_layers: int,
                     num_tokens: int, flops: float | None = None, speedup: float | None = None,
                     calibrate: bool = False, batch: int = 32, cache: dict | None = None,
                     method: str = "tome") -> BudgetResult:
    """The budget solve of every adapter. ``run(schedule, x)`` runs the patched model (or its vision
    tower) on ``x`` with that schedule; ``example``: one input ``(1, ...)`` on the model's device;
    ``num_tokens``: tokens entering the first block (r is at most half of them). FLOPs are counted on
    ``example`` (steady state, see ``visiontools.timing.count_flops``); with ``calibrate`` a batch of
    ``batch`` random inputs is timed against schedule 0, interleaved. ``cache``: a dict kept with the
    model, so that counts of a schedule (per input shape and ``method``) are made once per model."""
    from visiontools.timing import count_flops, interleaved_times, median

    cache = {} if cache is None else cache
    key = (tuple(example.shape), str(example.dtype), method)

    def counted(rs, warmup: bool) -> int:
        k = (*key, tuple(rs) if isinstance(rs, list) else rs)
        if k not in cache:
            cache[k] = count_flops(lambda: run(rs, example), warmup=warmup)
        return cache[k]

    def fraction_of(rs: list[int]) -> float:
        return counted(rs, warmup=False) / base

    base = counted(0, warmup=True)  # warms caches (Hyena's filters) once for all counts
    measure = None
    if calibrate:
        xb = torch.randn(batch, *example.shape[1:], device=example.device, dtype=example.dtype)

        def measure(rs):
            times = interleaved_times({"base": lambda: run(0, xb), "reduced": lambda: run(rs, xb)}, repeats=5,
                                      warmup=1, device=example.device)
            return median(times["base"]) / median(times["reduced"])
    quiet = _QUIET_CAPS.set(True)  # the solve tries schedules that later blocks cannot apply in full
    try:
        result = solve_budget(fraction_of, num_layers, num_tokens // 2, flops, speedup, measure)
    finally:
        _QUIET_CAPS.reset(quiet)
    n = num_tokens
    for i, r in enumerate(result.schedule):  # the schedule as applied (same FLOPs), so it never warns
        result.schedule[i] = min(r, n // 2)
        n -= result.schedule[i]
    return result
