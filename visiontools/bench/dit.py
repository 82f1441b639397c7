"""Diffusion transformers (SD3, PixArt, Flux): unpatched vs token merging vs key/value downsampling.

Each model is a diffusers transformer with real block shapes (SD3-medium, PixArt-Σ, Flux.1) but only
a few blocks, random weights (nothing is downloaded), called at the token counts of a 1024² image
(4096 image tokens) with the models' text lengths. Candidates share the weights and are timed
interleaved in one process (``visiontools.timing.interleaved_times``). Beside the speed-up: the FLOP
ratio (``visiontools.timing.count_flops``, on one call of each candidate, which doubles as its
warm-up), speed-up / FLOP ratio (how much of the FLOP ideal the patch reaches), and the relative L2
distance of the output to the unpatched model's.
"""
from __future__ import annotations

import argparse

from visiontools.bench import loops, shared_copy
from visiontools.bench.vit import IDEAL_COLUMNS, add_ideal_arguments, ideal_cells
from visiontools.timing import add_run_arguments

#: Candidate methods: ToMe merge, ToDo downsample, and merge mode with ToFu's or PiToMe's rule.
METHODS = ("merge", "downsample", "tofu", "pitome")
# (diffusers class, config with real block shapes, text tokens); layers cut to a few blocks.
MODELS = {
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), 333),
    "pixart": ("PixArtTransformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=72,
        num_attention_heads=16, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False, interpolation_scale=2), 300),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56)), 512),
}
TINY = {"sd3": dict(attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                    pooled_projection_dim=8),
        "pixart": dict(attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16, caption_channels=16),
        "flux": dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                     axes_dims_rope=(4, 6, 6))}


# the single-call options' defaults (add_arguments takes them from here): --loop refuses them changed
SINGLE_CALL_DEFAULTS = {"candidates": ["merge@0.5", "downsample@0.5"], "rope_rules": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench dit``."""
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    parser.add_argument("--candidates", nargs="+", default=SINGLE_CALL_DEFAULTS["candidates"], metavar="METHOD@RATIO",
                        help="patched candidates besides the unpatched baseline, e.g. merge@0.5 downsample@0.75 "
                             "tofu@0.5 pitome@0.5 (tofu, pitome: merge mode with that method)")
    parser.add_argument("--resolution", type=int, default=1024, help="image size in pixels (square); latent = /8")
    add_run_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument("--tiny", action="store_true", help="tiny widths, same layout (smoke test)")
    add_ideal_arguments(parser, "the unpatched attention timed alone at the sizes each candidate attends over")
    parser.add_argument("--rope-rules", action="store_true",
                        help="instead of timing: errors of Flux's RoPE rules for merged tokens (small random Flux)")
    loops.add_loop_arguments(parser)


def parse_candidates(specs: list[str]) -> list[tuple[str, float]]:
    """``["merge@0.5", ...]`` -> ``[("merge", 0.5), ...]``; ``ValueError`` naming a bad entry."""
    out = []
    for spec in specs:
        method, _, ratio = spec.partition("@")
        try:
            out.append((method, float(ratio)))
        except ValueError:
            raise ValueError(f"candidate {spec!r} is not METHOD@RATIO (e.g. merge@0.5, downsample@0.75)") from None
        if method not in METHODS:
            raise ValueError(f"candidate {spec!r}: method must be one of {', '.join(METHODS)}")
    return out


def patch(model, method: str, ratio: float):
    """``model`` patched in place with one candidate (``tofu``/``pitome``: merge mode with that method)."""
    from visiontools.patches.diffusers_dit import apply_tome_dit

    if method in ("merge", "downsample"):
        return apply_tome_dit(model, ratio=ratio, mode=method)
    return apply_tome_dit(model, ratio=ratio, mode="merge", method=method)


def build(name: str, resolution: int, seed: int, tiny: bool):
    """The model (real block shapes, or ``tiny`` widths) and the keyword inputs of one call at ``resolution``:
    the adapter's example inputs (:func:`~visiontools.patches.diffusers_dit.dit_example_inputs`), with
    seeded random text, pooled embeddings and spatially smooth latents in place of its zeros."""
    import torch
    import diffusers

    from visiontools.patches.diffusers_dit import dit_example_inputs

    cls, config, n_text = MODELS[name]
    torch.manual_seed(seed)
    model = getattr(diffusers, cls)(**{**config, **(TINY[name] if tiny else {})}).eval()
    kw = dit_example_inputs(model, resolution, resolution, n_text, device="cpu")
    g = torch.Generator().manual_seed(seed)
    kw["encoder_hidden_states"] = torch.randn(kw["encoder_hidden_states"].shape, generator=g)
    kw["hidden_states"] = _smooth_like(kw["hidden_states"], g)
    if "pooled_projections" in kw:
        kw["pooled_projections"] = torch.randn(kw["pooled_projections"].shape, generator=g)
    return model, kw


def _smooth_like(x, g):
    """Random latents shaped like ``x`` (``(1, C, H, W)``, or Flux's packed ``(1, H*W, C)`` on a square
    grid) that are spatially smooth, as real latents are: noise on a grid 8x coarser, resized bicubically."""
    import torch
    import torch.nn.functional as F

    packed = x.ndim == 3
    c, h, w = (x.shape[2], round(x.shape[1] ** 0.5), round(x.shape[1] ** 0.5)) if packed else x.shape[1:]
    coarse = torch.randn(1, c, max(1, h // 8), max(1, w // 8), generator=g)  # small latents: one cell at least
    out = F.interpolate(coarse, size=(h, w), mode="bicubic")
    return out.flatten(2).transpose(1, 2) if packed else out


def candidate_calls(base, kw: dict, candidates: list[tuple[str, float]], outputs: dict, models: dict | None = None
                    ) -> dict:
    """``{"unpatched": call, "merge@0.5": call, ...}``: one forward (inference mode) of ``base`` and of a
    patched copy sharing its weights per candidate, each storing its output (float32) in ``outputs``
    (and, with ``models``, the model it calls)."""
    import torch

    fns = {}
    for method, ratio in [("unpatched", 0.0)] + list(candidates):
        key = "unpatched" if method == "unpatched" else f"{method}@{ratio:g}"
        model = shared_copy(base)
        if method != "unpatched":
            patch(model, method, ratio)
        if models is not None:
            models[key] = model

        def call(model=model, key=key):
            with torch.inference_mode():
                outputs[key] = model(**kw).sample.float()
        fns[key] = call
    return fns


def time_model(args: argparse.Namespace, name: str, candidates: list[tuple[str, float]], device=None,
               dtype=None) -> list[dict]:
    """Time the unpatched model and every candidate (patched copies sharing its weights) interleaved,
    on ``device`` in ``dtype`` (default: CPU, float32); a row each: median seconds, speed-ups (medians,
    per round), FLOP ratio, its share reached, rel. L2, and (unless ``--no-ideal``) the token-count
    ideal (``visiontools.bench.ideal.AttentionIdeal``); ``--profile``: the reduction steps' profile."""
    import torch

    from visiontools.timing import count_flops, interleaved_times, median

    device, dtype = torch.device(device or "cpu"), dtype or torch.float32
    base, kw = build(name, args.resolution, args.seed, args.tiny)
    base = base.to(device, dtype)
    kw = {k: (v.to(device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
              if torch.is_tensor(v) else v) for k, v in kw.items()}
    outputs, models = {}, {}
    fns = candidate_calls(base, kw, candidates, outputs, models)
    flops = {k: count_flops(f, warmup=False) for k, f in fns.items()}  # also each candidate's warm-up call
    parts = None if args.no_ideal else _attention_ideal(models, fns, device)
    n_img = (args.resolution // 16) ** 2  # latent /8, then 2x2 patches (SD3, PixArt) or 2x2 packing (Flux)
    n_par = sum(p.numel() for p in base.parameters())
    par = f"{n_par / 1e6:.0f}M" if n_par >= 1e6 else f"{n_par / 1e3:.0f}k" if n_par >= 1e3 else str(n_par)
    print(f"\n{name}: {par} parameters, timing {len(fns)} candidates"
          f"{'' if parts is None else f' and {len(parts.fns)} attention sizes (token-count ideal)'}, "
          f"{args.warmup} warm-up + {args.repeats} rounds")
    times = interleaved_times({**fns, **(parts.fns if parts else {})}, repeats=args.repeats, warmup=args.warmup,
                              device=device, progress=not args.no_progress)
    medians = {k: median(v) for k, v in times.items()}
    ref_t, ref = medians["unpatched"], outputs["unpatched"]
    cols = parts.columns({k: medians[k] for k in fns}, "unpatched", medians) if parts else {}
    rows = []
    for key in fns:
        med = medians[key]
        flop_ratio = flops["unpatched"] / flops[key]
        rows.append(dict(model=name, candidate=key, image_tokens=n_img, median_s=med, times_s=times[key],
                         speedup=ref_t / med, speedup_paired=median([b / c for b, c in zip(times["unpatched"],
                                                                                              times[key])]),
                         flops=flops[key], flop_ratio=flop_ratio, of_ideal=ref_t / med / flop_ratio,
                         rel_l2=((outputs[key] - ref).norm() / ref.norm()).item(), **cols.get(key, {}),
                         **({"attention_calls": parts.calls[key]} if parts else {})))
    if args.profile:
        from visiontools.bench.profile import profile_patched

        for row in rows[1:]:
            row["profile"] = profile_patched(fns[row["candidate"]], device)
    return rows


def _attention_ideal(models: dict, fns: dict, device):
    """The token-count ideal (``visiontools.bench.ideal.AttentionIdeal``): the attention calls of one
    call of each candidate (``fns``; its model in ``models``), timed on the unpatched model's attention."""
    from visiontools.bench.ideal import AttentionIdeal, attention_modules, record_attention
    from visiontools.patches.diffusers_dit import dit_blocks

    def attns(model):
        return attention_modules([b for _, b, _ in dit_blocks(model)])
    calls = {key: record_attention(fns[key], attns(m)) for key, m in models.items()}
    return AttentionIdeal(attns(models["unpatched"]), calls, device)


def _markdown(rows: list[dict]) -> str:
    """The results table (the token-count ideal's columns: dashes with ``--no-ideal``), then any profiles."""
    from visiontools.bench.profile import profile_table

    lines = ["| model (blocks) | candidate | median s | speed-up | per-round speed-up | FLOP ratio | speed-up / FLOP "
             "ratio |" + IDEAL_COLUMNS + " rel. L2 vs unpatched |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['candidate']} | {r['median_s']:.3f} | {r['speedup']:.2f}× | "
                     f"{r['speedup_paired']:.2f}× | {r['flop_ratio']:.2f}× | {r['of_ideal']:.2f} |{ideal_cells(r)} "
                     f"{r['rel_l2']:.4f} |")
    lines += [t for r in rows if r.get("profile") for t in ("", profile_table(f"{r['model']} {r['candidate']}",
                                                                             r["profile"]))]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for every model; print and write (``--out-md``, ``--out-json``) the table."""
    import torch

    from visiontools.errors import require
    from visiontools.timing import dtype_label, machine_description, resolve_device, resolve_dtype, write_results

    require("diffusers", "`visiontools bench dit`")
    loops.check_mode_options(args, SINGLE_CALL_DEFAULTS)
    if args.loop:  # whole denoising loops (visiontools.bench.loops), on any device
        return loops.run_dit(args, build)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)  # bf16 on CUDA (fp16 where the GPU lacks it), float32 elsewhere
    if args.rope_rules:
        errs = rope_rule_errors()
        print("| rope rule | rel. L2 of output | rel. L2 of block-0 image attention |\n|---|---|---|")
        for rule, e in errs.items():
            print(f"| {rule} | {e['output']:.4f} | {e['block0_attention']:.4f} |")
        return 0
    candidates = parse_candidates(args.candidates)
    machine = machine_description(device)
    rows = []
    with torch.inference_mode():
        for name in args.models:
            rows += time_model(args, name, candidates, device, dtype)
            print(_markdown([r for r in rows if r["model"] == name]))
    header = (f"Diffusion-transformer blocks{' (tiny)' if args.tiny else ''} at {args.resolution}² "
              f"({(args.resolution // 16) ** 2} image tokens), {dtype_label(dtype)}, batch 1, FLOP-counting call + "
              f"{args.warmup} "
              f"warm-up + {args.repeats} interleaved rounds; {machine}")
    result = dict(machine=machine, device=str(device), dtype=dtype_label(dtype), resolution=args.resolution,
                  threads=torch.get_num_threads(), tiny=bool(args.tiny),
                  repeats=args.repeats, warmup=args.warmup, models={n: MODELS[n][0] for n in args.models}, rows=rows)
    write_results(args, _markdown(rows), result, header=header, echo=False)  # each model's table is printed above
    return 0


def rope_rule_errors(seeds: int = 3, grid: int = 24, ratio: float = 0.5) -> dict[str, dict[str, float]]:
    """Merge mode on a small random Flux (2 double + 4 single blocks, head dim 32): mean relative L2
    error, against the unpatched model, of the output and of the first block's image attention
    output, for each RoPE rule of merged tokens and for merged tokens without positions (``none``)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from visiontools.patches import diffusers_dit as dit

    rules, real = (*dit.ROPE_RULES, "none"), dit._merged_rope
    errs = {r: {"output": 0.0, "block0_attention": 0.0} for r in rules}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=8, axes_dims_rope=(8, 12, 12)).eval()
        g = torch.Generator().manual_seed(seed)
        ids = torch.zeros(grid, grid, 3)
        ids[..., 1], ids[..., 2] = torch.arange(grid)[:, None], torch.arange(grid)[None]
        x = torch.nn.functional.interpolate(torch.randn(2, 16, grid // 4, grid // 4, generator=g), size=(grid, grid),
                                            mode="bicubic") + 0.1 * torch.randn(2, 16, grid, grid, generator=g)
        kw = dict(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                  pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([0.5, 0.5]),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(7, 3))
        seen = []
        model.transformer_blocks[0].attn.register_forward_hook(lambda m, a, out: seen.append(out[0]))
        with torch.no_grad():
            ref = model(**kw).sample
            ref_attn = seen.pop()
            for rule in rules:
                try:
                    if rule == "none":  # merged tokens at angle 0: no position at all
                        dit._merged_rope = lambda p, c, s, r: tuple(t * 0 + v for t, v in zip(real(p, c, s, r), (1, 0)))
                    dit.apply_tome_dit(model, ratio=ratio, rope="mean" if rule == "none" else rule)
                    out = model(**kw).sample
                finally:
                    dit._merged_rope = real
                dit.remove_tome_dit(model)
                errs[rule]["output"] += ((out - ref).norm() / ref.norm()).item() / seeds
                attn = seen.pop()
                errs[rule]["block0_attention"] += ((attn - ref_attn).norm() / ref_attn.norm()).item() / seeds
    return errs
