"""Token merging through grid operations: run a 2D operation (a depthwise convolution, Hyena's short
and long convolutions) on tokens that ToMe has merged.

A merged token stands for a group of patches (its source map says which). Before the operation each
token is spread back over its patches (:func:`unmerge_to_grid`), the operation runs on the full
H x W grid, and the result is reduced back into the same groups by their mean
(:func:`reduce_to_groups`; every patch weighs 1, so this is the size-weighted mean of the group).
Attention, projections and MLPs stay on the merged tokens, where the cost is.

Library-agnostic tensor code; the ToMe adapters (``visiontools.patches.timm_grid``) call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["unmerge_to_grid", "reduce_to_groups", "through_grid", "GridLayout"]


def _check_source(source: torch.Tensor, H: int, W: int) -> None:
    if source.dim() != 2 or source.shape[1] != H * W:
        raise ValueError(f"grid source map must be (B, H*W) = (B, {H * W}), got {tuple(source.shape)}")


def unmerge_to_grid(tokens: torch.Tensor, source: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Spread merged grid tokens ``tokens`` (B, M, C) over the H x W grid: ``source`` (B, H*W) gives
    for every patch the index (0..M-1) of the token holding it. Returns (B, H, W, C)."""
    _check_source(source, H, W)
    B, M, C = tokens.shape
    return tokens.gather(1, source[..., None].expand(-1, -1, C)).reshape(B, H, W, C)


def reduce_to_groups(grid: torch.Tensor, source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Mean of ``grid`` (B, H, W, C) over the patches of each group: (B, num_tokens, C). Groups that
    hold no patch (impossible for a source map of the same merge) would come out as zeros."""
    B, H, W, C = grid.shape
    _check_source(source, H, W)
    flat = grid.reshape(B, H * W, C)
    out = flat.new_zeros(B, num_tokens, C)
    return out.scatter_reduce(1, source[..., None].expand(-1, -1, C), flat, reduce="mean", include_self=False)


def through_grid(op: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, source: torch.Tensor,
                 H: int, W: int) -> torch.Tensor:
    """``op`` ((B, H, W, C) -> (B, H, W, C')) applied to merged grid tokens (B, M, C): unmerge with
    ``source`` (B, H*W), run ``op``, reduce back to the M groups by their mean. Returns (B, M, C')."""
    return reduce_to_groups(op(unmerge_to_grid(tokens, source, H, W)), source, tokens.shape[1])


@dataclass(frozen=True)
class GridLayout:
    """How the current tokens sit on an H x W patch grid: ``prefix`` prefix tokens first, then either
    the H*W grid tokens in row-major order (``source is None``) or merged tokens, with ``source``
    ``(B, prefix + H*W)`` giving for every prefix token and patch the index of the current token
    that holds it (ToMe's source map), and ``size`` ``(B, M, 1)`` the patches per token."""

    prefix: int
    H: int
    W: int
    source: Optional[torch.Tensor] = None
    size: Optional[torch.Tensor] = None

    @property
    def merged(self) -> bool:
        return self.source is not None

    def run(self, op: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Apply ``op`` ((B, H, W, C) -> (B, H, W, C')) to the grid tokens ``tokens`` (B, n, C) (the
        sequence without its prefix): directly when unmerged; when merged, spread each token over the
        patches it holds, run ``op`` on the full grid and average the result over each group."""
        B, n, C = tokens.shape
        if self.source is None:
            if n != self.H * self.W:
                raise ValueError(f"{n} grid tokens do not fill the {self.H}x{self.W} grid")
            return op(tokens.reshape(B, self.H, self.W, C)).reshape(B, n, -1)
        return through_grid(op, tokens, self.source[:, self.prefix:] - self.prefix, self.H, self.W)
