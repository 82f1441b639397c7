"""torch.distributed helpers shared by training and evaluation (both run under ``torchrun``):
process-group set-up, exact metric sums over processes and barriers (the autocast dtype comes from
``visiontools.timing.resolve_dtype``)."""
from __future__ import annotations

import os

import torch


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises torch.distributed when launched by torchrun, where
    each CUDA process takes GPU ``LOCAL_RANK``. Gloo carries CPU tensors (the metric sums of
    :func:`all_reduce_sum`), NCCL the CUDA ones (DDP's gradients)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(values: list[float], world: int) -> list[float]:
    """Sum a list of numbers over all processes (identity when not distributed)."""
    if world <= 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: int) -> None:
    """Wait for every process (nothing to do when not distributed)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def destroy_if_distributed() -> None:
    """Tear down the process group at the end of a ``torchrun`` command."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()

