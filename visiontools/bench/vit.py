"""ViT token-merging benchmark: timm's unpatched model (fused SDPA attention) against ToMe at several r.

All candidates run interleaved in one process (see ``visiontools.timing``); the table reports
images/s, the measured speedup over the baseline, the FLOP ratio (``torch.utils.flop_counter``) and
how much of that ideal speedup was realised.
"""
from __future__ import annotations

import argparse
import copy

from visiontools.tome.r_text import TOKENS_HEADER, r_argument, schedule_label, token_span

DEFAULT_MODEL = "vit_base_patch16_224"


def benchmark_vit(model: torch.nn.Module, rs, batch_size: int = 32, img_size: tuple[int, int] | None = None,
                  device="cpu", dtype: torch.dtype | None = None, repeats: int = 10, warmup: int = 3,
                  progress: bool = True) -> dict:
    """Time ``model`` unpatched and ToMe-patched at each r setting in ``rs`` (interleaved, medians)
    and count FLOPs per image. Returns a dict with one row per candidate."""
    import torch

    from visiontools.patches.timm import apply_tome, tome_forward
    from visiontools.timing import autocast_context, count_flops, interleaved_times, machine_description, median

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
                tokens = list(tome_forward(m, x1)[1].tokens_per_layer)
        speedup, flop_ratio = base_t / t, base_flops / flops
        rows.append({
            "name": name, "r": r, "final_tokens": tokens and tokens[-1], "tokens_per_layer": tokens,
            "median_s": t, "img_per_s": batch_size / t,
            "speedup": speedup, "gflops_per_img": flops / 1e9, "flop_ratio": flop_ratio,
            "measured_over_ideal": speedup / flop_ratio, "times_s": times[name],
        })
    return {
        "machine": machine_description(device), "device": str(device),
        "dtype": str(dtype or torch.float32).replace("torch.", ""), "batch_size": batch_size,
        "img_size": list(img_size), "repeats": repeats, "warmup": warmup,
        "baseline_fused_attn": bool(getattr(model.blocks[0].attn, "fused_attn", False)), "rows": rows,
    }


TOME_COLUMNS = f"| candidate | {TOKENS_HEADER} | im/s | speedup | GFLOPs/img | FLOP ratio |"


def tome_cells(row: dict) -> str:
    """A result row's :data:`TOME_COLUMNS` cells (the columns ``bench vit`` and ``bench onnx`` share)."""
    tok = token_span(row.get("tokens_per_layer"))
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
    p.add_argument("--r", type=r_argument, nargs="+", default=[8, 16], metavar="R",
                   help=f"ToMe settings to compare with the {baseline}: an int r, 'r,inflection' "
                        "(e.g. 16,-0.5 for the decreasing schedule) or a comma list of per-layer r")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="PX",
                   help="input size (one value for square, or H W); default: the model's own")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench [vit]``."""
    from visiontools.timing import add_run_arguments

    add_model_arguments(p, DEFAULT_MODEL, "baseline", 32, "images per forward pass")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (visiontools.timing.resolve_dtype); auto = bf16 on CUDA, fp32 on CPU")
    add_run_arguments(p)


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model ``--model`` names (``visiontools.models.load``: a shipped checkpoint, a checkpoint file,
    or a timm name with random weights unless ``--pretrained``), built for ``--img-size`` when given."""
    from visiontools import models  # imports timm: only when a model is loaded, not for --help

    img = None if args.img_size is None else (tuple(args.img_size) * 2)[:2]
    return models.load(args.model, pretrained=args.pretrained, **({} if img is None else {"img_size": img}))[0]


def run(args: argparse.Namespace) -> int:
    """Run the ViT benchmark from parsed command-line arguments and print a markdown table."""
    import torch

    from visiontools.timing import busy_machine_note, resolve_device, resolve_dtype, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        from visiontools.errors import UserError
        raise UserError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    img = None if args.img_size is None else (tuple(args.img_size) * 2)[:2]
    model = load_model(args)
    result = benchmark_vit(model, args.r, args.batch_size, img, device, dtype, args.repeats, args.warmup,
                           progress=not args.no_progress)
    result["model"] = args.model
    write_results(args, markdown_table(result, args.model), result)
    note = busy_machine_note([row["speedup"] for row in result["rows"][1:]], device)
    if note:
        print(note)
    return 0
