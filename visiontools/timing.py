"""Measuring speed honestly: interleaved timing of several candidates in one process, and FLOP counts.

Machines are noisy, so candidates are timed round-robin (in a rotating order) rather than one after
the other, and the median is reported. FLOPs come from ``torch.utils.flop_counter``, not by hand.
"""
from __future__ import annotations

import contextlib
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _fft_flop(signal_shape, dims, real: bool) -> int:
    """FLOPs of an FFT over ``dims`` of a signal of ``signal_shape``: the usual 5·n·log2(n) per
    complex transform of n points (a multi-dimensional one is n = product of the sizes), half that
    when the signal is real (``rfft``/``irfft``)."""
    n = math.prod(signal_shape[d] for d in dims)
    batch = math.prod(signal_shape) // max(1, n)
    flops = 5 * batch * n * math.log2(n) if n > 1 else 0
    return int(flops / 2 if real else flops)


def _fft_r2c_flop(input_shape, dim, normalization, onesided, *args, out_shape=None, **kwargs) -> int:
    return _fft_flop(input_shape, dim, real=True)


def _fft_c2r_flop(input_shape, dim, normalization, last_dim_size, *args, out_shape=None, **kwargs) -> int:
    return _fft_flop(out_shape, dim, real=True)  # the real signal is the output


def _fft_c2c_flop(input_shape, dim, normalization, forward, *args, out_shape=None, **kwargs) -> int:
    return _fft_flop(input_shape, dim, real=False)


# torch's counter knows the CUDA SDPA kernels but not the CPU flash kernel, which CPU SDPA uses
# (with or without a float mask); without this, attention FLOPs would silently count as zero.
# It does not count FFTs either (Hyena's long convolutions), so those are added too.
_EXTRA_FORMULAS = {
    torch.ops.aten._fft_r2c: _fft_r2c_flop,
    torch.ops.aten._fft_c2r: _fft_c2r_flop,
    torch.ops.aten._fft_c2c: _fft_c2c_flop,
}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_sdpa_flop


def add_rounds_arguments(parser) -> None:
    """``--repeats`` and ``--warmup`` with the defaults every timing command shares
    (``visiontools.defaults.REPEATS`` and ``WARMUP``)."""
    from visiontools.defaults import REPEATS, WARMUP

    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed rounds (each runs every candidate once)")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed rounds first")


def add_run_arguments(parser) -> None:
    """The options every ``visiontools bench`` target shares: device, CPU threads, interleaved rounds
    (:func:`add_rounds_arguments`), progress bars, and the files the results go to."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_rounds_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out-json", type=Path, default=None, help="write the full result (all timings) here")
    parser.add_argument("--out-md", type=Path, default=None, help="write the markdown table (with the machine) here")


def write_results(args, table: str, result: dict, plot: Callable[[dict, Path], None] | None = None,
                  header: str = "", echo: bool = True) -> None:
    """The one way a bench target reports: print its markdown ``table`` (unless ``echo`` is False, for
    a target that printed it already), write ``header`` + ``table`` to ``--out-md`` and the full
    ``result`` to ``--out-json`` (:func:`add_run_arguments`), and draw ``plot(result, path)`` to
    ``--plot`` when the target has that option; folders are created, every file written is named."""
    import json

    if echo:
        print(table)
    md = (header + "\n\n" if header else "") + table + "\n"
    for path, text in ((args.out_md, md), (args.out_json, json.dumps(result, indent=1, default=str))):
        if path:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if plot is not None and getattr(args, "plot", None):
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}")


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the Agg backend (no display needed): ``(figure, axes)`` for a
    results plot, to be written by :func:`save_figure`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Write a matplotlib figure to ``path`` (PNG), creating its folder, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "off": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu", auto: str = "bf16"
                  ) -> torch.dtype:
    """The one reading of a dtype setting (``--dtype``, ``--amp``, the ``amp`` config key): ``fp32``,
    ``off`` or None -> float32 (for autocast: none), ``bf16``/``bfloat16``, ``fp16``/``float16``/``half``;
    ``auto`` -> ``auto`` (bf16, or fp16 where the GPU lacks bf16) on CUDA and float32 elsewhere.
    A ``torch.dtype`` passes through. ``ValueError`` naming the accepted names otherwise."""
    if name is None or isinstance(name, torch.dtype):
        return name or torch.float32
    key = str(name).strip().lower()
    if key == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        key = auto if auto != "bf16" or torch.cuda.is_bf16_supported() else "fp16"
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, fp32, bf16 or fp16")
    return DTYPES[key]


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX, Arm's BF16 extension


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags listed in the file ``cpuinfo`` (x86 ``flags``, Arm ``Features`` lines);
    empty where the file does not exist (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo", flags: tuple[str, ...] = BF16_CPU_FLAGS) -> bool:
    """Whether this CPU computes bfloat16 in hardware: one of ``flags`` (default AVX512-BF16, AMX or Arm
    BF16) among :func:`cpu_flags`. Without it, bf16 autocast is emulated and runs several times
    slower than float32."""
    return not cpu_flags(cpuinfo).isdisjoint(flags)


def dtype_label(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` (short names for tables)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` -> cuda when available, else cpu; anything else as given."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str | None = None,
    progress: bool | Callable[[float, str], object] = False,
) -> dict[str, list[float]]:
    """Time each zero-argument callable ``repeats`` times, interleaved round-robin, after
    ``warmup`` untimed rounds. Returns the seconds of every timed call, per name. ``progress``:
    ``True`` for a progress bar, or a callable ``(fraction, text)`` (e.g. a UI's) called before every
    round and with 1.0 at the end."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    total = warmup + repeats
    rounds = range(total)
    report = progress if callable(progress) else None
    if progress is True:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc="timing", unit="round")
    with torch.inference_mode():
        for i in rounds:
            if report:
                report(i / total, f"{'warm-up' if i < warmup else 'timing'} round {i + 1} of {total}")
            order = names[i % len(names):] + names[: i % len(names)]
            for name in order:
                _sync(device)
                t0 = time.perf_counter()
                fns[name]()
                _sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    if report:
        report(1.0, "done")
    return times


def median(xs: list[float]) -> float:
    """Median of a list of timings."""
    return statistics.median(xs)


def count_flops(fn: Callable[[], object], warmup: bool = True) -> int:
    """FLOPs of one steady-state call of ``fn`` (a multiply-add counts as 2), from
    ``torch.utils.flop_counter`` (plus CPU flash attention and FFTs, which it misses). ``fn`` runs once
    uncounted first (``warmup``), so that work a model caches on its first call (Hyena's inference-mode
    filters) is not counted as per-call work; pass ``warmup=False`` when the model is already warm."""
    if warmup:
        with torch.inference_mode():
            fn()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.inference_mode(), counter:
        fn()
    return int(counter.get_total_flops())


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """bf16/fp16 autocast on the given device when ``dtype`` is set, else a no-op context."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def cpu_threads() -> int:
    """CPU threads this process may run on (its affinity where the OS tells it, else the CPU count)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_machine_note(speedups, device: torch.device | str = "cpu") -> str | None:
    """One line for a CPU timing that found ToMe slower (a speedup below 1 in ``speedups``) while the
    machine was busy (its 1-minute load average above its CPU threads, :func:`cpu_threads`): the
    likely reason, and ``--threads 1`` as the fairer rerun. ``None`` otherwise (also on GPUs)."""
    import os

    slower = [s for s in speedups if s is not None and s < 1.0]
    if not slower or torch.device(device).type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, threads = os.getloadavg()[0], cpu_threads()
    if load <= threads:
        return None
    fix = ("this run had --threads 1 already: rerun on an idle machine" if torch.get_num_threads() == 1 else
           "rerun with --threads 1, or on an idle machine,")
    return (f"note: ToMe measured slower ({min(slower):.2f}x) while this machine is busy (load average {load:.1f} "
            f"> its {threads} CPU threads): its merge steps wait for cores the other work holds; {fix} "
            "for a fair comparison")


def machine_description(device: torch.device | str) -> str:
    """A short human-readable description of the machine a benchmark ran on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    import os
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
