"""The visiontools Gradio demo (``visiontools demo``): see which patches a ToMe-patched ViT merges,
block by block, its predictions before and after merging, and the speedup measured on this machine.

Runs offline on the library's default checkpoint (``visiontools.models.DEFAULT_CHECKPOINT``) and bundled
example photos; any timm ViT can be loaded by name. This module composes the page: the model header,
then the tabs (``merge_tab``, ``speed_tab``, ``sd_tab``, ``hyena_tab``, ``video_tab``), each built through
the one tab interface of :mod:`visiontools.demos.state`, which also holds what they share. Gradio is
imported inside functions so that ``visiontools --help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
import sys

from visiontools.demos.state import cache as _cache  # noqa: F401 (the former name of state.cache)

TITLE = "visiontools: Token Merging (ToMe) demo"
DEFAULT_MODEL = "default"  # visiontools.demos.model_cache.DEFAULT_MODEL (not imported here: it imports torch)


def port_argument(text) -> int:
    """argparse type of ``--port``: a TCP port, 1 to 65535 (its default is checked the same way)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: pass --port N with N from 1 to 65535 "
                                         "(or set GRADIO_SERVER_PORT=N)")
    return port


def check_port_free(host: str, port: int) -> None:
    """``UserError`` in one line when ``host:port`` cannot be listened on (in use, or not this machine's
    address), checked before any model loads."""
    import socket

    from visiontools.errors import UserError

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it: a port in
            s.bind((host, port))                                      # TIME_WAIT after a restart is free
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port} ({e.strerror or e}): pass another --port N "
                        "(or set GRADIO_SERVER_PORT=N) or --host") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``visiontools demo``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 to serve other machines on the network)")
    parser.add_argument("--port", type=port_argument, default=os.environ.get("GRADIO_SERVER_PORT") or 7860,
                        help="port to listen on (default: $GRADIO_SERVER_PORT if set, else 7860)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model shown first: 'default' (the library's default checkpoint, the shipped CIFAR-10 "
                             "CCT-style ViT cifar10_cct), another shipped checkpoint (conformer_cifar10: slower "
                             "with ToMe on CPUs; cifar10_vit: a plain ViT with a class token), a timm ViT name "
                             "(e.g. vit_small_patch16_224) or a visiontools .safetensors checkpoint")
    parser.add_argument("--share", action=argparse.BooleanOptionalAction, default=False,
                        help="create a public gradio.live link (needs internet)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download pretrained timm weights (use random weights with a notice)")
    parser.add_argument("--max-size", type=int, default=64,
                        help="most requests waiting in the queue before new ones are turned away (64: "
                             "20 users of the merge view at once are all served, tested)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="requests of one kind (e.g. merge visualisations) processed at the same time")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")


def tab_modules() -> tuple:
    """The demo's tabs in page order, each a module with the tab interface of :mod:`visiontools.demos.state`."""
    from visiontools.demos import hyena_tab, merge_tab, sd_tab, speed_tab, video_tab

    return merge_tab, speed_tab, sd_tab, hyena_tab, video_tab


def add_tabs(gr, shared, tabs=None) -> None:
    """Build every tab (default: :func:`tab_modules`) in order; one whose optional packages are missing
    shows its ``MISSING`` note in its place, or nothing."""
    for tab in tab_modules() if tabs is None else tabs:
        if tab.available():
            tab.build_tab(gr, shared)
        elif getattr(tab, "MISSING", None):
            with gr.Tab(tab.TITLE):
                gr.Markdown(tab.MISSING, elem_id=tab.__name__.rpartition(".")[2].removesuffix("_tab") + "-missing")


def _header(gr, shared, default_model: str) -> None:
    """The title, the model dropdown with its panel, and the status line, into ``shared``."""
    from visiontools.demos.merge_tab import model_info_markdown
    from visiontools.demos.model_cache import SUGGESTED_MODELS

    gr.Markdown(f"# {TITLE}\nToken Merging combines similar patch tokens inside a Vision Transformer, "
                "so later blocks process fewer tokens. Pick an image and r (tokens merged per block): "
                "the picture shows which patches have been merged into one token (each group filled "
                "with its mean colour and outlined) after the chosen block.")
    choices = list(dict.fromkeys([default_model, *SUGGESTED_MODELS]))
    with gr.Row():
        shared.model_name = gr.Dropdown(
            choices, value=default_model, allow_custom_value=True, scale=2, min_width=280, label="Model",
            info="'default' = the shipped CIFAR-10 CCT-style ViT (cifar10_cct); conformer_cifar10 = the shipped "
                 "conv-augmented ViT (slower with ToMe on CPUs); cifar10_vit = a plain ViT with a class token; "
                 "or type any timm ViT name")
        with gr.Column(scale=3, min_width=300):
            shared.model_info = gr.Markdown(model_info_markdown(shared.dm), elem_id="model-info")
    shared.status = gr.Markdown("", elem_id="status")


def build_demo(default_model: str = DEFAULT_MODEL):
    """The Gradio Blocks app (not launched): the header, then every tab."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from visiontools.demos.state import Shared, cache

    shared = Shared(dm=cache().get(default_model))
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        shared.demo = demo
        _header(gr, shared, default_model)
        add_tabs(gr, shared)
    return demo


def run(args: argparse.Namespace) -> int:
    """Start the demo server (blocks until interrupted)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_port_free(args.host, args.port)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from visiontools.demos.model_cache import ModelCache
    from visiontools.demos.state import set_cache

    set_cache(ModelCache(allow_download=not args.no_download, default=args.model))
    try:
        demo = build_demo(args.model)
    except (ValueError, FileNotFoundError) as e:
        from visiontools.errors import UserError
        raise UserError(f"the demo cannot start with model {args.model!r}: {e}") from None
    demo.queue(max_size=args.max_size, default_concurrency_limit=args.concurrency)
    from visiontools.demos.images import ASSETS_DIR

    kwargs = dict(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                  max_file_size="25mb", allowed_paths=[str(ASSETS_DIR)],
                  # Gradio 6 extras, all off: no Node SSR server, MCP endpoint, PWA or footer links
                  ssr_mode=False, mcp_server=False, pwa=False, footer_links=[])
    import inspect

    accepted = inspect.signature(demo.launch).parameters
    try:
        demo.launch(**{k: v for k, v in kwargs.items() if k in accepted})
    except OSError as e:
        if "port" not in str(e).lower():
            raise
        from visiontools.errors import UserError
        raise UserError(f"cannot serve on {args.host}:{args.port}, the port is in use: pass --port N "
                        "(or set GRADIO_SERVER_PORT=N)") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m visiontools.demos.app``: ``visiontools demo`` itself, with its one-line errors."""
    from visiontools.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
