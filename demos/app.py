"""The visiontools Gradio demo (``visiontools demo``): see which patches a ToMe-patched ViT merges,
block by block, its predictions before and after merging, and the speedup measured on this machine.

Runs offline on the shipped CIFAR-10 checkpoint and bundled example photos; any timm ViT can be
loaded by name. Gradio is imported inside functions so that ``visiontools --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

TITLE = "visiontools: Token Merging (ToMe) demo"
DEFAULT_R = 4
DEFAULT_MODEL = "default"  # visiontools.demos.model_cache.DEFAULT_MODEL (not imported here: it imports torch)

_CACHE = None  # the process-wide visiontools.demos.model_cache.ModelCache


def _cache():
    global _CACHE
    if _CACHE is None:
        from visiontools.demos.model_cache import ModelCache

        _CACHE = ModelCache()
    return _CACHE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``visiontools demo``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 to serve other machines on the network)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
                        help="port to listen on (default: $GRADIO_SERVER_PORT if set, else 7860)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model shown first: 'default' (the shipped conv-augmented CIFAR-10 ViT, conformer_cifar10), "
                             "another shipped checkpoint (cifar10_vit), a timm ViT name (e.g. vit_small_patch16_224) "
                             "or a visiontools .safetensors checkpoint")
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


# ----------------------------------------------------------------------------------------------
# Callbacks: plain functions of component values, returning component values (tested directly).
# ----------------------------------------------------------------------------------------------

def model_info_markdown(dm) -> str:
    """The model panel: what is loaded, its token grid, and any notice (e.g. random weights)."""
    rows, cols = dm.grid_size
    text = (f"**Model:** {dm.description}. {dm.depth} blocks, {rows}x{cols} = {dm.num_patches} patches "
            f"+ {dm.model.num_prefix_tokens} class token(s), {len(dm.classes)} classes.")
    if dm.notice:
        text += f"\n\n⚠️ **Note:** {dm.notice}"
    return text


def max_r_for(dm) -> int:
    """Largest useful r for the slider: ToMe merges at most half of a block's patch tokens."""
    return max(1, dm.num_patches // 2)


def load_model_ui(name: str):
    """Select a model: returns (model panel markdown, r slider update, layer slider update, status)."""
    import gradio as gr

    try:
        dm = _cache().get(name)
    except Exception as e:  # unknown names, unsupported architectures, broken checkpoints
        msg = f"Could not load model {name!r}: {e}"
        gr.Warning(msg)
        return gr.update(), gr.update(), gr.update(), f"⚠️ {msg}"
    if dm.notice:
        gr.Warning(dm.notice)
    r_max = max_r_for(dm)
    return (model_info_markdown(dm),
            gr.update(maximum=r_max, value=min(DEFAULT_R, r_max)),
            gr.update(maximum=dm.depth, value=dm.depth),
            f"Loaded {dm.description}.")


def run_merge(image, model_name: str, r, schedule: str, layer, opacity=1.0):
    """The merge tab: returns (visualisation, token table, summary markdown, top-5 before, top-5 after,
    status). Bad uploads or settings give a status message (and a warning toast), never an exception."""
    import gradio as gr

    from visiontools.demos.images import ImageInputError, read_image
    from visiontools.demos.merging import TOKEN_TABLE_HEADERS, analyse

    empty = (None, gr.update(value=[], headers=TOKEN_TABLE_HEADERS), "", None, None)
    image = upload_path(image)
    if image is None:
        return (*empty, "Upload an image or pick an example.")
    try:
        im, notes = read_image(image)
        dm = _cache().get(model_name)
        layer = min(int(layer), dm.depth)
        res = analyse(dm, im, int(r), schedule, layer, opacity=float(opacity))
    except ImageInputError as e:
        gr.Warning(str(e))
        return (*empty, f"⚠️ **Could not use this upload:** {e}")
    except ValueError as e:
        gr.Warning(str(e))
        return (*empty, f"⚠️ {e}")
    except Exception as e:  # a bug or an odd model: say so on the page, keep serving
        logging.getLogger(__name__).exception("merge analysis failed")
        gr.Warning(f"Something went wrong: {type(e).__name__}: {e}")
        return (*empty, f"⚠️ Something went wrong: {type(e).__name__}: {e}")
    status = "; ".join(notes).capitalize() + "." if notes else ""
    for n in notes:
        gr.Info(n.capitalize())
    if not dm.trained:
        status = (status + " " if status else "") + "Random weights: the predictions are meaningless."
    return (res.visualisation, res.table, res.summary(dm, int(r), schedule), res.before, res.after, status)


def thread_choices() -> list[int]:
    """CPU thread counts offered for the speed measurement: powers of two up to the core count, and it."""
    n = os.cpu_count() or 1
    return sorted({*(2 ** i for i in range(n.bit_length()) if 2 ** i <= n), n})


def run_speed(image, model_name: str, r, schedule: str, batch_size, repeats, sweep: bool, threads=None,
              progress=None):
    """The speed tab: returns (bar chart, results table, markdown note)."""
    import gradio as gr
    import torch

    from visiontools.demos.images import ImageInputError, read_image
    from visiontools.demos.merging import model_input
    from visiontools.demos.speed import SPEED_HEADERS, measure_speed, speed_chart

    image = upload_path(image)
    try:
        dm = _cache().get(model_name)
        if image is not None:
            im, _ = read_image(image)
            x = model_input(dm, im)
            what = "the current image"
        else:
            x = torch.randn(1, 3, *dm.input_size)
            what = "random input (no image selected)"
    except (ImageInputError, ValueError) as e:
        gr.Warning(str(e))
        return None, gr.update(value=[], headers=SPEED_HEADERS), f"⚠️ {e}"
    cb = (lambda f, text: progress(f, desc=text)) if progress is not None else None
    try:
        res = measure_speed(dm, x, int(r), schedule, batch_size=int(batch_size), repeats=int(repeats),
                            sweep=bool(sweep), threads=int(threads) if threads else None, progress=cb)
    except Exception as e:  # e.g. out of memory for a big batch: say so, keep serving
        logging.getLogger(__name__).exception("speed measurement failed")
        gr.Warning(f"The measurement failed: {type(e).__name__}: {e}")
        return None, gr.update(value=[], headers=SPEED_HEADERS), f"⚠️ The measurement failed: {type(e).__name__}: {e}"
    best = res.table()[-1]
    note = (f"Measured on **{res.machine}**, batch of {int(batch_size)} copies of {what}, median of "
            f"{res.repeats} rounds, candidates interleaved. ToMe r={int(r)} ({schedule}): "
            f"**{best[3]:.2f}x** measured speedup, {best[5]:.2f}x fewer FLOPs. Other work on this machine "
            "(e.g. other users of the demo) slows all candidates alike but adds noise.")
    if best[3] < 1.0:
        note += (" ToMe was slower here: its merge step is many small operations, which suffer most when "
                 "CPU threads compete (other jobs, too many threads for the cores); try fewer CPU threads "
                 "or a larger batch.")
    return speed_chart(res), res.table(), note


# ----------------------------------------------------------------------------------------------
# The UI
# ----------------------------------------------------------------------------------------------

def torch_threads() -> int:
    """torch's current CPU thread count."""
    import torch

    return torch.get_num_threads()


def upload_path(value) -> str | None:
    """The file path inside an image component's raw value. The merge and speed events run with
    ``preprocess=False``, so uploads reach :func:`visiontools.demos.images.read_image` undecoded and a bad file
    gets its own clear message instead of a generic processing error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "path", None)


def _extra_tabs(gr, image) -> None:
    """Tabs for the Stable Diffusion, Hyena and video parts when those modules are installed."""
    for module in ("visiontools.demos.sd_tab", "visiontools.demos.hyena_tab", "visiontools.demos.video_tab"):
        try:
            mod = __import__(module, fromlist=["build_tab"])
        except ImportError:
            continue
        if mod.available():
            mod.build_tab(gr, image)
        elif module.endswith("sd_tab"):
            with gr.Tab("Stable Diffusion"):
                gr.Markdown(SD_MISSING, elem_id="sd-missing")


SD_MISSING = ("**Stable Diffusion is not installed.** This tab needs the optional `sd` extra (diffusers, "
              "transformers, accelerate): run `pip install -e '.[sd]'` in the repository (or `bash scripts/setup.sh`, "
              "which installs it), then restart `visiontools demo`.")


def build_demo(default_model: str = DEFAULT_MODEL):
    """The Gradio Blocks app (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from visiontools.demos.images import example_images
    from visiontools.demos.merging import SCHEDULES, TOKEN_TABLE_HEADERS
    from visiontools.demos.model_cache import SUGGESTED_MODELS
    from visiontools.demos.speed import SPEED_HEADERS

    dm = _cache().get(default_model)
    r_max = max_r_for(dm)
    choices = list(dict.fromkeys([default_model, *SUGGESTED_MODELS]))
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nToken Merging combines similar patch tokens inside a Vision Transformer, "
                    "so later blocks process fewer tokens. Pick an image and r (tokens merged per block): "
                    "the picture shows which patches have been merged into one token (each group filled "
                    "with its mean colour and outlined) after the chosen block.")
        with gr.Row():
            model_name = gr.Dropdown(choices, value=default_model, allow_custom_value=True, scale=2, min_width=280,
                                     label="Model", info="'default' = the shipped conv-augmented CIFAR-10 ViT; cifar10_vit = the shipped plain ViT; or type any timm ViT name")
            with gr.Column(scale=3, min_width=300):
                model_info = gr.Markdown(model_info_markdown(dm), elem_id="model-info")
        status = gr.Markdown("", elem_id="status")
        with gr.Tab("Which patches merge"):
            with gr.Row():
                with gr.Column(scale=1):
                    examples = example_images()
                    first = next((p for p in examples if p.endswith("cat.jpg")), examples[0] if examples else None)
                    image = gr.Image(value=first, type="filepath", label="Image (upload or pick an example)",
                                     height=300, elem_id="input-image", sources=["upload", "clipboard"])
                    gallery = gr.Examples(examples=[[p] for p in examples], inputs=[image],
                                label="Bundled example photos", elem_id="examples")
                    r = gr.Slider(0, r_max, value=min(DEFAULT_R, r_max), step=1, label="r: tokens merged per block",
                                  elem_id="r-slider")
                    schedule = gr.Radio(list(SCHEDULES), value="constant", label="Schedule",
                                        info="decreasing merges more in early blocks, increasing in late ones")
                    layer = gr.Slider(0, dm.depth, value=dm.depth, step=1, label="Show merges after block",
                                      info="0 = before the first block", elem_id="layer-slider")
                    opacity = gr.Slider(0.2, 1.0, value=1.0, step=0.05, label="Drawing opacity",
                                        info="below 1 the photo shows through the merged groups")
                with gr.Column(scale=1):
                    vis = gr.Image(label="Merged patch groups", type="pil", height=384, elem_id="merge-vis",
                                   interactive=False, format="png")
                    summary = gr.Markdown(elem_id="token-summary")
            tokens = gr.Dataframe(headers=TOKEN_TABLE_HEADERS, label="Tokens per block (class token included)",
                                  interactive=False, elem_id="token-table")
            with gr.Row():
                before = gr.Label(num_top_classes=5, label="Top-5 without ToMe", elem_id="top5-before")
                after = gr.Label(num_top_classes=5, label="Top-5 with ToMe", elem_id="top5-after")
        with gr.Tab("Measured speed"):
            gr.Markdown("Times the unpatched model against the ToMe-patched one (same r and schedule as "
                        "the first tab) on the machine running this demo.")
            with gr.Row():
                batch = gr.Slider(1, 64, value=16, step=1, label="Batch size")
                repeats = gr.Slider(2, 30, value=6, step=1, label="Timed rounds")
                choices = thread_choices()
                threads = gr.Dropdown(choices, value=min(choices, key=lambda t: abs(t - torch_threads())),
                                      label="CPU threads", info="on small shared CPUs, fewer threads can be faster")
                sweep = gr.Checkbox(False, label="Also time smaller r (throughput vs r)")
            measure = gr.Button("Measure speed", variant="primary", elem_id="measure")
            chart = gr.Plot(label="Throughput", elem_id="speed-chart")
            speed_table = gr.Dataframe(headers=SPEED_HEADERS, label="Results", interactive=False, elem_id="speed-table")
            speed_note = gr.Markdown(elem_id="speed-note")
        _extra_tabs(gr, image)

        merge_inputs = [image, model_name, r, schedule, layer, opacity]
        merge_outputs = [vis, tokens, summary, before, after, status]
        # image.input: uploads, pastes and clears (image.change would fire twice per upload);
        # picking an example sets the value without an input event, so it gets its own trigger.
        example_picked = getattr(gallery, "load_input_event", None)
        image_triggers = (image.input, example_picked.then) if example_picked is not None else (image.change,)
        # .input, not .change: a model switch sets r and layer itself and then runs run_merge once
        # (below); .change would also fire for those programmatic updates and run it twice more.
        for trigger in (*image_triggers, r.input, schedule.input, layer.input, opacity.input):
            trigger(run_merge, merge_inputs, merge_outputs, trigger_mode="always_last", preprocess=False,
                    show_progress="minimal", concurrency_id="merge")
        demo.load(run_merge, merge_inputs, merge_outputs, preprocess=False, concurrency_id="merge")
        model_name.change(load_model_ui, [model_name], [model_info, r, layer, status],
                          concurrency_id="load", concurrency_limit=1).then(
            run_merge, merge_inputs, merge_outputs, preprocess=False, concurrency_id="merge")

        def speed(image, model_name, r, schedule, batch, repeats, sweep, threads, progress=gr.Progress()):
            return run_speed(image, model_name, r, schedule, batch, repeats, sweep, threads, progress=progress)

        measure.click(speed, [image, model_name, r, schedule, batch, repeats, sweep, threads],
                      [chart, speed_table, speed_note], preprocess=False, concurrency_limit=1,
                      concurrency_id="speed")
    return demo


def run(args: argparse.Namespace) -> int:
    """Start the demo server (blocks until interrupted)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from visiontools.demos.model_cache import ModelCache

    global _CACHE
    _CACHE = ModelCache(allow_download=not args.no_download, default=args.model)
    try:
        demo = build_demo(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"visiontools demo: cannot start with model {args.model!r}: {e}", file=sys.stderr)
        return 2
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
    """``python -m visiontools.demos.app``: the same as ``visiontools demo``."""
    parser = argparse.ArgumentParser(prog="visiontools demo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
