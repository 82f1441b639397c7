"""``--profile``: where the time of a token-reduction step goes, operator by operator (``torch.profiler``).

For one candidate, every reduction step of its schedule (the engine's ``TokenState.reduce`` and the
next block's proportional-attention mask, the code the patched model runs) is replayed on random
tokens of the shapes that step sees, under ``torch.profiler``, on the benchmark's device. The
table lists the operators (and on CUDA their kernels' device time) with their share of the step's
time, plus the aten operation count and bytes of one pass (``visiontools.tome.opcount``).
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
    from torch.profiler import ProfilerActivity, profile

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
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        for _ in range(repeats):
            run()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0 and (cuda or e.key.startswith("aten::"))]
    total = sum(getattr(e, key) for e in events) / repeats
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    rows = [{"op": e.key, "calls": e.count // repeats, "time_us": getattr(e, key) / repeats,
             "share": getattr(e, key) / repeats / total if total else 0.0} for e in events[:top]]
    counted = count_ops(run) if not cuda else None
    return {"rows": rows, "total_us": total, "clock": "device" if cuda else "CPU", "steps": len(steps),
            "ops": counted and counted.ops, "kernels": counted and counted.kernels,
            "bytes": counted and counted.bytes}


def profile_table(name: str, prof: dict) -> str:
    """A markdown table of one candidate's :func:`profile_reduction` result."""
    counts = "" if prof["ops"] is None else (f"; one pass: {prof['ops']} aten ops ({prof['kernels']} kernels), "
                                             f"{prof['bytes'] / 2 ** 20:.1f} MiB")
    lines = [f"**{name}: reduction steps** ({prof['steps']} steps, {prof['total_us'] / 1e3:.2f} ms of "
             f"{prof['clock']} time per pass{counts})", "",
             f"| operator | calls per pass | {prof['clock']} time per pass (us) | share |", "|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['calls']} | {r['time_us']:.0f} | {r['share'] * 100:.0f} % |" for r in prof["rows"]]
    return "\n".join(lines)
