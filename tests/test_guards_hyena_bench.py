"""Guards (issue 44): Hyena's cached spectra follow the skip term ``D`` alone, and ``bench all``'s
time budget and failure isolation (a mid-section skip, compile seconds, every kind of error)."""
import time

import pytest
import torch

from visiontools.bench import all as bench_all
from visiontools.layers.hyena import Hyena2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ Hyena's cached spectra

def test_a_change_of_the_skip_term_alone_invalidates_the_cached_spectra():
    """On FFT grids inference multiplies by spectra with ``D`` folded in (``skip_spectra``), cached per
    grid. An in-place change of ``D`` only (no filter weight touched) must rebuild them: the output is
    then the one an uncached module computes with the new ``D``."""
    torch.manual_seed(0)
    m = Hyena2d(8, filter_hidden=8, long_conv="fft").double().eval()
    fresh = Hyena2d(8, filter_hidden=8, long_conv="fft", cache_filters=False).double().eval()
    x = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        y1 = m(x)
        first = m._filter_cache[(6, 5, "skip")][1]
        m(x)
        assert m._filter_cache[(6, 5, "skip")][1] is first  # reused while nothing changed
        m.skip.mul_(-2.0)  # D only: an optimizer step or load_state_dict on the skip term
        y2 = m(x)
        assert m._filter_cache[(6, 5, "skip")][1] is not first
        fresh.load_state_dict(m.state_dict())
        expected = fresh(x)
    assert not torch.allclose(y2, y1)
    torch.testing.assert_close(y2, expected, rtol=0, atol=1e-12)
    with torch.no_grad():  # and a load_state_dict that replaces D by new values
        state = {k: v.clone() for k, v in m.state_dict().items()}
        state["skip"] = torch.randn_like(state["skip"])
        m.load_state_dict(state)
        fresh.load_state_dict(state)
        torch.testing.assert_close(m(x), fresh(x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ bench all

def _section(items, measure, seconds):
    """``run_section`` over ``items`` with ``seconds`` until the deadline; returns the section's record."""
    results = {"sections": {}}
    bench_all.run_section("vit", items, measure, time.perf_counter() + seconds, results, lambda: None)
    return results["sections"]["vit"]


def test_a_size_skipped_in_the_middle_does_not_end_its_section():
    """An item that does not fit (its compile seconds alone overrun) is skipped, and the smaller one after
    it still runs: a skip is not the end of the section."""
    items = [dict(size=1, cost=1), dict(size=2, cost=1, fixed_s=100.0), dict(size=3, cost=1)]
    sec = _section(items, lambda item: [{"size": item["size"]}], seconds=30.0)
    assert [r["size"] for r in sec["rows"]] == [1, 3]
    assert sec["skipped"] == [{"size": 2}] and sec["errors"] == []


def test_compile_seconds_do_not_count_in_the_next_prediction():
    """The item after a compiled one is predicted from the compiled one's time without its compile
    seconds: 0.2 s per unit of cost and 1 s of compilation, given 2.1 s: the third item is predicted at
    0.2 s (fits at about 1.6 s), not at 1.2 s (which would end at 2.6 s and be skipped)."""
    def measure(item):
        time.sleep(0.2 * item["cost"] + item.get("fixed_s", 0.0))
        return [{"size": item["size"]}]

    items = [dict(size=1, cost=1), dict(size=2, cost=1, fixed_s=1.0), dict(size=3, cost=1)]
    sec = _section(items, measure, seconds=2.1)
    assert [r["size"] for r in sec["rows"]] == [1, 2, 3] and sec["skipped"] == []


@pytest.mark.parametrize("error", [ValueError("shapes do not match (planted)"),
                                   AssertionError("a check failed (planted)"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (planted)")],
                         ids=["ValueError", "AssertionError", "OutOfMemoryError"])
def test_every_kind_of_failure_is_isolated(error):
    """A size that fails with any error (not only a RuntimeError) is recorded, with its type, and the
    next size still runs."""
    def measure(item):
        if item["size"] == 2:
            raise error
        return [{"size": item["size"]}]

    sec = _section([dict(size=s, cost=1) for s in (1, 2, 3)], measure, seconds=30.0)
    assert [r["size"] for r in sec["rows"]] == [1, 3]
    (err,) = sec["errors"]
    assert err["size"] == 2 and err["error"] == f"{type(error).__name__}: {error}"
    assert "(planted)" in err["traceback"]
