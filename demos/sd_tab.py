"""The demo's Stable Diffusion tab: which latent tokens ToMe-SD merges in each patched UNet block,
and the UNet speed-up measured on this machine (unpatched SDPA vs ToMe-SD merge vs token downsampling).

Offline, the UNet is the SD 1.5 layout at a few million parameters with random weights
(``visiontools.bench.sd.TINY_UNET_CONFIG``); the "latent" is the picture itself resized to the
latent grid (RGB in [-1, 1] plus luminance as the 4 channels). Merge plans use fixed (top-left)
destinations and the tokens' own dtype for matching (:func:`exact_plan_options`), so the plan
recomputed here from each transformer block's input is exactly the one the patched block used.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from visiontools.demos.images import square_resized
from visiontools.bench import shared_copy

TITLE = "Stable Diffusion (ToMe-SD)"
MISSING = ("**Stable Diffusion is not installed.** This tab needs the optional `sd` extra (diffusers, "
           "transformers, accelerate): run `pip install -e '.[sd]'` in the repository (or `bash scripts/setup.sh`, "
           "which installs it), then restart `visiontools demo`.")
LATENT_SIDES = {"32x32 (256 px image)": 32, "64x64 (512 px image)": 64}
TIMESTEP = 500
_LOCK = threading.Lock()
_UNET = None


def available() -> bool:
    """Whether diffusers and the ToMe-SD patch are installed (found, not imported: importing
    diffusers takes seconds, paid only when the tab is used)."""
    from importlib.util import find_spec

    try:
        return all(find_spec(m) is not None for m in ("diffusers", "visiontools.patches.diffusers", "visiontools.bench.sd"))
    except (ImportError, ValueError):
        return False


def tiny_unet():
    """The tab's UNet (SD 1.5 layout, tiny widths, random weights, seed 0), built once."""
    global _UNET
    with _LOCK:
        if _UNET is None:
            from diffusers import UNet2DConditionModel

            from visiontools.bench.sd import TINY_UNET_CONFIG

            g = torch.random.get_rng_state()
            torch.manual_seed(0)
            _UNET = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
            torch.random.set_rng_state(g)
        return _UNET


def image_latent(image: Image.Image, side: int) -> torch.Tensor:
    """``(1, 4, side, side)``: the centre square of ``image`` resized to the latent grid, RGB scaled
    to [-1, 1] plus luminance as the fourth channel (a stand-in for a VAE latent)."""
    im = square_resized(image, side, side)
    rgb = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    lum = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]
    return torch.cat([rgb, lum]).unsqueeze(0)


def _text_embedding(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)


def exact_plan_options() -> dict:
    """``apply_tome_sd`` options under which the plan recomputed from a block's input is exactly the
    one the block used: fixed destinations, and the matching done in the tokens' own dtype."""
    return {"use_rand": False, "similarity_dtype": "input"}


@dataclass
class BlockMerge:
    """One patched block: its name, downsampling, token grid, tokens merged, and the picture."""

    name: str
    downsample: int
    grid: tuple[int, int]
    merged: int
    picture: Image.Image

    @property
    def caption(self) -> str:
        h, w = self.grid
        return f"{self.name} (x{self.downsample}, {h}x{w} tokens): {self.merged} of {h * w} merged"


def sd_merge_maps(image: Image.Image, ratio: float, max_downsample: int, latent_side: int = 64,
                  display_side: int = 512, method: str = "tome") -> list[BlockMerge]:
    """Run the (tiny) UNet patched with ToMe-SD at ``ratio`` on levels downsampled at most
    ``max_downsample`` times, and draw, for every patched block, which latent tokens merged
    (``method``: ``tome``, ``tofu`` or ``pitome``, whose energy picks other sources)."""
    from visiontools.patches.diffusers import apply_tome_sd, method_rules, patched_blocks
    from visiontools.tome import merge2d
    from visiontools.tome.vis import render_merges

    unet = apply_tome_sd(shared_copy(tiny_unet()), ratio=ratio, mode="merge", max_downsample=max_downsample,
                         method=method, **exact_plan_options())
    blocks = patched_blocks(unet)
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, _ in blocks:  # ToMe-SD plans from the transformer block's input (before norm1)
        def grab(module, args, kwargs, name=name):
            inputs[name] = (args[0] if args else kwargs["hidden_states"]).detach()

        hooks.append(unet.get_submodule(name).register_forward_pre_hook(grab, with_kwargs=True))
    x = image_latent(image, latent_side)
    try:
        with torch.inference_mode():
            unet(x, torch.tensor(TIMESTEP), _text_embedding(unet))
    finally:
        for h in hooks:
            h.remove()
    view = square_resized(image, display_side, display_side)
    cfg_sx = cfg_sy = 2
    out = []
    for i, (name, ds) in enumerate(blocks):
        h, w = merge2d.grid_at(latent_side, latent_side, ds)
        r = merge2d.num_merged(h * w, ratio, cfg_sx, cfg_sy, h, w)
        margin, reduce = method_rules(method, i, len(blocks))  # the plan the block made, rebuilt
        plan = merge2d.plan_merge_2d(inputs[name], h, w, r, cfg_sx, cfg_sy, None, energy_margin=margin,
                                     reduce=reduce)
        out.append(BlockMerge(name, ds, (h, w), plan.r, render_merges(view, plan.index[0], grid_size=(h, w))))
    return out


def sd_speed(ratio: float, max_downsample: int, latent_side: int = 64, repeats: int = 3, warmup: int = 1,
             progress=None, method: str = "tome") -> tuple[list[list], str]:
    """Median UNet call time of SDPA (unpatched), ToMe-SD merge (with ``method``'s rules) and token
    downsampling at ``ratio``, interleaved; rows ``[method, ms, speedup, FLOP ratio]`` and the machine."""
    from diffusers import UNet2DConditionModel

    from visiontools.patches.diffusers import apply_tome_sd
    from visiontools.bench.sd import TINY_UNET_CONFIG
    from visiontools.timing import count_flops, interleaved_times, machine_description, median

    base = tiny_unet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent_side, latent_side, generator=g)
    e = _text_embedding(base)
    t = torch.tensor(TIMESTEP)
    with torch.device("meta"):
        meta = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    fns, flops = {}, {}
    for mode in ("unpatched", "merge", "downsample"):
        unet, m = shared_copy(base), shared_copy(meta)
        if mode != "unpatched":
            kw = dict(ratio=ratio, mode=mode, max_downsample=max_downsample,
                      method=method if mode == "merge" else "tome")  # downsample mode has no merge method
            apply_tome_sd(unet, **kw)
            apply_tome_sd(m, **kw)
        fns[mode] = (lambda u: (lambda: u(x, t, e)))(unet)
        flops[mode] = count_flops(lambda m=m: m(x.to("meta"), t.to("meta"), e.to("meta")))
    with _LOCK:
        times = interleaved_times(fns, repeats=repeats, warmup=warmup, progress=progress or False)
    names = list(fns)
    base_t = median(times["unpatched"])
    label = {"unpatched": "unpatched", "downsample": f"ToMe-SD downsample @ {ratio:g}",
             "merge": f"ToMe-SD merge @ {ratio:g}" + ("" if method == "tome" else f" ({method})")}
    rows = [[label[n], round(median(times[n]) * 1e3, 1),
             round(base_t / median(times[n]), 2), round(flops["unpatched"] / flops[n], 2)] for n in names]
    return rows, machine_description("cpu")


SD_SPEED_HEADERS = ["UNet", "ms / call", "speedup", "FLOP ratio"]


def merge_maps_ui(img, ratio, max_ds, side_label, method="tome"):
    """The tab's "show" callback: (gallery of (picture, caption), markdown note); a bad upload gives
    a warning and a note instead of an exception."""
    import gradio as gr

    from visiontools.demos.images import ImageInputError, read_image
    from visiontools.demos.state import upload_path

    try:
        im, _ = read_image(upload_path(img))
    except ImageInputError as err:
        gr.Warning(str(err))
        return [], f"⚠️ {err}"
    side = LATENT_SIDES[side_label]
    maps = sd_merge_maps(im, float(ratio), int(max_ds), side, method=method)
    merged = sum(b.merged for b in maps)
    total = sum(b.grid[0] * b.grid[1] for b in maps)
    text = (f"{len(maps)} patched self-attention blocks; {merged} of {total} tokens merged before their "
            f"attention (then copied back), method `{method}`. Tiny random-weight UNet, {side}x{side} latent made "
            "from the image.")
    return [(b.picture, b.caption) for b in maps], text


def build_tab(gr, shared) -> None:
    """The tab's components and events (``shared.image``: the input image of the merge tab)."""

    def run_speed(ratio, max_ds, side_label, repeats, method, progress=gr.Progress()):
        rows, machine = sd_speed(float(ratio), int(max_ds), LATENT_SIDES[side_label], int(repeats),
                                 progress=lambda f, text: progress(f, desc=text), method=method)
        return rows, (f"Measured on **{machine}**: tiny random-weight UNet (SD 1.5 layout), batch 1, median of "
                      f"{int(repeats)} interleaved rounds. The gain depends on the latent size and the UNet "
                      "width (merge plans cost time too); full-size SD 1.5 numbers come from `visiontools bench sd`.")

    with gr.Tab(TITLE):
        gr.Markdown("ToMe for Stable Diffusion merges similar latent tokens before each self-attention (one "
                    "destination per 2x2 window) and copies the result back after it. Pictures: which latent "
                    "tokens share a merged token in each patched UNet block, for the image of the first tab.")
        with gr.Row():
            ratio = gr.Slider(0.0, 0.75, value=0.5, step=0.05, label="ratio (fraction of tokens merged)",
                              elem_id="sd-ratio")
            max_ds = gr.Radio([1, 2, 4, 8], value=1, label="patch levels downsampled at most",
                              info="1 = only the highest-resolution blocks (tomesd's default)")
            side = gr.Radio(list(LATENT_SIDES), value=list(LATENT_SIDES)[1], label="latent size")
            method = gr.Radio(["tome", "tofu", "pitome"], value="tome", label="merge method",
                              info="tofu: the same matches (pruned early, MLERP late); pitome: merges by energy")
        show = gr.Button("Show merged latent tokens", variant="primary", elem_id="sd-show")
        gallery = gr.Gallery(label="Merged tokens per patched block", columns=4, height=360, object_fit="contain",
                             elem_id="sd-gallery")
        note = gr.Markdown(elem_id="sd-note")
        with gr.Row():
            repeats = gr.Slider(2, 10, value=3, step=1, label="Timed rounds")
            measure = gr.Button("Measure UNet speed", elem_id="sd-measure")
        table = gr.Dataframe(headers=SD_SPEED_HEADERS, interactive=False, label="UNet call", elem_id="sd-speed")
        speed_note = gr.Markdown()
        show.click(merge_maps_ui, [shared.image, ratio, max_ds, side, method], [gallery, note], preprocess=False,
                   concurrency_limit=1, concurrency_id="sd")
        measure.click(run_speed, [ratio, max_ds, side, repeats, method], [table, speed_note], concurrency_limit=1,
                      concurrency_id="sd")
