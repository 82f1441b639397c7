"""Counting what one token-reduction step costs in eager mode: aten operations and bytes moved.

:class:`OpCounter` is a ``TorchDispatchMode`` that records every aten operation a piece of code
dispatches. In eager mode each one is a separate call into PyTorch (and on a GPU, each non-view one a
kernel launch), so at small batch the count is what the step costs. :func:`reduction_step_ops` counts
one ToMe reduction step of :class:`visiontools.tome.engine.TokenState` (``reduce`` plus the
proportional-attention mask the next block asks for) on random tensors of a given shape.

Counts are taken under ``torch.inference_mode`` (as every benchmark runs) on the CPU.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that only make a new view (no data moves, no kernel)
VIEW_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze",
    "aten.expand", "aten.transpose", "aten.permute", "aten.t", "aten.alias", "aten.as_strided",
    "aten.unbind", "aten.split", "aten.chunk", "aten.narrow", "aten.detach", "aten.lift_fresh",
    "aten.reshape", "aten.flatten", "aten.unflatten", "aten.diagonal", "aten.split_with_sizes",
})
# ops that read only the indexed part of their first (source) argument
_INDEXED_READS = frozenset({"aten.gather", "aten.index_select", "aten.index", "aten.take_along_dim"})
# in-place ops that write only the indexed rows of their first argument
_INDEXED_WRITES = frozenset({"aten.index_add_", "aten.scatter_add_", "aten.scatter_", "aten.index_put_",
                             "aten.index_copy_", "aten.scatter_reduce_"})


def _nbytes(t) -> int:
    """Bytes a tensor spans, counting a broadcast (stride-0) dimension once."""
    if not isinstance(t, torch.Tensor):
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else 1
    return n * t.element_size()


def _tensors(xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from _tensors(x)


@dataclass
class OpCount:
    """What :class:`OpCounter` saw: ``by_op`` (aten op -> calls), ``ops`` (all of them), ``kernels``
    (the non-view ones, :data:`VIEW_OPS` excluded) and ``bytes`` (bytes read and written by the
    kernels: their tensor arguments and results; a gather reads the rows it takes, not its whole source)."""

    by_op: Counter = field(default_factory=Counter)
    bytes: int = 0

    @property
    def ops(self) -> int:
        return sum(self.by_op.values())

    @property
    def kernels(self) -> int:
        return sum(n for k, n in self.by_op.items() if k not in VIEW_OPS)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` counts the aten operations dispatched inside into ``c.count``."""

    def __init__(self):
        super().__init__()
        self.count = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.count.by_op[name] += 1
        if name not in VIEW_OPS:
            ins = list(_tensors(args)) + list(_tensors((kwargs or {}).values()))
            if name in _INDEXED_WRITES and ins:  # reads the index and the new rows, writes those rows
                self.count.bytes += sum(_nbytes(t) for t in ins[1:]) + _nbytes(ins[-1])
                return out
            if name in _INDEXED_READS and ins:
                ins = ins[1:]  # the source: read as many bytes as the result has (below)
                self.count.bytes += sum(_nbytes(t) for t in _tensors([out]))
            self.count.bytes += sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in _tensors([out]))
        return out


def count_ops(fn) -> OpCount:
    """The aten operations and bytes of one call of ``fn`` (under ``torch.inference_mode``)."""
    with torch.inference_mode(), OpCounter() as counter:
        fn()
    return counter.count


def reduction_step_ops(batch: int = 8, tokens: int = 197, width: int = 768, r: int = 16, prefix: int = 1,
                       metric_width: int = 64, steady: bool = True, prop_attn: bool = True) -> OpCount:
    """The operations of one ToMe reduction step (``TokenState.reduce`` and the next block's
    ``bias()``) on random tokens ``(batch, tokens, width)`` with ``prefix`` protected tokens.
    ``steady``: a step after the first (the tokens carry sizes); else the first step (all sizes 1)."""
    from visiontools.tome.engine import TokenState

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, width, generator=g)
    metric = torch.randn(batch, tokens, metric_width, generator=g)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=g).float() if steady else None

    def step():
        state = TokenState(schedule=[r], num_prefix_tokens=prefix, prop_attn=prop_attn, size=size)
        state.reduce(x, metric)
        state.bias()
    with torch.inference_mode():
        step()  # uncounted: constant index tables are made once per shape
    return count_ops(step)
