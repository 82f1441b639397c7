"""Hyena's long convolutions by FFT against dense matrices (``long_conv``), beside the attention twin.

For each grid, the Hyena CIFAR ViT with ``long_conv="fft"`` and with the default ``"auto"`` (dense
matrices up to ``visiontools.layers.hyena.DENSE_MAX_TOKENS`` tokens) and the attention ViT of the same size:
inference images/s (eval, cached filters, batch 256) and training steps/s (forward, cross-entropy,
backward, batch 64), all interleaved in one process (medians), GFLOPs per image, training-step peak
memory, and the largest output difference between the two Hyena modes. The weights are random (speed
and memory do not depend on them; ``hyena_cifar10``'s accuracy is unchanged, see its test). Usage:

    python scripts/hyena_long_conv.py --threads 2 --repeats 7 --out docs/results/hyena_long_conv_cpu.md
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import visiontools.models  # noqa: F401  (registers the CIFAR ViTs)
from visiontools.evaluate import training_peak_memory
from visiontools.layers.hyena import Hyena2d
from visiontools.timing import count_flops, interleaved_times, machine_description, median

MODELS = {64: ("hyena_vit_cifar", "attn_vit_cifar"), 256: ("hyena_vit_cifar_p2", "attn_vit_cifar_p2")}


def with_long_conv(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """A copy of ``model`` whose Hyena mixers run their long convolutions in ``mode``."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, Hyena2d):
            m.long_conv = mode
    return model


def measure(tokens: int, repeats: int, batch: int, train_batch: int) -> dict:
    """The rows for one grid (see the module docstring)."""
    hyena_name, attn_name = MODELS[tokens]
    torch.manual_seed(0)
    hyena = timm.create_model(hyena_name)
    models = {"attention": timm.create_model(attn_name), "Hyena, FFT": with_long_conv(hyena, "fft"),
              "Hyena, auto (dense)": with_long_conv(hyena, "auto")}
    x, xt = torch.randn(batch, 3, 32, 32), torch.randn(train_batch, 3, 32, 32)
    y = torch.randint(0, 10, (train_batch,))

    def infer(m):
        return lambda: m.eval()(x)

    def train_step(m):
        def step():
            with torch.inference_mode(False), torch.enable_grad():
                m.train()
                F.cross_entropy(m(xt), y).backward()
                m.zero_grad(set_to_none=True)
        return step

    t_inf = interleaved_times({n: infer(m) for n, m in models.items()}, repeats=repeats, warmup=1)
    t_train = interleaved_times({n: train_step(m) for n, m in models.items()}, repeats=repeats, warmup=1)
    with torch.no_grad():
        a, b = (models[n].eval()(x[:16]) for n in ("Hyena, FFT", "Hyena, auto (dense)"))
    memory = training_peak_memory(models, xt, y, torch.device("cpu"))
    rows = []
    for n, m in models.items():
        m.eval()
        rows.append({"model": n, "images_per_s": batch / median(t_inf[n]),
                     "train_steps_per_s": 1 / median(t_train[n]),
                     "gflops": count_flops(lambda m=m: m(x[:1])) / 1e9, "train_peak_mb": memory[n] / 2**20})
    return {"tokens": tokens, "models": [hyena_name, attn_name], "max_abs_diff": (a - b).abs().max().item(),
            "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Hyena long convolutions, FFT vs dense matrices; batch {result['batch']} (inference), "
             f"{result['train_batch']} (training), median of {result['repeats']} interleaved rounds, "
             f"{result['machine']}", "",
             "| tokens | model | images/s | vs attention | training steps/s | GFLOPs/img | training peak MB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for g in result["grids"]:
        base = g["rows"][0]["images_per_s"]
        for r in g["rows"]:
            lines.append(f"| {g['tokens']} | {r['model']} | {r['images_per_s']:.0f} | "
                         f"{r['images_per_s'] / base:.2f}x | "
                         f"{r['train_steps_per_s']:.2f} | {r['gflops']:.3f} | {r['train_peak_mb']:.0f} |")
    lines.append("")
    lines += [f"- {g['tokens']} tokens: largest output difference between the two Hyena modes "
              f"{g['max_abs_diff']:.1e}" for g in result["grids"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256], choices=sorted(MODELS),
                   help="grids to measure (64: 4x4 patches, 256: 2x2 patches of a 32x32 image)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
    p.add_argument("--batch", type=int, default=256, help="images per inference call")
    p.add_argument("--train-batch", type=int, default=64, help="images per training step")
    p.add_argument("--out", type=Path, default=None,
                   help="write the table to OUT with suffix .md and the numbers with suffix .json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine_description("cpu"), "repeats": args.repeats, "batch": args.batch,
              "train_batch": args.train_batch,
              "grids": [measure(t, args.repeats, args.batch, args.train_batch) for t in args.tokens]}
    table = markdown(result)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out.with_suffix('.md')}, {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
