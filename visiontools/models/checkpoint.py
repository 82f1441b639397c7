"""Crash-safe safetensors checkpoints: atomic writes, and the training state (model, AdamW state,
step/epoch, log history) packed as tensors plus JSON metadata in one file.

A file is written to a temporary name in the target folder, flushed and fsync'ed, then moved over
the target with ``os.replace`` (atomic on POSIX) and the folder is fsync'ed: a kill at any moment
leaves either the old complete file or the new complete file, never a partial one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

META_KEY = "visiontools"  # JSON description of the model (see visiontools.models.model_description)
TRAIN_KEY = "train_state"  # JSON training state (epoch, step, optimizer param groups, config, history)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:  # mkstemp creates 0600; keep the old file's mode, else the usual umask-based one
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    """Serialise ``tensors`` (+ string ``metadata``) as safetensors and write the file atomically."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def pack_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        description: dict[str, Any], state: dict[str, Any],
                        scaler: torch.amp.GradScaler | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a resumable training checkpoint: ``model.*`` weights, ``optim.<i>.<key>``
    AdamW state, the model description and the JSON training ``state`` (epoch, step, history...)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    state = dict(state)
    if optimizer is not None:
        sd = optimizer.state_dict()
        for i, s in sd["state"].items():
            for k, v in s.items():
                tensors[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        state["optimizer_param_groups"] = sd["param_groups"]
    if scaler is not None and scaler.is_enabled():
        state["grad_scaler"] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
    meta = {META_KEY: json.dumps(description), TRAIN_KEY: json.dumps(state)}
    return tensors, meta


def unpack_optimizer_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, Any]:
    """Rebuild ``optimizer.state_dict()`` from a checkpoint written by ``pack_training_state``."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            per_param.setdefault(int(i), {})[key] = v
    if "optimizer_param_groups" not in state:
        raise ValueError("checkpoint holds no optimizer state (was it exported for inference only?)")
    return {"state": per_param, "param_groups": state["optimizer_param_groups"]}


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a .safetensors file written by "
                                "`visiontools train`, or a shipped name from visiontools.models.SHIPPED)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    return tensors, meta


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, model description, training state) of a resumable checkpoint."""
    tensors, meta = read_checkpoint(path)
    if TRAIN_KEY not in meta or META_KEY not in meta:
        raise ValueError(f"{path} is not a resumable visiontools training checkpoint "
                         f"(missing '{TRAIN_KEY}'/'{META_KEY}' metadata)")
    return tensors, json.loads(meta[META_KEY]), json.loads(meta[TRAIN_KEY])


def export_for_inference(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype = torch.float16,
                         extra: dict[str, Any] | None = None) -> None:
    """Write the weights of a training checkpoint alone (as ``dtype``; its EMA weights when it has
    them) with its model description (and ``extra`` entries merged into it) to ``dst``, atomically."""
    tensors, desc, _ = load_training_state(src)
    prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."  # EMA weights when trained with them
    weights = {"model." + k[len(prefix):]: (v.to(dtype) if v.is_floating_point() else v)
               for k, v in tensors.items() if k.startswith(prefix)}
    desc = {**desc, **(extra or {})}
    save_safetensors_atomic(dst, weights, {META_KEY: json.dumps(desc)})
