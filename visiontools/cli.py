"""The ``visiontools`` command line: ``bench`` (vit | sd | hyena | onnx), ``train``, ``eval``, ``demo``, ``export``, ``video``.

Each command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args)``;
modules keep heavy imports (diffusers, gradio) inside ``run`` so that ``--help`` stays fast.

Everyday mistakes (an unknown model, a bad value, missing data, an existing output, a missing optional
extra) end in one line on stderr, ``visiontools: error: ...``, and exit status 2; ``--debug`` (anywhere
on the command line) or ``VISIONTOOLS_DEBUG=1`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from visiontools.errors import EXTRAS, UserError, install_hint

# command -> (module, one-line help). Modules that are not installed/landed are skipped.
COMMANDS = {
    "train": ("visiontools.train", "train a model on CIFAR-10/100 from a YAML config"),
    "eval": ("visiontools.evaluate", "accuracy, throughput and FLOPs with and without ToMe"),
    "demo": ("visiontools.demos.app", "start the Gradio demo"),
    "export": ("visiontools.export", "export a (ToMe-patched) timm ViT to ONNX (and torch.export), checked in onnxruntime"),
    "video": ("visiontools.video", "annotate a video: ToMe merge map, tokens and FPS on every frame"),
}
BENCH_TARGETS = {
    "vit": ("visiontools.bench.vit", "timm ViT: unpatched (fused attention) vs ToMe at several r"),
    "sd": ("visiontools.bench.sd", "Stable Diffusion UNet: SDPA vs tomesd vs ToMe-SD vs downsampling"),
    "hyena": ("visiontools.bench.hyena", "one Hyena block vs one attention block over grid sizes"),
    "mixers": ("visiontools.bench.mixers", "token mixers vs tokens: SDPA, Hyena, LSH, reformer-pytorch"),
    "reversible": ("visiontools.bench.reversible", "training memory vs depth: plain, checkpointed, reversible ViT"),
    "onnx": ("visiontools.bench.onnx", "onnxruntime: the exported unpatched ViT vs exported ToMe ViTs"),
    "dit": ("visiontools.bench.dit", "SD3 / PixArt / Flux blocks: unpatched vs ToMe merge vs key/value downsampling"),
    "all": ("visiontools.bench.all", "the prepared GPU run: ViT, SD, Hyena and LSH sections within a time budget"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None  # command not available in this install
        raise


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available command and its options."""
    parser = _Parser(
        prog="visiontools",
        description="visiontools: make vision models faster (token merging, Hyena) and measure it.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: VISIONTOOLS_DEBUG=1); "
                             "accepted anywhere on the command line")
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


# Errors that are the user's to fix: printed as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def error_line(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None when ``exc`` is not one (a bug: show the traceback)."""
    if isinstance(exc, ModuleNotFoundError) and not isinstance(exc, UserError):
        root = (exc.name or "").split(".")[0]
        if root not in EXTRAS:
            return None
        return f"this command needs the optional package {root!r}, which is not installed: {install_hint(root)}"
    if not isinstance(exc, USER_ERRORS):
        return None
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text


def normalize_argv(argv: list[str]) -> list[str]:
    """The arguments as the parser takes them: ``--debug`` removed (it is accepted anywhere), and
    ``bench [options]`` read as ``bench vit [options]``."""
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in (*BENCH_TARGETS, "-h", "--help")):
        argv.insert(1, "vit")
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``visiontools`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("VISIONTOOLS_DEBUG", "").lower() not in ("", "0", "false", "no")
    if "--debug" in argv:
        debug = True
    args = build_parser().parse_args(normalize_argv(argv))
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("visiontools: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = error_line(e)
        if debug or line is None:
            raise
        print(f"visiontools: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
