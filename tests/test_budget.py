"""Budgets instead of r: visiontools.tome.budget and apply_tome(flops=..., speedup=...)."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from visiontools.tome.budget import solve_budget, solve_ratio, solve_schedule
from visiontools.patches.timm import apply_tome, remove_tome
from visiontools.timing import count_flops


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**cfg).eval()


def tokens_fraction(num_tokens, num_layers):
    """A stand-in FLOP model: the tokens summed over the layers, relative to no merging."""
    def frac(rs):
        n, total = num_tokens, 0
        for r in rs:
            total += n
            n -= min(r, n // 2)
        return total / (num_tokens * num_layers)
    return frac


def test_solve_schedule_is_the_lightest_schedule_meeting_the_target():
    frac = tokens_fraction(64, 6)
    for target in (0.9, 0.7, 0.55, 0.5):
        rs, f = solve_schedule(frac, 6, target, 32)
        assert f == frac(rs) <= target
        # the heaviest-FLOP (lightest-merging) of all schedules [r]*k + [r-1]*(6-k) that meet the target
        shapes = [[r] * k + [r - 1] * (6 - k) for r in range(1, 33) for k in range(1, 7)]
        assert f == max(frac(s) for s in shapes if frac(s) <= target)
        assert rs == sorted(rs, reverse=True) and max(rs) - min(rs) <= 1
    assert solve_schedule(frac, 6, 1.0, 32) == ([0] * 6, 1.0)
    with pytest.raises(ValueError, match="out of reach"):
        solve_schedule(frac, 6, 0.01, 32)


def test_solve_ratio_finds_the_smallest_grid_ratio_in_few_counts():
    """Diffusion budgets: the smallest ratio on the 1/256 grid meeting the target, as a full scan finds
    it, for linear, curved, stepped and kinked FLOP fractions; at most five counts where the fraction is
    a parabola (bisection takes nine), and a bounded number where it is not."""
    import math

    curves = {"linear": lambda r: 1 - 0.6 * r, "quadratic": lambda r: 1 - 0.3 * r - 0.5 * r * r,
              "stepped": lambda r: 1 - 0.5 * math.floor(r * 37) / 37,
              "kinked": lambda r: 1 - (0.05 * r if r < 0.6 else 0.03 + 0.8 * (r - 0.6))}
    for name, curve in curves.items():
        for target in [t for t in (0.99, 0.97, 0.9, 0.8, 0.72) if t > curve(0.75)] + [curve(0.75)]:
            calls = []

            def fraction(r):
                calls.append(r)
                return curve(r)
            ratio, frac = solve_ratio(fraction, target, 0.75)
            best = min(k for k in range(257) if curve(0.75 * k / 256) <= target)
            assert ratio == 0.75 * best / 256 and frac == curve(ratio) <= target, (name, target)
            assert len(calls) <= 15, (name, target, len(calls))
            if name in ("linear", "quadratic"):  # bisection: 9
                assert len(calls) <= 5, (name, target, calls)
    with pytest.raises(ValueError, match="out of reach"):
        solve_ratio(curves["linear"], 0.5, 0.75)
    assert solve_ratio(curves["linear"], 1.0, 0.75) == (0.0, 1.0)


def test_calibration_merges_more_while_the_measured_speedup_falls_short():
    frac = tokens_fraction(64, 6)
    # a device on which time is 0.1 + 0.9 * FLOPs: FLOP-proportional predictions fall short
    measured = lambda rs: 1.0 / (0.1 + 0.9 * frac(rs))
    res = solve_budget(frac, 6, 32, speedup=1.6, measure=measured)
    assert res.measured_speedup == measured(res.schedule) >= 1.6
    assert len(res.trials) >= 2 and res.trials[0]["measured_speedup"] < 1.6
    assert res.flop_fraction < 1 / 1.6
    plain = solve_budget(frac, 6, 32, speedup=1.6)
    assert plain.measured_speedup is None and plain.flop_fraction <= 1 / 1.6


def test_calibration_comes_back_after_overshooting_and_lands_within_ten_percent():
    """A noisy first measurement (far too slow) makes the fit aim too far; the next round overshoots
    by more than 10 % and calibration re-aims, ending within 10 % of the target without a warning."""
    import warnings

    frac = tokens_fraction(196, 12)
    true = lambda rs: 1.0 / frac(rs)  # time proportional to FLOPs
    calls = []
    measured = lambda rs: calls.append(rs) or (1.3 if len(calls) == 1 else true(rs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solve_budget(frac, 12, 98, speedup=1.5, measure=measured, rounds=4)
    assert len(res.trials) >= 3 and res.trials[1]["measured_speedup"] > 1.5 * 1.1
    assert 1.5 <= res.measured_speedup <= 1.5 * 1.1


def test_calibration_warns_with_the_measured_figure_when_it_misses():
    frac = tokens_fraction(64, 6)
    slow = lambda rs: 1.0 / (0.8 + 0.2 * frac(rs))  # merging barely helps on this device
    with pytest.warns(UserWarning, match=r"asked for a 1.50x speedup, measured 1\.0\dx"):
        res = solve_budget(frac, 6, 32, speedup=1.5, measure=slow)
    assert res.measured_speedup < 1.5


@pytest.mark.parametrize("method", ["tome", "tofu", "pitome", "prune"])
def test_apply_tome_flops_budget_counts_the_patched_model(method):
    model = tiny_vit()
    x = torch.zeros(1, 3, 32, 32)
    base = count_flops(lambda: model(x))
    apply_tome(model, flops=0.6, method=method)
    b = model.tome_budget
    assert model.tome_r == b.schedule and len(b.schedule) == 4
    measured = count_flops(lambda: model(x)) / base  # independent count on the patched model
    assert b.flop_fraction == pytest.approx(measured, rel=1e-6) and measured <= 0.6
    model.tome_r = [max(r - 1, 0) for r in b.schedule]  # a merge fewer per layer misses the budget
    assert count_flops(lambda: model(x)) / base > 0.6
    remove_tome(model)
    assert not hasattr(model, "tome_budget")


def test_speedup_budget_and_calibration_on_the_model():
    model = apply_tome(tiny_vit(), speedup=2.0)
    assert model.tome_budget.flop_fraction <= 0.5 and model.tome_budget.measured_speedup is None
    model = apply_tome(tiny_vit(), speedup=1.5, calibrate=True, calibrate_batch=4)
    b = model.tome_budget
    assert b.trials and b.measured_speedup > 0 and model.tome_r == b.schedule
    assert not model.training


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=4, flops=0.5), "give r or a budget"),
    (dict(flops=0.5, speedup=2.0), "exactly one of"),
    (dict(flops=1.5), r"fraction .* in \(0, 1\]"),
    (dict(speedup=0.5), "speedup must be >= 1"),
    (dict(flops=0.01), "out of reach"),
    (dict(r=4, calibrate=True), "use it with speedup="),
])
def test_bad_budgets_are_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_tome(tiny_vit(), **kwargs)


def test_a_second_solve_on_the_same_model_counts_nothing_again(monkeypatch):
    """FLOP counts are cached with the model (per input shape and method): re-solving for another
    budget reuses them, a new method counts anew, and remove_tome drops the cache."""
    import visiontools.timing as timing

    calls = []
    real = timing.count_flops
    monkeypatch.setattr(timing, "count_flops", lambda fn, warmup=True: calls.append(1) or real(fn, warmup))
    model = tiny_vit()
    apply_tome(model, flops=0.6)
    first = len(calls)
    apply_tome(model, flops=0.6)
    assert len(calls) == first > 0
    b = model.tome_budget
    model.tome_r = 0
    base = real(lambda: model(torch.zeros(1, 3, 32, 32)))
    model.tome_r = b.schedule
    assert real(lambda: model(torch.zeros(1, 3, 32, 32))) / base == pytest.approx(b.flop_fraction, rel=1e-6)
    apply_tome(model, flops=0.6, method="pitome")
    assert len(calls) > first
    remove_tome(model)
    assert not hasattr(model, "tome_flop_cache")
