"""The demo's "Measured speed" tab: the unpatched model against the ToMe-patched one (r and schedule of
the merge tab) timed on the machine running the demo, as a chart, a table and a note."""
from __future__ import annotations

import logging
import os

TITLE = "Measured speed"


def available() -> bool:
    """Always: the tab needs only the demo's own dependencies."""
    return True


def thread_choices() -> list[int]:
    """CPU thread counts offered for the speed measurement: powers of two up to the core count, and it."""
    n = os.cpu_count() or 1
    return sorted({*(2 ** i for i in range(n.bit_length()) if 2 ** i <= n), n})


def torch_threads() -> int:
    """torch's current CPU thread count."""
    import torch

    return torch.get_num_threads()


def run_speed(image, model_name: str, r, schedule: str, batch_size, repeats, sweep: bool, threads=None,
              progress=None):
    """Returns (bar chart, results table, markdown note)."""
    import gradio as gr
    import torch

    from visiontools.demos.images import ImageInputError, read_image
    from visiontools.demos.merging import model_input
    from visiontools.demos.speed import SPEED_HEADERS, measure_speed, speed_chart
    from visiontools.demos.state import cache, upload_path

    image = upload_path(image)
    try:
        dm = cache().get(model_name)
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


def build_tab(gr, shared) -> None:
    """The tab's components and events (the image, model, r and schedule of ``shared``)."""
    from visiontools.demos.speed import SPEED_HEADERS

    with gr.Tab(TITLE):
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

    def speed(image, model_name, r, schedule, batch, repeats, sweep, threads, progress=gr.Progress()):
        return run_speed(image, model_name, r, schedule, batch, repeats, sweep, threads, progress=progress)

    measure.click(speed, [shared.image, shared.model_name, shared.r, shared.schedule, batch, repeats, sweep, threads],
                  [chart, speed_table, speed_note], preprocess=False, concurrency_limit=1, concurrency_id="speed")
