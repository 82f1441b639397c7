"""Reversible residual blocks (RevNet coupling, as in Reformer and Rev-ViT, Mangalam et al., CVPR 2022):
training memory for activations that does not grow with depth.

Two streams of the token width: ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``, with ``F`` the attention
sub-block (any token mixer: attention, Hyena, LSH) and ``G`` the MLP sub-block. The inputs of a
block can be rebuilt from its outputs, ``X2 = Y2 - G(Y1)``, ``X1 = Y1 - F(X2)``, so the custom autograd
:class:`_ReversibleFunction` keeps only the last block's outputs and, in backward, walks the blocks
in reverse, rebuilding each block's inputs and re-running F and G under autograd for one block at a
time (activation memory: one block's, not ``depth`` blocks').

Randomness (dropout, drop-path, LSH rotations in training) is replayed: the RNG state (CPU, and the
CUDA device's when the input is on CUDA) is recorded before every F and G call in the forward and
restored for the recompute, so the backward differentiates exactly the function the forward ran.

This module imports no timm; :class:`ReversibleSequence` takes ``(F, G)`` module pairs (built from
timm ``Block`` s in :mod:`visiontools.models`). ``reversible=False`` runs the same coupling under
plain autograd (the reference the tests compare gradients against).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["RevCoupling", "ReversibleSequence"]


class RevCoupling(nn.Module):
    """One reversible block: ``f`` (token mixing sub-block) and ``g`` (MLP sub-block), each (B, N, C) -> (B, N, C)."""

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f = f
        self.g = g

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1 = x1 + self.f(x2)
        return y1, x2 + self.g(y1)


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _replay:
    """Context: run with an RNG state recorded by :func:`_rng_state`, and restore the current one after."""

    def __init__(self, state, device: torch.device):
        self.state, self.device = state, device

    def __enter__(self):
        self.saved = _rng_state(self.device)
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)


class _ReversibleFunction(torch.autograd.Function):
    """Forward through all couplings without storing activations; backward rebuilds them block by block."""

    @staticmethod
    def forward(ctx, x1, x2, blocks, params_per_block, *params):
        ctx.blocks = blocks
        ctx.params_per_block = params_per_block
        ctx.states = []
        dev = x1.device
        with torch.no_grad():
            for blk in blocks:
                sf = _rng_state(dev)
                x1 = x1 + blk.f(x2)
                sg = _rng_state(dev)
                x2 = x2 + blk.g(x1)
                ctx.states.append((sf, sg))
        ctx.save_for_backward(x1, x2)
        ctx.autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        dev = y1.device
        grads: list = []
        with torch.autocast(dev.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            for blk, params, (sf, sg) in zip(reversed(ctx.blocks), reversed(ctx.params_per_block),
                                             reversed(ctx.states)):
                n_g = len(params[1])
                with torch.enable_grad():  # G: rebuild x2 = y2 - G(y1), grads of G and of y1
                    y1 = y1.detach().requires_grad_(True)
                    with _replay(sg, dev):
                        gy = blk.g(y1)
                    dg = torch.autograd.grad(gy, [y1, *params[1]], dy2, allow_unused=True)
                with torch.no_grad():
                    x2 = y2 - gy
                    dy1 = dy1 + dg[0]
                del gy
                with torch.enable_grad():  # F: rebuild x1 = y1 - F(x2), grads of F and of x2
                    x2 = x2.detach().requires_grad_(True)
                    with _replay(sf, dev):
                        fx = blk.f(x2)
                    df = torch.autograd.grad(fx, [x2, *params[0]], dy1, allow_unused=True)
                with torch.no_grad():
                    x1 = y1 - fx
                    dy2 = dy2 + df[0]
                del fx
                grads.append(list(df[1:]) + list(dg[1:1 + n_g]))
                y1, y2 = x1, x2
        flat = [g for block_grads in reversed(grads) for g in block_grads]
        return (dy1, dy2, None, None, *flat)


class ReversibleSequence(nn.Module):
    """A stack of :class:`RevCoupling` s on (B, N, C) tokens: the input is copied into both streams and
    the output is their mean. ``reversible=True`` (default) uses the memory-saving backward;
    ``False`` plain autograd (same function, same RNG use)."""

    def __init__(self, blocks: Sequence[RevCoupling], reversible: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible

    def __len__(self) -> int:
        return len(self.blocks)

    def forward_streams(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two output streams for two input streams."""
        if not (self.reversible and torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or any(
                p.requires_grad for p in self.parameters()))):
            for blk in self.blocks:
                x1, x2 = blk(x1, x2)
            return x1, x2
        per_block = tuple(([p for p in b.f.parameters() if p.requires_grad],
                           [p for p in b.g.parameters() if p.requires_grad]) for b in self.blocks)
        flat = [p for f, g in per_block for p in (*f, *g)]
        return _ReversibleFunction.apply(x1, x2, tuple(self.blocks), per_block, *flat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1, y2 = self.forward_streams(x, x)
        return (y1 + y2) / 2
