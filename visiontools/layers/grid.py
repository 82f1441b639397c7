"""Where a ViT's tokens sit on the 2D patch grid: the per-call grid, and the layout of (possibly
merged) tokens that a grid operation (a depthwise convolution, Hyena's FFT convolutions) needs.

- The per-call grid: an adapter that knows the grid of the input now running through a model (e.g.
  a hook on a timm ``patch_embed``) declares it with :func:`set_call_grid`, keyed by a
  :class:`GridKey` the model's grid layers hold. It lives in a ``ContextVar``, so concurrent calls
  with different image sizes never see each other's grid.
- :class:`GridTokens`: the mixin of every layer that needs the grid (``HyenaAttention``, the
  Conformer block, the ConvFFN). It resolves ``(prefix tokens, (H, W))`` for a sequence length.
- :class:`~visiontools.tome.merge_grid.GridLayout` (defined with the merging algorithms, re-exported
  here): prefix count, grid and, once tokens were merged, the source map; its ``run`` applies a grid
  operation to the grid tokens, merged or not.
"""
from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Optional, Sequence

from visiontools.tome.merge_grid import GridLayout  # noqa: F401 (re-exported: layers take it)

__all__ = ["GridKey", "set_call_grid", "square_grid", "GridTokens", "GridLayout"]

# (owner key, (H, W)) of the input now running through a model, per thread/async task.
_CALL_GRID: ContextVar[Optional[tuple[object, tuple[int, int]]]] = ContextVar("visiontools_call_grid", default=None)


class GridKey:
    """Identity that pairs a model's grid source with its grid layers. An object held by both, not
    an ``id()``, so a ``copy.deepcopy`` of the model gets its own key, still shared by both sides."""


def set_call_grid(owner: GridKey, grid: Sequence[int]) -> None:
    """Declare the (H, W) patch grid of the current call for the grid layers whose ``grid_owner`` is ``owner``."""
    _CALL_GRID.set((owner, (int(grid[0]), int(grid[1]))))


def square_grid(n: int) -> Optional[tuple[int, int]]:
    """``(s, s)`` when ``n = s * s > 0``, else None."""
    s = math.isqrt(n) if n > 0 else 0
    return (s, s) if s * s == n and n > 0 else None


class GridTokens:
    """Mixin for layers whose tokens are ``num_prefix_tokens`` prefix tokens followed by a row-major
    grid. The grid is the per-call grid declared for ``grid_owner`` (:func:`set_call_grid`), else
    ``grid_size`` when it matches the token count, else a square. With ``num_prefix_tokens=None``
    the prefix count is the smallest P that leaves a square grid."""

    num_prefix_tokens: Optional[int] = None
    grid_size: Optional[tuple[int, int]] = None
    grid_owner: Optional[GridKey] = None

    def resolve_grid(self, n: int) -> tuple[int, tuple[int, int]]:
        """(number of prefix tokens, (H, W)) for a sequence of ``n`` tokens, or a ValueError."""
        p = self.num_prefix_tokens
        if p is None:
            for q in range(n):
                if square_grid(n - q) is not None:
                    return q, square_grid(n - q)
            raise ValueError(f"cannot infer a square token grid from {n} tokens")
        if n <= p:
            raise ValueError(f"sequence of {n} tokens has no grid after {p} prefix tokens")
        call = _CALL_GRID.get()
        g = call[1] if call is not None and call[0] is self.grid_owner else self.grid_size
        if g is not None and g[0] * g[1] == n - p:
            return p, (int(g[0]), int(g[1]))
        sq = square_grid(n - p)
        if sq is None:
            raise ValueError(
                f"{n - p} grid tokens ({n} tokens minus {p} prefix tokens) do not form a square grid "
                f"and grid_size={g} does not match; set {type(self).__name__}.grid_size to (H, W)")
        return p, sq

    def layout(self, n: int) -> "GridLayout":
        """The :class:`GridLayout` of an unmerged sequence of ``n`` tokens."""
        p, (H, W) = self.resolve_grid(n)
        return GridLayout(p, H, W)
