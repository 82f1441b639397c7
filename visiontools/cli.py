"""The ``visiontools`` command line: ``bench`` (vit | sd | hyena | onnx), ``train``, ``eval``, ``demo``, ``export``, ``video``.

Each command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args)``;
modules keep heavy imports (diffusers, gradio) inside ``run`` so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Modules that are not installed/landed are skipped.
COMMANDS = {
    "train": ("visiontools.train", "train a model on CIFAR-10/100 from a YAML config"),
    "eval": ("visiontools.evaluate", "accuracy, throughput and FLOPs with and without ToMe"),
    "demo": ("visiontools.demos.app", "start the Gradio demo"),
    "export": ("visiontools.export", "export a (ToMe-patched) timm ViT to ONNX (and torch.export), checked in onnxruntime"),
    "video": ("visiontools.video", "annotate a video: ToMe merge map, tokens and FPS on every frame"),
}
BENCH_TARGETS = {
    "vit": ("visiontools.bench", "timm ViT: unpatched (fused attention) vs ToMe at several r"),
    "sd": ("visiontools.bench_sd", "Stable Diffusion UNet: SDPA vs tomesd vs ToMe-SD vs downsampling"),
    "hyena": ("visiontools.bench_hyena", "one Hyena block vs one attention block over grid sizes"),
    "onnx": ("visiontools.bench_onnx", "onnxruntime: the exported unpatched ViT vs exported ToMe ViTs"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None  # command not available in this install
        raise


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available command and its options."""
    parser = argparse.ArgumentParser(
        prog="visiontools",
        description="visiontools: make vision models faster (token merging, Hyena) and measure it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="benchmarks (default target: vit)",
                           description="Throughput benchmarks, candidates interleaved in one process.")
    targets = bench.add_subparsers(dest="target", metavar="TARGET")
    for name, (module, help_) in BENCH_TARGETS.items():
        mod = _load(module)
        if mod is None:
            continue
        p = targets.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)

    for name, (module, help_) in COMMANDS.items():
        mod = _load(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``visiontools`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `visiontools bench [options]` means `visiontools bench vit [options]`.
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in (*BENCH_TARGETS, "-h", "--help")):
        argv.insert(1, "vit")
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
