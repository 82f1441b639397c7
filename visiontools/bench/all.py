"""Every GPU number the docs promise, from one command within a time budget: ``visiontools bench all``.

Four sections, each timed interleaved in one process (``visiontools.timing.interleaved_times``):

- ``vit``: ViT-B/16 and ViT-L/16 (random weights, batch 256, bf16 autocast on CUDA): timm's fused
  SDPA against ToMe at r=8, r=16 and the decreasing schedule (16, -0.5), and r=16 without
  proportional attention (whose mask keeps SDPA off its flash kernel), eager and under
  ``torch.compile``; the counted FLOP ratio beside the measured one.
- ``sd``: the SD 1.5 and SDXL UNets (random weights at their real shapes) at 1024² and 2048²:
  diffusers' SDPA against tomesd, ToMe-SD merge and downsample at ratios 0.5 and 0.75.
- ``dit``: a few SD3-medium-, PixArt- and Flux-sized blocks (``visiontools bench dit``'s models) at
  1024² and 2048²: unpatched against ToMe merge and key/value downsampling (ratios 0.5, 0.75).
- ``hyena``: one Hyena block against one SDPA attention block from 1K to 64K tokens: time and peak memory.
- ``lsh``: LSH attention against SDPA from 4K to 64K tokens: time and peak memory.

Each section fails on its own (its error is recorded, the others still run), and every finished
measurement is written at once to ``OUT/bench_all.json`` and ``OUT/bench_all.md``, with the machine
named. ``--budget-s`` bounds the whole run: each section gets an equal share of what is left, sizes
run smallest first, and a size whose predicted time does not fit is skipped (the largest go first).
``--smoke`` runs every section at tiny sizes on the CPU (the test suite does), so the script is
known to work before a GPU is ever available. ``scripts/gpu_bench.sh`` is the prepared GPU run.
"""
from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

SECTIONS = ("vit", "sd", "dit", "hyena", "lsh")

# The GPU run. Items of a section are listed smallest first; "cost" is a relative size used to
# predict an item's time from the last one measured, "fixed_s" the seconds an item spends beyond that
# (compilation), which do not scale with its size.
# Compiling the ViT-B variants (SDPA and the ToMe schedules, whose token counts change from block to
# block) took about 390 s of a 421 s run for four variants on an H200 with torch 2.11, and starved the
# other sections; with five variants, ViT-B eager + compiled + ViT-L eager took 464 s (docs/results/gpu).
# A compiled item runs only where its section has that much time.
COMPILE_S = 390.0
FULL = {
    "vit": [dict(model="vit_base_patch16_224", batch=256, compile=False, cost=1),
            dict(model="vit_base_patch16_224", batch=256, compile=True, cost=3, fixed_s=COMPILE_S),
            dict(model="vit_large_patch16_224", batch=256, compile=False, cost=3.5),
            dict(model="vit_large_patch16_224", batch=256, compile=True, cost=8, fixed_s=COMPILE_S)],
    "sd": [dict(unet=u, resolution=r, cost=w * (r / 1024) ** 2.5)
           for r in (1024, 2048) for u, w in (("sd15", 1), ("sdxl", 2.5))],
    "dit": [dict(model=m, resolution=r, cost=w * (r / 1024) ** 2.5)
            for r in (1024, 2048) for m, w in (("pixart", 1), ("sd3", 1.2), ("flux", 4))],
    "hyena": [dict(grid=g, cost=g ** 2) for g in (32, 64, 128, 181, 256)],
    "lsh": [dict(grid=g, cost=g ** 2) for g in (64, 128, 181, 256)],
}
# CPU smoke sizes: every code path, in seconds.
SMOKE = {
    "vit": [dict(model="vit_tiny_patch16_224", batch=2, compile=False, cost=1, img_size=64, patch_size=8, depth=3)],
    "sd": [dict(unet="sd15_tiny", resolution=64, cost=1), dict(unet="sdxl_tiny", resolution=64, cost=1)],
    "dit": [dict(model=m, resolution=128, cost=1) for m in ("pixart", "sd3", "flux")],
    "hyena": [dict(grid=8, cost=64), dict(grid=16, cost=256)],
    "lsh": [dict(grid=8, cost=64), dict(grid=16, cost=256)],
}
VIT_SCHEDULES = [8, 16, (16, -0.5)]
# r=16 without proportional attention: its log(size) mask keeps SDPA off the flash kernel on CUDA, which
# this row measures (on an H200, ViT-B at r=16: 1.12x with it, 1.22x without, for a FLOP ratio of 2.00x).
VIT_NO_PROP = 16
SD_CANDIDATES = [("tomesd", 0.5), ("tomesd", 0.75), ("merge", 0.5), ("merge", 0.75),
                 ("downsample", 0.5), ("downsample", 0.75), ("tofu", 0.5), ("pitome", 0.5)]
DIT_CANDIDATES = [("merge", 0.5), ("downsample", 0.5), ("downsample", 0.75), ("tofu", 0.5), ("pitome", 0.5)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench all``."""
    from visiontools.timing import add_rounds_arguments

    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run, in order")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds for the whole run; the largest sizes are dropped first to fit")
    p.add_argument("--smoke", action="store_true",
                   help="every section at tiny sizes, 1 timed round (CPU, seconds): checks the script")
    add_rounds_arguments(p)  # the shared defaults; --smoke times 1 round after 1 warm-up whatever they say
    p.add_argument("--out", default="docs/results/gpu", help="folder for bench_all.json and bench_all.md")


class Budget:
    """Deadlines for the sections and the prediction that decides whether the next size fits."""

    def __init__(self, seconds: float, sections: int):
        self.start, self.seconds, self.left = time.perf_counter(), seconds, sections

    def section_deadline(self) -> float:
        """Equal share of the time still left for this section and the ones after it."""
        now = time.perf_counter()
        share = (self.start + self.seconds - now) / max(1, self.left)
        self.left -= 1
        return now + share

    @staticmethod
    def fits(deadline: float, last: tuple[float, float] | None, cost: float, fixed_s: float = 0.0) -> bool:
        """Whether an item of relative ``cost`` fits before ``deadline``, predicted from the last
        ``(seconds, cost)`` (seconds without its ``fixed_s``) plus this item's ``fixed_s``; the first
        item of a section runs unless its ``fixed_s`` alone overruns the deadline."""
        if last is None:
            return time.perf_counter() + fixed_s < deadline
        return time.perf_counter() + last[0] * cost / last[1] + fixed_s <= deadline


def run_section(name: str, items: list[dict], measure, deadline: float, results: dict, save) -> None:
    """Measure ``items`` in order until the deadline; record rows, skips and errors; save after each."""
    sec = results["sections"].setdefault(name, {"rows": [], "skipped": [], "errors": []})
    last = None
    for item in items:
        label = {k: v for k, v in item.items() if k not in ("cost", "fixed_s")}
        if not Budget.fits(deadline, last, item["cost"], item.get("fixed_s", 0.0)):
            sec["skipped"].append(label)
            print(f"[{name}] skipped {label}: does not fit in the time budget", flush=True)
            continue
        print(f"[{name}] {label} ...", flush=True)
        t0 = time.perf_counter()
        try:
            rows = measure(item)
            sec["rows"].extend(rows)
        except Exception as e:  # one size (or section) failing loses nothing else
            sec["errors"].append({**label, "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc(limit=4)})
            print(f"[{name}] {label} failed: {type(e).__name__}: {e}", flush=True)
        last = (max(time.perf_counter() - t0 - item.get("fixed_s", 0.0), 1e-3), item["cost"])
        save()


def run(args: argparse.Namespace) -> int:
    """``visiontools bench all``: every section within ``--budget-s``; results saved as they come."""
    import torch

    from visiontools.timing import machine_description, resolve_device

    if not args.budget_s > 0:
        raise ValueError(f"--budget-s is the time for the whole run in seconds and must be > 0, got {args.budget_s}")
    device = torch.device("cpu") if args.smoke else resolve_device(args.device)
    plan = SMOKE if args.smoke else FULL
    ctx = Context(device=device, smoke=args.smoke, repeats=1 if args.smoke else args.repeats,
                  warmup=1 if args.smoke else args.warmup)
    results = {"machine": machine_description(device), "device": str(device), "smoke": args.smoke,
               "budget_s": args.budget_s, "sections": {}}
    out = Path(args.out)
    save = lambda: write(results, out)  # noqa: E731
    budget = Budget(args.budget_s, len(args.sections))
    for name in args.sections:
        deadline = budget.section_deadline()
        run_section(name, plan[name], lambda item, name=name: MEASURE[name](ctx, item), deadline, results, save)
    results["elapsed_s"] = time.perf_counter() - budget.start
    save()
    errors = sum(len(s["errors"]) for s in results["sections"].values())
    print(f"wrote {out / 'bench_all.json'} and {out / 'bench_all.md'} in {results['elapsed_s']:.0f} s"
          + (f" ({errors} measurement(s) failed: see the JSON)" if errors else ""))
    return 0


class Context:
    """What every measurement needs: the device, the dtype, smoke mode, timed rounds."""

    def __init__(self, device, smoke: bool, repeats: int, warmup: int = 1):
        import torch

        self.device, self.smoke, self.repeats, self.warmup = device, smoke, repeats, warmup
        from visiontools.timing import resolve_dtype

        self.dtype = resolve_dtype("auto", device)  # bf16 on GPUs that have it, fp16 on older ones; fp32 on CPUs
        self.half = torch.float16 if device.type == "cuda" else torch.float32  # the diffusion models' dtype

    def times(self, fns: dict) -> dict:
        from visiontools.timing import interleaved_times

        return interleaved_times(fns, repeats=self.repeats, warmup=self.warmup, device=self.device)


# ----------------------------------------------------------------------------- sections

def measure_vit(ctx: Context, item: dict) -> list[dict]:
    """One ViT: SDPA baseline vs ToMe schedules, eager or compiled, FLOP ratio beside the measured ratio."""
    import copy

    import timm
    import torch

    from visiontools.patches.timm import apply_tome
    from visiontools.timing import autocast_context, count_flops, dtype_label, median

    kw = {k: item[k] for k in ("img_size", "patch_size", "depth") if k in item}
    torch.manual_seed(0)
    base = timm.create_model(item["model"], **kw).eval().to(ctx.device)
    size = kw.get("img_size", 224)
    x = torch.randn(item["batch"], 3, size, size, device=ctx.device)
    one = torch.randn(1, 3, size, size, device=ctx.device)
    models = {"sdpa": base, **{f"r={_label(r)}": apply_tome(copy.deepcopy(base), r=r) for r in VIT_SCHEDULES},
              f"r={VIT_NO_PROP} no prop-attn": apply_tome(copy.deepcopy(base), r=VIT_NO_PROP, prop_attn=False)}
    flops = {k: count_flops(lambda m=m: m(one)) for k, m in models.items()}  # fp32, one image, before compiling
    if item["compile"]:
        models = {k: torch.compile(m) for k, m in models.items()}

    def call(m):
        with torch.inference_mode(), autocast_context(ctx.device, ctx.dtype):
            return m(x)

    times = ctx.times({k: (lambda m=m: call(m)) for k, m in models.items()})
    ref = median(times["sdpa"])
    return [{"model": item["model"], "compile": item["compile"], "batch": item["batch"], "candidate": k,
             "dtype": dtype_label(ctx.dtype), "median_s": median(times[k]),
             "images_per_s": item["batch"] / median(times[k]), "speedup": ref / median(times[k]),
             "flop_ratio": flops["sdpa"] / flops[k], "times_s": times[k]} for k in models]


def _label(r) -> str:
    return f"{r[0]},{r[1]:g}" if isinstance(r, tuple) else str(r)


# diffusers' SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, architecture only)
SDXL_UNET_CONFIG = {
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": (5, 10, 20), "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
SDXL_TINY_CONFIG = {
    **SDXL_UNET_CONFIG, "block_out_channels": (32, 64, 64), "attention_head_dim": (2, 4, 4),
    "transformer_layers_per_block": (1, 1, 1), "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 32, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
}


def unet_config(name: str) -> dict:
    from visiontools.bench.sd import SD15_UNET_CONFIG, TINY_UNET_CONFIG

    return {"sd15": SD15_UNET_CONFIG, "sd15_tiny": TINY_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG,
            "sdxl_tiny": SDXL_TINY_CONFIG}[name]


def unet_inputs(config: dict, resolution: int, device, dtype) -> tuple:
    """``(sample, timestep, encoder_hidden_states, added_cond_kwargs)`` for one square image."""
    from visiontools.patches.diffusers import unet_example_inputs

    return unet_example_inputs(config, resolution // 8, resolution // 8, device, dtype)


def measure_sd(ctx: Context, item: dict) -> list[dict]:
    """One UNet at one resolution: SDPA vs tomesd, merge and downsample; FLOP ratio (counted on a
    meta-device twin) and the relative L2 distance of the predicted noise to SDPA's."""
    import torch
    from diffusers import UNet2DConditionModel

    from visiontools.bench import shared_copy
    from visiontools.bench.sd import _patch
    from visiontools.timing import count_flops, median

    cfg = unet_config(item["unet"])
    dtype = ctx.half
    torch.manual_seed(0)
    base = UNet2DConditionModel(**cfg).eval().to(ctx.device, dtype)
    with torch.device("meta"):
        meta = UNet2DConditionModel(**cfg).eval().to(dtype)  # the meta inputs below are in ``dtype`` too
    x, t, e, added = unet_inputs(cfg, item["resolution"], ctx.device, dtype)
    meta_in = (x.to("meta"), t.to("meta"), e.to("meta"),
               None if added is None else {k: v.to("meta") for k, v in added.items()})
    fns, outs, flops = {}, {}, {}
    for method, ratio in [("sdpa", 0.0)] + SD_CANDIDATES:
        name = "sdpa" if method == "sdpa" else f"{method}@{ratio:g}"
        levels = 2 if "sdxl" in item["unet"] else 1  # SDXL's first attention is at 1/2 of the latent
        unet = _patch(shared_copy(base), method, ratio, levels)
        m = _patch(shared_copy(meta), method, ratio, levels)
        flops[name] = count_flops(lambda m=m: m(*meta_in[:3], added_cond_kwargs=meta_in[3]))

        def call(unet=unet, name=name):
            with torch.inference_mode():
                outs[name] = unet(x, t, e, added_cond_kwargs=added).sample.float()
        fns[name] = call
    times = ctx.times(fns)
    ref = median(times["sdpa"])
    return [{"unet": item["unet"], "resolution": item["resolution"], "candidate": k, "dtype": str(dtype)[6:],
             "median_s": median(times[k]), "speedup": ref / median(times[k]), "flop_ratio": flops["sdpa"] / flops[k],
             "rel_l2": ((outs[k] - outs["sdpa"]).norm() / outs["sdpa"].norm()).item(), "times_s": times[k]}
            for k in fns]


def _mixer_rows(ctx: Context, section: str, grid: int, fns: dict, flops: dict, dim: int) -> list[dict]:
    """Time (interleaved) and forward peak memory of each mixer on one token grid."""
    from visiontools.bench.memory import peak_memory
    from visiontools.timing import median

    times = ctx.times(fns)
    ref = median(times["sdpa"])
    return [{"section": section, "tokens": grid * grid, "grid": grid, "dim": dim, "candidate": k,
             "median_s": median(times[k]), "speedup": ref / median(times[k]),
             "peak_mb": peak_memory(fns[k], ctx.device) / 2 ** 20, "flops": flops.get(k),
             "times_s": times[k]} for k in fns]


def measure_hyena(ctx: Context, item: dict) -> list[dict]:
    """One Hyena block (order 2) against one SDPA attention block (width 192, batch 1)."""
    import torch

    from visiontools.bench.hyena import build_blocks
    from visiontools.timing import autocast_context, count_flops

    dim, g = 192, item["grid"]
    torch.manual_seed(0)
    attn, hyena = build_blocks(dim, 3, 2, 4.0, ctx.device)
    hyena.attn.grid_size = (g, g)
    x = torch.randn(1, g * g, dim, device=ctx.device)

    def call(block):
        with torch.inference_mode(), autocast_context(ctx.device, ctx.dtype):
            return block(x)

    fns = {"sdpa": lambda: call(attn), "hyena": lambda: call(hyena)}
    flops = {k: count_flops(f) for k, f in fns.items()} if g * g <= 16384 else {}
    return _mixer_rows(ctx, "hyena", g, fns, flops, dim)


def measure_lsh(ctx: Context, item: dict) -> list[dict]:
    """LSH attention (bucket 64, 4 hashes) against timm's SDPA attention (width 192, batch 1)."""
    import torch
    from timm.layers import Attention

    from visiontools.layers.lsh import LSHAttention
    from visiontools.timing import autocast_context

    dim, g = 192, item["grid"]
    torch.manual_seed(0)
    bucket = 8 if ctx.smoke else 64
    mixers = {"sdpa": Attention(dim, num_heads=3), "lsh": LSHAttention(dim, num_heads=3, bucket_size=bucket, n_hashes=4)}
    mixers = {k: m.eval().to(ctx.device) for k, m in mixers.items()}
    x = torch.randn(1, g * g, dim, device=ctx.device)

    def call(m):
        with torch.inference_mode(), autocast_context(ctx.device, ctx.dtype):
            return m(x)

    return _mixer_rows(ctx, "lsh", g, {k: (lambda m=m: call(m)) for k, m in mixers.items()}, {}, dim)


def measure_dit(ctx: Context, item: dict) -> list[dict]:
    """Diffusion-transformer blocks at one resolution: unpatched vs merge, downsample, ToFu and PiToMe;
    FLOP ratio (counted on the device, one call) and relative L2 of the output to the unpatched model's."""
    import torch

    from visiontools.bench.dit import build, candidate_calls
    from visiontools.timing import count_flops, median

    dtype = ctx.half
    base, kw = build(item["model"], item["resolution"], 0, ctx.smoke)
    base = base.to(ctx.device, dtype)
    kw = {k: (v.to(ctx.device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
              if torch.is_tensor(v) else v) for k, v in kw.items()}
    outs = {}
    fns = candidate_calls(base, kw, DIT_CANDIDATES, outs)
    flops = {k: count_flops(f) for k, f in fns.items()}
    times = ctx.times(fns)
    ref = median(times["unpatched"])
    return [{"model": item["model"], "resolution": item["resolution"], "candidate": k, "dtype": str(dtype)[6:],
             "median_s": median(times[k]), "speedup": ref / median(times[k]),
             "flop_ratio": flops["unpatched"] / flops[k],
             "rel_l2": ((outs[k] - outs["unpatched"]).norm() / outs["unpatched"].norm()).item(),
             "times_s": times[k]} for k in fns]


MEASURE = {"vit": measure_vit, "sd": measure_sd, "dit": measure_dit, "hyena": measure_hyena, "lsh": measure_lsh}


# ----------------------------------------------------------------------------- results

def markdown(results: dict) -> str:
    """The results as markdown tables, one per section, with the machine named."""
    lines = [f"# `visiontools bench all` on {results['machine']}", ""]
    if results["smoke"]:
        lines += ["Smoke run (tiny sizes, CPU): checks the script, not a measurement.", ""]
    cols = {"vit": ["model", "compile", "batch", "candidate", "images_per_s", "speedup", "flop_ratio"],
            "sd": ["unet", "resolution", "candidate", "median_s", "speedup", "flop_ratio", "rel_l2"],
            "dit": ["model", "resolution", "candidate", "median_s", "speedup", "flop_ratio", "rel_l2"],
            "hyena": ["tokens", "candidate", "median_s", "speedup", "peak_mb", "flops"],
            "lsh": ["tokens", "candidate", "median_s", "speedup", "peak_mb"]}
    for name, sec in results["sections"].items():
        lines += [f"## {name}", "", "| " + " | ".join(cols[name]) + " |", "|" + "---|" * len(cols[name])]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols[name]) + " |" for r in sec["rows"]]
        lines += [""] + [f"- skipped (time budget): {s}" for s in sec["skipped"]]
        lines += [f"- failed: {e_['error']} ({ {k: v for k, v in e_.items() if k not in ('error', 'traceback')} })"
                  for e_ in sec["errors"]] + [""]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def write(results: dict, out: Path) -> None:
    """``bench_all.json`` and ``bench_all.md`` in ``out`` (rewritten after every measurement)."""
    from visiontools.timing import write_results

    write_results(argparse.Namespace(out_md=out / "bench_all.md", out_json=out / "bench_all.json"),
                  markdown(results), results, echo=False)
