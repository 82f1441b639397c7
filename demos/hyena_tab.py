"""The demo's Hyena tab: the long 2D filters of a Hyena ViT (shipped checkpoint when there is one,
otherwise random weights, said so), and one attention block against one Hyena block timed over
growing token grids on this machine."""
from __future__ import annotations

import threading

import torch

TITLE = "Hyena"
_LOCK = threading.Lock()
_MODEL = None
DEFAULT_GRIDS = (8, 16, 32, 48, 64)
ALL_GRIDS = (8, 16, 32, 48, 64, 96, 128)
TIMING_HEADERS = ["grid", "tokens", "batch", "attention ms / image", "Hyena ms / image", "Hyena speedup",
                  "attention peak MB / image", "Hyena peak MB / image"]


def available() -> bool:
    """Whether the Hyena operator and its timm adapter are installed."""
    try:
        import visiontools.patches.timm_hyena  # noqa: F401
        import visiontools.layers.hyena  # noqa: F401
    except ImportError:
        return False
    return True


def hyena_model():
    """``(model, description, trained)``: the Hyena checkpoint shipped in ``visiontools/checkpoints``
    (a ``*hyena*.safetensors`` file), else ``hyena_vit_cifar`` with random weights. Loaded once."""
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            from visiontools import models

            shipped = sorted(models.CHECKPOINT_DIR.glob("*hyena*.safetensors"))
            why = "no Hyena checkpoint is shipped"
            if shipped:
                from visiontools.demos.model_cache import accuracy_note

                try:
                    model, desc = models.load(shipped[0])
                    _MODEL = (model, f"shipped checkpoint {shipped[0].name} ({desc['model']}{accuracy_note(desc)})", True)
                except (OSError, ValueError) as e:
                    why = f"{shipped[0].name} could not be loaded: {e}"
            if _MODEL is None:
                model, _ = models.load("hyena_vit_cifar")  # random weights, seeded
                _MODEL = (model, f"hyena_vit_cifar with random weights ({why}): "
                                 "the filters shown are the untrained initial ones", False)
        return _MODEL


def filter_bank(model, block: int, order_index: int = 0) -> torch.Tensor:
    """The long filters ``(C, 2H-1, 2W-1)`` that Hyena order ``order_index`` of block ``block`` applies
    on the model's patch grid."""
    from visiontools.patches.timm_hyena import hyena_layers

    layers = hyena_layers(model)
    if not 0 <= block < len(layers):
        raise ValueError(f"block must be between 0 and {len(layers) - 1}, got {block}")
    mixer = layers[block].mixer
    if not 0 <= order_index < mixer.order:
        raise ValueError(f"order_index must be between 0 and {mixer.order - 1}, got {order_index}")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    with torch.no_grad():
        kernels = mixer.filter(grid)
    C = mixer.dim
    return kernels[order_index * C:(order_index + 1) * C]


def filter_figure(kernels: torch.Tensor, show: int = 8, title: str = ""):
    """Heatmaps of ``show`` channels spread over the bank (first = fastest decay, last = slowest)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    C = kernels.shape[0]
    idx = sorted({round(i * (C - 1) / max(show - 1, 1)) for i in range(show)})
    cols = 4
    rows = -(-len(idx) // cols)
    fig = Figure(figsize=(8, 2.1 * rows + 0.4), layout="constrained")
    for k, c in enumerate(idx):
        ax = fig.add_subplot(rows, cols, k + 1)
        kern = kernels[c].float().numpy()
        lim = float(abs(kern).max()) or 1.0
        ax.imshow(kern, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"channel {c}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def block_timing(grids=DEFAULT_GRIDS, dim: int = 192, heads: int = 3, repeats: int = 3) -> dict:
    """One attention block against one Hyena block on ``g x g`` token grids, measured by
    ``visiontools.bench.hyena.benchmark`` (interleaved, medians, peak memory, crossover); returns its
    result dict. Its tqdm bar drives the page's progress bar (``gr.Progress(track_tqdm=True)``)."""
    from visiontools.bench.hyena import benchmark

    with _LOCK:
        return benchmark([(g, g) for g in grids], dim=dim, num_heads=heads, repeats=repeats, progress=True)


def timing_rows(result: dict) -> list[list]:
    """Table rows (``TIMING_HEADERS``) from a ``bench_hyena`` result: per-image times and peak memory."""
    return [[f"{r['grid'][0]}x{r['grid'][1]}", r["tokens"], r["batch"], round(r["attn_ms"] / r["batch"], 3),
             round(r["hyena_ms"] / r["batch"], 3), round(r["attn_over_hyena_time"], 2),
             round(r["attn_peak_bytes"] / r["batch"] / 2**20, 2), round(r["hyena_peak_bytes"] / r["batch"] / 2**20, 2)]
            for r in result["rows"]]


def timing_figure(result: dict):
    """Log-log plot of per-image block time against tokens for attention and Hyena."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(tokens, [r["attn_ms"] / r["batch"] for r in rows], "o-", color="#9aa3ad",
            label="attention block (fused SDPA)")
    ax.plot(tokens, [r["hyena_ms"] / r["batch"] for r in rows], "o-", color="#f97316",
            label=f"Hyena block (order {result['order']})")
    ax.plot(tokens, [r["hyena_regen_ms"] / r["batch"] for r in rows], "s--", color="#f97316", alpha=0.5,
            label="Hyena, filters regenerated (training)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens N (grid side²)")
    ax.set_ylabel("ms per image, one block")
    ax.set_title(f"One block, width {result['dim']} (lower is better)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def filters_ui(block, order_index):
    """The tab's filter callback: (matplotlib figure, markdown note)."""
    model, desc, _ = hyena_model()
    kernels = filter_bank(model, int(block), int(order_index))
    h, w = model.patch_embed.grid_size
    fig = filter_figure(kernels, title=f"block {int(block)}, Hyena order {int(order_index) + 1}: "
                                       f"{kernels.shape[0]} filters over all {2 * h - 1}x{2 * w - 1} offsets")
    return fig, f"**{desc}.** Red = positive, blue = negative weight at each (dy, dx) offset."


def build_tab(gr, shared) -> None:  # noqa: ARG001  (the tab interface: visiontools.demos.state)
    """The tab's components and events."""
    def run_timing(dim, repeats, largest, progress=gr.Progress(track_tqdm=True)):
        grids = tuple(g for g in ALL_GRIDS if g <= int(largest))
        result = block_timing(grids, dim=int(dim), heads=max(1, int(dim) // 64), repeats=int(repeats))
        co = result["crossover_tokens"]
        said = f"Hyena is faster from **{co} tokens** on" if co else "Hyena was not faster at any size measured"
        return timing_figure(result), timing_rows(result), (
            f"Measured on **{result['machine']}** by `visiontools bench hyena`'s code: median of {int(repeats)} "
            f"interleaved rounds per grid. {said}. Peak memory: {result['memory_method']}.")

    with gr.Tab(TITLE) as tab:
        gr.Markdown("Hyena replaces attention by long 2D convolutions with implicit filters (an MLP over "
                    "the offset, times a decay window) and gating: O(N log N) instead of O(N²) in the tokens N.")
        depth = 6
        try:
            depth = len(hyena_model()[0].blocks)
        except Exception:
            pass
        with gr.Row():
            block = gr.Slider(0, depth - 1, value=0, step=1, label="block")
            order_index = gr.Radio([("first", 0), ("second", 1)], value=0, label="long convolution (Hyena order)")
            show = gr.Button("Show filters", variant="primary", elem_id="hyena-show")
        filters = gr.Plot(label="Long filters (implicit, per channel)", elem_id="hyena-filters")
        filters_note = gr.Markdown(elem_id="hyena-note")
        with gr.Row():
            dim = gr.Radio([64, 192, 384], value=192, label="block width")
            largest = gr.Radio([48, 64, 96, 128], value=max(DEFAULT_GRIDS), label="largest grid side",
                               info="96 and 128 take a while on a CPU")
            repeats = gr.Slider(2, 10, value=3, step=1, label="Timed rounds")
            measure = gr.Button("Time attention vs Hyena", elem_id="hyena-measure")
        curve = gr.Plot(label="Block time vs tokens", elem_id="hyena-curve")
        table = gr.Dataframe(headers=TIMING_HEADERS, interactive=False, elem_id="hyena-table")
        note = gr.Markdown()
        for trigger in (tab.select, show.click, block.change, order_index.change):
            trigger(filters_ui, [block, order_index], [filters, filters_note], concurrency_id="hyena-filters",
                    trigger_mode="always_last")
        measure.click(run_timing, [dim, repeats, largest], [curve, table, note], concurrency_limit=1,
                      concurrency_id="hyena-timing")
