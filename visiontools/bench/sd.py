"""Stable Diffusion UNet forward: diffusers' SDPA vs tomesd vs ToMe-SD (merge, and its ToFu and PiToMe
variants) vs token downsampling.

The real SD 1.5 UNet architecture (~860M parameters) is built from its config with random weights
(nothing is downloaded). All candidates are copies of one UNet that share its weights, timed
interleaved in one process. Speed-up: ratio of medians, and the median of per-round ratios (robust
to load that drifts during the run). Beside it: the FLOP ratio (counted on a meta-device copy, so it
costs no compute) and the relative L2 distance of the predicted noise to the unpatched UNet's.
The time spent inside the transformer blocks at the patched levels is reported too, to show where
a candidate's saving (or overhead) is.
"""
from __future__ import annotations

import argparse
import time

from visiontools.bench import loops, shared_copy
from visiontools.bench.vit import IDEAL_COLUMNS, add_ideal_arguments, ideal_cells
from visiontools.timing import add_run_arguments

#: Candidates besides SDPA: the peer, our merge (``tofu``/``pitome``: merge mode with that method), ToDo.
METHODS = ("tomesd", "merge", "tofu", "pitome", "downsample")

# diffusers' config of runwayml/stable-diffusion-v1-5 unet/config.json (architecture only).
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}

# A few-million-parameter UNet with the same layout, for smoke tests (--tiny).
TINY_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "block_out_channels": (32, 32, 64, 64),
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


# the single-call options' defaults (add_arguments takes them from here): --loop refuses them changed
SINGLE_CALL_DEFAULTS = {"candidates": None, "methods": ["tomesd", "merge", "downsample"], "ratios": [0.5], "batch": 1,
                        "similarity_dtype": "auto"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench sd``."""
    parser.add_argument("--resolutions", type=int, nargs="+", default=[768, 512],
                        help="image sizes in pixels (square); the latent is size/8")
    parser.add_argument("--ratios", type=float, nargs="+", default=SINGLE_CALL_DEFAULTS["ratios"],
                        help="token ratios of every method (fraction of tokens removed)")
    parser.add_argument("--methods", nargs="+", default=SINGLE_CALL_DEFAULTS["methods"], choices=METHODS,
                        help="candidates besides the SDPA baseline (tofu, pitome: merge mode with that method)")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="METHOD@RATIO",
                        help="explicit candidates such as merge@0.5 pitome@0.5 downsample@0.75 (overrides "
                             "--methods/--ratios)")
    parser.add_argument("--batch", type=int, default=SINGLE_CALL_DEFAULTS["batch"], help="batch size of the UNet call")
    add_run_arguments(parser)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="weights/activations dtype; unset: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--max-downsample", type=int, default=1,
                        help="patch levels downsampled at most this much (1 = tomesd's default, 64x64 at 512px)")
    parser.add_argument("--similarity-dtype", default=SINGLE_CALL_DEFAULTS["similarity_dtype"],
                        choices=["auto", "input", "float32", "bfloat16", "float16"],
                        help="dtype of merge mode's matching matmul (auto: bf16 for fp32 on CPUs with hardware bf16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument("--tiny", action="store_true", help="tiny UNet with the SD 1.5 layout (smoke test)")
    add_ideal_arguments(parser, "the unpatched attention of the patched levels timed alone at the sizes each "
                                "candidate attends over")
    loops.add_loop_arguments(parser)


def _patch(unet, method: str, ratio: float, max_downsample: int, similarity_dtype: str = "auto"):
    from visiontools.patches.diffusers import apply_tome_sd

    if method == "tomesd":
        import tomesd

        tomesd.apply_patch(unet, ratio=ratio, max_downsample=max_downsample)
    elif method in ("merge", "downsample"):  # similarity_dtype is used by merge mode only
        apply_tome_sd(unet, ratio=ratio, mode=method, max_downsample=max_downsample, similarity_dtype=similarity_dtype)
    elif method in ("tofu", "pitome"):
        apply_tome_sd(unet, ratio=ratio, mode="merge", method=method, max_downsample=max_downsample,
                      similarity_dtype=similarity_dtype)
    return unet


class _BlockTimer:
    """Seconds spent inside the transformer blocks at levels <= ``max_downsample``, per UNet call
    (forward hooks; CUDA events on a GPU, so timing adds no synchronisation)."""

    def __init__(self, unet, max_downsample: int, device):
        from visiontools.patches.diffusers import transformer_blocks

        self.cuda = device.type == "cuda"
        self.calls: list[list[list]] = []  # per call: [start, end] stamps of each block
        for _, block, ds in transformer_blocks(unet):
            if ds <= max_downsample:
                block.register_forward_pre_hook(lambda module, args: self.calls[-1].append([self._stamp(), None]))
                block.register_forward_hook(lambda module, args, out: self.calls[-1][-1].__setitem__(1, self._stamp()))

    def _stamp(self):
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def new_call(self) -> None:
        self.calls.append([])

    def seconds(self) -> list[float]:
        """Block seconds of every call so far."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [sum(b.elapsed_time(e) / 1000 for b, e in call) for call in self.calls]
        return [sum(e - b for b, e in call) for call in self.calls]


def _markdown(rows: list[dict]) -> str:
    """The results table: speed, FLOP ratio, the patched-level blocks' time with their token-count ideal
    (``visiontools.bench.ideal.AttentionIdeal``, dashes with ``--no-ideal``), then any profiles."""
    from visiontools.bench.profile import profile_table

    lines = ["| latent (image) | method | ratio | median s | speed-up vs SDPA | per-round speed-up | FLOP ratio "
             "| patched-level blocks s | blocks speed-up |" + IDEAL_COLUMNS + " rel. L2 of noise pred. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['latent']}² ({r['resolution']}²) | {r['method']} | {r['ratio']:g} | {r['median_s']:.3f} "
                     f"| {r['speedup']:.2f}× | {r['speedup_paired']:.2f}× | {r['flop_ratio']:.2f}× "
                     f"| {r['blocks_s']:.3f} | {r['blocks_speedup']:.2f}× |{ideal_cells(r)} {r['rel_l2']:.4f} |")
    lines += [t for r in rows if r.get("profile") for t in
              ("", profile_table(f"{r['method']}@{r['ratio']:g} at {r['resolution']}²", r["profile"]))]
    return "\n".join(lines)


def candidate_pairs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """``(method, ratio)`` of every candidate besides SDPA (``--candidates``, else ``--methods`` x
    ``--ratios``), checked: known methods, ratios in range, tomesd installed when asked for."""
    from visiontools.errors import UserError, missing_extra

    if args.candidates:
        pairs = []
        for c in args.candidates:
            method, _, ratio = c.partition("@")
            if method not in METHODS or not ratio:
                raise UserError(f"--candidates: expected METHOD@RATIO with METHOD {'|'.join(METHODS)}, got {c!r}")
            try:
                pairs.append((method, float(ratio)))
            except ValueError:
                raise UserError(f"--candidates: bad ratio in {c!r}") from None
    else:
        pairs = [(m, r) for r in args.ratios for m in args.methods]
    if any(m == "tomesd" for m, _ in pairs):
        try:
            import tomesd  # noqa: F401
        except ImportError:
            raise missing_extra("tomesd", "the tomesd candidate (leave it out of --methods/--candidates, or install it)") from None
    for m, r in pairs:
        if m == "downsample" and not 0 < r < 1:
            raise UserError(f"downsample ratios must be in (0, 1), got {r}")
        if m != "downsample" and not 0 < r <= 0.75:
            raise UserError(f"{m} ratios must be in (0, 0.75] (the 2x2-window merge limit), got {r}")
    for res in args.resolutions:
        if res % 8:
            raise UserError(f"--resolutions must be multiples of 8 (latent = size/8), got {res}")
    return pairs


def build_unets(unet_cls, config: dict, seed: int, device, dtype):
    """The UNet of ``config`` with random weights seeded by ``seed``, on ``device`` in ``dtype``, and a
    meta-device twin (FLOPs are counted on it, at no compute cost)."""
    import torch

    torch.manual_seed(seed)
    base = unet_cls(**config).eval()
    base.to(device)
    if dtype != torch.float32:
        base.to(dtype)
    with torch.device("meta"):
        meta = unet_cls(**config).eval()
    return base, meta


def time_resolution(args: argparse.Namespace, res: int, config: dict, base, meta, candidates, device, dtype
                    ) -> list[dict]:
    """Time every candidate (patched copies of ``base``) interleaved at one resolution; a row each: speed-ups
    over SDPA (medians, per round), FLOP ratio, patched-level block time, relative L2 of the noise prediction."""
    import torch

    from visiontools.timing import count_flops, interleaved_times, median

    lat = res // 8
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 4, lat, lat, generator=g).to(device, dtype)
    e = torch.randn(args.batch, 77, config["cross_attention_dim"], generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    fns, outputs, flops, timers, unets = {}, {}, {}, {}, {}
    for method, ratio in candidates:
        name = "sdpa" if method == "sdpa" else f"{method}@{ratio:g}"
        unet = unets[name] = _patch(shared_copy(base), method, ratio, args.max_downsample, args.similarity_dtype)
        timers[name] = _BlockTimer(unet, args.max_downsample, device)

        def call(unet=unet, name=name):
            timers[name].new_call()
            outputs[name] = unet(x, t, e).sample.float()

        fns[name] = call
        m = _patch(shared_copy(meta), method, ratio, args.max_downsample, args.similarity_dtype)
        xm, em, tm = x.to("meta"), e.to("meta"), t.to("meta")
        flops[name] = count_flops(lambda m=m: m(xm, tm, em))
    parts = None if args.no_ideal else _attention_ideal(unets, fns, args.max_downsample, device)
    print(f"\n{res}x{res} (latent {lat}x{lat}): timing {len(fns)} candidates"
          f"{'' if parts is None else f' and {len(parts.fns)} attention sizes (token-count ideal)'}, "
          f"{args.warmup} warm-up + {args.repeats} rounds")
    times = interleaved_times({**fns, **(parts.fns if parts else {})}, repeats=args.repeats, warmup=args.warmup,
                              device=device, progress=not args.no_progress)
    ref_t, ref_out = median(times["sdpa"]), outputs["sdpa"]
    rows = []
    for method, ratio in candidates:
        name = "sdpa" if method == "sdpa" else f"{method}@{ratio:g}"
        med = median(times[name])
        rel = ((outputs[name] - ref_out).norm() / ref_out.norm()).item()
        # per-round ratio to the baseline of the same round: robust to load drifting over the run
        paired = median([b / c for b, c in zip(times["sdpa"], times[name])])
        blocks = timers[name].seconds()[-args.repeats:]
        rows.append(dict(resolution=res, latent=lat, method=method, ratio=ratio, median_s=med,
                         min_s=min(times[name]), times_s=times[name], speedup=ref_t / med,
                         speedup_paired=paired, flops=flops[name],
                         flop_ratio=flops["sdpa"] / flops[name], blocks_s=median(blocks),
                         blocks_times_s=blocks, rel_l2=rel))
    _ideal_and_profile(args, rows, times, parts, fns, device)
    return rows


def _attention_ideal(unets: dict, fns: dict, max_downsample: int, device):
    """The token-count ideal of the patched-level blocks (``visiontools.bench.ideal.AttentionIdeal``):
    the attention calls of one call of each candidate (``fns``, the UNets ``unets``), timed on the
    unpatched UNet's attention modules at those sizes."""
    from visiontools.bench.ideal import AttentionIdeal, attention_modules, record_attention
    from visiontools.patches.diffusers import transformer_blocks

    def attns(unet):
        return attention_modules([b for _, b, ds in transformer_blocks(unet) if ds <= max_downsample])
    calls = {name: record_attention(fns[name], attns(unet)) for name, unet in unets.items()}
    return AttentionIdeal(attns(unets["sdpa"]), calls, device)


def _ideal_and_profile(args, rows: list[dict], times: dict, parts, fns: dict, device) -> None:
    """Each row: the blocks' speed-up, the ideal's columns (with ``parts``) and, with ``--profile``, a
    profile of the reduction steps of our candidates as they run (``visiontools.bench.profile``)."""
    from visiontools.timing import median

    base = next(r for r in rows if r["method"] == "sdpa")["blocks_s"]
    for r in rows:
        r["blocks_speedup"] = base / r["blocks_s"]
    if parts is not None:
        medians = {k: median(v) for k, v in times.items()}
        cols = parts.columns({_name(r): r["blocks_s"] for r in rows}, "sdpa", medians)
        for r in rows:
            r.update(cols[_name(r)], attention_calls=parts.calls[_name(r)])
    if args.profile:
        from visiontools.bench.profile import profile_patched

        for r in rows:
            if r["method"] not in ("sdpa", "tomesd"):  # tomesd's own step functions are not ours to wrap
                r["profile"] = profile_patched(fns[_name(r)], device)


def _name(row: dict) -> str:
    return "sdpa" if row["method"] == "sdpa" else f"{row['method']}@{row['ratio']:g}"


def run(args: argparse.Namespace) -> int:
    """Run the benchmark: print a Markdown table per resolution (and of all of them), and write them
    (``--out-md``) and every timing (``--out-json``) through ``visiontools.timing.write_results``."""
    import torch

    from visiontools.errors import require
    from visiontools.timing import dtype_label, machine_description, resolve_device, resolve_dtype, write_results

    unet_cls = require("diffusers", "`visiontools bench sd`").UNet2DConditionModel
    loops.check_mode_options(args, SINGLE_CALL_DEFAULTS)
    if args.loop:  # whole denoising loops (visiontools.bench.loops)
        return loops.run_sd(args, TINY_UNET_CONFIG if args.tiny else SD15_UNET_CONFIG, build_unets)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device, auto="fp16")
    dtype_name = dtype_label(dtype)
    candidates = [("sdpa", 0.0)] + candidate_pairs(args)
    config = TINY_UNET_CONFIG if args.tiny else SD15_UNET_CONFIG
    base, meta = build_unets(unet_cls, config, args.seed, device, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    machine = machine_description(device)
    print(f"{'tiny' if args.tiny else 'SD 1.5'} UNet, {n_params / 1e6:.0f}M parameters, {dtype_name}, "
          f"batch {args.batch}; {machine}")
    rows = []
    for res in args.resolutions:
        rows += time_resolution(args, res, config, base, meta, candidates, device, dtype)
        print(_markdown([r for r in rows if r["resolution"] == res]))
    if len(args.resolutions) > 1:  # all resolutions together (each one's table was printed above)
        print()
    result = dict(machine=machine, device=str(device), dtype=dtype_name, batch=args.batch,
                  threads=torch.get_num_threads(), params=n_params, tiny=bool(args.tiny),
                  max_downsample=args.max_downsample, similarity_dtype=args.similarity_dtype,
                  repeats=args.repeats, warmup=args.warmup, rows=rows)
    header = (f"SD 1.5 UNet{' (tiny)' if args.tiny else ''}, {dtype_name}, batch {args.batch}, "
              f"{args.warmup} warm-up + {args.repeats} interleaved rounds; {machine}")
    write_results(args, _markdown(rows), result, header=header, echo=len(args.resolutions) > 1)
    return 0
