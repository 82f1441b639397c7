"""Accuracy, throughput and FLOPs of a model with and without ToMe: ``visiontools eval``.

Evaluates a visiontools checkpoint (default: the shipped CIFAR-10 ViT) or a timm model name on
CIFAR-10/100 or an ImageNet validation-style folder, unpatched and with ToMe at every requested r
(and schedule), and writes a markdown table, JSON and an accuracy-vs-throughput plot. Throughput is
timed with all candidates interleaved in one process (``visiontools.timing.interleaved_times``);
FLOPs come from ``torch.utils.flop_counter``. Runs under ``torchrun`` too (accuracy is sharded over
the processes; timing runs on rank 0 alone while the others wait). ``--compare`` adds other
checkpoints trained on the same data (for example the Hyena ViT beside its attention twin): they are
evaluated unpatched on the same images and timed in the same interleaved rounds.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch is imported where it is used, so that `visiontools eval --help` stays fast
    import torch


# ----------------------------------------------------------------------------- candidates

def setting_name(r) -> str:
    """A row name for a ToMe r setting: ``ToMe r=8``, ``ToMe r=8,-0.5`` (schedule), ``ToMe r=[8,8,4]`` (per layer)."""
    if isinstance(r, tuple):
        return f"ToMe r={int(r[0])},{float(r[1]):g}"
    if isinstance(r, list):
        return "ToMe r=[" + ",".join(str(int(v)) for v in r) + "]"
    return f"ToMe r={int(r)}"


def applied_name(name: str, r, tokens_per_layer) -> str:
    """A row's name with the r its blocks applied where a block merged fewer tokens than asked (a block
    merges at most half of its unprotected tokens): ``ToMe r=[12,6,3,2] (asked r=1000, capped)``."""
    from visiontools.tome.r_text import applied_label

    if r is None or " r=" not in name:
        return name
    label = applied_label(r, tokens_per_layer)
    return f"{name.split(' r=')[0]} {label}" if label.endswith(", capped)") else name


def candidate_settings(rs: Sequence[Any], schedules: Sequence[tuple[int, float]] = ()) -> list[tuple[str, Any]]:
    """(name, tome_r) for every row: ``("unpatched", None)`` first, then ToMe at each r setting of
    ``rs`` (ints, ``(r, inflection)`` schedules or per-layer lists, as ``parse_r_text`` reads them) and
    each of ``schedules``."""
    from visiontools.tome.merge import check_r

    rows: list[tuple[str, Any]] = [("unpatched", None)]
    for r in [*rs, *schedules]:
        r = (int(r[0]), float(r[1])) if isinstance(r, tuple) else list(r) if isinstance(r, list) else r
        check_r(r)
        rows.append((setting_name(r), r))
    return rows


def budget_settings(budgets: Sequence[float], methods: Sequence[str]) -> list[tuple[str, Any]]:
    """(name, patch arguments) for every method at every FLOP fraction: ``("pitome @0.50", {"method":
    "pitome", "flops": 0.5})``; the r schedule is solved per model (``apply_tome(flops=...)``)."""
    from visiontools.tome.budget import check_fraction
    from visiontools.tome.methods import check_method

    rows = []
    for m in methods:
        check_method(m)
        for b in budgets:
            rows.append((f"{m} @{check_fraction(b, 'flops'):.2f}", {"method": m, "flops": float(b)}))
    return rows


def method_settings(rs: Sequence[int], methods: Sequence[str]) -> list[tuple[str, Any]]:
    """(name, patch arguments) for every method other than ToMe at every r (ToMe's rows come from
    :func:`candidate_settings`)."""
    from visiontools.tome.methods import check_method

    rows = []
    for m in methods:
        check_method(m)
        if m != "tome":
            rows += [(setting_name(r).replace("ToMe", m, 1), {"method": m, "r": r}) for r in rs]
    return rows


def build_candidates(model: torch.nn.Module, settings: list[tuple[str, Any]], prop_attn: bool = True
                     ) -> dict[str, torch.nn.Module]:
    """One model per row: the unpatched original, and ToMe-patched copies with their r (or, for a
    dict, with those ``apply_tome`` arguments: a method, a FLOP budget)."""
    from visiontools.errors import UserError
    from visiontools.patches.timm import apply_tome

    out = {}
    for name, r in settings:
        if r is None:
            out[name] = model
            continue
        try:
            if isinstance(r, dict):
                out[name] = apply_tome(copy.deepcopy(model), prop_attn=prop_attn, **r).eval()
            else:
                out[name] = apply_tome(copy.deepcopy(model), r=r, prop_attn=prop_attn).eval()
        except TypeError as e:  # the adapter names the unsupported class
            raise UserError(f"{e}; pass --r with no values to evaluate this model unpatched only") from None
    return out


# ----------------------------------------------------------------------------- data

class EvalData:
    """Normalised float batches of a dataset for one model: an in-memory CIFAR split (resized to the
    model's input size if needed) or an ImageNet folder read with the model's own transform."""

    def __init__(self, kind: str, tensor_ds=None, mean=None, std=None, input_size=None, folder=None,
                 num_workers: int = 0):
        self.kind, self.tensor_ds, self.mean, self.std = kind, tensor_ds, mean, std
        self.input_size, self.folder, self.num_workers = input_size, folder, num_workers

    def __len__(self) -> int:
        return len(self.tensor_ds) if self.kind == "tensor" else len(self.folder)

    @property
    def classes(self) -> list[str]:
        return self.tensor_ds.classes if self.kind == "tensor" else self.folder.classes

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        from visiontools.data import normalize

        x = normalize(x, self.mean, self.std)
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            import torch.nn.functional as F
            x = F.interpolate(x, size=tuple(self.input_size), mode="bicubic", align_corners=False)
        return x

    def batches(self, indices: Sequence[int], batch_size: int):
        """Yield (float images, labels) for ``indices``."""
        if self.kind == "tensor":
            from visiontools.data import iterate_batches
            for x, y in iterate_batches(self.tensor_ds, indices, batch_size):
                yield self._prep(x), y
        else:
            import torch.utils.data
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.folder, list(indices)),
                                                 batch_size=batch_size, shuffle=False,
                                                 num_workers=self.num_workers)
            yield from loader

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` images (repeated if the dataset is smaller), as one float batch."""
        return self.first_labelled(n)[0]

    def first_labelled(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images (repeated if the dataset is smaller) and their labels."""
        import torch

        idx = [i % len(self) for i in range(n)]
        xs, ys = zip(*self.batches(idx, n))
        return torch.cat(xs)[:n], torch.cat(ys)[:n]


def load_eval_data(dataset: str, data_dir: str | None, model: torch.nn.Module, mean, std, download: bool = False,
                   per_class: int | None = None, num_workers: int = 0, progress: bool = False) -> EvalData:
    """The evaluation split of ``dataset`` (cifar10, cifar100 or imagenet), prepared for ``model``."""
    from visiontools.data import DEFAULT_DATA_DIR, ImageNetFolder, load_cifar, timm_eval_transform

    if dataset in ("cifar10", "cifar100"):
        if data_dir is None and not download and dataset == "cifar10":
            data_dir = DEFAULT_DATA_DIR  # the same default as `visiontools train`
        ds = load_cifar(dataset, "test", data_dir, download, per_class, progress)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3,) + tuple(ds.images.shape[-2:])))[-2:]
        return EvalData("tensor", tensor_ds=ds, mean=mean, std=std, input_size=input_size)
    if dataset == "imagenet":
        if data_dir is None:
            raise ValueError("--dataset imagenet needs --data-dir: a folder with one sub-folder per WordNet id "
                             "(e.g. ../shared/datasets/imagenet-samples)")
        folder = ImageNetFolder(data_dir, transform=timm_eval_transform(model), max_per_class=per_class)
        return EvalData("folder", folder=folder, num_workers=num_workers)
    raise ValueError(f"unknown dataset {dataset!r}; expected cifar10, cifar100 or imagenet")


# ----------------------------------------------------------------------------- measuring

def accuracy(models: dict[str, torch.nn.Module], data: EvalData, batch_size: int, device: torch.device,
             amp: torch.dtype | None = None, rank: int = 0, world: int = 1, progress: bool = False
             ) -> dict[str, dict[str, float]]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy (``loss``) of every model on the whole dataset;
    each batch is loaded once and fed to all models. Sharded over ranks and summed exactly."""
    import torch
    import torch.nn.functional as F

    from visiontools.data import eval_shard
    from visiontools.timing import autocast_context
    from visiontools.distributed import all_reduce_sum

    idx = eval_shard(len(data), rank, world)
    names = list(models)
    c1 = {n: 0.0 for n in names}
    c5 = {n: 0.0 for n in names}
    loss = {n: 0.0 for n in names}
    batches = data.batches(idx, batch_size)
    if progress and rank == 0:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=math.ceil(len(idx) / batch_size), desc="accuracy", unit="batch")
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        for n in names:
            with torch.no_grad(), autocast_context(device, amp):
                logits = models[n](x).float()
            loss[n] += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            c1[n] += (top[:, 0] == y).sum().item()
            c5[n] += (top == y[:, None]).any(dim=1).sum().item()
    k = len(names)
    sums = all_reduce_sum([c1[n] for n in names] + [c5[n] for n in names] + [loss[n] for n in names]
                          + [float(len(idx))], world)
    total = sums[-1]
    return {n: {"top1": 100.0 * sums[i] / total, "top5": 100.0 * sums[k + i] / total, "loss": sums[2 * k + i] / total,
                "n": int(total)} for i, n in enumerate(names)}


def speed_and_flops(models: dict[str, torch.nn.Module], x: torch.Tensor, device: torch.device,
                    amp: torch.dtype | None, repeats: int, warmup: int, progress: bool = False) -> dict[str, dict]:
    """Interleaved throughput (images/s, median of ``repeats``) on batch ``x``, and GFLOPs per image."""
    from visiontools.timing import autocast_context, count_flops, interleaved_times, median

    def call(m, inp):
        def f():
            with autocast_context(device, amp):
                return m(inp)
        return f

    times = interleaved_times({n: call(m, x) for n, m in models.items()}, repeats=repeats, warmup=warmup,
                              device=device, progress=progress)
    out = {}
    for n, m in models.items():
        flops = count_flops(call(m, x[:1]))
        out[n] = {"images_per_s": x.shape[0] / median(times[n]), "median_s": median(times[n]),
                  "times_s": times[n], "gflops": flops / 1e9}
    return out


def training_peak_memory(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                         device: torch.device) -> dict[str, int]:
    """Peak bytes of one training step (train mode, forward, cross-entropy, backward) on batch ``x``
    for each model (``visiontools.bench.memory.peak_memory``: activations and gradients, weights excluded).
    Each step runs on a copy, so BatchNorm statistics and LSH rotations of the evaluated models stay as they were."""
    import copy

    import torch

    from visiontools.bench.memory import peak_memory

    out = {}
    for name, model in models.items():
        m = copy.deepcopy(model).train()

        def step(m=m):
            torch.nn.functional.cross_entropy(m(x), y).backward()

        out[name] = peak_memory(step, device, autograd=True)
        del m
    return out


def tokens_after_merging(model: torch.nn.Module, x: torch.Tensor) -> list[int] | None:
    """Tokens entering each block (and after the last) for a ToMe-patched model, else None."""
    import torch

    from visiontools.patches.timm import ToMeVisionTransformer, tome_forward

    if not isinstance(model, ToMeVisionTransformer):
        return None
    with torch.no_grad():
        _, info = tome_forward(model, x[:1])
    return list(info.tokens_per_layer)


# ----------------------------------------------------------------------------- reporting

def markdown_table(result: dict) -> str:
    """The result rows as a markdown table."""
    lines = [f"**Note: {result['notice']}.**", ""] if result.get("notice") else []
    mem = bool(result["rows"]) and "train_peak_bytes" in result["rows"][0]
    from visiontools.tome.r_text import TOKENS_HEADER, token_span

    lines += [f"| variant | params (M) | {TOKENS_HEADER} | top-1 % | top-5 % | images/s | speedup "
              "| GFLOPs/img | FLOP ratio |" + (f" training peak MB (batch {result['rows'][0]['train_memory_batch']}) |"
                                              if mem else ""),
              "|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if mem else "")]
    for row in result["rows"]:
        tok_s = token_span(row.get("tokens_per_layer"))
        params = f"{row['params'] / 1e6:.2f}" if "params" in row else "—"
        lines.append(f"| {row['name']} | {params} | {tok_s} | {row['top1']:.2f} | {row['top5']:.2f} | "
                     f"{row['images_per_s']:.1f} | {row['speedup']:.2f}x | {row['gflops']:.3f} | "
                     f"{row['flop_ratio']:.2f}x |" + (f" {row['train_peak_bytes'] / 2**20:.1f} |" if mem else ""))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | os.PathLike) -> None:
    """Accuracy against throughput, one labelled point per row (PNG, matplotlib Agg backend)."""
    from visiontools.timing import save_figure, subplots

    fig, ax = subplots(figsize=(6.4, 4.4), dpi=120)
    rows = result["rows"]
    kinds = [("ToMe", "o", "tab:blue", [r for r in rows if r["name"].startswith("ToMe")]),
             ("unpatched", "s", "tab:red", rows[:1]),
             ("other checkpoints", "^", "tab:green", [r for r in rows[1:] if not r["name"].startswith("ToMe")])]
    for label, marker, color, group in kinds:
        if group:
            ax.plot([r["images_per_s"] for r in group], [r["top1"] for r in group], marker, color=color, label=label)
    for i, r in enumerate(rows):  # staggered labels, so close points stay readable
        ax.annotate(r["name"].replace("ToMe ", ""), (r["images_per_s"], r["top1"]), textcoords="offset points",
                    xytext=(4, 4 + 9 * (i % 3)), fontsize=8)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("top-1 accuracy (%)")
    weights = " — random weights: accuracy is meaningless" if result.get("random_weights") else ""
    ax.set_title(f"{result['model']} on {result['dataset']} ({result['n_images']} images){weights}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, result["machine"], fontsize=6, color="gray")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def budget_table(result: dict) -> str:
    """Methods at equal FLOPs: one row per FLOP budget, one column per method (top-1, measured speedup)."""
    rows = [r for r in result["rows"] if r.get("budget") is not None]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    base = result["rows"][0]
    lines = ["| FLOP budget | " + " | ".join(f"{m}: top-1 % (FLOP frac., speedup)" for m in methods) + " |",
             "|---:|" + "---:|" * len(methods),
             "| 1.00 (unpatched) | " + " | ".join(f"{base['top1']:.2f}" for _ in methods) + " |"]
    for b in budgets:
        cells = []
        for m in methods:
            r = next((r for r in rows if r["budget"] == b and r["method"] == m), None)
            cells.append("—" if r is None else f"{r['top1']:.2f} ({1 / r['flop_ratio']:.2f}, {r['speedup']:.2f}x)")
        lines.append(f"| {b:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_budgets(result: dict, path: str | os.PathLike) -> None:
    """Methods at equal FLOPs: top-1 against FLOP fraction (left) and measured images/s against FLOP
    fraction (right), a line per method, the unpatched model at 1.0 (PNG)."""
    from visiontools.timing import save_figure, subplots

    rows = [r for r in result["rows"] if r.get("budget") is not None]
    base = result["rows"][0]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 4.2), dpi=120)
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted(((1 / r["flop_ratio"], r["top1"], r["images_per_s"]) for r in rows if r["method"] == m))
        pts.append((1.0, base["top1"], base["images_per_s"]))
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=m)
    for ax, label in ((ax1, "top-1 accuracy (%)"), (ax2, "measured throughput (images/s)")):
        ax.set_xlabel("FLOP fraction (reduced / unpatched)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_title(f"{result['model']} on {result['dataset']} ({result['n_images']} images)", fontsize=9)
    fig.text(0.01, 0.01, result["machine"], fontsize=6, color="gray")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- driver

def load_comparisons(checkpoints: Sequence[str], desc: dict, device: torch.device) -> dict[str, torch.nn.Module]:
    """``{name: model}`` for each ``--compare`` checkpoint, named by its file stem, or by
    ``<folder>_<stem>`` when stems repeat (``runs/a/last.safetensors``, ``runs/b/last.safetensors``);
    ``ValueError`` for a checkpoint given twice, or unless it was trained on the same dataset, classes
    and normalisation as the evaluated model (``desc``)."""
    from visiontools.errors import UserError
    from visiontools.models import is_checkpoint, load

    loaded = []
    for ckpt in checkpoints:
        if not is_checkpoint(ckpt):
            raise UserError(f"--compare takes checkpoints (a shipped name or a .safetensors file), got {ckpt!r}")
        model, other = load(ckpt, device=device, tome=False)
        for key in ("dataset", "classes", "mean", "std"):
            if other.get(key) != desc.get(key):
                raise ValueError(f"--compare {ckpt}: its {key} ({other.get(key)}) differs from the evaluated "
                                 f"model's ({desc.get(key)}); compare checkpoints trained on the same data")
        loaded.append((Path(other["path"]).resolve(), model))
    stems = [path.stem for path, _ in loaded]
    out = {}
    for path, model in loaded:
        name = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}_{path.stem}"
        if name in out:
            raise ValueError(f"--compare: {path} is given twice (two candidates would be named {name!r})")
        out[name] = model
    return out


def load_model_for_eval(checkpoint: str | None, model_name: str | None, pretrained: bool, dataset: str,
                        device: torch.device) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, description with classes/mean/std) from a checkpoint or a timm name
    (``visiontools.models.load``); a timm model gets the dataset's classes and normalisation."""
    from visiontools.data import CIFAR_NUM_CLASSES, CIFAR_STATS
    from visiontools.errors import UserError
    from visiontools.models import DEFAULT_CHECKPOINT, is_checkpoint, load

    if checkpoint is not None and model_name is not None:
        raise ValueError("give either --checkpoint or --model, not both")
    if model_name is None:
        if checkpoint is not None and not is_checkpoint(checkpoint):
            raise UserError(f"--checkpoint {checkpoint}: not a shipped checkpoint or a .safetensors file "
                            "(name a timm model with --model instead)")
        return load(checkpoint or DEFAULT_CHECKPOINT, device=device, tome=False)  # rows patch it themselves
    num_classes = CIFAR_NUM_CLASSES.get(dataset, 1000 if dataset == "imagenet" else None)
    kwargs = {} if (pretrained and dataset == "imagenet") else {"num_classes": num_classes}
    model, desc = load(model_name, device=device, pretrained=pretrained, **kwargs)  # random weights seeded: runs repeat
    if dataset in CIFAR_STATS:
        desc["mean"], desc["std"] = (list(v) for v in CIFAR_STATS[dataset])
    desc["classes"] = None
    if not pretrained:
        desc["notice"] = RANDOM_WEIGHTS_NOTICE
    elif "num_classes" in kwargs:
        desc["notice"] = (f"pretrained body with a new random {num_classes}-class head (not fine-tuned): "
                          "accuracy is meaningless")
    return model, desc


RANDOM_WEIGHTS_NOTICE = ("random weights: accuracy is meaningless (initialisation seeded with 0, so runs repeat); "
                         "timing and FLOPs are real")


def evaluate(checkpoint: str | None = None, model_name: str | None = None, pretrained: bool = False,
             dataset: str | None = None, data_dir: str | None = None, download: bool = False,
             per_class: int | None = None, rs: Sequence[int] = (0, 2, 4, 6, 8),
             schedules: Sequence[tuple[int, float]] = (), prop_attn: bool = True, batch_size: int = 250,
             timing_batch_size: int = 256, repeats: int = 10, warmup: int = 2, device: str | None = None,
             amp: str = "off", num_workers: int = 0, progress: bool = True, compare: Sequence[str] = (),
             budgets: Sequence[float] = (), methods: Sequence[str] = ("tome",), train_memory_batch: int = 0) -> dict:
    """Run the whole evaluation and return the result dict (rows, machine, settings); see module doc.
    ``compare``: more checkpoints, evaluated unpatched beside the model (rows named by their file).
    ``methods`` (``visiontools.tome.methods.METHODS``) at every r in ``rs`` (ToMe also at every
    schedule) and, with ``budgets`` (FLOP fractions), at every budget: equal FLOPs side by side.
    ``train_memory_batch``: also the peak memory of one training step at that batch size (0: not measured)."""
    from visiontools.models import DEFAULT_CHECKPOINT
    from visiontools.timing import machine_description, resolve_device, resolve_dtype
    from visiontools.distributed import barrier, init_distributed

    rank, world, dev = init_distributed(resolve_device(device))
    adt = resolve_dtype(amp, dev)
    # every setting is checked (methods, budgets, then against the model) before any data is read
    settings = candidate_settings(rs if "tome" in methods else [], schedules if "tome" in methods else [])
    settings += method_settings(rs, methods) + budget_settings(budgets, methods)
    if dataset is None:
        dataset = "cifar10" if model_name is None else "imagenet"
    model, desc = load_model_for_eval(checkpoint, model_name, pretrained, dataset, dev)
    if desc.get("dataset") and dataset != desc["dataset"] and dataset != "imagenet":
        raise ValueError(f"{desc.get('path', 'the checkpoint')} was trained on {desc['dataset']}, not {dataset}")
    models = build_candidates(model, settings, prop_attn)
    data = load_eval_data(dataset, data_dir, model, desc["mean"], desc["std"], download, per_class, num_workers,
                          progress and rank == 0)
    if desc.get("classes") and dataset != "imagenet" and list(desc["classes"]) != list(data.classes):
        raise ValueError(f"the model's classes {desc['classes'][:4]}... do not match the dataset's "
                         f"{data.classes[:4]}... (wrong --dataset or --data-dir?)")
    for name, other in load_comparisons(compare, desc, dev).items():
        if name in models:
            raise ValueError(f"--compare: two candidates are named {name!r}")
        settings.append((name, None))
        models[name] = other

    acc = accuracy(models, data, batch_size, dev, adt, rank, world, progress)
    shown = desc["model"] if model_name is not None else str(checkpoint or DEFAULT_CHECKPOINT)  # as the user named it
    result = {"model": shown, "architecture": desc["model"], "dataset": dataset,
              "data_dir": data_dir, "n_images": next(iter(acc.values()))["n"], "device": str(dev),
              "machine": machine_description(dev), "amp": amp, "timing_batch_size": timing_batch_size,
              "repeats": repeats, "warmup": warmup, "prop_attn": prop_attn, "world_size": world,
              "budgets": list(budgets), "methods": list(methods),
              "random_weights": bool(model_name is not None and not pretrained), "rows": []}
    if desc.get("notice"):
        result["notice"] = desc["notice"]
    if rank == 0:
        x = data.first(timing_batch_size).to(dev)
        speed = speed_and_flops(models, x, dev, adt, repeats, warmup, progress)
        train_mem = {}
        if train_memory_batch:
            xt, yt = data.first_labelled(train_memory_batch)
            train_mem = training_peak_memory(models, xt.to(dev), yt.to(dev), dev)
        base = speed["unpatched"]
        for name, r in settings:
            s = speed[name]
            if isinstance(r, dict):  # a method and/or a budget: report the schedule that ran
                r = models[name].tome_r
            tokens = tokens_after_merging(models[name], x)
            result["rows"].append({
                "name": applied_name(name, r, tokens), "r": list(r) if isinstance(r, tuple) else r, **acc[name],
                "method": getattr(models[name], "tome_method", None),
                "budget": getattr(getattr(models[name], "tome_budget", None), "target_flops", None),
                "images_per_s": s["images_per_s"], "median_s": s["median_s"], "times_s": s["times_s"],
                "speedup": base["median_s"] / s["median_s"], "gflops": s["gflops"],
                "flop_ratio": base["gflops"] / s["gflops"], "tokens_per_layer": tokens,
                "params": sum(p.numel() for p in models[name].parameters()),
                **({"train_peak_bytes": train_mem[name], "train_memory_batch": train_memory_batch} if train_mem else {})})
    barrier(world)
    return result


def output_prefix(args: argparse.Namespace, model_shown: str, dataset: str) -> Path:
    """``--out`` or ``runs/eval/<name>_<dataset>``. A checkpoint file is named with its folder too
    (``runs/a/last.safetensors`` -> ``a_last``), so two runs' ``last.safetensors`` do not collide."""
    if args.out:
        return Path(args.out)
    from visiontools.models import SHIPPED

    if args.model is not None:
        name = args.model.replace("/", "_").replace(":", "_")
    elif model_shown in SHIPPED:
        name = model_shown
    else:
        path = Path(model_shown).resolve()
        name = f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
    return Path("runs/eval") / f"{name}_{dataset}"


def refuse_existing_out(out: str | None, overwrite: bool) -> None:
    """Raise ``FileExistsError`` (one line naming the file and the fix) when an explicit ``--out PREFIX``
    would replace an earlier result (PREFIX.md, .json or .png) and ``--overwrite`` is not given; checked
    before the evaluation, so a long run never ends in a refusal. The default prefix is replaced silently."""
    if out is None or overwrite:
        return
    for suffix in (".md", ".json", ".png"):
        path = Path(str(out) + suffix)
        if path.exists():
            raise FileExistsError(f"{path} already exists: pass --overwrite to replace it, or choose another --out")


def default_rs(args: argparse.Namespace) -> list:
    """The r rows of ``eval`` without ``--r``: 0, half the recommended r and the recommended r of the
    evaluated checkpoint (:func:`visiontools.models.recommended_r`: the r it was trained with, its
    card's choice, else the default checkpoint's), e.g. ``0 4 8`` for ``cifar10_cct``."""
    from visiontools.models import DEFAULT_CHECKPOINT, recommended_r

    rec = recommended_r(None if args.model else (args.checkpoint or DEFAULT_CHECKPOINT))
    return sorted({0, rec // 2, rec}) if isinstance(rec, int) else [0, rec]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``visiontools eval``."""
    from visiontools.defaults import DEFAULT_CHECKPOINT, REPEATS, WARMUP, default_r_text
    from visiontools.tome.r_text import r_argument

    src = parser.add_argument_group("model")
    src.add_argument("--checkpoint", default=None,
                     help="visiontools checkpoint (.safetensors) or shipped name; if neither this nor --model is given, "
                          "the shipped default, cifar10_cct")
    src.add_argument("--model", default=None, help="a timm model name instead of a checkpoint")
    src.add_argument("--compare", nargs="+", default=[], metavar="CHECKPOINT",
                     help="more checkpoints trained on the same data, evaluated unpatched on the same images and "
                          "timed in the same interleaved rounds (e.g. hyena_cifar10 beside its attention twin)")
    src.add_argument("--pretrained", action="store_true", help="with --model: load timm's pretrained weights "
                                                               "(needs a network)")
    d = parser.add_argument_group("data")
    d.add_argument("--dataset", choices=["cifar10", "cifar100", "imagenet"], default=None,
                   help="if not given: cifar10 for checkpoints, imagenet for --model")
    d.add_argument("--data-dir", default=None,
                   help="CIFAR: ImageFolder root with test/<class>/* or torchvision's files (if not given: "
                        "../shared/datasets/cifar10 for CIFAR-10, as for train); ImageNet: folder of "
                        "<wnid>/<image> (e.g. ../shared/datasets/imagenet-samples)")
    d.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs a network)")
    d.add_argument("--per-class", type=int, default=None, help="only the first N images of every class")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image folders")
    t = parser.add_argument_group("ToMe")
    t.add_argument("--r", "--tome-r", dest="r", type=r_argument, nargs="*", default=None,
                   help="ToMe r settings, one row each: an int r (tokens merged per block), r,inflection (e.g. "
                        "8,-0.5, the decreasing schedule) or a per-layer list (8,8,4,4); default 0, half the "
                        "checkpoint's recommended r and that r (the r it was trained with, or its card's choice: "
                        f"{default_r_text()} for {DEFAULT_CHECKPOINT}), none with --budget. Under torchrun spell "
                        "it --tome-r (torchrun reads --r as an abbreviation of its own --rdzv-* options)")
    t.add_argument("--schedule", type=r_argument, nargs="*", default=[], metavar="R,INFLECTION",
                   help="more ToMe settings, read as --r reads them except that two values are always r,inflection "
                        "(8,1 is inflection 1)")
    t.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")
    t.add_argument("--method", nargs="+", default=["tome"], metavar="METHOD",
                   help="token reduction methods: tome, tofu, pitome, prune (visiontools.tome.methods); each runs "
                        "at every --r and --budget")
    t.add_argument("--budget", nargs="*", type=float, default=[], metavar="FLOPS",
                   help="FLOP fractions such as 0.5 0.6 0.7: each method's r schedule is solved to keep at most that "
                        "fraction of the unpatched FLOPs (equal FLOPs side by side); with --budget, --r defaults to none")
    m = parser.add_argument_group("measurement")
    m.add_argument("--batch-size", type=int, default=250, help="batch size for the accuracy pass")
    m.add_argument("--timing-batch-size", type=int, default=256, help="batch size for throughput timing")
    m.add_argument("--repeats", type=int, default=REPEATS, help="timed rounds (interleaved)")
    m.add_argument("--warmup", type=int, default=WARMUP, help="untimed warm-up rounds")
    m.add_argument("--device", default=None, help="cpu or cuda; if not given, cuda when available")
    m.add_argument("--amp", choices=["off", "bf16", "fp16", "auto"], default="off", help="autocast dtype")
    m.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    m.add_argument("--train-memory", type=int, default=0, metavar="BATCH",
                   help="also measure each row's peak memory of one training step (forward, cross-entropy, "
                        "backward; activations and gradients, not weights) at this batch size; 0 (default): not measured")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="output prefix: writes PREFIX.md, PREFIX.json and PREFIX.png; if not given, "
                        "runs/eval/<model>_<dataset> (a checkpoint file: <its folder>_<its name>_<dataset>)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the files of an existing --out PREFIX (without it, eval refuses to)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``visiontools eval``."""
    from visiontools.models.checkpoint import atomic_write_text
    from visiontools.timing import busy_machine_note

    from visiontools.errors import UserError

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    # --schedule: two values always mean r,inflection (its documented form, also for 8,1)
    schedules = [(v[0], float(v[1])) if isinstance(v, list) and len(v) == 2 else v for v in args.schedule]
    if args.batch_size < 1 or args.timing_batch_size < 1 or args.repeats < 1 or args.warmup < 0 or args.train_memory < 0:
        raise UserError("--batch-size, --timing-batch-size and --repeats must be >= 1, --warmup and --train-memory >= 0")
    refuse_existing_out(args.out, args.overwrite)
    result = evaluate(checkpoint=args.checkpoint, model_name=args.model, pretrained=args.pretrained,
                      dataset=args.dataset, data_dir=args.data_dir, download=args.download,
                      per_class=args.per_class,
                      rs=args.r if args.r is not None else ([] if args.budget else default_rs(args)),
                      schedules=schedules, prop_attn=not args.no_prop_attn, budgets=args.budget, methods=args.method,
                      batch_size=args.batch_size, timing_batch_size=args.timing_batch_size, repeats=args.repeats,
                      warmup=args.warmup, device=args.device, amp=args.amp, num_workers=args.num_workers,
                      progress=not args.no_progress, compare=args.compare, train_memory_batch=args.train_memory)
    if result["rows"]:  # rank 0
        prefix = output_prefix(args, str(result["model"]), result["dataset"])
        prefix.parent.mkdir(parents=True, exist_ok=True)
        md = (f"{result['model']} on {result['dataset']} ({result['n_images']} images), "
              f"timing batch {result['timing_batch_size']}, median of {result['repeats']} interleaved rounds; "
              f"{result['machine']}\n\n" + markdown_table(result))
        if result["budgets"]:
            md += "\n" + budget_table(result)
        atomic_write_text(str(prefix) + ".md", md)
        atomic_write_text(str(prefix) + ".json", json.dumps(result, indent=1))
        (plot_budgets if result["budgets"] else plot)(result, str(prefix) + ".png")
        print(md)
        note = busy_machine_note([row["speedup"] for row in result["rows"] if row["r"] not in (None, 0)],
                                 result["device"])
        if note:
            print(note)
        print(f"wrote {prefix}.md, {prefix}.json, {prefix}.png")
    from visiontools.distributed import destroy_if_distributed
    destroy_if_distributed()
    return 0
