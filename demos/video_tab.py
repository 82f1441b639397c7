"""The demo's video tab: a clip (uploaded, or the bundled example: a camera pan across one of the
bundled photos, generated on first use) goes through ``visiontools.video.annotate_video`` with the
demo's start-up model; the page shows the annotated clip (frame | merge map, tokens, FPS with and
without ToMe) and a plot of tokens per block and FPS over the clip. A webcam section streams single
frames through the same drawing, where the browser grants the camera (localhost or HTTPS)."""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

TITLE = "Video"
MAX_FRAMES = 120            # longer clips are cut here, with a message (the CLI has no limit)
MAX_PIXELS = 3840 * 2160    # 4K frames at most in the demo
OUT_HEIGHT = 240            # output panel height: small files, quick to encode and send
KEEP_OUTPUTS_S = 3600       # annotated clips older than this are deleted from the work folder
EXAMPLE_PHOTO = "cat.jpg"
_EXAMPLE_LOCK = threading.Lock()


def available() -> bool:
    """Whether OpenCV (the ``video`` extra) is installed."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visiontools"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    base = Path(tempfile.gettempdir()) / "visiontools-cache"
    base.mkdir(parents=True, exist_ok=True)
    return base


def example_clip() -> str:
    """Path of the example clip (WebM, 48 frames, 320x240): a pan across the bundled cat photo,
    generated into the user's cache folder on first use."""
    from visiontools.demos.images import ASSETS_DIR
    from visiontools.video import make_pan_clip

    path = _cache_dir() / f"example_pan_{Path(EXAMPLE_PHOTO).stem}_v1.webm"
    with _EXAMPLE_LOCK:
        if not path.is_file():
            make_pan_clip(ASSETS_DIR / EXAMPLE_PHOTO, path)
    return str(path)


def _work_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "visiontools-demo-video"
    d.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for p in d.glob("*.webm"):  # outputs are copied into Gradio's cache when returned: ours can go
        try:
            if now - p.stat().st_mtime > KEEP_OUTPUTS_S:
                p.unlink()
        except OSError:
            pass
    return d


def video_figure(res):
    """Two panels: tokens entering each block (and after the last), and model FPS per batch over
    the clip, with and without ToMe."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    t = res.tokens_per_layer
    ax.plot(range(len(t)), t, "o-", color="#f97316", label="ToMe")
    ax.axhline(t[0], color="#9aa3ad", ls="--", label="without ToMe")
    ax.axvline(res.block, color="k", lw=0.8, alpha=0.4)
    ax.set_xlabel("after block (0 = input; grey line: the block drawn)")
    ax.set_ylabel("tokens per frame (a class token included)" if t[0] > res.grid[0] * res.grid[1] else "tokens per frame")
    ax.set_title("Tokens per block", fontsize=9)
    ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    sizes = [b - a for a, b in zip([0, *res.batch_frames[:-1]], res.batch_frames)]
    ax2.plot(res.batch_frames, [n / s for n, s in zip(sizes, res.tome_seconds)], "o-", color="#f97316",
             label=f"ToMe ({res.fps_tome:.0f} FPS overall)")
    ax2.plot(res.batch_frames, [n / s for n, s in zip(sizes, res.base_seconds)], "o-", color="#9aa3ad",
             label=f"without ToMe ({res.fps_base:.0f} FPS overall)")
    ax2.set_xlabel("frame (end of each batch)")
    ax2.set_ylabel("model frames / s")
    ax2.set_ylim(bottom=0)
    ax2.set_title("Model FPS per batch (same frames, interleaved)", fontsize=9)
    ax2.legend(fontsize=8)
    return fig


def run_video(clip, r, block, batch_size, progress=None):
    """The tab's callback: returns (annotated clip path or None, figure or None, markdown note)."""
    import gradio as gr

    from visiontools.demos.merging import r_setting
    from visiontools.demos.state import cache, upload_path
    from visiontools.video import VideoInputError, annotate_video, probe_video

    path = upload_path(clip)
    if path is None:
        return None, None, "Upload a clip or pick the example."
    try:
        dm = cache().get(None)
        info = probe_video(path, MAX_PIXELS)
        total = info.frame_count
        out = _work_dir() / f"{uuid.uuid4().hex}.webm"
        block = min(int(block), dm.depth)

        def report(done, n):
            if progress is not None:
                progress(done / n if n else 0.0, desc=f"frame {done} of {n or '?'}")

        res = annotate_video(dm.model, path, out, r_setting(int(r)), mean=dm.mean, std=dm.std, block=block,
                             batch_size=int(batch_size), max_frames=MAX_FRAMES, out_height=OUT_HEIGHT,
                             max_pixels=MAX_PIXELS, progress=report)
    except VideoInputError as e:
        gr.Warning(str(e))
        return None, None, f"⚠️ **Could not use this clip:** {e}"
    except ValueError as e:
        gr.Warning(str(e))
        return None, None, f"⚠️ {e}"
    except Exception as e:  # a bug or an odd file: say so on the page, keep serving
        logging.getLogger(__name__).exception("video annotation failed")
        gr.Warning(f"Something went wrong: {type(e).__name__}: {e}")
        return None, None, f"⚠️ Something went wrong: {type(e).__name__}: {e}"
    note = (f"**{res.frames} frames** through {dm.description}, ToMe r={int(r)}{res.picture_text}: "
            f"**{res.tokens_after_block} of "
            f"{res.tokens_per_layer[0]} tokens** after block {res.block}. Model speed (forward pass only, "
            f"batches of {int(batch_size)}, both models on the same frames, interleaved): **ToMe {res.fps_tome:.1f} "
            f"FPS, without ToMe {res.fps_base:.1f} FPS ({res.fps_tome / res.fps_base:.2f}x)** on this machine, "
            "which other users of the demo may share.")
    if total > MAX_FRAMES and res.frames == MAX_FRAMES:
        fps = info.fps or 25.0
        capped = (f"The clip has {total} frames ({total / fps:.1f} s); the demo processes the first {MAX_FRAMES} "
                  f"({MAX_FRAMES / fps:.1f} s). Use `visiontools video` on the command line for whole clips.")
        gr.Info(capped)
        note = f"✂️ {capped}\n\n{note}"
    return str(out), video_figure(res), note


def webcam_frame(frame, r, block):
    """One webcam frame (RGB array) -> the frame beside its merge map, with tokens and the model time."""
    import torch

    import copy

    from visiontools.demos.merging import r_setting
    from visiontools.demos.state import cache
    from visiontools.patches.timm import apply_tome, tome_forward
    from visiontools.pictures import picture_r
    from visiontools.video import annotate_frame, display_size, model_input

    if frame is None:
        return None
    import cv2

    dm = cache().get(None)
    block = min(int(block), dm.depth)
    pic, k = dm.picture  # the merge map at least 14x14 patches: the model on a k times larger input
    tome = apply_tome(copy.copy(pic), r=picture_r(r_setting(int(r)), dm.depth, k))
    x = model_input([frame], tuple(pic.patch_embed.img_size), dm.mean, dm.std)
    with torch.inference_mode():
        t0 = time.perf_counter()
        _, info = tome_forward(tome, x, trace_source=True)
        ms = (time.perf_counter() - t0) * 1e3
    rows, cols = dm.picture_grid
    source = torch.arange(rows * cols) if block == 0 else info.layer_sources[block - 1][0]
    w, h = display_size(frame.shape[1], frame.shape[0], OUT_HEIGHT)
    view = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    scaled = f" (x{k * k} at {x.shape[-2]}x{x.shape[-1]})" if k > 1 else ""
    return annotate_frame(view, source, (rows, cols), [
        f"ToMe r={int(r)}{scaled}: {info.tokens_per_layer[block]} of {info.tokens_per_layer[0]} tokens "
        f"after block {block}",
        f"ToMe forward {ms:.1f} ms (one frame)"])


def build_tab(gr, shared) -> None:  # noqa: ARG001  (the tab interface: visiontools.demos.state)
    """The tab's components and events, for the demo's start-up model."""
    from visiontools.demos.state import cache

    dm = cache().get(None)

    def annotate(clip, r, block, batch_size, progress=gr.Progress()):
        return run_video(clip, r, block, batch_size, progress=progress)

    with gr.Tab(TITLE):
        pic, k = dm.picture
        enlarged = (f" The model runs on {pic.patch_embed.img_size[0]}x{pic.patch_embed.img_size[1]} frames "
                    f"({dm.picture_grid[0]}x{dm.picture_grid[1]} patches, every block's r x{k * k}) so that the "
                    "merge map is as fine as the ToMe paper's figures; the speeds are measured at that size."
                    if k > 1 else "")
        gr.Markdown(f"Token merging on every frame of a clip, with {dm.description}: each frame beside the "
                    "patch groups merged after the chosen block, the tokens left, and the model's frames per "
                    f"second with and without ToMe.{enlarged} Clips are cut at {MAX_FRAMES} frames here "
                    "(`visiontools video` has no limit).")
        with gr.Row():
            with gr.Column(scale=1):
                clip = gr.Video(label="Clip (upload one, or pick the example below)",
                                sources=["upload"], height=260, elem_id="video-in")
                gr.Examples(examples=[[example_clip()]], inputs=[clip], elem_id="video-examples",
                            label="Example: a camera pan across a bundled photo")
                r = gr.Slider(0, max(1, dm.num_patches // 2), value=min(4, dm.num_patches // 2), step=1,
                              label="r: tokens merged per block", elem_id="video-r")
                block = gr.Slider(0, dm.depth, value=dm.depth, step=1, label="Show merges after block",
                                  info="0 = before the first block")
                batch = gr.Slider(1, 32, value=8, step=1, label="Frames per batch")
                go = gr.Button("Annotate clip", variant="primary", elem_id="video-run")
            with gr.Column(scale=2):
                out = gr.Video(label="Frame | merged patch groups", interactive=False, elem_id="video-out",
                               autoplay=True, loop=True)
                note = gr.Markdown(elem_id="video-note")
        plot = gr.Plot(label="Tokens per block and FPS over the clip", elem_id="video-plot")
        with gr.Accordion("Webcam (live)", open=False):
            gr.Markdown("Each webcam frame goes through the ToMe model alone (no batching, no comparison run). "
                        "Browsers only give pages the camera on localhost or over HTTPS.")
            with gr.Row():
                cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam", elem_id="webcam")
                cam_out = gr.Image(label="Frame | merged patch groups", elem_id="webcam-out")
        go.click(annotate, [clip, r, block, batch], [out, plot, note], preprocess=False, concurrency_limit=1,
                 concurrency_id="video")
        cam.stream(webcam_frame, [cam, r, block], [cam_out], stream_every=0.3, time_limit=120,
                   concurrency_limit=2, concurrency_id="webcam")
