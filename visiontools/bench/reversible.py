"""Training memory against depth: plain ViT vs activation-checkpointed ViT vs reversible ViT.

At each depth the three are the same timm ``VisionTransformer`` (same width, heads, tokens and
parameters): ``plain`` (autograd keeps every block's activations), ``checkpointed`` (timm's
``set_grad_checkpointing()``: each block's activations are recomputed in backward, its inputs kept)
and ``reversible`` (:mod:`visiontools.patches.timm_reversible`: two-stream RevNet blocks whose inputs
are rebuilt from their outputs, so only one block's activations live at a time). One training step
(forward, cross-entropy, backward) is timed for all three interleaved in one process (medians), and
its peak memory is measured above the level before it (weights excluded, their gradients included;
``visiontools.bench.memory.peak_memory``; on a CPU, the storages every operator returns, counted until
freed: ``torch.profiler``'s allocator events miss the reversible backward's recomputation).

A second table gives the peak training-step memory of CIFAR models at the training batch size
(``--cifar-models``), the figure quoted beside ``visiontools eval --compare`` in the README.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from visiontools.bench.memory import peak_memory
from visiontools.timing import add_run_arguments, interleaved_times, machine_description, median, write_results

VARIANTS = ("plain", "checkpointed", "reversible")


def build(variant: str, depth: int, dim: int, heads: int, img_size: int, patch_size: int):
    """One of :data:`VARIANTS` as a timm ViT (seed 0, so all variants share weights)."""
    from timm.models.vision_transformer import VisionTransformer

    from visiontools.patches.timm_reversible import make_reversible

    torch.manual_seed(0)
    m = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads,
                          num_classes=10)
    if variant == "checkpointed":
        m.set_grad_checkpointing(True)
    elif variant == "reversible":
        make_reversible(m)
    return m.train()


def train_step(model, x, y) -> None:
    """Forward, cross-entropy and backward, with autograd on; gradients dropped afterwards."""
    with torch.inference_mode(False), torch.enable_grad():
        F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.grad = None


def benchmark(depths=(6, 12, 24), dim: int = 192, heads: int = 3, img_size: int = 224, patch_size: int = 16,
              batch_size: int = 16, repeats: int = 3, warmup: int = 1, device="cpu",
              cifar_models=("attn_vit_cifar", "lsh_vit_cifar", "rev_vit_cifar"), cifar_batch: int = 64,
              progress: bool = True) -> dict:
    """Peak memory and time of one training step per variant and depth (see module docstring)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    rows = []
    it = list(depths)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="depths", unit="depth")
    for depth in it:
        models = {v: build(v, depth, dim, heads, img_size, patch_size).to(device) for v in VARIANTS}
        times = interleaved_times({v: (lambda m=m: train_step(m, x, y)) for v, m in models.items()},
                                  repeats=repeats, warmup=warmup, device=device)
        mem = {v: peak_memory(lambda m=m: train_step(m, x, y), device, autograd=True) for v, m in models.items()}
        ms = {v: 1e3 * median(times[v]) for v in VARIANTS}
        rows.append({"depth": depth, "params": sum(p.numel() for p in models["plain"].parameters()),
                     "step_ms": ms, "images_per_s": {v: batch_size / ms[v] * 1e3 for v in VARIANTS},
                     "peak_bytes": mem, "times_s": times})
        del models
    base = {v: rows[0]["peak_bytes"][v] for v in VARIANTS}
    cifar = []
    if cifar_models:
        from visiontools.models import load
        xc = torch.randn(cifar_batch, 3, 32, 32, generator=g).to(device)
        yc = torch.randint(0, 10, (cifar_batch,), generator=g).to(device)
        for name in cifar_models:
            m = load(name, device=device, tome=False)[0].train()
            cifar.append({"model": name, "params": sum(p.numel() for p in m.parameters()),
                          "batch": cifar_batch, "peak_bytes": peak_memory(lambda: train_step(m, xc, yc), device, autograd=True)})
    return {"machine": machine_description(device), "device": str(device), "threads": torch.get_num_threads(),
            "dim": dim, "heads": heads, "img_size": img_size, "patch_size": patch_size,
            "tokens": (img_size // patch_size) ** 2 + 1, "batch": batch_size, "repeats": repeats,
            "warmup": warmup, "rows": rows,
            "memory_growth_vs_first_depth": {v: {r["depth"]: r["peak_bytes"][v] / base[v] for r in rows}
                                             for v in VARIANTS},
            "throughput_cost_vs_plain": {v: {r["depth"]: 1 - r["images_per_s"][v] / r["images_per_s"]["plain"]
                                             for r in rows} for v in VARIANTS if v != "plain"},
            "cifar_models": cifar}


def markdown_table(result: dict) -> str:
    """The result as markdown tables."""
    out = [f"One training step (fwd + cross-entropy + bwd), ViT width {result['dim']}, {result['heads']} heads, "
           f"{result['tokens']} tokens, batch {result['batch']}, fp32, {result['threads']} thread(s), medians of "
           f"{result['repeats']} interleaved rounds, {result['machine']}", "",
           "| depth | params | plain MB | checkpointed MB | reversible MB | plain im/s | checkpointed im/s "
           "| reversible im/s | checkpointed cost | reversible cost |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cost = result["throughput_cost_vs_plain"]
    for r in result["rows"]:
        d = r["depth"]
        mb, ips = r["peak_bytes"], r["images_per_s"]
        out.append(f"| {d} | {r['params'] / 1e6:.1f}M | {mb['plain'] / 2**20:.0f} | {mb['checkpointed'] / 2**20:.0f} | "
                   f"{mb['reversible'] / 2**20:.0f} | {ips['plain']:.1f} | {ips['checkpointed']:.1f} | "
                   f"{ips['reversible']:.1f} | {100 * cost['checkpointed'][d]:.0f}% | "
                   f"{100 * cost['reversible'][d]:.0f}% |")
    g = result["memory_growth_vs_first_depth"]
    first, last = result["rows"][0]["depth"], result["rows"][-1]["depth"]
    out += ["", f"Peak memory at depth {last} / depth {first}: " +
            ", ".join(f"{v} {g[v][last]:.2f}x" for v in VARIANTS) + ". Cost = throughput lost against plain."]
    if result["cifar_models"]:
        out += ["", "Peak training-step memory of the CIFAR models (fwd+bwd, weights excluded):", "",
                "| model | params | batch | peak MB |", "|---|---:|---:|---:|"]
        out += [f"| {c['model']} | {c['params'] / 1e6:.2f}M | {c['batch']} | {c['peak_bytes'] / 2**20:.1f} |"
                for c in result["cifar_models"]]
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench reversible``."""
    p.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24], help="ViT depths")
    p.add_argument("--dim", type=int, default=192, help="width (192 = ViT-Tiny)")
    p.add_argument("--num-heads", type=int, default=3, help="attention heads")
    p.add_argument("--img-size", type=int, default=224, help="input size")
    p.add_argument("--patch-size", type=int, default=16, help="patch size")
    p.add_argument("--batch-size", type=int, default=16, help="images per training step")
    p.add_argument("--cifar-models", nargs="*", default=["attn_vit_cifar", "lsh_vit_cifar", "rev_vit_cifar"],
                   help="registered CIFAR models whose training-step peak memory to list (none: skip)")
    p.add_argument("--cifar-batch", type=int, default=64, help="batch for --cifar-models")
    add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``visiontools bench reversible``."""
    from visiontools.timing import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or min(args.depths) < 1:
        from visiontools.errors import UserError
        raise UserError("--repeats, --batch-size and --depths must be >= 1 and --warmup >= 0")
    result = benchmark(args.depths, args.dim, args.num_heads, args.img_size, args.patch_size, args.batch_size,
                       args.repeats, args.warmup, resolve_device(args.device), args.cifar_models or (),
                       args.cifar_batch, progress=not args.no_progress)
    write_results(args, markdown_table(result), result)
    return 0
