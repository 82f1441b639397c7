"""Peak memory of one call on CPU, without the profiler: a ``TorchDispatchMode`` that counts the bytes
of every tensor storage that an operator creates, and subtracts them when the storage is freed.

``torch.profiler`` (``profile_memory=True``) measures the same thing but starts Kineto, which prints
``gpuGetDeviceCount failed`` / ``USDT`` lines on machines without a GPU and refuses to run outside the
thread that first used it (the demo's worker threads). Like the profiler's per-operator sums, this
sees the tensors that operators return, not scratch an operator frees before it returns, nor memory
that MKL/oneDNN allocate outside PyTorch.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveStorageBytes(TorchDispatchMode):
    """Running total and peak of the bytes held by storages created inside the mode."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._live:  # a view, an in-place result, or seen
                continue
            self._live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_bytes(fn: Callable[[], object], autograd: bool = False) -> int:
    """Peak bytes of tensor storage allocated by one call of ``fn`` above the level before it; the
    result of ``fn`` is dropped before returning. ``fn`` runs under ``torch.inference_mode`` unless
    ``autograd`` (a training step: saved activations and the backward pass's tensors are counted)."""
    mode = _LiveStorageBytes()
    with torch.inference_mode(not autograd), torch.set_grad_enabled(autograd), mode:
        fn()
    return int(mode.peak)


def peak_memory(fn: Callable[[], object], device: torch.device, autograd: bool = False) -> int:
    """Peak bytes allocated by one call of ``fn`` on ``device`` above the level before it: CUDA's
    allocator statistics on a GPU, :func:`peak_bytes` elsewhere. ``autograd`` as in :func:`peak_bytes`.

    (``torch.profiler``'s CPU memory events miss allocations made inside custom autograd Functions'
    backward: for a reversible ViT's training step they reported a quarter of the true peak.)"""
    if device.type != "cuda":
        return peak_bytes(fn, autograd)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode(not autograd), torch.set_grad_enabled(autograd):
        fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)
