"""Guards for the diffusion-transformer guarantees (issue 44): downsample mode's ``downsample_method``
on a DiT, unit rotations of Flux's ``angle`` RoPE rule, Flux with non-zero text position ids, budget
ceilings of windows other than 2x2, and the default image size of a Flux or PixArt budget."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_diffusers_dit import flux_ids, tiny
from test_diffusers_patch import tiny_unet

from visiontools.patches import diffusers_dit as dit
from visiontools.patches.diffusers_dit import apply_tome_dit, remove_tome_dit
from visiontools.timing import count_flops
from visiontools.tome import merge2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T = 5  # text tokens
FH, FW = 8, 6  # Flux packed grid (test_diffusers_dit's); SD3 latent 16x12 (patch 2 -> 8x6 grid)


def inputs(kind: str, txt_ids=None):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, T, 16, generator=g)
    if kind == "flux":
        x = F.interpolate(torch.randn(2, 16, 3, 3, generator=g), size=(FH, FW), mode="bilinear")
        return dict(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=text,
                    pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.full((2,), 0.5),
                    img_ids=flux_ids(), txt_ids=torch.zeros(T, 3) if txt_ids is None else txt_ids)
    x = F.interpolate(torch.randn(2, 4, 4, 3, generator=g), size=(16, 12), mode="bilinear")
    return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=torch.randn(2, 8, generator=g),
                timestep=torch.full((2,), 500.0))


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ downsample_method on a DiT

@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_downsample_method_sets_how_a_dit_resamples_keys_and_values(kind, monkeypatch):
    """Every patched attention resamples with the method asked for (``avg`` here: 2x2 means of the
    8x6 grid), and the output is not the default method's."""
    model = tiny(kind)
    kw = inputs(kind)
    ref = run(model, kw)
    apply_tome_dit(model, ratio=0.75, mode="downsample")
    nearest = run(model, kw)
    seen = []
    real = merge2d.downsample_tokens

    def spy(x, h, w, size, method="nearest-exact"):
        out = real(x, h, w, size, method)
        seen.append((method, (h, w), tuple(size)))
        if method == "avg":  # the 2x2 means of the grid
            grid = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            torch.testing.assert_close(out, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
        return out
    monkeypatch.setattr(merge2d, "downsample_tokens", spy)
    apply_tome_dit(model, ratio=0.75, mode="downsample", downsample_method="avg")
    avg = run(model, kw)
    n_attn = 3 if kind == "flux" else 2  # flux: keys and values pooled separately (rope before pooling)
    assert seen and {s for s in seen} == {("avg", (FH, FW), (4, 3))} and len(seen) == n_attn * (2 if kind == "flux"
                                                                                                  else 1)
    assert not torch.equal(avg, nearest) and 0 < rel(avg, ref) < 0.2
    remove_tome_dit(model)


# ------------------------------------------------------------------ Flux RoPE

def test_flux_angle_rule_gives_unit_rotations(monkeypatch):
    """``rope="angle"``: each merged token is rotated by the mean angle of its members, so per frequency
    cos^2 + sin^2 = 1 (``"mean"`` averages cos and sin and shortens them). Checked on Flux's own tables
    and on every table the patched Flux attention rotates with."""
    model = tiny("flux")
    ids = torch.cat([torch.zeros(T, 3), flux_ids()])
    cos, sin = model.pos_embed(ids)
    cos_i, sin_i = cos[T:], sin[T:]
    plan = merge2d.plan_merge_2d(torch.randn(2, FH * FW, 8, generator=torch.Generator().manual_seed(0)), FH, FW, 24,
                                 seed=3)
    c, s = dit._merged_rope(plan, cos_i, sin_i, "angle")
    assert c.shape == (2, FH * FW - 24, cos.shape[-1])
    torch.testing.assert_close(c * c + s * s, torch.ones_like(c), rtol=0, atol=1e-5)
    cm, sm = dit._merged_rope(plan, cos_i, sin_i, "mean")
    assert (cm * cm + sm * sm).min() < 0.99  # averaged cos/sin are shorter: the renormalisation matters
    assert torch.equal(torch.sign(c), torch.sign(cm)) and torch.equal(torch.sign(s), torch.sign(sm))  # same angle
    tables = []
    real = dit._rotate

    def spy(x, cos, sin):
        tables.append((cos, sin))
        return real(x, cos, sin)
    monkeypatch.setattr(dit, "_rotate", spy)
    apply_tome_dit(model, ratio=0.5, rope="angle")
    run(model, inputs("flux"))
    merged = [(a, b) for a, b in tables if a.ndim == 3]  # per-sample tables of merged tokens
    assert len(merged) == 2 * 3  # q and k of 3 attentions
    for a, b in merged:
        assert a.shape[1] == FH * FW - FH * FW // 2
        torch.testing.assert_close(a * a + b * b, torch.ones_like(a), rtol=0, atol=1e-5)


def _text_ids():
    """Text position ids a custom pipeline might pass: not all zeros."""
    ids = torch.zeros(T, 3)
    ids[:, 0] = torch.arange(T) * 0.5
    ids[:, 1], ids[:, 2] = torch.arange(T) + 3.0, 7.0 - torch.arange(T)
    return ids


def test_flux_with_non_zero_text_position_ids_is_exact_where_nothing_is_reduced():
    """Diffusers' pipelines pass zero text ids (identity rotations); a custom one may not. With keys and
    values downsampled to the full grid (nothing dropped) the patched Flux must equal the unpatched one,
    text rotations included, in the double- and the single-stream blocks."""
    model = tiny("flux")
    kw = inputs("flux", txt_ids=_text_ids())
    ref = run(model, kw)
    assert rel(ref, run(model, inputs("flux"))) > 1e-3  # the text ids matter to this model
    apply_tome_dit(model, ratio=0.01, mode="downsample")  # the kv grid rounds up to the full grid
    assert rel(run(model, kw), ref) < 1e-5


@pytest.mark.parametrize("mode", ["merge", "downsample"])
def test_flux_single_stream_text_prefix_is_rotated_as_unpatched(mode, monkeypatch):
    """Only the first single-stream block patched, so its input is the unpatched model's: the queries and
    keys of its text prefix (non-zero text ids) reach attention exactly as unpatched, image tokens reduced."""
    model = tiny("flux")
    kw = inputs("flux", txt_ids=_text_ids())
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*a, **kws):
        names = ("query", "key", "value")
        q, k = (a[i] if len(a) > i else kws[names[i]] for i in range(2))
        calls.append((q, k))
        return sdpa(*a, **kws)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    run(model, kw)
    ref = calls[1]  # double block, then single block 0
    calls.clear()
    apply_tome_dit(model, ratio=0.5, mode=mode, blocks=["single_transformer_blocks.0"])
    run(model, kw)
    q, k = calls[1]
    assert k.shape[2] < ref[1].shape[2]  # image keys reduced
    torch.testing.assert_close(q[:, :, :T], ref[0][:, :, :T], rtol=0, atol=1e-6)
    torch.testing.assert_close(k[:, :, :T], ref[1][:, :, :T], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ budgets: windows and default sizes

@pytest.mark.parametrize("sx,sy,ceiling", [(1, 2, 0.5), (3, 3, 8 / 9)])
def test_a_budget_searches_up_to_the_windows_own_ceiling(sx, sy, ceiling):
    """Merge budgets search ratios up to ``1 - 1/(sx*sy)``: 0.5 for 1x2 windows (a target past it is out
    of reach, and named with 0.5), 8/9 for 3x3 (a target that needs more than 2x2's 0.75 is reached)."""
    model = tiny("sd3")
    size = (96, 96)  # a 12x12 latent: a 6x6 grid, four 3x3 windows
    kw = dit.dit_example_inputs(model, *size, T, device="cpu")

    def fraction(ratio):
        apply_tome_dit(model, ratio=ratio, sx=sx, sy=sy)
        return count_flops(lambda: model(**kw), warmup=False) / base

    base = count_flops(lambda: model(**kw), warmup=False)
    top = fraction(ceiling)
    over = fraction(0.75) if ceiling > 0.75 else None
    target = (top + over) / 2 if over is not None else top * 1.01
    apply_tome_dit(model, flops=target, sx=sx, sy=sy, size=size, text_tokens=T)
    b = model.tome_budget
    assert b.flop_fraction <= target and b.ratio <= ceiling
    assert b.ratio == pytest.approx(ceiling * round(b.ratio / ceiling * 256) / 256)  # on the window's own grid
    assert fraction(b.ratio) == pytest.approx(b.flop_fraction, rel=1e-9)
    if over is not None:
        assert b.ratio > 0.75
    with pytest.raises(ValueError, match=rf"out of reach: the largest ratio \({ceiling:.3g}\) keeps"):
        apply_tome_dit(model, flops=top * 0.98, sx=sx, sy=sy, size=size, text_tokens=T)


def test_a_unet_budget_with_1x2_windows_is_bounded_by_their_ceiling():
    """UNets share the solve: with 1x2 windows the largest ratio tried (and named) is 0.5."""
    from visiontools.patches.diffusers import apply_tome_sd

    unet = tiny_unet(sample_size=8)
    with pytest.raises(ValueError, match=r"out of reach: the largest ratio \(0.5\) keeps 0\.9\d+ of the FLOPs"):
        apply_tome_sd(unet, flops=0.5, sx=1, sy=2)


def test_default_budget_size_of_flux_is_1024_px(monkeypatch):
    """A Flux budget without ``size`` counts at 1024 px (Flux has no ``sample_size``): a 128x128 latent
    packed into 64x64 tokens, with Flux's 512 text tokens. (The solve itself is replaced by a recorder:
    counting at 1024 px takes seconds; the PixArt test below runs it end to end.)"""
    from visiontools.tome.budget import RatioBudget

    model = tiny("flux")
    built, asked = [], []
    real = dit.dit_example_inputs

    def example(model, height, width, text_tokens, **kw):
        built.append((height, width, text_tokens))
        out = real(model, height, width, text_tokens, **kw)
        built.append(tuple(out["hidden_states"].shape))
        return out

    def budget_for(apply, twin, call, cfg, flops, speedup, size, where):
        asked.append((flops, size, where))
        return RatioBudget(0.25, 0.9, flops, speedup, size)
    monkeypatch.setattr(dit, "dit_example_inputs", example)
    monkeypatch.setattr(dit.sd, "budget_for", budget_for)
    apply_tome_dit(model, flops=0.95)
    assert model.tome_budget.size == (1024, 1024) and model.tome_budget.ratio == 0.25
    assert built == [(1024, 1024, 512), (1, 64 * 64, 16)]
    assert asked == [(0.95, (1024, 1024), "of this transformer at 1024x1024 pixels; patch more blocks (blocks=None)")]
    assert getattr(model, dit._ATTR).config.ratio == 0.25


def test_default_budget_size_of_pixart_is_its_sample_size():
    """A PixArt budget without ``size`` counts at ``sample_size`` latents x 8 (64 px for the tiny model)
    with PixArt-Sigma's 300 text tokens: its FLOP fraction is the one counted there."""
    model = tiny("pixart")
    apply_tome_dit(model, flops=0.97)
    b = model.tome_budget
    assert b.size == (64, 64) and dit.TEXT_TOKENS[type(model).__name__] == 300
    twin = dit.sd.meta_twin(model)
    kw = dit.dit_example_inputs(model, 64, 64, 300)
    counted = {}
    for ratio in (0.0, b.ratio):
        apply_tome_dit(twin, ratio=ratio)
        counted[ratio] = count_flops(lambda: twin(**kw), warmup=False)
    assert counted[b.ratio] / counted[0.0] == pytest.approx(b.flop_fraction, rel=1e-9)
