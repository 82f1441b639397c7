"""The ``visiontools`` command line: ``bench`` (vit | sd | hyena | onnx), ``train``, ``eval``, ``demo``, ``export``, ``video``.

Each command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args)``. The
parser imports a command's module only when that command is used, so ``visiontools --help`` and a bare
``visiontools bench`` (which lists the targets) import no torch; modules keep the heaviest imports
(diffusers, gradio) inside ``run`` so that ``visiontools COMMAND --help`` stays fast too.

Everyday mistakes (an unknown model, a bad value, missing data, an existing output, a missing optional
extra) end in one line on stderr, ``visiontools: error: ...``, and exit status 2; ``--debug`` (anywhere
on the command line) or ``VISIONTOOLS_DEBUG=1`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
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


def _available(module: str) -> bool:
    """Whether a command's module is installed, found without importing it (``--help`` stays fast)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its package is missing
        return False


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help once: not when the help already says its default,
    nor for a ``None`` default or an on/off flag, where it would say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The option's help, with ``(default: X)`` appended only where it adds something."""
        help_ = action.help or ""
        if "default" in help_.lower() or action.default is None or action.nargs == 0:
            return help_
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away). A command's parser made with
    ``module=`` imports that module and adds its options only when the command is used (parsed or its
    help shown), so ``visiontools --help`` imports no command module (no torch)."""

    def __init__(self, *args, module: str | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `train --r 8` is an error, never `--resume 8`
        super().__init__(*args, **kwargs)
        self._module = module

    def load(self) -> "_Parser":
        """Import the command's module once and add its options; returns the parser."""
        if self._module is not None:
            mod, self._module = importlib.import_module(self._module), None
            if mod.__doc__ and not self.description:
                self.description = mod.__doc__.strip().splitlines()[0]
            mod.add_arguments(self)
            if "--no-progress" not in self._option_string_actions:  # every command takes it (scripts pass it)
                self.add_argument("--no-progress", action="store_true",
                                  help="no progress bars (this command draws none; accepted by every command)")
            self.set_defaults(_run=mod.run, _prog=self.prog)
        return self

    def parse_args(self, args=None, namespace=None):
        """argparse's parse; unrecognized arguments point to the help of the command they were given to."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = getattr(ns, "_prog", self.prog)
            self.exit(2, f"visiontools: error: unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
        return ns

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parse, after loading the command's options."""
        self.load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        """The command's ``--help`` text, with its options loaded."""
        self.load()
        return super().format_help()

    def format_usage(self) -> str:
        """The command's usage line, with its options loaded."""
        self.load()
        return super().format_usage()

    def error(self, message: str):
        """Exit with status 2 and one line naming the problem and where the usage is; the prefix is
        ``visiontools: error:`` for every command, as for the errors raised while running one."""
        self.exit(2, f"visiontools: error: {message} (see {self.prog} --help)\n")


def _print_bench_targets(parser: argparse.ArgumentParser):
    """The ``_run`` of ``visiontools bench`` without a target: list the targets and exit 0."""
    def run(args: argparse.Namespace) -> int:
        parser.print_help()
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available command; a command's module is imported (and its
    options added) only when that command is parsed or its help is shown."""
    parser = _Parser(
        prog="visiontools",
        description="visiontools: make vision models faster (token merging, Hyena) and measure it.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: VISIONTOOLS_DEBUG=1); "
                             "accepted anywhere on the command line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="benchmarks: vit, sd, hyena, ... (without a target: list them)",
                           description="Throughput benchmarks, candidates interleaved in one process. "
                                       "Run `visiontools bench TARGET`; options without a target run `bench vit`.")
    targets = bench.add_subparsers(dest="target", metavar="TARGET")
    bench.set_defaults(_run=_print_bench_targets(bench))
    for name, (module, help_) in BENCH_TARGETS.items():
        if _available(module):
            targets.add_parser(name, help=help_, module=module, formatter_class=_DefaultsFormatter)

    for name, (module, help_) in COMMANDS.items():
        if _available(module):
            sub.add_parser(name, help=help_, description=help_, module=module, formatter_class=_DefaultsFormatter)
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
    ``bench --option ...`` (options without a target) read as ``bench vit --option ...``. A bare
    ``bench`` stays as it is: it lists the targets."""
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1].startswith("-") and argv[1] not in ("-h", "--help"):
        argv.insert(1, "vit")
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``visiontools`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("VISIONTOOLS_DEBUG", "").lower() not in ("", "0", "false", "no")
    if "--debug" in argv:
        debug = True
    try:  # parsing imports the command's module: a missing optional extra is a one-line error too
        args = build_parser().parse_args(normalize_argv(argv))
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
