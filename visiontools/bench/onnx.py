"""ONNX benchmark: a timm ViT exported unpatched and ToMe-patched the same way, timed in onnxruntime.

Every candidate goes through :func:`visiontools.export.export_onnx` (same exporter, same settings)
and runs in its own onnxruntime CPU session; sessions are timed interleaved in one process (see
``visiontools.timing``). FLOPs are counted on the PyTorch models that were exported. Each exported
model is also checked against PyTorch (max logit difference).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from visiontools.timing import count_flops, interleaved_times, machine_description, median, write_results

DEFAULT_MODEL = "vit_small_patch16_224"
BASELINE = "unpatched (ONNX)"


def benchmark_onnx(model: torch.nn.Module, rs, batch_size: int = 8, img_size=None, threads: int | None = None,
                   repeats: int = 10, warmup: int = 3, progress: bool = True) -> dict:
    """Export ``model`` unpatched and with ToMe at each r setting in ``rs``, time the ONNX models in
    onnxruntime interleaved (medians), count FLOPs per image and check each against PyTorch."""
    from visiontools.tome.r_text import applied_label, schedule_label
    from visiontools.export import example_input, export_onnx, max_abs_diff, onnx_session, token_counts
    from visiontools.patches.timm import apply_tome

    model = model.eval()
    candidates, r_of = {BASELINE: model}, {}
    for r in rs:
        candidates[f"ToMe {schedule_label(r)} (ONNX)"] = apply_tome(copy.deepcopy(model), r=r)
        r_of[f"ToMe {schedule_label(r)} (ONNX)"] = r
    x = example_input(model, batch_size, img_size)
    x1 = x[:1]
    sessions, diffs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate(candidates.items()):
            path = export_onnx(m, x, Path(tmp) / f"m{i}.onnx", dynamic_batch=False)
            sessions[name] = onnx_session(path, threads)
            diffs[name] = max_abs_diff(m, sessions[name], x)
    feed = {name: {s.get_inputs()[0].name: x.numpy()} for name, s in sessions.items()}
    fns = {name: (lambda s=s, f=feed[name]: s.run(None, f)) for name, s in sessions.items()}
    times = interleaved_times(fns, repeats=repeats, warmup=warmup, progress=progress)
    base_t = median(times[BASELINE])
    base_flops = count_flops(lambda: model(x1))
    rows = []
    for name, m in candidates.items():
        t, flops = median(times[name]), count_flops(lambda: m(x1))
        tokens = token_counts(m, x1)
        label = f"ToMe {applied_label(r_of[name], tokens)} (ONNX)" if name in r_of else name  # the r applied
        rows.append({"name": label, "final_tokens": None if tokens is None else tokens[-1],
                     "tokens_per_layer": None if tokens is None else list(tokens), "median_s": t,
                     "img_per_s": batch_size / t, "speedup": base_t / t, "gflops_per_img": flops / 1e9,
                     "flop_ratio": base_flops / flops, "max_abs_diff": diffs[name], "times_s": times[name]})
    import onnxruntime

    return {"machine": machine_description("cpu"), "onnxruntime": onnxruntime.__version__,
            "ort_threads": threads or "default", "batch_size": batch_size, "img_size": list(x.shape[-2:]),
            "repeats": repeats, "warmup": warmup, "rows": rows}


def markdown_table(result: dict, title: str) -> str:
    """A markdown table of a :func:`benchmark_onnx` result."""
    from visiontools.bench.vit import TOME_COLUMNS, tome_cells

    lines = [f"**{title}** in onnxruntime {result['onnxruntime']} (CPU, {result['ort_threads']} intra-op threads) "
             f"— batch {result['batch_size']}, {result['img_size'][0]}x{result['img_size'][1]}, fp32, "
             f"{result['repeats']} interleaved rounds, {result['machine']}", "",
             TOME_COLUMNS + " max abs diff vs PyTorch |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"{tome_cells(row)} {row['max_abs_diff']:.1e} |" for row in result["rows"]]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench onnx``."""
    from visiontools.bench.vit import add_model_arguments
    from visiontools.timing import add_rounds_arguments

    add_model_arguments(p, DEFAULT_MODEL, "unpatched export", 8, "images per onnxruntime call (fixed in the export)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads per session (default: onnxruntime's choice)")
    add_rounds_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out-json", type=Path, default=None, help="write the full result (all timings) here")
    p.add_argument("--out-md", type=Path, default=None, help="write the markdown table (with the machine) here")


def run(args: argparse.Namespace) -> int:
    """Run the ONNX benchmark from parsed command-line arguments and print a markdown table."""
    from visiontools.bench.vit import load_model
    from visiontools.errors import UserError
    from visiontools.export import require_onnx

    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    try:
        require_onnx()
    except ImportError as e:
        raise UserError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    img = None if args.img_size is None else (tuple(args.img_size) * 2)[:2]
    model = load_model(args)
    result = benchmark_onnx(model, args.r, args.batch_size, img, args.threads, args.repeats, args.warmup,
                            progress=not args.no_progress)
    result["model"] = args.model
    write_results(args, markdown_table(result, args.model), result)
    return 0
