"""Whole denoising loops (``bench sd --loop``, ``bench dit --loop``): token reduction beside diffusers' own
step caches.

Each candidate runs the same loop: ``--steps`` steps of the model's scheduler (DDIM for UNets, flow-matching
Euler for Flux) from the same seeded noise with the same conditioning (random weights, nothing downloaded, no
classifier-free guidance), timed interleaved in one process. A candidate is a ``+``-joined list of parts:

- a diffusers cache: ``pab`` (pyramid attention broadcast), ``fbc`` (first-block cache), ``faster``
  (FasterCache), ``taylorseer``, ``mag`` (MagCache), with fixed settings (:func:`cache_config`);
- ToMe: ``merge@RATIO`` or ``downsample@RATIO``, ``merge@RATIO:every=K`` reusing merge plans for ``K`` steps.

Rows: loop seconds, speed-up over the unpatched loop, seconds per step, and the relative L2 distance of the
final latents to the unpatched loop's. With random weights the distance says how much a candidate perturbs
this network's computation, not how an image from trained weights would look (see docs/stacking.md).
"""
from __future__ import annotations

import argparse
import contextlib

from visiontools.bench import shared_copy

#: Cache parts and the diffusers function of each.
CACHES = {"pab": "pyramid_attention_broadcast", "fbc": "first_block_cache", "faster": "faster_cache",
          "taylorseer": "taylorseer_cache", "mag": "mag_cache"}
#: Caches that need the model's ``cache_context`` (diffusers' CacheMixin: Flux here, not the UNet/SD3/PixArt).
NEEDS_CONTEXT = ("fbc", "taylorseer")
UNET_DEFAULT = ["pab", "merge@0.5", "merge@0.5:every=2", "downsample@0.75", "pab+downsample@0.75",
                "pab+merge@0.5:every=2"]
DIT_DEFAULT = ["pab", "fbc", "faster", "taylorseer", "mag", "merge@0.5", "merge@0.5:every=2", "downsample@0.5",
               "fbc+downsample@0.5", "mag+merge@0.5:every=2"]


DEFAULT_STEPS = 20  # --steps


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--loop`` options ``bench sd`` and ``bench dit`` share."""
    parser.add_argument("--loop", action="store_true",
                        help="time whole denoising loops: unpatched, diffusers' step caches, ToMe, and cache + ToMe")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="--loop: denoising steps")
    parser.add_argument("--loop-candidates", nargs="+", default=None, metavar="PARTS",
                        help="--loop: candidates, parts joined by +: pab fbc faster taylorseer mag, merge@R, "
                             "downsample@R, merge@R:every=K (e.g. pab+merge@0.5:every=2)")


def check_mode_options(args: argparse.Namespace, single_call: dict) -> None:
    """A one-line ``UserError`` for an option the chosen mode would ignore: with ``--loop``, any option of
    ``single_call`` (its name -> its default) that was changed, ``--profile`` or ``--no-ideal``; without
    ``--loop``, ``--steps`` or ``--loop-candidates``."""
    from visiontools.errors import UserError

    def flags(names):
        return ", ".join("--" + n.replace("_", "-") for n in names)

    if args.loop:
        if args.profile or args.no_ideal:
            raise UserError("--profile and --no-ideal time single calls; leave them out with --loop")
        changed = [n for n, default in single_call.items() if getattr(args, n) != default]
        if changed:
            raise UserError(f"{flags(changed)} set the single-call benchmark, which --loop does not run: leave "
                            "them out with --loop (choose its candidates with --loop-candidates)")
        return
    loop_only = ["steps"] * (args.steps != DEFAULT_STEPS) + ["loop_candidates"] * (args.loop_candidates is not None)
    if loop_only:
        raise UserError(f"{flags(loop_only)} set the denoising loops: add --loop, or leave them out")


def parse_candidate(spec: str) -> tuple[list[str], dict | None]:
    """``"pab+merge@0.5:every=2"`` -> ``(["pab"], {"mode": "merge", "ratio": 0.5, "plan_every": 2})``;
    ``UserError`` naming a bad part."""
    from visiontools.errors import UserError

    caches, tome = [], None
    for part in spec.split("+"):
        if part in CACHES:
            caches.append(part)
            continue
        head, _, every = part.partition(":every=")
        mode, _, ratio = head.partition("@")
        try:
            settings = {"mode": mode, "ratio": float(ratio), "plan_every": int(every) if every else 1}
        except ValueError:
            settings = None
        if settings is None or mode not in ("merge", "downsample") or tome is not None:
            raise UserError(f"--loop-candidates: bad part {part!r} in {spec!r}; parts are {', '.join(CACHES)}, "
                            "merge@RATIO, downsample@RATIO, merge@RATIO:every=K (one ToMe part at most)")
        tome = settings
    return caches, tome


def cache_config(name: str, clock: list, steps: int):
    """diffusers' config of cache ``name`` (``clock[0]``: the current timestep) with settings that skip work
    in the middle of a ``steps``-step loop."""
    import diffusers.hooks as dh

    now = lambda: clock[0]  # noqa: E731
    if name == "pab":
        return dh.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                  spatial_attention_timestep_skip_range=(100, 800),
                                                  current_timestep_callback=now)
    if name == "fbc":
        return dh.FirstBlockCacheConfig(threshold=0.2)
    if name == "faster":
        return dh.FasterCacheConfig(spatial_attention_block_skip_range=2,
                                    spatial_attention_timestep_skip_range=(-1, 681), current_timestep_callback=now,
                                    attention_weight_callback=lambda module: 0.5, tensor_format="BCHW",
                                    is_guidance_distilled=True)
    if name == "taylorseer":
        return dh.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=max(1, steps // 10))
    return dh.MagCacheConfig(threshold=0.06, num_inference_steps=steps, mag_ratios=[1.0] * steps)


def prepare(model, caches: list[str], tome: dict | None, clock: list, steps: int, apply_tome):
    """``model`` (a copy) with the caches and then ToMe (``apply_tome(model, **settings)``) applied."""
    import diffusers.hooks as dh

    for name in caches:
        config = cache_config(name, clock, steps)
        if hasattr(model, "enable_cache") and name != "pab":
            model.enable_cache(config)
        else:
            getattr(dh, f"apply_{CACHES[name]}")(model, config)
    if tome is not None:
        apply_tome(model, **tome)
    return model


def loop_fn(model, scheduler, steps: int, start, call, clock: list, result: dict, key: str):
    """A function running one whole loop: scheduler timesteps, ``call(model, x, t)`` each step (in a cache
    context where the model has one), final latents stored in ``result[key]``."""
    import torch
    from diffusers.hooks import HookRegistry

    def run():
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        scheduler.set_timesteps(steps)
        x = start.clone()
        for t in scheduler.timesteps:
            clock[0] = int(t)
            ctx = model.cache_context("cond") if hasattr(model, "cache_context") else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                out = call(model, scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input")
                           else x, t)
            x = scheduler.step(out, t, x).prev_sample
        result[key] = x.float()
    return run


def time_loops(args, label: str, base, scheduler_cls, start, call, specs: list[str], apply_tome, device) -> list[dict]:
    """Time the unpatched loop and every candidate of ``specs`` (copies of ``base`` sharing its weights),
    interleaved; a row each."""
    from visiontools.timing import interleaved_times, median

    fns, finals = {}, {}
    for spec in ["unpatched"] + list(specs):
        caches, tome = ([], None) if spec == "unpatched" else parse_candidate(spec)
        if not hasattr(base, "cache_context") and any(c in NEEDS_CONTEXT for c in caches):
            why = f"diffusers' {'/'.join(NEEDS_CONTEXT)} caches need a model with cache_context, such as Flux"
            if args.loop_candidates is not None:  # asked for by name: refused, never skipped quietly
                from visiontools.errors import UserError
                raise UserError(f"--loop-candidates {spec}: {why}; leave it out for {label}")
            print(f"{label}: skipping {spec} ({why})")
            continue
        clock = [0]
        model = prepare(shared_copy(base), caches, tome, clock, args.steps, apply_tome)
        fns[spec] = loop_fn(model, scheduler_cls(), args.steps, start, call, clock, finals, spec)
    print(f"\n{label}: {args.steps}-step loops, {len(fns)} candidates, {args.warmup} warm-up + {args.repeats} rounds")
    times = interleaved_times(fns, repeats=args.repeats, warmup=args.warmup, device=device,
                             progress=not getattr(args, "no_progress", False))
    ref_t, ref = median(times["unpatched"]), finals["unpatched"]
    rows = []
    for spec in fns:
        med = median(times[spec])
        rows.append(dict(model=label, candidate=spec, steps=args.steps, median_s=med, times_s=times[spec],
                         per_step_s=med / args.steps, speedup=ref_t / med,
                         speedup_paired=median([b / c for b, c in zip(times["unpatched"], times[spec])]),
                         rel_l2=((finals[spec] - ref).norm() / ref.norm()).item()))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | candidate | loop s | s / step | speed-up | per-round speed-up | rel. L2 of final latents |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['candidate']} | {r['median_s']:.3f} | {r['per_step_s']:.4f} "
                     f"| {r['speedup']:.2f}× | {r['speedup_paired']:.2f}× | {r['rel_l2']:.4f} |")
    return "\n".join(lines)


def run_sd(args, config: dict, build_unets) -> int:
    """``bench sd --loop``: DDIM loops of the UNet of ``config`` (built by ``build_unets``, bench sd's) at each
    resolution."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from visiontools.patches.diffusers import apply_tome_sd
    from visiontools.timing import machine_description, resolve_device, resolve_dtype, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device, auto="fp16")
    base, _ = build_unets(UNet2DConditionModel, config, args.seed, device, dtype)
    rows = []
    for res in args.resolutions:
        g = torch.Generator().manual_seed(args.seed)
        start = torch.randn(1, 4, res // 8, res // 8, generator=g).to(device, dtype)
        e = torch.randn(1, 77, config["cross_attention_dim"], generator=g).to(device, dtype)
        rows += time_loops(args, f"SD 1.5{' (tiny)' if args.tiny else ''} {res}²", base, DDIMScheduler, start,
                           lambda m, x, t: m(x, t, e).sample, args.loop_candidates or UNET_DEFAULT,
                           lambda m, **kw: apply_tome_sd(m, max_downsample=args.max_downsample, **kw), device)
    machine = machine_description(device)
    result = dict(machine=machine, steps=args.steps, tiny=bool(args.tiny), threads=torch.get_num_threads(), rows=rows)
    write_results(args, markdown(rows), result, header=f"Denoising loops, {args.steps} DDIM steps, batch 1, no CFG, "
                  f"random weights; {args.warmup} warm-up + {args.repeats} interleaved rounds; {machine}")
    return 0


def run_dit(args, build) -> int:
    """``bench dit --loop``: flow-matching Euler loops of each of ``--models`` at ``--resolution``, built by
    ``build(name, resolution, seed, tiny) -> (model, call keywords)`` (bench dit's)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from visiontools.patches.diffusers_dit import apply_tome_dit
    from visiontools.timing import dtype_label, machine_description, resolve_device, resolve_dtype, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)  # as bench dit: bf16 on CUDA (fp16 where the GPU lacks it), else fp32
    rows = []
    for name in args.models:
        base, kw = build(name, args.resolution, args.seed, args.tiny)
        base.to(device, dtype)
        kw = {k: v.to(device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
              if hasattr(v, "to") else v for k, v in kw.items()}
        start = kw.pop("hidden_states")
        kw.pop("timestep", None)  # the loop's
        scale = 1.0 if name == "flux" else 1000.0

        def call(m, x, t, kw=kw, scale=scale):
            return m(hidden_states=x, timestep=(t / 1000 * scale).expand(x.shape[0]).to(x.device), **kw).sample

        specs = args.loop_candidates or DIT_DEFAULT
        rows += time_loops(args, f"{name}{' (tiny)' if args.tiny else ''} {args.resolution}²", base,
                           FlowMatchEulerDiscreteScheduler, start, call, specs, apply_tome_dit, device)
    machine = machine_description(device)
    result = dict(machine=machine, steps=args.steps, tiny=bool(args.tiny), threads=torch.get_num_threads(),
                  dtype=dtype_label(dtype), rows=rows)
    write_results(args, markdown(rows), result, header=f"Denoising loops, {args.steps} flow-matching Euler steps, "
                  f"batch 1, {dtype_label(dtype)}, random weights; {args.warmup} warm-up + {args.repeats} "
                  f"interleaved rounds; {machine}")
    return 0
