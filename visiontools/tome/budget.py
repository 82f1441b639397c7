"""Token reduction to a budget: the r schedule (ViTs) or the ratio (diffusion models) that meets a FLOP
fraction (or a speedup) instead of a guessed one.

Library-agnostic: the caller supplies a function that gives the FLOP fraction (reduced / unreduced,
counted with ``visiontools.timing.count_flops``) of a per-layer r schedule or of a ratio, and
optionally one that measures the speedup of a schedule. The search only assumes that merging more
tokens never costs more.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class BudgetResult:
    """What a budget solve chose: the per-layer ``schedule``, its ``flop_fraction`` (reduced FLOPs /
    unreduced FLOPs, counted, so the method's own planning cost is included), the request
    (``target_flops`` and/or ``target_speedup``) and, when calibrated, the ``measured_speedup``
    (interleaved timing on the user's device) and every schedule tried with its measured speedup."""

    schedule: list[int]
    flop_fraction: float
    target_flops: float
    target_speedup: float | None = None
    measured_speedup: float | None = None
    trials: list[dict] = field(default_factory=list)

    @property
    def predicted_speedup(self) -> float:
        """1 / FLOP fraction: the speedup if time were proportional to FLOPs."""
        return 1.0 / self.flop_fraction


def check_fraction(value, name: str) -> float:
    """``ValueError`` unless ``value`` is a number in (0, 1] (``flops``) or >= 1 (``speedup``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if name == "flops" and not 0 < value <= 1:
        raise ValueError(f"flops is the fraction of the unpatched model's FLOPs to keep, in (0, 1]; got {value}")
    if name == "speedup" and not value >= 1:
        raise ValueError(f"speedup must be >= 1 (1.8 means 1.8x faster), got {value}")
    return float(value)


def solve_schedule(fraction_of: Callable[[list[int]], float], num_layers: int, target: float,
                   r_max: int) -> tuple[list[int], float]:
    """The lightest schedule whose FLOP fraction is at most ``target``: the smallest constant r that
    meets it, then as few leading layers as possible at that r with the rest at r - 1 (merging
    early saves most). Returns ``(schedule, fraction)``; ``ValueError`` if even r = ``r_max`` in every
    layer does not reach the target. About ``log2(r_max) + log2(num_layers)`` calls of ``fraction_of``."""
    cache: dict[tuple, float] = {}

    def frac(rs: list[int]) -> float:
        key = tuple(rs)
        if key not in cache:
            cache[key] = fraction_of(list(rs))
        return cache[key]

    if frac([0] * num_layers) <= target:
        return [0] * num_layers, frac([0] * num_layers)
    if frac([r_max] * num_layers) > target:
        raise ValueError(f"a FLOP fraction of {target:.3g} is out of reach: merging the most tokens possible "
                         f"(r={r_max} in every layer) keeps {frac([r_max] * num_layers):.3g}")
    lo, hi = 0, r_max  # frac(lo) > target >= frac(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if frac([mid] * num_layers) <= target else (mid, hi)
    r = hi
    k_lo, k_hi = 0, num_layers  # k leading layers at r, the rest at r - 1; k_hi meets the target

    def sched(k: int) -> list[int]:
        return [r] * k + [r - 1] * (num_layers - k)

    while k_hi - k_lo > 1:
        mid = (k_lo + k_hi) // 2
        k_lo, k_hi = (k_lo, mid) if frac(sched(mid)) <= target else (mid, k_hi)
    best = sched(k_hi) if frac(sched(k_lo)) > target else sched(k_lo)
    return best, frac(best)


def solve_budget(fraction_of: Callable[[list[int]], float], num_layers: int, r_max: int, flops: float | None = None,
                 speedup: float | None = None, measure: Callable[[list[int]], float] | None = None,
                 rounds: int = 3, tolerance: float = 0.1) -> BudgetResult:
    """Solve for ``flops`` (a FLOP fraction) or ``speedup`` (then the FLOP fraction 1 / speedup, as if
    time were proportional to FLOPs). With ``measure`` (schedule -> measured speedup) and ``speedup``,
    calibrate: measure the solved schedule and, while it is not within ``tolerance`` of the target
    (short of it, or more than 10 % past it), fit ``time = a + (1 - a) * FLOP fraction`` to the last
    measurement and solve for the FLOP fraction that this says reaches the speedup (at most ``rounds``
    measurements). The lightest schedule that met the target (else the fastest) is returned; a
    ``UserWarning`` gives the measured speedup when it is not within ``tolerance`` of the target."""
    if (flops is None) == (speedup is None):
        raise ValueError("give exactly one of flops= (a FLOP fraction such as 0.5) or speedup= (such as 1.8)")
    target = check_fraction(flops, "flops") if flops is not None else 1.0 / check_fraction(speedup, "speedup")
    schedule, frac = solve_schedule(fraction_of, num_layers, target, r_max)
    result = BudgetResult(schedule, frac, target, speedup)
    if measure is None or speedup is None:
        return result
    _calibrate(result, fraction_of, num_layers, r_max, measure, rounds, tolerance)
    return result


def _calibrate(result: BudgetResult, fraction_of, num_layers: int, r_max: int, measure, rounds: int,
               tolerance: float) -> None:
    """Measure and re-aim ``result`` in place (see :func:`solve_budget`)."""
    speedup, schedule, frac = result.target_speedup, result.schedule, result.flop_fraction
    for _ in range(rounds):
        measured = measure(schedule)
        result.trials.append({"schedule": schedule, "flop_fraction": frac, "measured_speedup": measured})
        if speedup <= measured <= speedup * (1 + tolerance) or (measured < speedup and frac >= 1.0):
            break
        # fit time = a + (1 - a) * FLOP fraction (a: the part that merging does not shrink) to this
        # measurement, and aim at the FLOP fraction that model says reaches the speedup
        a = (1.0 / measured - frac) / (1.0 - frac) if frac < 1.0 else 0.0
        if a >= 1.0 / speedup:
            break  # no FLOP fraction reaches it on this device
        aim = (1.0 / speedup - a) / (1.0 - a)
        try:  # (a schedule measured before is measured again: the first reading may have been noise)
            schedule, frac = solve_schedule(fraction_of, num_layers, min(aim, 1.0), r_max)
        except ValueError:
            break
    meets = [t for t in result.trials if t["measured_speedup"] >= speedup]
    pick = (max(meets, key=lambda t: t["flop_fraction"]) if meets  # the lightest that meets it
            else max(result.trials, key=lambda t: t["measured_speedup"]))
    result.schedule, result.flop_fraction = pick["schedule"], pick["flop_fraction"]
    result.measured_speedup = pick["measured_speedup"]
    if abs(result.measured_speedup / speedup - 1) > tolerance:
        warnings.warn(f"calibrated ToMe budget: asked for a {speedup:.2f}x speedup, measured {result.measured_speedup:.2f}x "
                      f"with schedule {result.schedule} ({result.flop_fraction:.2f} of the FLOPs) after "
                      f"{len(result.trials)} measurements; timings on a busy machine vary, so re-run or pass r= "
                      "directly", UserWarning, stacklevel=4)


@dataclass
class RatioBudget:
    """What a diffusion-model budget solve chose: the ``ratio`` and its ``flop_fraction`` (reduced /
    unreduced FLOPs of one denoiser call, counted at an image of ``size`` pixels), and the request."""

    ratio: float
    flop_fraction: float
    target_flops: float
    target_speedup: float | None
    size: tuple[int, int]

    @property
    def predicted_speedup(self) -> float:
        """1 / FLOP fraction: the speedup if time were proportional to FLOPs."""
        return 1.0 / self.flop_fraction


def solve_ratio(fraction_of: Callable[[float], float], target: float, upper: float, steps: int = 8
                ) -> tuple[float, float]:
    """The smallest ratio on the grid ``upper * k / 2**steps`` whose FLOP fraction ``fraction_of(ratio)``
    (falling as the ratio grows; 1 at 0) is at most ``target``; returns ``(ratio, fraction)``.
    ``ValueError`` if even ``upper`` does not reach the target.

    A merge's FLOP fraction is close to a parabola in the ratio (attention is quadratic in the tokens,
    the rest linear), so each step aims where the parabola through the three counts nearest the
    bracket crosses the target (the line through its ends before there are three): usually four
    counts in all, against nine for bisection. Two steps that do not halve the bracket are followed by
    a bisection step, so stepped fractions (downsampling's integer grids) still converge."""
    if target >= 1.0:
        return 0.0, 1.0
    top = fraction_of(upper)
    if top > target:
        raise ValueError(f"a FLOP fraction of {target:.3g} is out of reach: the largest ratio ({upper:.3g}) keeps "
                         f"{top:.3g} of the FLOPs")
    n = 2 ** steps
    g = {0: 1.0 - target, n: top - target}  # grid point k -> fraction - target: > 0 at lo, <= 0 at hi
    lo, hi, widths = 0, n, [n]
    while hi - lo > 1:
        if len(widths) >= 3 and widths[-1] > widths[-3] / 2:
            k = (lo + hi) // 2
        else:
            x = _parabola_crossing(g, lo, hi) if len(g) >= 3 else None
            x = lo + g[lo] / (g[lo] - g[hi]) * (hi - lo) if x is None else x
            k = min(max(math.ceil(x - 1e-9), lo + 1), hi - 1)
        g[k] = fraction_of(upper * k / n) - target
        lo, hi = (lo, k) if g[k] <= 0 else (k, hi)
        widths.append(hi - lo)
    return upper * hi / n, g[hi] + target


def _parabola_crossing(points: dict[int, float], lo: int, hi: int) -> float | None:
    """Where the parabola through the three ``(x, y)`` points nearest the bracket ``[lo, hi]`` crosses
    ``y = 0`` inside ``(lo, hi]`` (the first such crossing), or None."""
    (x0, y0), (x1, y1), (x2, y2) = sorted(points.items(), key=lambda p: min(abs(p[0] - lo), abs(p[0] - hi)))[:3]
    d1, d2 = (y1 - y0) / (x1 - x0), ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)
    a, b, c = d2, d1 - d2 * (x0 + x1), y0 - d1 * x0 + d2 * x0 * x1  # y = a x^2 + b x + c
    if abs(a) <= 1e-12 * (abs(b) + abs(c)):
        roots = [-c / b] if b else []
    else:
        disc = b * b - 4 * a * c
        roots = [] if disc < 0 else [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1.0, -1.0)]
    inside = [r for r in roots if lo < r <= hi]
    return min(inside) if inside else None

