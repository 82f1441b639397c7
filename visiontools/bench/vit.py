"""ViT token-merging benchmark: timm's unpatched model (fused SDPA attention) against ToMe at several r.

All candidates run interleaved in one process (see ``visiontools.timing``); the table reports
images/s, the measured speedup over the baseline, the FLOP ratio (``torch.utils.flop_counter``) and
how much of that ideal speedup was realised.
"""
from __future__ import annotations

import argparse
import copy

import torch

from visiontools.timing import (
    add_run_arguments, autocast_context, count_flops, interleaved_times, machine_description, median,
    resolve_device, write_results,
)

DEFAULT_MODEL = "vit_base_patch16_224"


def parse_schedule(text: str):
    """``"16"`` -> 16, ``"16,-0.5"`` -> (16, -0.5), ``"8,8,4,4"`` (more than two values) -> list."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if len(parts) == 1:
            r = int(parts[0])
        elif len(parts) == 2 and "." in parts[1]:
            r = int(parts[0]), float(parts[1])
        else:
            r = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an r setting: {text!r} (expected 16, or r,inflection like 16,-0.5, or a per-layer list)") from None
    if min([r] if isinstance(r, int) else [r[0]] if isinstance(r, tuple) else r or [0]) < 0:
        raise argparse.ArgumentTypeError(f"r must be >= 0 (tokens merged per block), got {text!r}")
    return r


def schedule_label(r) -> str:
    """A short label for an r setting, for tables and plots."""
    if isinstance(r, tuple):
        return f"r={r[0]} (inflect {r[1]:+g})"
    if isinstance(r, list):
        return "r=[" + ",".join(map(str, r)) + "]"
    return f"r={r}"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``auto`` -> bf16 autocast on CUDA, fp32 on CPU; ``fp32`` means no autocast."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def benchmark_vit(model: torch.nn.Module, rs, batch_size: int = 32, img_size: tuple[int, int] | None = None,
                  device="cpu", dtype: torch.dtype | None = None, repeats: int = 10, warmup: int = 3,
                  progress: bool = True) -> dict:
    """Time ``model`` unpatched and ToMe-patched at each r setting in ``rs`` (interleaved, medians)
    and count FLOPs per image. Returns a dict with one row per candidate."""
    from visiontools.patches.timm import apply_tome, tome_forward

    device = torch.device(device)
    model = model.eval().to(device)
    candidates = {"timm (fused SDPA)": (model, None)}
    for r in rs:
        try:
            candidates[f"ToMe {schedule_label(r)}"] = (apply_tome(copy.deepcopy(model), r=r), r)
        except TypeError as e:  # the adapter names the unsupported class
            from visiontools.errors import UserError
            raise UserError(f"{e}; `visiontools bench` needs a timm VisionTransformer (e.g. vit_base_patch16_224)") from None
    if img_size is None:
        img_size = tuple(model.patch_embed.img_size)
    x = torch.randn(batch_size, 3, *img_size, device=device)
    x1 = x[:1]

    def call(m, inp):
        with autocast_context(device, dtype):
            return m(inp)

    fns = {name: (lambda m=m: call(m, x)) for name, (m, _) in candidates.items()}
    times = interleaved_times(fns, repeats=repeats, warmup=warmup, device=device, progress=progress)
    rows = []
    base_t = median(times["timm (fused SDPA)"])
    base_flops = None
    for name, (m, r) in candidates.items():
        flops = count_flops(lambda: call(m, x1))
        base_flops = base_flops or flops
        t = median(times[name])
        tokens = None
        if r is not None:
            with torch.inference_mode():
                tokens = tome_forward(m, x1)[1].tokens_per_layer[-1]
        speedup, flop_ratio = base_t / t, base_flops / flops
        rows.append({
            "name": name, "r": r, "final_tokens": tokens, "median_s": t, "img_per_s": batch_size / t,
            "speedup": speedup, "gflops_per_img": flops / 1e9, "flop_ratio": flop_ratio,
            "measured_over_ideal": speedup / flop_ratio, "times_s": times[name],
        })
    return {
        "machine": machine_description(device), "device": str(device),
        "dtype": str(dtype or torch.float32).replace("torch.", ""), "batch_size": batch_size,
        "img_size": list(img_size), "repeats": repeats, "warmup": warmup,
        "baseline_fused_attn": bool(getattr(model.blocks[0].attn, "fused_attn", False)), "rows": rows,
    }


TOME_COLUMNS = "| candidate | final tokens | im/s | speedup | GFLOPs/img | FLOP ratio |"


def tome_cells(row: dict) -> str:
    """A result row's :data:`TOME_COLUMNS` cells (the columns ``bench vit`` and ``bench onnx`` share)."""
    tok = "—" if row["final_tokens"] is None else str(row["final_tokens"])
    return (f"| {row['name']} | {tok} | {row['img_per_s']:.1f} | {row['speedup']:.2f}x | "
            f"{row['gflops_per_img']:.2f} | {row['flop_ratio']:.2f}x |")


def markdown_table(result: dict, title: str) -> str:
    """A markdown table of a :func:`benchmark_vit` result."""
    lines = [f"**{title}** — batch {result['batch_size']}, {result['img_size'][0]}x{result['img_size'][1]}, "
             f"{result['dtype']}, {result['machine']}", "",
             TOME_COLUMNS + " measured/ideal |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"{tome_cells(row)} {row['measured_over_ideal']:.2f} |" for row in result["rows"]]
    return "\n".join(lines)


def add_model_arguments(p: argparse.ArgumentParser, model: str, baseline: str, batch_size: int,
                        batch_help: str) -> None:
    """The options ``bench vit`` and ``bench onnx`` share: model, weights, r settings, batch and input size."""
    p.add_argument("--model", default=model,
                   help="timm ViT name (random weights unless --pretrained), a shipped checkpoint name "
                        "(cifar10_vit) or a visiontools .safetensors checkpoint")
    p.add_argument("--pretrained", action="store_true", help="load pretrained timm weights (needs a network)")
    p.add_argument("--r", type=parse_schedule, nargs="+", default=[8, 16], metavar="R",
                   help=f"ToMe settings to compare with the {baseline}: an int r, 'r,inflection' "
                        "(e.g. 16,-0.5 for the decreasing schedule) or a comma list of per-layer r")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="PX",
                   help="input size (one value for square, or H W); default: the model's own")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench [vit]``."""
    add_model_arguments(p, DEFAULT_MODEL, "baseline", 32, "images per forward pass")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    add_run_arguments(p, repeats=10, warmup=3)


def load_model(name: str, pretrained: bool = False, img_size=None) -> torch.nn.Module:
    """A timm model by name (built for ``img_size`` when given), or a shipped/saved checkpoint
    when ``visiontools.models`` knows the name."""
    from visiontools import models as zoo  # imports timm: only when a model is loaded, not for --help

    if name in zoo.SHIPPED or name.endswith(".safetensors"):
        return zoo.load_checkpoint_model(name)[0]
    kwargs = {} if img_size is None else {"img_size": img_size}
    torch.manual_seed(0)  # random weights: the same model on every run
    return zoo.create_model(name, pretrained=pretrained, **kwargs)


def run(args: argparse.Namespace) -> int:
    """Run the ViT benchmark from parsed command-line arguments and print a markdown table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        from visiontools.errors import UserError
        raise UserError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    img = None if args.img_size is None else (tuple(args.img_size) * 2)[:2]
    model = load_model(args.model, args.pretrained, img)
    result = benchmark_vit(model, args.r, args.batch_size, img, device, dtype, args.repeats, args.warmup)
    result["model"] = args.model
    write_results(args, markdown_table(result, args.model), result)
    return 0
