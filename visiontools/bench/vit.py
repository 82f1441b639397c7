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
                  progress: bool = True, ideal: bool = True, peer_patch=None, profile: bool = False,
                  cuda_graphs: bool = False) -> dict:
    """Time ``model`` unpatched and ToMe-patched at each r setting in ``rs`` (interleaved, medians)
    and count FLOPs per image. With ``ideal``, the unpatched blocks are also timed alone at each
    schedule's token counts (``visiontools.bench.ideal``), interleaved with the models: the
    token-count ideal and the overhead of the reduction step. ``peer_patch``: the original ToMe's
    ``apply_patch`` (``visiontools.bench.peer``), timed at each r too, its logits compared with ours.
    ``profile``: a ``torch.profiler`` table of each candidate's reduction steps
    (``visiontools.bench.profile``). ``cuda_graphs`` (CUDA only): the baseline and each ToMe candidate
    also run under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), rows named
    ``"CUDA graphs: <name>"``. Returns a dict with one row per candidate."""
    import torch

    from visiontools.timing import autocast_context, interleaved_times, machine_description

    device = torch.device(device)
    model = model.eval().to(device)
    candidates = _candidates(model, rs, peer_patch)
    if cuda_graphs:
        if device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device: torch.compile's reduce-overhead mode captures "
                             "CUDA graphs")
        candidates.update({GRAPHS + n: (torch.compile(m, mode="reduce-overhead"), r)
                           for n, (m, r) in list(candidates.items()) if not n.startswith(PEER)})
    if img_size is None:
        img_size = tuple(model.patch_embed.img_size)
    x = torch.randn(batch_size, 3, *img_size, device=device)

    def call(m, inp):
        with autocast_context(device, dtype):
            return m(inp)

    tokens = _tokens_per_layer(candidates, x[:1])
    fns = {name: (lambda m=m: call(m, x)) for name, (m, _) in candidates.items()}
    parts = None
    if ideal and len(tokens) > 1:
        from visiontools.bench.ideal import TokenCountIdeal

        def wrap(f):
            with autocast_context(device, dtype):
                return f()
        parts = TokenCountIdeal(model.blocks, tokens, batch_size, model.embed_dim, device, wrap)
        fns.update(parts.fns)
    times = interleaved_times(fns, repeats=repeats, warmup=warmup, device=device, progress=progress)
    rows = _rows(candidates, times, tokens, parts, batch_size, lambda m: call(m, x[:1]))
    if peer_patch is not None:
        _compare_peers(rows, candidates, x[:2])
    _count_step_ops(rows, batch_size, model.embed_dim, model.num_prefix_tokens, _head_dim(model))
    profiles = {}
    if profile:
        from visiontools.bench.profile import profile_reduction

        for name, tok in tokens.items():
            if name.startswith("ToMe "):  # not the original ToMe's rows, nor the compiled copies
                profiles[name] = profile_reduction(tok, batch_size, model.embed_dim, model.num_prefix_tokens,
                                                   device, dtype, metric_width=_head_dim(model))
    return {
        "machine": machine_description(device), "device": str(device),
        "dtype": str(dtype or torch.float32).replace("torch.", ""), "batch_size": batch_size,
        "img_size": list(img_size), "repeats": repeats, "warmup": warmup,
        "baseline_fused_attn": bool(getattr(model.blocks[0].attn, "fused_attn", False)), "rows": rows,
        "ideal_parts_s": {k: v for k, v in times.items() if k.startswith("ideal: ")}, "profiles": profiles,
    }


BASELINE = "timm (fused SDPA)"


PEER = "original ToMe"
#: The prefix of the rows compiled with ``torch.compile(mode="reduce-overhead")`` (``--cuda-graphs``).
GRAPHS = "CUDA graphs: "


def _twin(name: str) -> str:
    """The eager ToMe row whose token counts a row shares (the original ToMe's, a compiled copy's)."""
    name = name.removeprefix(GRAPHS)
    return name.replace(PEER, "ToMe", 1) if name.startswith(PEER) else name


def _candidates(model, rs, peer_patch=None) -> dict:
    """name -> (model, r): the unpatched model and one ToMe-patched copy per r setting (and one
    patched by the original ToMe, with ``peer_patch``)."""
    from visiontools.patches.timm import apply_tome

    candidates = {BASELINE: (model, None)}
    for r in rs:
        try:
            candidates[f"ToMe {schedule_label(r)}"] = (apply_tome(copy.deepcopy(model), r=r), r)
        except TypeError as e:  # the adapter names the unsupported class
            from visiontools.errors import UserError
            raise UserError(f"{e}; `visiontools bench` needs a timm VisionTransformer (e.g. vit_base_patch16_224)") from None
        if peer_patch is not None:
            from visiontools.bench.peer import peer_model

            candidates[f"{PEER} {schedule_label(r)}"] = (peer_model(peer_patch, model, r), r)
    return candidates


def _head_dim(model) -> int:
    """The width of the ToMe metric (keys averaged over heads): the first block's attention head width."""
    attn = model.blocks[0].attn
    return getattr(attn, "head_dim", model.embed_dim // getattr(attn, "num_heads", 1))


def _count_step_ops(rows: list[dict], batch: int, width: int, prefix: int, metric_width: int) -> None:
    """Each of our ToMe rows: the aten operations and bytes of its first reduction step (counted on CPU)."""
    from visiontools.tome.opcount import reduction_step_ops

    for row in rows:
        tok = row.get("tokens_per_layer")
        if row["name"].startswith("ToMe ") and tok:
            l = next((i for i in range(len(tok) - 1) if tok[i + 1] < tok[i]), None)
            if l is not None:
                c = reduction_step_ops(batch, tok[l], width, tok[l] - tok[l + 1], prefix, metric_width, steady=l > 0)
                row.update(step_ops=c.ops, step_kernels=c.kernels, step_bytes=c.bytes)


def _compare_peers(rows: list[dict], candidates: dict, x) -> None:
    """Each original-ToMe row: its speed relative to ours at the same r, and how its logits agree."""
    from visiontools.bench.peer import agreement

    by_name = {row["name"]: row for row in rows}
    for row in rows:
        if row["name"].startswith(PEER):
            ours = row["name"].replace(PEER, "ToMe", 1)
            row["ours_over_peer"] = by_name[ours]["img_per_s"] / row["img_per_s"]
            row.update(agreement(candidates[ours][0], candidates[row["name"]][0], x))


def _tokens_per_layer(candidates: dict, x1) -> dict[str, list[int]]:
    """Tokens entering each block (then after the last) of every candidate, the baseline's included."""
    import torch

    from visiontools.patches.timm import tome_forward

    tokens = {}
    with torch.inference_mode():
        for name, (m, r) in candidates.items():
            if r is not None and _twin(name) == name:
                tokens[name] = list(tome_forward(m, x1)[1].tokens_per_layer)
    for name, (m, r) in candidates.items():
        if r is not None and _twin(name) != name:  # the same r gives the same counts: the ideal is shared
            tokens[name] = tokens[_twin(name)]
    if tokens:
        n0 = next(iter(tokens.values()))[0]
        tokens = {BASELINE: [n0] * len(next(iter(tokens.values()))), **tokens}
    return tokens


def _rows(candidates: dict, times: dict, tokens: dict, parts, batch_size: int, call_one) -> list[dict]:
    """One result row per candidate: speed, FLOP ratio and, with ``parts``, the token-count ideal."""
    from visiontools.bench.ideal import ideal_columns
    from visiontools.timing import count_flops, median

    medians = {k: median(v) for k, v in times.items()}
    base_t, base_flops, rows = medians[BASELINE], None, []
    for name, (m, r) in candidates.items():
        flops = count_flops(lambda: call_one(getattr(m, "_orig_mod", m)))  # a compiled copy: its module
        base_flops = base_flops or flops
        t, tok = medians[name], tokens.get(name) if r is not None else None
        speedup, flop_ratio = base_t / t, base_flops / flops
        row = {"name": name, "r": r, "final_tokens": tok and tok[-1], "tokens_per_layer": tok,
               "median_s": t, "img_per_s": batch_size / t,
               "speedup": speedup, "gflops_per_img": flops / 1e9, "flop_ratio": flop_ratio,
               "measured_over_ideal": speedup / flop_ratio, "times_s": times[name]}
        if name.startswith(GRAPHS):  # against the compiled baseline; the ideal is the eager blocks'
            row["speedup_vs_compiled_baseline"] = medians[GRAPHS + BASELINE] / t
        elif parts is not None:
            sched = tokens[name]
            ideal_s = parts.ideal(base_t, tokens[BASELINE], sched, medians)
            merging = sum(1 for a, b in zip(sched, sched[1:]) if b < a)
            row.update(ideal_columns(t, base_t, ideal_s, merging))
        rows.append(row)
    return rows


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
             TOME_COLUMNS + " measured/FLOP ratio |" + IDEAL_COLUMNS, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"{tome_cells(row)} {row['measured_over_ideal']:.2f} |{ideal_cells(row)}" for row in result["rows"]]
    return "\n".join(lines + _notes(result))


def _notes(result: dict) -> list[str]:
    """Lines under the table: operations per reduction step, the original ToMe's agreement, profiles."""
    from visiontools.bench.profile import profile_table

    out = [f"- {row['name']}: one reduction step (eager, at the first merge) is {row['step_ops']} aten ops "
           f"({row['step_kernels']} kernels), {row['step_bytes'] / 2 ** 20:.1f} MiB moved"
           for row in result["rows"] if row.get("step_ops")]
    out += [f"- {row['name']}: ours runs {row['ours_over_peer']:.2f}x its speed; logits max abs diff "
            f"{row['peer_max_abs_diff']:.1e} (relative {row['peer_rel_diff']:.1e}), top-1 "
            f"{'agrees' if row['peer_top1_agree'] else 'DISAGREES'}" for row in result["rows"] if "ours_over_peer" in row]
    out += [f"- {row['name']}: {row['speedup_vs_compiled_baseline']:.2f}x the compiled baseline "
            f"({GRAPHS}{BASELINE})" for row in result["rows"]
            if "speedup_vs_compiled_baseline" in row and row["r"] is not None]
    out += [t for name, prof in result.get("profiles", {}).items() for t in ("", profile_table(name, prof))]
    return [""] + out if out else []


IDEAL_COLUMNS = " token-count ideal | share of ideal | overhead (share, per merging block) |"


def ideal_cells(row: dict) -> str:
    """A row's token-count ideal cells (``visiontools.bench.ideal``); dashes where it was not measured."""
    if "ideal_speedup" not in row:
        return " - | - | - |"
    per_block = f", {row['overhead_per_block_s'] * 1e3:.2f} ms" if row["overhead_per_block_s"] else ""
    return (f" {row['ideal_speedup']:.2f}x | {row['share_of_ideal']:.2f} | "
            f"{row['overhead_share'] * 100:.0f} %{per_block} |")


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


def add_ideal_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--no-ideal`` and ``--profile``, which ``bench vit``, ``bench sd`` and ``bench dit`` share
    (``what``: how the target measures its token-count ideal)."""
    p.add_argument("--no-ideal", action="store_true", help=f"skip the token-count ideal ({what})")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler table of each candidate's reduction steps (operators, share of time)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench [vit]``."""
    from visiontools.timing import add_run_arguments

    add_model_arguments(p, DEFAULT_MODEL, "baseline", 32, "images per forward pass")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (visiontools.timing.resolve_dtype); auto = bf16 on CUDA, fp32 on CPU")
    add_ideal_arguments(p, "the unpatched blocks timed alone at each schedule's counts")
    p.add_argument("--peer-tome", metavar="PATH", default=None,
                   help="a checkout of facebookresearch/ToMe: time the original ToMe at each r too and "
                        "compare its logits with ours")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: also time the baseline and each ToMe candidate under "
                        "torch.compile(mode='reduce-overhead') (CUDA graphs)")
    add_run_arguments(p)


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model ``--model`` names (``visiontools.models.load``: a shipped checkpoint, a checkpoint file,
    or a timm name with random weights unless ``--pretrained``), built for ``--img-size`` when given."""
    from visiontools import models  # imports timm: only when a model is loaded, not for --help

    img = None if args.img_size is None else (tuple(args.img_size) * 2)[:2]
    return models.load(args.model, pretrained=args.pretrained, tome=False,  # unpatched: the baseline row
                       **({} if img is None else {"img_size": img}))[0]


def run(args: argparse.Namespace) -> int:
    """Run the ViT benchmark from parsed command-line arguments and print a markdown table."""
    import torch

    from visiontools.timing import busy_machine_note, resolve_device, resolve_dtype, write_results
    from visiontools.tome.r_text import applied_label

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        from visiontools.errors import UserError
        raise UserError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        from visiontools.errors import UserError
        raise UserError(f"--cuda-graphs needs a CUDA device (torch.compile's reduce-overhead mode captures CUDA "
                        f"graphs), not {device}: use --device cuda, or leave --cuda-graphs out")
    dtype = resolve_dtype(args.dtype, device)
    img = None if args.img_size is None else (tuple(args.img_size) * 2)[:2]
    peer = None
    if args.peer_tome is not None:
        from visiontools.bench.peer import load_peer_patch
        peer = load_peer_patch(args.peer_tome)  # checked before the model is built
    model = load_model(args)
    result = benchmark_vit(model, args.r, args.batch_size, img, device, dtype, args.repeats, args.warmup,
                           progress=not args.no_progress, ideal=not args.no_ideal, peer_patch=peer,
                           profile=args.profile, cuda_graphs=args.cuda_graphs)
    result["model"] = args.model
    for row in result["rows"][1:]:  # label each ToMe row with the r its blocks applied
        if row["r"] is not None:
            graphs = GRAPHS if row["name"].startswith(GRAPHS) else ""
            prefix = PEER if row["name"].removeprefix(graphs).startswith(PEER) else "ToMe"
            row["name"] = f"{graphs}{prefix} {applied_label(row['r'], row['tokens_per_layer'])}"
    write_results(args, markdown_table(result, args.model), result)
    note = busy_machine_note([row["speedup"] for row in result["rows"][1:]], device)
    if note:
        print(note)
    return 0
