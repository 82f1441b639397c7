"""Hyena vs attention: forward time and peak memory of one ViT block of each kind over token-grid sizes.

Both blocks are timm ``Block`` s of the same width and MLP: one with timm's ``Attention`` (fused
``scaled_dot_product_attention``), one with :class:`visiontools.layers.hyena.HyenaAttention` as ``attn_layer``.
At every grid size they are timed interleaved in one process (``visiontools.timing.interleaved_times``,
median reported). The table gives milliseconds per forward, the time ratio, the FLOP ratio
(``visiontools.timing.count_flops``: ``torch.utils.flop_counter`` plus FFTs at 5·n·log2(n)) and the
peak memory of one forward pass, then the crossover token count and the log-log slope of time and
memory against tokens (attention ~2 in time, Hyena ~1 plus a log factor).

Hyena's implicit filters depend only on the weights and the grid, so at inference they are generated
once per grid size and cached (``Hyena2d.cache_filters``); the "Hyena ms" column is that case. A third
candidate, "Hyena, filters regenerated", runs the same block with the cache off (as in training,
where the filters are regenerated every step), timed in the same interleaved rounds. Hyena's FLOPs
and peak memory are measured with the filters generated inside the forward (conservative: the cache
would otherwise hold the filter spectra, O(tokens x channels), outside the measured call).

Peak memory is measured for one forward pass and for one training step (forward, loss, backward,
both blocks in train mode, Hyena's filters regenerated as in training). With ``--vit-sizes`` the
registered ViT-S/16 pair (``hyena_vit_small_224`` against ``attn_vit_small_224``) is also timed end to
end at batch 1 for each image size.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the level before the forward. On CPU,
:func:`visiontools.bench.memory.peak_bytes`: the storages every operator returns are counted until they are
freed, and the running total's maximum is the peak (the same quantity as ``torch.profiler``'s
per-operator memory sums, which earlier results used, without starting the profiler). Scratch that an
operator allocates and frees within itself, and memory allocated outside PyTorch's allocator
(MKL/oneDNN workspaces), is not seen.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from visiontools.timing import (
    add_run_arguments, autocast_context, count_flops, interleaved_times, machine_description, median,
    save_figure, subplots, write_results,
)

DEFAULT_GRIDS = [14, 16, 24, 32, 48, 64, 96, 128]


def parse_grid(text: str) -> tuple[int, int]:
    """``"32"`` -> (32, 32); ``"24x40"`` -> (24, 40)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"not a grid size: {text!r} (expected e.g. 32 or 24x40)")
    return parts[0], parts[1]


def build_blocks(dim: int, num_heads: int, order: int, mlp_ratio: float, device):
    """(attention block, Hyena block): timm ``Block`` s of equal width and MLP, in eval mode."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    from visiontools.layers.hyena import HyenaAttention

    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    attn = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, attn_layer=Attention)
    if not getattr(attn.attn, "fused_attn", True):
        raise RuntimeError("timm Attention is not using fused SDPA here (TIMM_FUSED_ATTN=0?); "
                           "the comparison would be against the slow path")

    hyena = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                  attn_layer=HyenaAttention.bound(order=order, num_prefix_tokens=0))
    return attn.to(device).eval(), hyena.to(device).eval()


def uncached_copy(hyena_block):
    """A copy of a Hyena block with the filter cache off (filters regenerated on every call)."""
    import copy

    blk = copy.deepcopy(hyena_block)
    blk.attn.mixer.cache_filters = False
    return blk


def peak_forward_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated by one inference call of ``fn`` above the level before it (see module docstring)."""
    from visiontools.bench.memory import peak_memory

    return peak_memory(fn, device)


def peak_train_step_memory(block, x: torch.Tensor, device: torch.device) -> int:
    """Peak bytes of one training step of ``block`` on ``x`` (forward, a loss, backward; gradients
    then dropped), above the level before it. Hyena regenerates its filters inside the step."""
    from visiontools.bench.memory import peak_memory

    def step():
        block.train()
        try:
            block(x).square().mean().backward()
        finally:
            block.zero_grad(set_to_none=True)
            block.eval()

    return peak_memory(step, device, autograd=True)


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x) (None with fewer than two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def crossover(rows: list[dict]) -> int | None:
    """Smallest token count from which Hyena is faster than attention at every larger size measured."""
    found = None
    for row in sorted(rows, key=lambda r: r["tokens"]):
        if row["hyena_ms"] < row["attn_ms"]:
            found = row["tokens"] if found is None else found
        else:
            found = None
    return found


def auto_batch(tokens: int, max_tokens: int) -> int:
    """Batch size that keeps about ``max_tokens`` tokens per forward (at least 1)."""
    return max(1, max_tokens // tokens)


def benchmark(grids, dim: int = 192, num_heads: int = 3, order: int = 2, mlp_ratio: float = 4.0,
              batch_size: int | None = None, max_tokens: int = 4096, device="cpu",
              dtype: torch.dtype | None = None, repeats: int = 5, warmup: int = 1,
              progress: bool = True) -> dict:
    """Time and memory of one attention block and one Hyena block at each grid; see module docstring."""
    device = torch.device(device)
    torch.manual_seed(0)
    attn, hyena = build_blocks(dim, num_heads, order, mlp_ratio, device)
    hyena_regen = uncached_copy(hyena)
    rows = []
    it = list(grids)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="grids", unit="grid")
    for H, W in it:
        n = H * W
        b = batch_size or auto_batch(n, max_tokens)
        x = torch.randn(b, n, dim, device=device)
        hyena.attn.grid_size = hyena_regen.attn.grid_size = (H, W)  # row-major H x W grid, no prefix

        def run(block, x=x):
            with autocast_context(device, dtype):
                return block(x)

        fns = {"attn": lambda: run(attn), "hyena": lambda: run(hyena),
               "hyena_regen": lambda: run(hyena_regen)}
        with torch.inference_mode():  # both must agree on shapes before timing
            if run(hyena).shape != x.shape or run(attn).shape != x.shape:
                raise RuntimeError("block output shape mismatch")
        times = interleaved_times(fns, repeats=repeats, warmup=warmup, device=device)
        # FLOPs and memory of Hyena with its filters generated inside the forward (the cached
        # spectra would otherwise be held outside it, like weights): the conservative numbers
        flops = {"attn": count_flops(fns["attn"]), "hyena": count_flops(fns["hyena_regen"])}
        mem = {"attn": peak_forward_memory(fns["attn"], device),
               "hyena": peak_forward_memory(fns["hyena_regen"], device),
               "attn_train": peak_train_step_memory(attn, x, device),
               "hyena_train": peak_train_step_memory(hyena, x, device)}
        row = {"grid": [H, W], "tokens": n, "batch": b,
               "attn_ms": 1e3 * median(times["attn"]), "hyena_ms": 1e3 * median(times["hyena"]),
               "hyena_regen_ms": 1e3 * median(times["hyena_regen"]),
               "attn_times_s": times["attn"], "hyena_times_s": times["hyena"],
               "hyena_regen_times_s": times["hyena_regen"],
               "attn_flops": flops["attn"], "hyena_flops": flops["hyena"],
               "attn_peak_bytes": mem["attn"], "hyena_peak_bytes": mem["hyena"],
               "attn_train_peak_bytes": mem["attn_train"], "hyena_train_peak_bytes": mem["hyena_train"]}
        row["attn_over_hyena_time"] = row["attn_ms"] / row["hyena_ms"]
        row["attn_over_hyena_flops"] = flops["attn"] / max(1, flops["hyena"])
        rows.append(row)
        if progress:
            it.set_postfix(tokens=n, attn_ms=f"{row['attn_ms']:.1f}", hyena_ms=f"{row['hyena_ms']:.1f}")
        del x, fns  # free the input before the next grid's is allocated
    per_img = lambda r, k: r[k] / r["batch"]  # noqa: E731
    big = [r for r in rows if r["tokens"] >= 1024] or rows
    return {
        "machine": machine_description(device),
        "device": str(device), "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "dim": dim, "num_heads": num_heads, "order": order, "mlp_ratio": mlp_ratio,
        "repeats": repeats, "warmup": warmup, "rows": rows,
        "crossover_tokens": crossover(rows),
        "crossover_tokens_regen": crossover([{**r, "hyena_ms": r["hyena_regen_ms"]} for r in rows]),
        "slope_time": {"attn": loglog_slope([r["tokens"] for r in big], [per_img(r, "attn_ms") for r in big]),
                       "hyena": loglog_slope([r["tokens"] for r in big], [per_img(r, "hyena_ms") for r in big]),
                       "hyena_regen": loglog_slope([r["tokens"] for r in big],
                                                   [per_img(r, "hyena_regen_ms") for r in big])},
        "slope_memory": {
            "attn": loglog_slope([r["tokens"] for r in big], [per_img(r, "attn_peak_bytes") for r in big]),
            "hyena": loglog_slope([r["tokens"] for r in big], [per_img(r, "hyena_peak_bytes") for r in big])},
        "slopes_fit_tokens": [r["tokens"] for r in big],
        "memory_method": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                          "visiontools.bench.memory.peak_bytes: storages returned by operators, counted until freed"),
    }


def benchmark_vits(sizes, device="cpu", repeats: int = 5, warmup: int = 1) -> list[dict]:
    """End to end: ``hyena_vit_small_224`` against its attention twin ``attn_vit_small_224`` (same
    ViT-S/16 otherwise, random weights), forward at batch 1 for each image size, timed interleaved."""
    import visiontools.models  # noqa: F401  (registers the models with timm)
    from timm import create_model

    torch.manual_seed(0)
    models = {"attn": create_model("attn_vit_small_224").to(device).eval(),
              "hyena": create_model("hyena_vit_small_224").to(device).eval()}
    rows = []
    for size in sizes:
        x = torch.randn(1, 3, size, size, device=device)
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        times = interleaved_times(fns, repeats=repeats, warmup=warmup, device=device)
        attn_s, hyena_s = median(times["attn"]), median(times["hyena"])
        rows.append({"image_size": size, "tokens": (size // 16) ** 2, "attn_s": attn_s, "hyena_s": hyena_s,
                     "attn_over_hyena_time": attn_s / hyena_s,
                     "attn_times_s": times["attn"], "hyena_times_s": times["hyena"]})
    return rows


def vit_table(rows: list[dict]) -> str:
    """:func:`benchmark_vits` rows as a markdown table."""
    lines = ["ViT-S/16 end to end, batch 1: `hyena_vit_small_224` against `attn_vit_small_224` (fused SDPA)", "",
             "| image | tokens | attention s | Hyena s | attention/Hyena time |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['image_size']} px | {r['tokens']} | {r['attn_s']:.3f} | {r['hyena_s']:.3f} | "
              f"{r['attn_over_hyena_time']:.2f}x |" for r in rows]
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The result as a markdown table plus a summary line."""
    lines = [f"One ViT block, width {result['dim']} ({result['num_heads']}-head fused-SDPA attention vs "
             f"order-{result['order']} Hyena), {result['dtype']}, {result['machine']}", "",
             "| grid | tokens | batch | attention ms | Hyena ms | Hyena ms, filters regenerated "
             "| attn/Hyena time | attn/Hyena FLOPs* | attention peak MB | Hyena peak MB "
             "| attention training-step peak MB | Hyena training-step peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['grid'][0]}x{r['grid'][1]} | {r['tokens']} | {r['batch']} | {r['attn_ms']:.2f} | "
            f"{r['hyena_ms']:.2f} | {r['hyena_regen_ms']:.2f} | {r['attn_over_hyena_time']:.2f} | "
            f"{r['attn_over_hyena_flops']:.2f} | "
            f"{r['attn_peak_bytes'] / 2**20:.1f} | {r['hyena_peak_bytes'] / 2**20:.1f} | "
            f"{r['attn_train_peak_bytes'] / 2**20:.1f} | {r['hyena_train_peak_bytes'] / 2**20:.1f} |")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    st, sm = result["slope_time"], result["slope_memory"]
    co, co2 = result["crossover_tokens"], result["crossover_tokens_regen"]
    top = max(r["tokens"] for r in result["rows"])
    say = lambda c: (f"Hyena is faster than attention from {c} tokens on" if c else  # noqa: E731
                     f"Hyena is not faster than attention at the largest size measured ({top} tokens)")
    lines += ["", f"Crossover: {say(co)}. With its filters regenerated: {say(co2)}.",
              f"Log-log slope vs tokens (per image, tokens >= {min(result['slopes_fit_tokens'])}): time attention "
              f"{fmt(st['attn'])}, Hyena {fmt(st['hyena'])} (regenerated {fmt(st['hyena_regen'])}); peak memory "
              f"attention {fmt(sm['attn'])}, Hyena {fmt(sm['hyena'])}.",
              "*FLOPs from torch.utils.flop_counter, plus FFTs counted as 5·n·log2(n) per complex transform (half for real). "
              "Hyena FLOPs and peak memory include generating its filters in the forward.",
              f"Peak memory: {result['memory_method']}."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Log-log plot of time and peak memory (forward; training step) per image against tokens."""
    rows = result["rows"]
    n = [r["tokens"] for r in rows]
    fig, (ax, ax2) = subplots(1, 2, figsize=(10, 4))
    ax.loglog(n, [r["attn_ms"] / r["batch"] for r in rows], "o-", label="attention (fused SDPA)")
    ax.loglog(n, [r["hyena_ms"] / r["batch"] for r in rows], "s-", label=f"Hyena (order {result['order']})")
    ax.loglog(n, [r["hyena_regen_ms"] / r["batch"] for r in rows], "s--", alpha=0.6,
              label="Hyena, filters regenerated")
    ax.set_xlabel("tokens")
    ax.set_ylabel("ms per image (one block forward)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax2.loglog(n, [max(r["attn_peak_bytes"], 1) / r["batch"] / 2**20 for r in rows], "o-", label="attention")
    ax2.loglog(n, [max(r["hyena_peak_bytes"], 1) / r["batch"] / 2**20 for r in rows], "s-", label="Hyena")
    if all("attn_train_peak_bytes" in r for r in rows):
        ax2.loglog(n, [max(r["attn_train_peak_bytes"], 1) / r["batch"] / 2**20 for r in rows], "o--",
                   label="attention, training step")
        ax2.loglog(n, [max(r["hyena_train_peak_bytes"], 1) / r["batch"] / 2**20 for r in rows], "s--",
                   label="Hyena, training step")
    ax2.set_xlabel("tokens")
    ax2.set_ylabel("peak MB per image")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend()
    fig.suptitle(f"one ViT block, width {result['dim']}, {result['dtype']}, {result['machine']}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench hyena``."""
    p.add_argument("--grids", type=parse_grid, nargs="+", default=[(g, g) for g in DEFAULT_GRIDS],
                   metavar="HxW", help="token grids to measure (e.g. 14 32 24x40)")
    p.add_argument("--dim", type=int, default=192, help="block width")
    p.add_argument("--num-heads", type=int, default=3, help="attention heads")
    p.add_argument("--order", type=int, default=2, help="Hyena order")
    p.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP hidden width / dim (same in both blocks)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward at every grid (default: about --max-tokens tokens per forward)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="with no --batch-size: batch = max(1, max_tokens // tokens)")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU); Hyena's FFTs stay float32")
    add_run_arguments(p)
    p.add_argument("--vit-sizes", type=int, nargs="*", default=[], metavar="PX",
                   help="also time the Hyena ViT-S/16 against its attention twin end to end at these image sizes "
                        "(batch 1; e.g. 768 1024)")
    p.add_argument("--plot", type=Path, default=None, help="write a log-log PNG of time and memory vs tokens")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``visiontools bench hyena``."""
    from visiontools.timing import resolve_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    from visiontools.errors import UserError

    if (args.batch_size is not None and args.batch_size < 1) or args.repeats < 1 or args.warmup < 0:
        raise UserError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    if any(v < 16 or v % 16 for v in args.vit_sizes):
        raise UserError(f"--vit-sizes must be positive multiples of 16 pixels (the patch size), got {args.vit_sizes}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    result = benchmark(args.grids, dim=args.dim, num_heads=args.num_heads, order=args.order,
                       mlp_ratio=args.mlp_ratio, batch_size=args.batch_size, max_tokens=args.max_tokens,
                       device=device, dtype=dtype, repeats=args.repeats, warmup=args.warmup,
                       progress=not args.no_progress)
    table = markdown_table(result)
    if args.vit_sizes:
        result["vit"] = benchmark_vits(args.vit_sizes, device=device, repeats=args.repeats, warmup=args.warmup)
        table += "\n\n" + vit_table(result["vit"])
    write_results(args, table, result, plot=plot)
    return 0
