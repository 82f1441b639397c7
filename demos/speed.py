"""The demo's speed tab: throughput of the unpatched model and of ToMe-patched copies, measured on the
machine that runs the demo (candidates interleaved round-robin, medians), with the FLOP ratio beside
the measured speedup, and a bar chart of it."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from visiontools.demos.merging import r_setting
from visiontools.demos.model_cache import DemoModel

SPEED_HEADERS = ["model", "ms / batch", "images / s", "speedup", "GFLOPs / image", "FLOP ratio",
                 "tokens (first -> last block)"]
_MEASURE_LOCK = threading.Lock()  # one measurement at a time, or they would slow each other down


@dataclass
class SpeedRow:
    """One candidate's median time and FLOPs."""

    name: str
    seconds: float          # median seconds per batch
    batch_size: int
    flops: int              # per batch
    tokens: str             # "65 -> 25" as bench and eval write it (visiontools.tome.r_text.token_span)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.seconds


@dataclass
class SpeedResult:
    """All candidates (the unpatched model first) and where they were measured."""

    rows: list[SpeedRow]
    machine: str
    repeats: int

    def table(self) -> list[list]:
        """Rows for the results table: name, ms/batch, im/s, speedup and FLOP ratio vs the unpatched model."""
        base = self.rows[0]
        return [[r.name, round(r.seconds * 1e3, 2), round(r.images_per_s, 1),
                 round(base.seconds / r.seconds, 2), round(r.flops / r.batch_size / 1e9, 4),
                 round(base.flops / r.flops, 2), r.tokens] for r in self.rows]


def sweep_values(r: int, points: int = 4) -> list[int]:
    """``points`` evenly spaced r values from ``r/points`` up to ``r`` (distinct, positive)."""
    return sorted({max(1, round(r * (i + 1) / points)) for i in range(points)}) if r > 0 else [0]


def measure_speed(dm: DemoModel, x: torch.Tensor, r: int, schedule: str = "constant", batch_size: int = 8,
                  repeats: int = 5, warmup: int = 1, sweep: bool = False, threads: int | None = None,
                  progress: Callable[[float, str], None] | None = None) -> SpeedResult:
    """Median time per batch of ``batch_size`` copies of ``x`` (``(1, 3, H, W)``) for the unpatched
    model and ToMe at ``r``/``schedule`` (plus a few smaller constant r with ``sweep``), timed
    round-robin in a rotating order; ``progress(fraction, text)`` is called between rounds.
    ``threads``: torch CPU threads during the measurement (process-wide, restored afterwards;
    ``None`` keeps the current setting). On small CPUs shared with other work the thread count can
    decide whether ToMe's many small merge operations pay off, so it is a choice, not a constant."""
    from visiontools.patches.timm import tome_forward
    from visiontools.tome.r_text import token_span
    from visiontools.timing import count_flops, interleaved_times, machine_description, median

    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    xb = x.expand(batch_size, *x.shape[1:]).contiguous()
    settings = [(f"ToMe r={v} (constant)", r_setting(v, "constant")) for v in sweep_values(r)[:-1]] if sweep else []
    settings.append((f"ToMe r={r} ({schedule})", r_setting(r, schedule)))
    # FLOPs (linear in the batch) and token counts from one single-image forward per candidate
    fns: dict[str, Callable[[], object]] = {"unpatched": lambda: dm.model(xb)}
    flops = {"unpatched": count_flops(lambda: dm.model(x)) * batch_size}
    tokens = {"unpatched": token_span(None)}
    for name, setting in settings:
        patched = dm.patched(setting)
        fns[name] = (lambda m: (lambda: m(xb)))(patched)
        info = []
        flops[name] = count_flops(lambda: info.append(tome_forward(patched, x)[1])) * batch_size
        tokens[name] = token_span(info[0].tokens_per_layer)
    with _MEASURE_LOCK:
        saved_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            times = interleaved_times(fns, repeats=repeats, warmup=warmup, progress=progress)
            machine = machine_description(xb.device)
        finally:
            torch.set_num_threads(saved_threads)
    rows = [SpeedRow(n, median(times[n]), batch_size, flops[n], tokens[n]) for n in fns]
    return SpeedResult(rows, machine, repeats)


def speed_chart(result: SpeedResult):
    """A matplotlib bar chart of images/s per candidate, annotated with measured speedup and FLOP ratio."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    table = result.table()
    names = [row[0] for row in table]
    ips = [row[2] for row in table]
    fig = Figure(figsize=(7, 3.2 + 0.15 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#9aa3ad"] + ["#f97316"] * (len(names) - 1)
    bars = ax.barh(names[::-1], ips[::-1], color=colors[::-1])
    for bar, row in zip(bars, table[::-1]):
        label = "baseline" if row[0] == "unpatched" else f"{row[3]:.2f}x measured, {row[5]:.2f}x fewer FLOPs"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  {row[2]:.0f} im/s  ({label})",
                va="center", fontsize=8)
    ax.set_xlabel("images / second (higher is better)")
    ax.set_xlim(0, max(ips) * 2.3)
    ax.set_title(f"Throughput, batch {result.rows[0].batch_size}, median of {result.repeats} interleaved rounds",
                 fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return fig
