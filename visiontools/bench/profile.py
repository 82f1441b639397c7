"""``--profile``: where the time of a token-reduction step goes, operator by operator (``torch.profiler``).

For one candidate, every reduction step of its schedule (the engine's ``TokenState.reduce`` and the
next block's proportional-attention mask, the code the patched model runs) is replayed on random
tokens of the shapes that step sees, under ``torch.profiler``, on the benchmark's device. The
table lists the operators (and on CUDA their kernels' device time) with their share of the step's
time, plus the aten operation count and bytes of one pass (``visiontools.tome.opcount``).

The diffusion patches (``bench sd``, ``bench dit``) are profiled as they run instead
(:func:`profile_patched`): their step functions are wrapped in a ``record_function`` range for the
duration of one profiled forward, and only the operators inside those ranges are tabulated.
"""
from __future__ import annotations

import torch


def _steps(tokens: list[int], batch: int, width: int, prefix: int, device, dtype, metric_width: int):
    """``(x, metric, r, size)`` for each merging block of a schedule (tokens entering each block): the
    tokens and sizes in float32 (the residual stream stays float32 under autocast), the metric (the
    keys averaged over heads) in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    steps = []
    for l, (n, m) in enumerate(zip(tokens, tokens[1:])):
        if m < n:
            x = torch.randn(batch, n, width, generator=g).to(device)
            metric = torch.randn(batch, n, metric_width, generator=g).to(device, dtype)
            size = None if l == 0 else torch.randint(1, 4, (batch, n, 1), generator=g).float().to(device)
            steps.append((x, metric, n - m, size))
    return steps


def profile_reduction(tokens: list[int], batch: int, width: int, prefix: int, device="cpu",
                      dtype: torch.dtype | None = None, repeats: int = 5, top: int = 12,
                      metric_width: int = 64) -> dict:
    """Profile the reduction steps of one schedule ``tokens`` (entering each block, then after the
    last) at ``batch`` x ``width`` (``metric_width``: the attention's head width). Returns
    ``{"rows": [{"op", "calls", "time_us", "share"}], "total_us", "clock", "ops", "kernels", "bytes"}``:
    per pass over the schedule, ``top`` operators by self time (device time on CUDA, CPU time
    elsewhere)."""
    from visiontools.tome.engine import TokenState
    from visiontools.tome.opcount import count_ops

    device = torch.device(device)
    steps = _steps(tokens, batch, width, prefix, device, dtype or torch.float32, metric_width)

    def run():
        for x, metric, r, size in steps:
            state = TokenState(schedule=[r], num_prefix_tokens=prefix, size=size)
            state.reduce(x, metric)
            state.bias()
    with torch.inference_mode():
        run()  # warm (index tables, kernels)
    out = _profile(run, device, repeats, top)
    counted = count_ops(run) if device.type != "cuda" else None
    return {**out, "steps": len(steps), "ops": counted and counted.ops, "kernels": counted and counted.kernels,
            "bytes": counted and counted.bytes}


def _profile(run, device: torch.device, repeats: int, top: int, ranges: tuple[str, ...] = ()) -> dict:
    """``run()`` ``repeats`` times under ``torch.profiler``: the ``top`` operators by self time per pass
    (device time on CUDA, CPU time elsewhere). With ``ranges``, only the operators inside a
    ``record_function`` range of one of those names count, and ``forward_us`` is every operator's time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        for _ in range(repeats):
            run()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if ranges:
        events, whole = _in_ranges(prof.events(), ranges, key, cuda)
    else:
        events = [e for e in prof.key_averages() if getattr(e, key) > 0 and (cuda or e.key.startswith("aten::"))]
        events = [(e.key, e.count, getattr(e, key)) for e in events]
        whole = None
    total = sum(t for _, _, t in events) / repeats
    events.sort(key=lambda e: e[2], reverse=True)
    rows = [{"op": name, "calls": count // repeats, "time_us": t / repeats,
             "share": t / repeats / total if total else 0.0} for name, count, t in events[:top]]
    return {"rows": rows, "total_us": total, "clock": "device" if cuda else "CPU",
            **({} if whole is None else {"forward_us": whole / repeats})}


def _in_ranges(events, ranges: tuple[str, ...], key: str, cuda: bool) -> tuple[list[tuple[str, int, float]], float]:
    """``(op, calls, time)`` of the aten operators (their self time, their kernels' on CUDA) inside a
    range named in ``ranges``, and the time of every aten operator."""
    from collections import defaultdict

    calls, times, whole = defaultdict(int), defaultdict(float), 0.0
    for e in events:
        on_cpu = getattr(e, "device_type", None) in (None, torch.autograd.DeviceType.CPU)
        if not e.name.startswith("aten::") or not on_cpu:
            continue
        t = getattr(e, key)
        whole += t
        parent = e.cpu_parent
        while parent is not None and parent.name not in ranges:
            parent = parent.cpu_parent
        if parent is not None and (t > 0 or not cuda):
            calls[e.name] += 1
            times[e.name] += t
    return [(k, calls[k], times[k]) for k in times], whole


#: The functions of a diffusion patch's reduction step (merge planning, merging, unmerging, key/value
#: downsampling, Flux's merged rotary table): module name -> function names.
DIFFUSION_STEP = {"visiontools.tome.merge2d": ("plan_merge_2d", "merge_2d", "unmerge", "downsample_tokens"),
                  "visiontools.patches.diffusers_dit": ("_merged_rope",)}
STEP_RANGE = "visiontools: reduction step"


def profile_patched(call, device="cpu", repeats: int = 3, top: int = 12, step=None) -> dict:
    """Profile the reduction steps of a patched diffusion model *as it runs* (``call()``: one forward):
    the functions of ``step`` (default :data:`DIFFUSION_STEP`) are wrapped, for the duration, in a
    ``record_function`` range, and the operators inside those ranges are tabulated as
    :func:`profile_reduction` does, with ``forward_us`` (all operators of the call) beside them.
    ``steps``: reduction-step calls per forward; ``ops``/``kernels``/``bytes``: one forward's
    reduction steps, counted on the CPU (``visiontools.tome.opcount``)."""
    import importlib

    from visiontools.tome.opcount import OpCounter

    device = torch.device(device)
    state = {"depth": 0, "calls": 0, "counter": None}

    def wrap(fn):
        def wrapped(*args, **kwargs):
            if state["depth"]:  # a step function inside another (merge_2d in _merged_rope): one range
                return fn(*args, **kwargs)
            state["depth"], state["calls"] = 1, state["calls"] + 1
            try:
                with torch.profiler.record_function(STEP_RANGE):
                    if state["counter"] is None:
                        return fn(*args, **kwargs)
                    with state["counter"]:
                        return fn(*args, **kwargs)
            finally:
                state["depth"] = 0
        return wrapped

    originals = [(mod, name, getattr(mod, name)) for mod_name, names in (step or DIFFUSION_STEP).items()
                 for mod in [importlib.import_module(mod_name)] for name in names]
    try:
        for mod, name, fn in originals:
            setattr(mod, name, wrap(fn))
        with torch.inference_mode():
            call()  # warm
        out = _profile(call, device, repeats, top, ranges=(STEP_RANGE,))
        state["calls"], counter = 0, None
        if device.type != "cuda":
            counter = state["counter"] = OpCounter()
            with torch.inference_mode():
                call()
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    counted = counter and counter.count
    return {**out, "steps": state["calls"], "ops": counted and counted.ops,
            "kernels": counted and counted.kernels, "bytes": counted and counted.bytes}


def profile_table(name: str, prof: dict) -> str:
    """A markdown table of one candidate's :func:`profile_reduction` result."""
    counts = "" if prof["ops"] is None else (f"; one pass: {prof['ops']} aten ops ({prof['kernels']} kernels), "
                                             f"{prof['bytes'] / 2 ** 20:.1f} MiB")
    share = (f", {prof['total_us'] / prof['forward_us'] * 100:.0f} % of the forward's operator time"
             if prof.get("forward_us") else "")
    lines = [f"**{name}: reduction steps** ({prof['steps']} steps, {prof['total_us'] / 1e3:.2f} ms of "
             f"{prof['clock']} time per pass{share}{counts})", "",
             f"| operator | calls per pass | {prof['clock']} time per pass (us) | share |", "|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['calls']} | {r['time_us']:.0f} | {r['share'] * 100:.0f} % |" for r in prof["rows"]]
    return "\n".join(lines)
