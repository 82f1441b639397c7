"""The demo's first tab, "Which patches merge": an image, r, a schedule and a block; the picture of the
patch groups merged after that block, tokens per block, and top-5 before and after merging. It owns
the shared input image and the r and schedule controls (:class:`visiontools.demos.state.Shared`),
and answers a switch of the page's model (sliders follow the new model, then the picture).

Callbacks are plain functions of component values returning component values (tested directly); bad
uploads or settings give a status message and a warning toast, never an exception."""
from __future__ import annotations

import logging

TITLE = "Which patches merge"
# The first view opens at the loaded checkpoint's recommended r (DemoModel.recommended_r; for the default
# checkpoint DEFAULT_R, its card's choice: visiontools.models.recommended_r). That r is also the one r of
# the first merge picture (each block's r times k*k on the picture's k times larger input,
# visiontools.pictures); its block: visiontools.demos.merging.first_view_block.
from visiontools.defaults import default_r_text  # noqa: E402 (torch-free, like this module)
from visiontools.tome.r_text import first_r, parse_r_text  # noqa: E402

DEFAULT_R = first_r(parse_r_text(default_r_text()))  # = visiontools.demos.model_cache.DEFAULT_R


def available() -> bool:
    """Always: the tab needs only the demo's own dependencies."""
    return True


def model_info_markdown(dm) -> str:
    """The model panel: what is loaded, its token grid, and any notice (e.g. random weights)."""
    rows, cols = dm.grid_size
    from visiontools.demos.merging import prefix_words

    tokens = dm.num_patches + dm.model.num_prefix_tokens
    text = (f"**Model:** {dm.description}. {dm.depth} blocks, {rows}x{cols} = {dm.num_patches} patches, "
            f"{tokens} tokens ({prefix_words(dm.model)}), {len(dm.classes)} classes.")
    pic, k = dm.picture
    if k > 1:
        (ph, pw), (gh, gw) = pic.patch_embed.img_size, dm.picture_grid
        text += (f" Merge pictures: the same model on a {ph}x{pw} copy of the image ({gh}x{gw} patches, "
                 f"each block's r times {k * k}), fine enough to show groups that follow objects.")
    if dm.notice:
        text += f"\n\n⚠️ **Note:** {dm.notice}"
    return text


def max_r_for(dm) -> int:
    """Largest useful r for the slider: ToMe merges at most half of a block's patch tokens."""
    return max(1, dm.num_patches // 2)


def load_model_ui(name: str):
    """Select a model: returns (model panel markdown, r slider update, layer slider update (the first
    view's block, :func:`visiontools.demos.merging.first_view_block`), classes note, status)."""
    import gradio as gr

    from visiontools.demos.state import cache

    try:
        dm = cache().get(name)
    except Exception as e:  # unknown names, unsupported architectures, broken checkpoints
        msg = f"Could not load model {name!r}: {e}"
        gr.Warning(msg)
        return gr.update(), gr.update(), gr.update(), gr.update(), f"⚠️ {msg}"
    if dm.notice:
        gr.Warning(dm.notice)
    from visiontools.demos.merging import classes_note, first_view_block

    r_max = max_r_for(dm)
    r = min(dm.recommended_r, r_max)
    return (model_info_markdown(dm),
            gr.update(maximum=r_max, value=r),
            gr.update(maximum=dm.depth, value=first_view_block(dm, r)),
            classes_note(dm), f"Loaded {dm.description}.")


def run_merge(image, model_name: str, r, schedule: str, layer, opacity=1.0):
    """Returns (visualisation, token table, summary markdown, top-5 before, top-5 after, status)."""
    import gradio as gr

    from visiontools.demos.images import ImageInputError, read_image
    from visiontools.demos.merging import TOKEN_TABLE_HEADERS, analyse
    from visiontools.demos.state import cache, upload_path

    empty = (None, gr.update(value=[], headers=TOKEN_TABLE_HEADERS), "", None, None)
    image = upload_path(image)
    if image is None:
        return (*empty, "Upload an image or pick an example.")
    try:
        im, notes = read_image(image)
        dm = cache().get(model_name)
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


def build_tab(gr, shared) -> None:
    """The tab's components and events; fills in ``shared.image``, ``shared.r`` and ``shared.schedule``."""
    from visiontools.demos.images import example_images
    from visiontools.demos.merging import SCHEDULES, TOKEN_TABLE_HEADERS, classes_note, first_view_block

    dm, r_max = shared.dm, max_r_for(shared.dm)
    r0 = min(dm.recommended_r, r_max)
    with gr.Tab(TITLE):
        with gr.Row():
            with gr.Column(scale=1):
                examples = example_images()
                first = next((p for p in examples if p.endswith("cat.jpg")), examples[0] if examples else None)
                image = gr.Image(value=first, type="filepath", label="Image (upload or pick an example)",
                                 height=300, elem_id="input-image", sources=["upload", "clipboard"])
                gallery = gr.Examples(examples=[[p] for p in examples], inputs=[image],
                                      label="Bundled example photos", elem_id="examples")
                r = gr.Slider(0, r_max, value=r0, step=1, label="r: tokens merged per block",
                              elem_id="r-slider")
                schedule = gr.Radio(list(SCHEDULES), value="constant", label="Schedule",
                                    info="decreasing merges more in early blocks (--r r,-0.5 on the command "
                                         "line), increasing in late ones (--r r,+0.5)")
                layer = gr.Slider(0, dm.depth, value=first_view_block(dm, r0), step=1,
                                  label="Show merges after block", info="0 = before the first block",
                                  elem_id="layer-slider")
                opacity = gr.Slider(0.2, 1.0, value=1.0, step=0.05, label="Drawing opacity",
                                    info="below 1 the photo shows through the merged groups")
            with gr.Column(scale=1):
                vis = gr.Image(label="Merged patch groups", type="pil", height=384, elem_id="merge-vis",
                               interactive=False, format="png")
                summary = gr.Markdown(elem_id="token-summary")
        tokens = gr.Dataframe(headers=TOKEN_TABLE_HEADERS, label="Tokens per block (as the summary counts them)",
                              interactive=False, elem_id="token-table")
        with gr.Row():
            before = gr.Label(num_top_classes=5, label="Top-5 without ToMe", elem_id="top5-before")
            after = gr.Label(num_top_classes=5, label="Top-5 with ToMe", elem_id="top5-after")
        classes = gr.Markdown(classes_note(dm), elem_id="classes-note")
    shared.image, shared.r, shared.schedule = image, r, schedule
    _merge_events(shared, gallery, [image, shared.model_name, r, schedule, layer, opacity],
                  [vis, tokens, summary, before, after, shared.status], layer, opacity, classes)


def _merge_events(shared, gallery, inputs: list, outputs: list, layer, opacity, classes) -> None:
    """Redraw on every change of the image, r, schedule, block or opacity, on page load, and after a
    model switch (which first updates the panel and the sliders)."""
    image, r, schedule = shared.image, shared.r, shared.schedule
    # image.input: uploads, pastes and clears (image.change would fire twice per upload);
    # picking an example sets the value without an input event, so it gets its own trigger.
    example_picked = getattr(gallery, "load_input_event", None)
    image_triggers = (image.input, example_picked.then) if example_picked is not None else (image.change,)
    # .input, not .change: a model switch sets r and layer itself and then runs run_merge once
    # (below); .change would also fire for those programmatic updates and run it twice more.
    for trigger in (*image_triggers, r.input, schedule.input, layer.input, opacity.input):
        trigger(run_merge, inputs, outputs, trigger_mode="always_last", preprocess=False,
                show_progress="minimal", concurrency_id="merge")
    shared.demo.load(run_merge, inputs, outputs, preprocess=False, concurrency_id="merge")
    shared.model_name.change(load_model_ui, [shared.model_name],
                             [shared.model_info, r, layer, classes, shared.status],
                             concurrency_id="load", concurrency_limit=1).then(
        run_merge, inputs, outputs, preprocess=False, concurrency_id="merge")
