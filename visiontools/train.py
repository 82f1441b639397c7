"""Train any registered timm model on CIFAR-10/100 from a YAML config: ``visiontools train --config
configs/vit_cifar10_cpu.yaml [--set epochs=2 ...] [--resume]``; runs under ``torchrun`` too (DDP).

Config format (YAML; every key is optional and defaults to the value below; ``--set key=value``
overrides any key on the command line, values parsed as YAML, dotted keys reach nested entries)::

    model: vit_cifar_mini_p4      # any registered timm model name (visiontools.models, the project's
                                  # one registry, registers its own models on import)
    model_kwargs: {}              # extra keyword arguments for timm.create_model (e.g. drop_path_rate: 0.1)
    dataset: cifar10              # cifar10 | cifar100 (num_classes is set from it)
    data_dir: ../shared/datasets/cifar10  # ImageFolder root with train/ and test/, or torchvision's files;
                                  # null = ~/.cache/visiontools/data (torchvision)
    download: false               # let torchvision download CIFAR (needs a network)
    train_per_class: null         # keep only the first N training images of every class (tests, quick runs)
    test_per_class: null          # same for the test set
    epochs: 10
    batch_size: 128               # global batch size, split evenly over the torchrun processes
    lr: 1.0e-3                    # peak AdamW learning rate
    min_lr: 1.0e-5                # end of the cosine schedule
    warmup_epochs: 1.0            # linear warm-up from 0 (fractions allowed), then cosine decay per step
    weight_decay: 0.05            # AdamW weight decay (not applied to biases, norms, pos_embed, cls_token)
    betas: [0.9, 0.999]
    label_smoothing: 0.1
    grad_clip: 1.0                # max gradient norm; null = no clipping
    crop_padding: 4               # random crop with this zero padding; 0 = off
    hflip: true                   # random horizontal flip
    randaugment: null             # e.g. [2, 9] = RandAugment(num_ops=2, magnitude=9); null = off
    mixup_alpha: 0.0              # > 0 enables mixup with Beta(alpha, alpha)
    grad_checkpointing: false     # activation checkpointing of the blocks (timm's set_grad_checkpointing):
                                  # less memory, one more forward per block in backward
    ema_decay: null               # e.g. 0.999: keep an exponential moving average of the weights (decay
                                  # warmed up as min(d, (1+step)/(10+step))); it is evaluated, saved and exported
    amp: auto                     # auto (bf16/fp16 on CUDA; on a CPU bf16 only with bf16 hardware, AVX512-BF16/
                                  # AMX, else off) | bf16 (warns on a CPU without it: ~10x slower) | fp16 | off
    seed: 0
    threads: null                 # torch.set_num_threads per process; null = torch's default
    eval_every: 1                 # evaluate on the test set every N epochs (and after the last)
    out_dir: runs/vit_cifar10     # last.safetensors (resumable checkpoint) and log.jsonl go here
    export: null                  # after training, also write the weights alone (fp16) to this path
    init_from: null               # start from these weights: a shipped checkpoint name (e.g. cifar10_cct) or a
                                  # .safetensors file of the same architecture (fine-tuning); ignored by --resume
    tome: null                    # train with token merging, e.g. {r: 12} or {r: "10,-0.5", method: tome,
                                  # prop_attn: true} (any r of the r grammar: 12, "12,-0.5", [8,8,4]) or a budget
                                  # {flops: 0.5} / {speedup: 2.0}, solved once at the training resolution;
                                  # `--set tome.r=12` or `--set tome=12`. null = no merging

Outputs in ``out_dir``: ``last.safetensors`` (written atomically after every epoch: weights, AdamW
state, epoch/step and log history), ``log.jsonl`` (one JSON object per epoch: loss, train/test
accuracy, lr, seconds, milliseconds per step), ``curve.png`` (accuracy, loss and learning rate against
epochs, redrawn after every epoch), ``results.md`` (the same per epoch as a table) and ``config.yaml``
(the resolved config).

Training with token merging (``tome:``): the model is patched with :func:`visiontools.apply_tome`
after it is built (and loaded from ``init_from``), before the optimizer, the EMA copy and DDP wrap
it, so every forward and backward pass of training merges tokens. Each evaluation measures the
(EMA) weights twice on the same batches: unpatched (``test_top1``; r=0, which is exact) and at the
training setting (``test_top1_tome``). The checkpoint's description records the setting as
``tome`` (``{"r": "12", "method": "tome", "prop_attn": true}``, r in the r grammar), so the export
and its card carry it and :func:`visiontools.models.load` applies it when it loads the model.

Resuming (``--resume``) restarts after the last completed epoch and gives the same result as an
uninterrupted run: the learning rate is a function of the step, the optimizer state is restored,
and all randomness (data order, augmentation, dropout) is re-seeded from (seed, epoch, rank).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from visiontools.data import DEFAULT_DATA_DIR
from visiontools.distributed import all_reduce_sum, barrier, destroy_if_distributed, init_distributed
from visiontools.errors import UserError, did_you_mean

DEFAULTS: dict[str, Any] = {
    "model": "vit_cifar_mini_p4",
    "model_kwargs": {},
    "dataset": "cifar10",
    "data_dir": DEFAULT_DATA_DIR,
    "download": False,
    "train_per_class": None,
    "test_per_class": None,
    "epochs": 10,
    "batch_size": 128,
    "lr": 1.0e-3,
    "min_lr": 1.0e-5,
    "warmup_epochs": 1.0,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "label_smoothing": 0.1,
    "grad_clip": 1.0,
    "crop_padding": 4,
    "hflip": True,
    "randaugment": None,
    "mixup_alpha": 0.0,
    "ema_decay": None,
    "grad_checkpointing": False,
    "amp": "auto",
    "seed": 0,
    "threads": None,
    "eval_every": 1,
    "out_dir": "runs/vit_cifar10",
    "export": None,
    "init_from": None,
    "tome": None,
}

# Flags that are shortcuts for --set key=value.
FLAG_KEYS = {"epochs": int, "batch_size": int, "lr": float, "data_dir": str, "out_dir": str, "model": str,
             "dataset": str, "seed": int, "threads": int, "amp": str, "export": str}


# ----------------------------------------------------------------------------- config

def _parse_value(text: str):
    import yaml
    return yaml.safe_load(text)


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (YAML values; ``a.b=1`` sets ``cfg['a']['b']``) to a copy of ``cfg``."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in DEFAULTS:
            raise UserError(f"unknown config key {parts[0]!r} in --set {item!r}{did_you_mean(parts[0], DEFAULTS)}; "
                            f"known keys: {', '.join(DEFAULTS)}")
        d = cfg
        for p in parts[:-1]:
            if d.get(p) is None:  # a section that is off (tome: null) is switched on by its first key
                d[p] = {}
            d = d[p]
            if not isinstance(d, dict):
                raise ValueError(f"--set {item!r}: {p!r} is not a mapping")
        d[parts[-1]] = _parse_value(value)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """DEFAULTS, updated from the YAML file at ``path`` and then from ``overrides``; unknown keys are errors."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist (see configs/ for examples)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config keys, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            hints = "".join(did_you_mean(k, DEFAULTS) for k in unknown)
            raise UserError(f"{path}: unknown config key(s) {unknown}{hints}; known keys: {', '.join(DEFAULTS)}")
        cfg.update(loaded)
    cfg = apply_overrides(cfg, list(overrides))
    if cfg["dataset"] not in ("cifar10", "cifar100"):
        raise ValueError(f"dataset must be cifar10 or cifar100, got {cfg['dataset']!r}")
    if cfg["amp"] is False or cfg["amp"] is None:  # YAML reads a bare `off` as false
        cfg["amp"] = "off"
    if cfg["amp"] not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp must be auto, bf16, fp16 or off, got {cfg['amp']!r}")
    if isinstance(cfg["epochs"], bool) or not isinstance(cfg["epochs"], int) or cfg["epochs"] < 1:
        raise UserError(f"epochs must be an integer >= 1, got {cfg['epochs']!r} (a run of 0 epochs writes no checkpoint)")
    if isinstance(cfg["batch_size"], bool) or not isinstance(cfg["batch_size"], int) or cfg["batch_size"] < 1:
        raise UserError(f"batch_size must be an integer >= 1, got {cfg['batch_size']!r}")
    if not isinstance(cfg["model_kwargs"], dict):
        raise ValueError(f"model_kwargs must be a mapping, got {cfg['model_kwargs']!r}")
    cfg["tome"] = check_tome_config(cfg["tome"])
    if cfg["init_from"] is not None:
        from visiontools.models.shipped import SHIPPED
        if str(cfg["init_from"]) not in SHIPPED and not Path(str(cfg["init_from"])).is_file():
            raise UserError(f"init_from: {cfg['init_from']!r} is neither a shipped checkpoint ({', '.join(SHIPPED)}) "
                            "nor an existing .safetensors file")
    return cfg


TOME_KEYS = ("r", "method", "prop_attn", "flops", "speedup")


def check_tome_config(tome) -> dict | None:
    """The ``tome:`` section normalised to ``{"r": text, "method": ..., "prop_attn": ...}`` (r written
    in the r grammar, :func:`visiontools.tome.r_text.r_to_text`) or ``{"flops"|"speedup": x, ...}``;
    ``None`` when off (null, an empty mapping, or r 0). A bare value (``tome: 12``) is its r. One-line
    ``UserError`` for anything else, before any data is read."""
    from visiontools.tome.methods import METHODS
    from visiontools.tome.r_text import parse_r_text, r_to_text

    if tome is None or tome == {}:
        return None
    if not isinstance(tome, dict):
        tome = {"r": tome}
    unknown = sorted(set(tome) - set(TOME_KEYS))
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in the tome: section{did_you_mean(unknown[0], TOME_KEYS)}; "
                        f"known keys: {', '.join(TOME_KEYS)}")
    budgets = [k for k in ("flops", "speedup") if tome.get(k) is not None]
    if len(budgets) + ("r" in tome) != 1:
        raise UserError("the tome: section needs exactly one of r (e.g. tome.r=12), flops (e.g. tome.flops=0.5) "
                        f"or speedup (e.g. tome.speedup=2.0), got {tome}")
    out = {"method": tome.get("method", "tome"), "prop_attn": tome.get("prop_attn", True)}
    if out["method"] not in METHODS:
        raise UserError(f"tome.method {out['method']!r} is not a method{did_you_mean(str(out['method']), METHODS)}; "
                        f"choose one of {', '.join(METHODS)}")
    if not isinstance(out["prop_attn"], bool):
        raise UserError(f"tome.prop_attn must be true or false, got {out['prop_attn']!r}")
    if budgets:
        value = tome[budgets[0]]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"tome.{budgets[0]} must be a positive number, got {value!r}")
        return {budgets[0]: float(value), **out}
    r = tome["r"]
    try:
        r = parse_r_text("[" + ",".join(map(str, r)) + "]" if isinstance(r, list) else str(r))
    except ValueError as e:
        raise UserError(f"tome.r: {e}") from None
    if not any([r] if isinstance(r, int) else r[:1] if isinstance(r, tuple) else r):
        return None  # r 0 merges nothing: the same as no tome: section
    return {"r": r_to_text(r), **out}


# ----------------------------------------------------------------------------- schedule / optimizer

def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def training_dtype(amp: str, dev: torch.device) -> torch.dtype:
    """The autocast dtype of the ``amp`` setting on ``dev``: ``auto`` is bf16 on a CPU only where it has
    bf16 hardware (:func:`visiontools.timing.cpu_has_bf16`) and float32 elsewhere on CPUs; an explicit
    ``bf16`` on a CPU without it is kept, with a warning that it runs several times slower."""
    from visiontools.timing import cpu_has_bf16, resolve_dtype

    if dev.type == "cpu" and amp in ("auto", "bf16"):
        if cpu_has_bf16():
            return torch.bfloat16
        if amp == "bf16":
            print("warning: amp=bf16 on a CPU without bf16 hardware (no AVX512-BF16/AMX): autocast is emulated "
                  "and runs about 10x slower than fp32 here; pass --amp auto or --amp off",
                  file=sys.stderr, flush=True)
            return torch.bfloat16
        return torch.float32
    return resolve_dtype(amp, dev)


def build_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.AdamW:
    """AdamW; no weight decay on 1-d parameters (biases, norms) nor on position embeddings/tokens."""
    decay, no_decay = [], []
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))


class WeightEMA:
    """Exponential moving average of a model's weights (parameters and floating-point buffers such
    as BatchNorm statistics; integer buffers are copied), with timm's warm-up of the decay,
    ``min(decay, (1 + step) / (10 + step))``, so that a short run is not dominated by its random init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(m, 1.0 - d)
            else:
                e.copy_(m)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**63 - 1)


# ----------------------------------------------------------------------------- training

def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@dataclass
class TrainRun:
    """Everything one training run works with: built by :func:`build_run`, restored or started by
    :func:`resume_run` / :func:`start_run`, advanced one epoch at a time by :func:`train_epoch`."""

    cfg: dict
    rank: int
    world: int
    dev: torch.device
    show: bool                      # progress bars and prints (rank 0 only)
    out_dir: Path
    last: Path                      # the resumable checkpoint, out_dir/last.safetensors
    log_path: Path                  # out_dir/log.jsonl
    train_ds: Any
    test_ds: Any
    mean: tuple
    std: tuple
    num_classes: int
    model: torch.nn.Module
    desc: dict                      # the checkpoint's model description
    optimizer: torch.optim.Optimizer
    ema: WeightEMA | None
    adt: torch.dtype                # autocast dtype (float32: none)
    scaler: Any                     # torch.amp.GradScaler, enabled for fp16
    steps_per_epoch: int
    train_model: torch.nn.Module = None  # the model, or its DDP wrapper under torchrun
    step: int = 0
    start_epoch: int = 0
    history: list = field(default_factory=list)

    @property
    def local_bs(self) -> int:
        return self.cfg["batch_size"] // self.world

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg["epochs"]

    @property
    def warmup_steps(self) -> int:
        return int(round(self.cfg["warmup_epochs"] * self.steps_per_epoch))


def output_paths(cfg: dict, resume: bool, overwrite: bool) -> tuple[Path, Path, Path]:
    """``(out_dir, last.safetensors, log.jsonl)``, refusing to overwrite a run unless asked to and to
    resume a run that is not there."""
    out_dir = Path(cfg["out_dir"])
    last = out_dir / "last.safetensors"
    if last.exists() and not resume and not overwrite:
        raise FileExistsError(f"{last} already exists: pass --resume to continue that run, --overwrite to "
                              f"start again (the old checkpoint is kept as {last.name}.bak), or another --out-dir")
    if resume and not last.exists():
        raise FileNotFoundError(f"--resume: no checkpoint {last} to resume from (check --out-dir / out_dir)")
    return out_dir, last, out_dir / "log.jsonl"


def build_run(cfg: dict, rank: int, world: int, dev: torch.device, paths: tuple[Path, Path, Path],
              progress: bool) -> TrainRun:
    """Load the data (every rank holds the arrays; each visits its shard), build the model (seeded),
    optimizer, EMA, autocast dtype and gradient scaler, and count the steps per epoch."""
    from visiontools.data import CIFAR_NUM_CLASSES, CIFAR_STATS, load_cifar
    from visiontools.models import create_model, model_description

    num_classes = CIFAR_NUM_CLASSES[cfg["dataset"]]
    mean, std = CIFAR_STATS[cfg["dataset"]]
    show = progress and rank == 0
    torch.manual_seed(cfg["seed"])
    model = create_model(cfg["model"], num_classes=num_classes, **cfg["model_kwargs"]).to(dev)
    if cfg["init_from"] is not None:
        init_weights(model, cfg["init_from"])
    if cfg["grad_checkpointing"]:
        if not hasattr(model, "set_grad_checkpointing"):
            raise UserError(f"grad_checkpointing: {cfg['model']} has no set_grad_checkpointing; set it to false")
        model.set_grad_checkpointing(True)
    patch_for_training(model, cfg["tome"])  # before the optimizer, the EMA copy and DDP; before the data is read
    train_ds = load_cifar(cfg["dataset"], "train", cfg["data_dir"], cfg["download"], cfg["train_per_class"], show)
    test_ds = load_cifar(cfg["dataset"], "test", cfg["data_dir"], False, cfg["test_per_class"], show)
    desc = model_description(cfg["model"], {**cfg["model_kwargs"], "num_classes": num_classes}, train_ds.classes,
                             mean, std, dataset=cfg["dataset"])
    if cfg["tome"] is not None:
        desc["tome"] = trained_tome(model, cfg["tome"])
    optimizer = build_optimizer(model, cfg)
    ema = WeightEMA(model, cfg["ema_decay"]) if cfg["ema_decay"] else None
    adt = training_dtype(cfg["amp"], dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=(adt == torch.float16))

    steps_per_epoch = math.ceil(len(train_ds) / world) // (cfg["batch_size"] // world)
    if steps_per_epoch == 0:
        raise UserError(f"batch_size {cfg['batch_size']} is larger than the {len(train_ds)} training images"
                        f"{f' per process ({world} processes)' if world > 1 else ''}: pass a smaller --batch-size "
                        "or use more data (train_per_class)")
    return TrainRun(cfg, rank, world, dev, show, *paths, train_ds, test_ds, mean, std, num_classes, model, desc,
                    optimizer, ema, adt, scaler, steps_per_epoch)


def init_weights(model: torch.nn.Module, init_from: str) -> None:
    """Load the weights of ``init_from`` (a shipped checkpoint name or a visiontools ``.safetensors``
    file; its EMA weights when it has them) into ``model``, which must have the same architecture."""
    from visiontools.models.shipped import load_checkpoint_model

    src, desc = load_checkpoint_model(init_from)
    try:
        model.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"init_from {init_from!r} holds a {desc['model']} {desc.get('model_kwargs', {})} that does not "
                        f"fit this config's model: {first[1].strip() if len(first) > 1 else first[0]}") from None


def patch_for_training(model: torch.nn.Module, tome: dict | None) -> None:
    """Patch ``model`` with the ``tome:`` setting (:func:`check_tome_config`) for training; a budget is
    solved once, at the model's input size. A model that cannot merge is a one-line ``UserError``."""
    if tome is None:
        return
    import visiontools
    from visiontools.tome.r_text import parse_r_text

    kwargs = {k: v for k, v in tome.items() if k != "r"}
    if "r" in tome:
        kwargs["r"] = parse_r_text(tome["r"])
    try:
        visiontools.apply_tome(model, **kwargs)
    except TypeError as e:  # a model ToMe cannot patch (LSH, reversible)
        raise UserError(f"the tome: section cannot be used with this model: {e}; remove the tome: setting") from None
    except ValueError as e:  # a setting this model cannot run (an unreachable budget, a method it lacks)
        raise UserError(f"tome: {e}") from None


def trained_tome(model: torch.nn.Module, tome: dict) -> dict:
    """What a checkpoint records of the setting it was trained with: r in the r grammar (a budget's
    solved per-layer schedule, with the budget beside it), method and proportional attention."""
    from visiontools.tome.r_text import r_to_text

    out = {"r": r_to_text(model.tome_r), "method": tome["method"], "prop_attn": tome["prop_attn"]}
    return {**out, **{k: tome[k] for k in ("flops", "speedup") if k in tome}}


# Settings that do not change what a run learns, or that ``resume_run`` reports on its own (epochs).
_RESUME_SILENT = {"epochs", "out_dir", "export", "data_dir", "download", "threads", "eval_every", "init_from"}


def _changed_settings(old: dict, cfg: dict) -> str:
    """The training settings that differ between a checkpoint's config and this one, as ``key old -> new``
    (empty when the checkpoint records no config)."""
    keys = [k for k in cfg if k in old and k not in _RESUME_SILENT and old[k] != cfg[k]]
    return ", ".join(f"{k} {old[k]!r} -> {cfg[k]!r}" for k in keys)


def resume_run(run: TrainRun) -> None:
    """Restore the model, optimizer, EMA, scaler, step and history from ``run.last``, warning when the
    schedule changed and refusing a checkpoint of another step count; rewrite the log to match it."""
    from visiontools.models import checkpoint as ckpt

    cfg, last = run.cfg, run.last
    tensors, _, state = ckpt.load_training_state(last)
    run.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    run.optimizer.load_state_dict(ckpt.unpack_optimizer_state(tensors, state))
    if run.ema is not None:
        if not any(k.startswith("ema.") for k in tensors):
            raise ValueError(f"cannot resume {last} with ema_decay set: it holds no EMA weights")
        run.ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    if "grad_scaler" in state:
        run.scaler.load_state_dict(state["grad_scaler"])
    run.start_epoch, run.step, run.history = state["epoch"], state["step"], state["history"]
    old = state.get("config") or {}
    if run.rank == 0 and old.get("epochs") not in (None, cfg["epochs"]):
        same_warmup = all(old.get(k) == cfg[k] for k in ("warmup_epochs", "lr"))
        if same_warmup and run.step <= round(cfg["warmup_epochs"] * run.steps_per_epoch):
            print(f"note: {last} was trained with a schedule for {old['epochs']} epochs, stopped within the warm-up "
                  f"that both schedules share: it continues as an uninterrupted {cfg['epochs']}-epoch run would",
                  file=sys.stderr, flush=True)
        else:
            print(f"warning: {last} was trained with a schedule for {old['epochs']} epochs; resuming with "
                  f"epochs={cfg['epochs']} switches to a learning-rate schedule over {cfg['epochs']} epochs from "
                  f"step {run.step} on, so the result differs from an uninterrupted {cfg['epochs']}-epoch run",
                  file=sys.stderr, flush=True)
    if run.start_epoch >= cfg["epochs"] and run.rank == 0:
        print(f"warning: {last} already completed {run.start_epoch} epochs (epochs={cfg['epochs']}): nothing to "
              "train; pass --set epochs=N with a larger N to continue", file=sys.stderr, flush=True)
    changed = _changed_settings(old, cfg)
    if run.rank == 0 and changed:
        print(f"note: resuming {last} with changed settings ({changed}): the run differs from one trained "
              "with either setting throughout", file=sys.stderr, flush=True)
    if state.get("steps_per_epoch") not in (None, run.steps_per_epoch):
        raise ValueError(f"cannot resume {last}: it was trained with {state['steps_per_epoch']} steps per "
                         f"epoch, this config gives {run.steps_per_epoch} (batch size or data changed)")
    if run.rank == 0:  # the log on disk may be ahead of or behind the checkpoint after a kill
        ckpt.atomic_write_text(run.log_path, _jsonl(run.history))


def start_run(run: TrainRun) -> None:
    """A new run (rank 0): create ``out_dir``, keep an old checkpoint as ``.bak``, empty the log."""
    from visiontools.models import checkpoint as ckpt

    if run.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if run.last.exists():
            os.replace(run.last, run.last.with_name(run.last.name + ".bak"))
        ckpt.atomic_write_text(run.log_path, "")


def train_epoch(run: TrainRun, epoch: int) -> dict:
    """One epoch over this rank's shard (all randomness a function of (seed, epoch, rank), so a resumed
    run repeats it exactly); returns its log record (loss and accuracy summed over the processes)."""
    from visiontools.data import iterate_batches, mixup, normalize, rand_augment, random_crop_flip, shard_indices
    from visiontools.timing import autocast_context

    cfg, dev = run.cfg, run.dev
    torch.manual_seed(_epoch_seed(cfg["seed"], epoch, run.rank))
    gen = torch.Generator().manual_seed(_epoch_seed(cfg["seed"] + 1, epoch, run.rank))
    order = shard_indices(len(run.train_ds), run.rank, run.world, shuffle=True, seed=cfg["seed"], epoch=epoch)
    run.train_model.train()
    t0 = time.time()
    loss_sum = correct = seen = 0.0
    batches = iterate_batches(run.train_ds, order, run.local_bs, drop_last=True)
    if run.show:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                       unit="step", mininterval=5, file=sys.stderr)
    for x, y in batches:
        x = random_crop_flip(x, cfg["crop_padding"], cfg["hflip"], gen)
        if cfg["randaugment"]:
            x = rand_augment(x, int(cfg["randaugment"][0]), int(cfg["randaugment"][1]), gen)
        x = normalize(x.to(dev, non_blocking=True), run.mean, run.std)
        y = y.to(dev, non_blocking=True)
        if cfg["mixup_alpha"] > 0:
            x, target = mixup(x, y, run.num_classes, cfg["mixup_alpha"], cfg["label_smoothing"], gen)
        else:
            target = y
        lr = lr_at(run.step, run.total_steps, run.warmup_steps, cfg["lr"], cfg["min_lr"])
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        with autocast_context(dev, run.adt):
            logits = run.train_model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, target, label_smoothing=0.0 if cfg["mixup_alpha"] > 0
                               else cfg["label_smoothing"])
        _optimizer_step(run, loss)
        loss_value = loss.item()
        loss_sum += loss_value * y.shape[0]
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.shape[0]
        if run.show:
            batches.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", refresh=False)
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], run.world)
    seconds = time.time() - t0
    return {"epoch": epoch + 1, "step": run.step, "lr": lr, "train_images": int(seen),
            "train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen, "seconds": round(seconds, 2),
            "step_ms": round(1000.0 * seconds / max(1, run.steps_per_epoch), 1)}


def _optimizer_step(run: TrainRun, loss: torch.Tensor) -> None:
    """Backward (scaled for fp16), gradient clipping, the optimizer and EMA updates; counts the step."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.cfg["grad_clip"]:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.model, run.step)
    run.step += 1


class AtR(torch.nn.Module):
    """A ToMe-patched model called at a fixed ``tome_r`` (the same weights evaluated at two settings
    in one pass over the data)."""

    def __init__(self, model: torch.nn.Module, r):
        super().__init__()
        self.inner, self.r = model, r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.inner.tome_r
        self.inner.tome_r = self.r
        try:
            return self.inner(x)
        finally:
            self.inner.tome_r = kept


def finish_epoch(run: TrainRun, epoch: int, record: dict) -> None:
    """Evaluate on the test set when due (the EMA weights when kept), then (rank 0) save the checkpoint
    and the whole log atomically and print the record."""
    from visiontools.evaluate import EvalData, accuracy
    from visiontools.models import checkpoint as ckpt

    cfg = run.cfg
    if (epoch + 1) % max(1, int(cfg["eval_every"])) == 0 or epoch + 1 == cfg["epochs"]:
        run.model.eval()
        data = EvalData("tensor", tensor_ds=run.test_ds, mean=run.mean, std=run.std)
        weights = run.model if run.ema is None else run.ema.model
        models = {"model": weights}
        if cfg["tome"] is not None:  # the same weights unpatched (r=0, exact) and at the training setting
            models = {"model": AtR(weights, 0), "tome": AtR(weights, weights.tome_r)}
        ev = accuracy(models, data, 500, run.dev, run.adt, run.rank, run.world, run.show)
        record.update(test_loss=ev["model"]["loss"], test_top1=ev["model"]["top1"], test_top5=ev["model"]["top5"],
                      test_images=ev["model"]["n"])
        if "tome" in ev:
            record.update(test_loss_tome=ev["tome"]["loss"], test_top1_tome=ev["tome"]["top1"],
                          test_top5_tome=ev["tome"]["top5"])
        if run.ema is not None:
            record["test_weights"] = "ema"
    run.history.append(record)
    if run.rank == 0:
        state = {"epoch": epoch + 1, "step": run.step, "steps_per_epoch": run.steps_per_epoch,
                 "history": run.history, "config": cfg, "world_size": run.world}
        tensors, meta = ckpt.pack_training_state(run.model, run.optimizer, run.desc, state, run.scaler)
        if run.ema is not None:  # the EMA weights are the ones evaluated, loaded and exported
            tensors.update({f"ema.{k}": v for k, v in run.ema.model.state_dict().items()})
        ckpt.save_safetensors_atomic(run.last, tensors, meta)
        ckpt.atomic_write_text(run.log_path, _jsonl(run.history))  # whole file: never a partial line
        title = f"{cfg['model']} on {cfg['dataset']}" + (f", trained at {tome_label(cfg['tome'])}" if cfg["tome"] else "")
        plot_curve(run.history, run.log_path.with_name("curve.png"), title, tome_label(cfg["tome"]))
        ckpt.atomic_write_text(run.out_dir / "results.md", results_table(run.history, title, tome_label(cfg["tome"])))
        print(json.dumps(record), flush=True)


def tome_label(tome: dict | None) -> str | None:
    """How tables and plots name a ``tome:`` setting (``"ToMe r=12"``, ``"PiToMe flops=0.5"``), or None."""
    if tome is None:
        return None
    name = {"tome": "ToMe", "tofu": "ToFu", "pitome": "PiToMe", "prune": "pruning"}.get(tome["method"], tome["method"])
    what = next(f"{k}={tome[k]}" for k in ("r", "flops", "speedup") if k in tome)
    return f"{name} {what}" + ("" if tome["prop_attn"] else " (no prop. attn.)")


def results_table(history: list[dict], title: str, tome: str | None) -> str:
    """``out_dir/results.md``: one row per epoch (train loss and top-1, test top-1 unpatched and, when
    training with token merging, at the training setting; milliseconds per training step)."""
    cols = ["epoch", "train loss", "train top-1 %", "test top-1 %"] + ([f"test top-1 % at {tome}"] if tome else [])
    lines = [f"# {title}", "", "| " + " | ".join(cols + ["ms / step", "epoch s"]) + " |",
             "|" + "---:|" * (len(cols) + 2)]
    for r in history:
        row = [str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['train_top1']:.2f}",
               f"{r['test_top1']:.2f}" if "test_top1" in r else ""]
        if tome:
            row.append(f"{r['test_top1_tome']:.2f}" if "test_top1_tome" in r else "")
        row += [f"{r['step_ms']:.1f}" if "step_ms" in r else "", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    weights = "EMA weights" if any(r.get("test_weights") == "ema" for r in history) else "the trained weights"
    lines += ["", f"Test accuracy of {weights}; ms / step: wall-clock training time per optimizer step, data "
              "augmentation included."]
    return "\n".join(lines) + "\n"


def plot_curve(history: list[dict], path: Path, title: str, tome: str | None = None) -> None:
    """The training curve, rewritten after every epoch: train and test top-1 (%) against epochs on the
    left (test also at the training setting ``tome`` when training with token merging), train loss and
    learning rate in the middle, milliseconds per training step on the right (``out_dir/curve.png``)."""
    from visiontools.models.checkpoint import atomic_write_bytes
    from visiontools.timing import subplots

    epochs = [r["epoch"] for r in history]
    fig, (acc, loss, speed) = subplots(1, 3, figsize=(14, 3.8))
    acc.plot(epochs, [r["train_top1"] for r in history], "o-", label="train (augmented)")
    tested = [r for r in history if "test_top1" in r]
    weights = " (EMA weights)" if any(r.get("test_weights") == "ema" for r in tested) else ""
    acc.plot([r["epoch"] for r in tested], [r["test_top1"] for r in tested], "s-",
             label=f"test{weights}" + (", unpatched" if tome else ""))
    if tome:
        merged = [r for r in tested if "test_top1_tome" in r]  # a run resumed with tome: added has epochs without
        acc.plot([r["epoch"] for r in merged], [r["test_top1_tome"] for r in merged], "^-", label=f"test at {tome}")
    acc.set(xlabel="epoch", ylabel="top-1 %", title=title)
    acc.grid(alpha=0.3)
    acc.legend()
    loss.plot(epochs, [r["train_loss"] for r in history], "o-", color="C2", label="train loss")
    loss.set(xlabel="epoch", ylabel="loss")
    lr = loss.twinx()
    lr.plot(epochs, [r["lr"] for r in history], "--", color="C3", label="learning rate (end of epoch)")
    lr.set_ylabel("learning rate")
    loss.legend(handles=loss.lines + lr.lines, loc="upper right")
    timed = [r for r in history if "step_ms" in r]
    speed.plot([r["epoch"] for r in timed], [r["step_ms"] for r in timed], "o-", color="C4")
    speed.set(xlabel="epoch", ylabel="ms per training step", title="measured step time")
    speed.set_ylim(bottom=0)
    speed.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt  # after subplots() chose the Agg backend

    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # a reader never sees half a PNG


def train(cfg: dict, resume: bool = False, overwrite: bool = False, progress: bool = True,
          device: str | None = None, stop_after: int | None = None) -> dict:
    """Train as described by ``cfg`` (see the module docstring); returns the last log record.
    ``stop_after`` ends the run after that many completed epochs (as if killed there; the schedule
    still targets ``cfg['epochs']``, so ``--resume`` continues it exactly)."""
    from visiontools.models import check_model_name
    from visiontools.models import checkpoint as ckpt
    from visiontools.timing import resolve_device

    check_model_name(cfg["model"])  # before minutes of data decoding
    rank, world, dev = init_distributed(resolve_device(device))
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    if cfg["batch_size"] % world:
        raise ValueError(f"batch_size {cfg['batch_size']} is not divisible by the {world} processes")
    run = build_run(cfg, rank, world, dev, output_paths(cfg, resume, overwrite), progress)
    (resume_run if resume else start_run)(run)
    if rank == 0:
        import yaml
        ckpt.atomic_write_text(run.out_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    barrier(world)

    run.train_model = run.model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        run.train_model = DDP(run.model, device_ids=[dev.index] if dev.type == "cuda" else None)

    record: dict = run.history[-1] if run.history else {}
    end_epoch = cfg["epochs"] if stop_after is None else min(cfg["epochs"], int(stop_after))
    for epoch in range(run.start_epoch, end_epoch):
        record = train_epoch(run, epoch)
        finish_epoch(run, epoch, record)
        barrier(world)

    if rank == 0 and cfg["export"] and end_epoch == cfg["epochs"]:
        ckpt.export_for_inference(run.last, cfg["export"], extra={"history": run.history})
    barrier(world)
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``visiontools train``."""
    parser.add_argument("--config", help="YAML config file (see configs/ and this module's docstring)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value, dotted keys for nested entries); repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.safetensors")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over although <out_dir>/last.safetensors exists (it is kept as .bak)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                        help="stop after this many completed epochs (resume later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", default=None, help="cpu or cuda; if not given, cuda when available")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs a network)")
    for key, typ in FLAG_KEYS.items():
        parser.add_argument("--" + key.replace("_", "-"), dest="flag_" + key, type=typ, default=None,
                            metavar=key.upper(), help=f"shortcut for --set {key}={key.upper()}")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``visiontools train``."""
    overrides = list(args.overrides)
    for key in FLAG_KEYS:
        v = getattr(args, "flag_" + key)
        if v is not None:
            overrides.append(f"{key}={v}")
    if args.download:
        overrides.append("download=true")
    cfg = load_config(args.config, overrides)
    record = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                   device=args.device, stop_after=args.stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {json.dumps(record)}; checkpoint {Path(cfg['out_dir']) / 'last.safetensors'}")
    destroy_if_distributed()
    return 0
