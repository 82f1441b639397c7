"""Tests of the 2D Hyena operator (visiontools/layers/hyena.py) and its timm adapter (patches/timm_hyena.py)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import visiontools.models  # noqa: F401  (registers the Hyena ViTs)
import visiontools.patches.timm_hyena as th
from visiontools.data import CIFAR_STATS
from visiontools.layers.hyena import (
    DENSE_MAX_BYTES, DENSE_MAX_TOKENS, Hyena2d, HyenaAttention, ImplicitFilter2d, conv_matrix, dense_conv2d,
    direct_conv2d, fft_conv2d, fft_size,
)

GRIDS = [(1, 1), (2, 3), (5, 5), (7, 4), (4, 9), (8, 8)]


def _tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args)


# ----------------------------------------------------------------------------- long convolution

@pytest.mark.parametrize("H,W", GRIDS)
def test_fft_conv_equals_direct_conv(H, W):
    g = torch.Generator().manual_seed(H * 10 + W)
    x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2 * H - 1, 2 * W - 1, generator=g, dtype=torch.float64)
    exact = direct_conv2d(x, k)  # outputs up to ~20: FFT round-off ~1e-14 in float64, ~5e-6 in float32
    torch.testing.assert_close(fft_conv2d(x, k), exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(fft_conv2d(x.float(), k.float()).double(), exact, rtol=0, atol=2e-5)


def test_fft_conv_is_linear_not_circular():
    # an impulse in the left column must not leak into the right column through wrap-around
    H, W = 6, 6
    x = torch.zeros(1, 1, H, W, dtype=torch.float64)
    x[0, 0, 2, 0] = 1.0
    k = torch.zeros(1, 2 * H - 1, 2 * W - 1, dtype=torch.float64)
    k[0, H - 1, W - 2] = 1.0  # offset dx = -1: moves the impulse one column to the left (off the grid)
    y = fft_conv2d(x, k)
    assert y.abs().max().item() < 1e-12
    k[0, H - 1, W] = 1.0      # offset dx = +1: one column to the right
    y = fft_conv2d(x, k)
    assert y[0, 0, 2, 1].item() == pytest.approx(1.0)
    assert y.abs().sum().item() == pytest.approx(1.0)


def test_fft_size_is_smooth_and_large_enough():
    for n in range(1, 80):
        p = fft_size(n)
        assert p >= 2 * n - 1
        m = p
        for q in (2, 3, 5):
            while m % q == 0:
                m //= q
        assert m == 1
    assert fft_size(8) == 15 and fft_size(14) == 27


def test_fft_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"kernel must be \(C, 2H-1, 2W-1\)"):
        fft_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\)"):
        fft_conv2d(torch.randn(2, 4, 4), torch.randn(2, 7, 7))


# ----------------------------------------------------------------------------- filters and operator

def test_implicit_filter_shapes_and_decay():
    f = ImplicitFilter2d(6, hidden=16)
    for H, W in GRIDS:
        assert f((H, W)).shape == (6, 2 * H - 1, 2 * W - 1)
    # the window decays faster for the first channel than for the last
    _, r = f.positions(8, 8)
    window = torch.exp(-r[..., None] * f.decay_rates)
    assert window[0, 0, 0] < window[0, 0, -1]
    with pytest.raises(ValueError, match="grid must be positive"):
        f((0, 3))


def test_implicit_filter_is_the_mlp_times_a_per_channel_decay_window():
    """h_c(dy, dx) = MLP(pos)_c * exp(-a_c * |(dy, dx)| / max(H, W)), with rates from fast to slow."""
    torch.manual_seed(0)
    f = ImplicitFilter2d(6, hidden=16, fast_decay=0.3, slow_decay=1.5, target=1e-2).double()
    H, W = 5, 7
    dy = torch.arange(-(H - 1), H, dtype=torch.float64)[:, None] / 7
    dx = torch.arange(-(W - 1), W, dtype=torch.float64)[None, :] / 7
    radius = torch.sqrt(dy ** 2 + dx ** 2)
    rates = torch.linspace(np.log(100) / 0.3, np.log(100) / 1.5, 6, dtype=torch.float64)
    torch.testing.assert_close(f.decay_rates.double(), rates, rtol=1e-6, atol=0)
    assert torch.exp(-rates[0] * 0.3) == pytest.approx(1e-2) and torch.exp(-rates[-1] * 1.5) == pytest.approx(1e-2)
    feats, _ = f.positions(H, W)
    mlp_out = f.mlp(feats.double()).permute(2, 0, 1)  # (6, 2H-1, 2W-1), no window
    expected = mlp_out * torch.exp(-rates[:, None, None] * radius)
    # float32 offsets, rates and window (exp(-a r) with a r up to ~20: relative error ~20 ulps)
    torch.testing.assert_close(f((H, W)).double(), expected, rtol=4e-6, atol=1e-9)
    assert (f((H, W))[:, 0, 0].abs() < 0.5 * mlp_out[:, 0, 0].abs()).all()  # the corners are damped


def _hyena_reference(m: Hyena2d, x: torch.Tensor, prefix: torch.Tensor):
    """Definition 3.1 of the Hyena paper, written out with direct (non-FFT) convolutions: order n uses
    filter rows [n*C, (n+1)*C); prefix tokens read the grid mean of the current value."""
    B, H, W, C = x.shape
    u = m.short_conv(m.in_proj(x).permute(0, 3, 1, 2))
    v, *gates = u.split(C, dim=1)
    k = m.filter((H, W))
    centre = m.short_conv.weight[:, 0, 1, 1]
    vp, *gates_p = (m.in_proj(prefix) * centre + m.short_conv.bias).split(C, dim=-1)
    for n in range(m.order):
        z = direct_conv2d(v, k[n * C:(n + 1) * C]) + v * m.skip[n].view(1, C, 1, 1)
        zp = v.mean(dim=(2, 3))[:, None, :] + vp * m.skip[n]
        v, vp = gates[n] * z, gates_p[n] * zp
    return m.out_proj(v.permute(0, 2, 3, 1)), m.out_proj(vp)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_hyena_equals_its_definition_with_a_filter_per_order_and_grid_mean_prefix(order):
    torch.manual_seed(0)
    m = Hyena2d(8, order=order, filter_hidden=16).double()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    prefix = torch.randn(2, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        y, yp = m(x, prefix=prefix)
        ry, ryp = _hyena_reference(m, x, prefix)
        torch.testing.assert_close(y, ry, rtol=0, atol=1e-12)
        torch.testing.assert_close(yp, ryp, rtol=0, atol=1e-12)
        torch.testing.assert_close(m(x), ry, rtol=0, atol=1e-12)  # the grid never reads the prefix


FFT_SETTINGS = ["cached", "regenerated", "one_chunk", "autograd", "autograd_no_recompute"]


@pytest.mark.parametrize("setting", FFT_SETTINGS)
def test_fft_recursion_equals_the_definition_with_gradients(setting):
    """The FFT recursion on larger grids (channel chunks of uneven size, the skip folded into the
    spectrum, grid means from the transforms' DC term) equals the written-out definition: in inference
    with filters cached or regenerated per chunk, and with autograd, chunks checkpointed or not (the
    gradients too)."""
    torch.manual_seed(0)
    m = Hyena2d(10, order=2, filter_hidden=16, long_conv="fft", fft_chunks=1 if setting == "one_chunk" else 3,
                cache_filters=setting != "regenerated", recompute=setting != "autograd_no_recompute").double()
    x = torch.randn(2, 7, 9, 10, dtype=torch.float64, requires_grad=True)
    prefix = torch.randn(2, 1, 10, dtype=torch.float64, requires_grad=True)
    wy, wp = torch.randn(2, 7, 9, 10, dtype=torch.float64), torch.randn(2, 1, 10, dtype=torch.float64)
    ry, ryp = _hyena_reference(m, x, prefix)
    if not setting.startswith("autograd"):
        with torch.no_grad():
            for _ in range(2):  # the second call reads the cache (when there is one)
                y, yp = m(x, prefix=prefix)
                torch.testing.assert_close(y, ry, rtol=0, atol=1e-10)
                torch.testing.assert_close(yp, ryp, rtol=0, atol=1e-10)
        return
    y, yp = m(x, prefix=prefix)
    torch.testing.assert_close(y, ry, rtol=0, atol=1e-10)
    torch.testing.assert_close(yp, ryp, rtol=0, atol=1e-10)
    inputs = [x, prefix, *m.parameters()]
    got = torch.autograd.grad((y * wy).sum() + (yp * wp).sum(), inputs)
    want = torch.autograd.grad((ry * wy).sum() + (ryp * wp).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_fft_chunks_and_recompute_bound_the_memory():
    """A quarter of the channels at a time: a forward with filters regenerated needs well under the
    scratch of all channels at once, and a checkpointed training step well under one that keeps the
    spectra and transforms for backward."""
    from visiontools.bench.memory import peak_bytes

    torch.manual_seed(0)
    x = torch.randn(1, 32, 32, 64)

    def forward_peak(**kw):
        m = Hyena2d(64, filter_hidden=16, long_conv="fft", cache_filters=False, **kw)
        return peak_bytes(lambda: m(x))

    def train_peak(**kw):
        m = Hyena2d(64, filter_hidden=16, long_conv="fft", **kw)
        return peak_bytes(lambda: m(x).square().mean().backward(), autograd=True)

    assert forward_peak(fft_chunks=4) < 0.5 * forward_peak(fft_chunks=1)
    assert train_peak(recompute=True) < 0.5 * train_peak(recompute=False)


def test_every_filter_row_gets_a_gradient():
    """Each of the order*dim generated filters is used: the loss has a gradient for every row."""
    torch.manual_seed(0)
    m = Hyena2d(8, order=3, filter_hidden=16)
    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["k"] = out

    m.filter.register_forward_hook(keep)
    y, yp = m(torch.randn(2, 5, 6, 8), prefix=torch.randn(2, 1, 8))
    (y.square().mean() + yp.square().mean()).backward()
    per_row = kept["k"].grad.abs().flatten(1).sum(1)
    assert per_row.shape == (24,) and (per_row > 0).all(), per_row


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("H,W", [(1, 1), (5, 7), (6, 3), (8, 8)])
def test_hyena_output_shapes(order, H, W):
    m = Hyena2d(8, order=order, filter_hidden=8)
    x = torch.randn(2, H, W, 8)
    assert m(x).shape == (2, H, W, 8)
    y, yp = m(x, prefix=torch.randn(2, 3, 8))
    assert y.shape == (2, H, W, 8) and yp.shape == (2, 3, 8)


def test_hyena_rejects_bad_input():
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        Hyena2d(8, order=0)
    m = Hyena2d(8)
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 8\)"):
        m(torch.randn(2, 4, 4, 6))
    with pytest.raises(ValueError, match=r"prefix must be \(B, P, 8\)"):
        m(torch.randn(2, 4, 4, 8), prefix=torch.randn(3, 1, 8))


def test_hyena_translation_equivariant_away_from_borders():
    # Without biases a zero background stays zero, so a local pattern gives a local output; moving the
    # pattern inside the grid moves the output by the same amount (the filters see offsets only).
    torch.manual_seed(0)
    m = Hyena2d(8, order=2, filter_hidden=16, bias=False, out_bias=False).double()
    H, W = 16, 14
    pattern = torch.randn(1, 3, 3, 8, dtype=torch.float64)
    a = torch.zeros(1, H, W, 8, dtype=torch.float64)
    b = torch.zeros_like(a)
    a[:, 3:6, 2:5] = pattern
    b[:, 9:12, 7:10] = pattern  # shifted by (6, 5)
    ya, yb = m(a), m(b)
    torch.testing.assert_close(yb[:, 6:, 5:], ya[:, :H - 6, :W - 5], rtol=1e-9, atol=1e-9)
    assert ya[:, 2:7, 1:6].abs().amax() > 1e-3  # the pattern does produce an output


def test_long_range_mixing():
    # one token changes the output at the far corner of the grid (with biases on)
    torch.manual_seed(0)
    m = Hyena2d(8, filter_hidden=16).double()
    x = torch.randn(1, 10, 10, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 0, 0] += 1.0
    assert (m(x2) - m(x))[0, 9, 9].abs().max() > 1e-8


@pytest.mark.parametrize("H,W", GRIDS)
def test_dense_conv_equals_direct_convolution(H, W):
    """The dense-matrix long convolution is the same linear map as the direct one (fp64, 1e-12)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, H, W, dtype=torch.float64)
    k = torch.randn(4, 2 * H - 1, 2 * W - 1, dtype=torch.float64)
    torch.testing.assert_close(dense_conv2d(x, conv_matrix(k, H, W)), direct_conv2d(x, k), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="kernel must be"):
        conv_matrix(k, H + 1, W)
    with pytest.raises(ValueError, match="matrix must be"):
        dense_conv2d(x[:, :3], conv_matrix(k, H, W))


def test_long_conv_modes_agree_with_gradients_and_auto_picks_by_grid_size():
    """long_conv='fft'/'dense'/'auto' give the same outputs and gradients (fp64, with a prefix token);
    'auto' runs dense matrices up to DENSE_MAX_TOKENS tokens and FFTs above."""
    torch.manual_seed(0)
    base = Hyena2d(8, filter_hidden=8).double()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    prefix = torch.randn(2, 1, 8, dtype=torch.float64)
    outs, grads = {}, {}
    for mode in ("fft", "dense", "auto"):
        m = copy.deepcopy(base)
        m.long_conv = mode
        y, yp = m(x, prefix=prefix)
        (y.square().sum() + yp.sum()).backward()
        outs[mode] = torch.cat([y.flatten(), yp.flatten()])
        grads[mode] = torch.cat([p.grad.flatten() for p in m.parameters()])
    for mode in ("dense", "auto"):
        torch.testing.assert_close(outs[mode], outs["fft"], rtol=0, atol=1e-10)
        torch.testing.assert_close(grads[mode], grads["fft"], rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # the cached operators: matrices on a small grid, spectra on a large one
        small = base.filter_operators(16, 16)
        large = base.filter_operators(17, 16)
    assert 16 * 16 <= DENSE_MAX_TOKENS < 17 * 16
    assert not small[0].is_complex() and small[0].shape == (8, 256, 256) and large[0].is_complex()
    wide = Hyena2d(100, filter_hidden=8)  # 100 x 256^2 float32 = 26 MB per order: over DENSE_MAX_BYTES
    with torch.no_grad():
        assert 100 * 256**2 * 4 > DENSE_MAX_BYTES and wide.filter_operators(16, 16)[0].is_complex()
        assert not wide.filter_operators(8, 8)[0].is_complex()
    with pytest.raises(ValueError, match="long_conv must be one of"):
        Hyena2d(8, long_conv="matmul")


def test_filter_cache_is_reused_and_invalidated():
    torch.manual_seed(0)
    m = Hyena2d(8, filter_hidden=8).double()
    x = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    y_grad = m(x)  # gradients on: no cache
    assert not m._filter_cache
    with torch.no_grad():
        y1 = m(x)
        first = m._filter_cache[(6, 5)][1][0]
        y2 = m(x)
        assert m._filter_cache[(6, 5)][1][0] is first  # reused
        torch.testing.assert_close(y1, y_grad.detach(), rtol=0, atol=0)
        torch.testing.assert_close(y2, y1, rtol=0, atol=0)
        m.filter.mlp[0].weight.mul_(1.5)  # an in-place change (optimizer step, load_state_dict) ...
        y3 = m(x)
    assert not torch.allclose(y3, y1)
    torch.testing.assert_close(y3, m(x).detach(), rtol=0, atol=0)  # ... regenerates the filters


def test_gradients_flow_to_every_parameter():
    torch.manual_seed(0)
    m = Hyena2d(8, order=2, filter_hidden=16)
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    prefix = torch.randn(2, 1, 8, requires_grad=True)
    y, yp = m(x, prefix=prefix)
    (y.square().mean() + yp.square().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and prefix.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_bf16_autocast_keeps_fft_in_float32(monkeypatch):
    seen = []
    real_rfft2 = torch.fft.rfft2

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return real_rfft2(x, *args, **kwargs)

    monkeypatch.setattr(torch.fft, "rfft2", spy)
    torch.manual_seed(0)
    m = Hyena2d(16, filter_hidden=16, long_conv="fft")
    x = torch.randn(2, 7, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert seen and all(d == torch.float32 for d in seen)
    assert torch.isfinite(y).all()
    # a bf16 input is convolved with float32 accuracy (a bf16 FFT would be off by ~1e-2)
    xb = torch.randn(1, 4, 7, 5).bfloat16()
    k = torch.randn(4, 13, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = fft_conv2d(xb, k)
    assert yb.dtype == torch.bfloat16
    ref = direct_conv2d(xb.double(), k.double())
    torch.testing.assert_close(yb.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = fft_conv2d(xb.float(), k)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- timm integration

def test_hyena_attention_grid_resolution():
    a = HyenaAttention(8, num_prefix_tokens=1, filter_hidden=8)
    assert a(torch.randn(2, 1 + 16, 8)).shape == (2, 17, 8)
    with pytest.raises(ValueError, match="do not form a square grid"):
        a(torch.randn(2, 1 + 15, 8))
    a.grid_size = (3, 5)
    assert a(torch.randn(2, 1 + 15, 8)).shape == (2, 16, 8)
    auto = HyenaAttention(8, filter_hidden=8)  # prefix count inferred: 10 = 1 + 3x3
    assert auto.resolve_grid(10) == (1, (3, 3)) and auto.resolve_grid(9) == (0, (3, 3))
    with pytest.raises(ValueError, match="attn_mask"):
        a(torch.randn(2, 16, 8), attn_mask=torch.zeros(16, 16))


def test_usable_as_timm_attn_layer():
    torch.manual_seed(0)
    m = _tiny_vit(attn_layer=HyenaAttention, reg_tokens=1)
    th.configure_hyena(m)
    assert all(isinstance(b.attn, HyenaAttention) for b in m.blocks)
    assert all(b.attn.num_prefix_tokens == 2 and b.attn.grid_size == (4, 4) for b in m.blocks)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    # timm's init must not shrink the filter MLP to std 0.02 (ImplicitFilter2d.init_weights resets it)
    w = m.blocks[0].attn.mixer.filter.mlp[0].weight
    assert w.std() > 0.1


def test_swap_attention_for_hyena_forward_backward():
    torch.manual_seed(0)
    m = _tiny_vit(reg_tokens=1, global_pool="token")
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("blocks.")}
    th.swap_attention_for_hyena(m, order=3, filter_hidden=8)
    assert len(th.hyena_layers(m)) == 2
    assert all(layer.mixer.order == 3 and layer.num_prefix_tokens == 2 for layer in th.hyena_layers(m))
    after = m.state_dict()
    for k, v in before.items():  # everything outside the blocks is kept
        assert torch.equal(after[k], v), k
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in m.named_parameters():
        if "attn" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the class token (global_pool='token') reads the grid: changing image content changes the logits
    x2 = x.clone()
    x2[:, :, 24:, 24:] += 1.0
    assert not torch.allclose(m(x2), m(x))


def test_swap_rejects_non_vit():
    with pytest.raises(TypeError, match="needs a timm VisionTransformer"):
        th.swap_attention_for_hyena(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))


def test_registered_models_and_resolution_flexibility():
    hy = timm.create_model("hyena_vit_cifar")
    at = timm.create_model("attn_vit_cifar")
    assert hy.embed_dim == at.embed_dim and len(hy.blocks) == len(at.blocks)
    n = sum(p.numel() for p in hy.parameters())
    assert 200_000 <= n <= 1_000_000
    assert hy.pretrained_cfg["mean"] == CIFAR_STATS["cifar10"][0]
    hy.eval()
    with torch.no_grad():
        assert hy(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert hy(torch.randn(1, 3, 48, 64)).shape == (1, 10)  # non-square 12x16 grid
    assert all(layer.grid_size == (8, 8) for layer in th.hyena_layers(hy))  # per-call grids leave no state


def test_deep_copied_model_keeps_its_per_call_grid():
    # A copy (e.g. a model-EMA wrapper's) must read its own patch grid: a 4x16 grid has 64 tokens,
    # which would otherwise be mistaken for the default 8x8 grid.
    import copy

    hy = timm.create_model("hyena_vit_cifar").eval()
    twin = copy.deepcopy(hy)
    with torch.no_grad():
        for shape in [(2, 3, 16, 64), (1, 3, 48, 64)]:
            x = torch.randn(shape)
            torch.testing.assert_close(twin(x), hy(x), rtol=0, atol=0)
    assert twin.patch_embed._hyena_grid_key is not hy.patch_embed._hyena_grid_key
    assert all(layer.grid_owner is twin.patch_embed._hyena_grid_key for layer in th.hyena_layers(twin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_hyena_built_in_a_dtype_runs_in_it(dtype):
    hy = Hyena2d(8, dtype=dtype)
    assert {p.dtype for p in hy.parameters()} == {dtype}
    assert hy(torch.randn(2, 4, 5, 8, dtype=dtype)).dtype == dtype
    assert {p.device.type for p in Hyena2d(8, device="meta").parameters()} == {"meta"}


def test_concurrent_calls_with_transposed_grids_do_not_mix():
    # 48x64 and 64x48 images both give 192 tokens; only the per-call grid tells them apart
    hy = timm.create_model("hyena_vit_cifar").eval()
    xs = [torch.randn(2, 3, 48, 64), torch.randn(2, 3, 64, 48)]
    with torch.no_grad():
        expected = [hy(x) for x in xs]
    out = [[], []]

    def work(i):
        with torch.no_grad():
            for _ in range(10):
                out[i].append(hy(xs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(2):
        for y in out[i]:
            torch.testing.assert_close(y, expected[i])
    assert "hyena_vit_small_224" in timm.list_models("hyena_*")
    assert "attn_vit_small_224" in timm.list_models("attn_*")
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model("hyena_vit_cifar", pretrained=True)


def test_torch_compile_runs():
    # Dynamo capture with the FFT kept out of the graph (torch.compiler.disable). The aot_eager backend
    # checks tracing and autograd without inductor's C++ codegen, which takes minutes on a small CPU.
    torch.manual_seed(0)
    m = _tiny_vit(img_size=16, patch_size=4, embed_dim=16, depth=1, attn_layer=HyenaAttention,
                  dynamic_img_size=True, class_token=False, global_pool="avg")
    th.configure_hyena(m)
    x = torch.randn(2, 3, 16, 16)
    ref = m(x)
    cm = torch.compile(m, backend="aot_eager", dynamic=False)  # see HyenaAttention: one graph per grid
    out = cm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert m.blocks[0].attn.mixer.skip.grad is not None
    x2 = torch.randn(2, 3, 16, 24)  # another grid, through the patch_embed hook
    torch.testing.assert_close(cm(x2), m(x2), rtol=1e-5, atol=1e-5)


def test_tiny_hyena_vit_learns_real_cifar10(cifar_batch, fit_losses):
    torch.manual_seed(0)
    x, y = cifar_batch
    assert x.shape == (64, 3, 32, 32) and len(set(y.tolist())) == 10
    losses = fit_losses(timm.create_model("hyena_vit_cifar", embed_dim=32, depth=2, num_heads=2))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.4, losses  # from ~2.3 (chance) down by more than 0.4 nats


# ----------------------------------------------------------------------------- benchmark helpers

def test_bench_peak_memory_sees_a_known_peak():
    from visiontools.bench.hyena import peak_forward_memory

    def fn():
        a = torch.ones(1 << 20)       # 4 MiB
        b = a * 2                     # 8 MiB live
        del a
        c = b + 1                     # 8 MiB live again
        return c.sum()

    peak = peak_forward_memory(fn, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 8 * 2**20 + 4096


def test_bench_crossover_slope_and_grid_parsing():
    import argparse

    from visiontools.bench.hyena import crossover, loglog_slope, parse_grid

    rows = [{"tokens": n, "attn_ms": a, "hyena_ms": h}
            for n, a, h in [(64, 1, 2), (256, 3, 2), (1024, 9, 10), (4096, 50, 20), (16384, 400, 90)]]
    assert crossover(rows) == 4096  # faster at 256 but not at 1024: the crossover is where it stays faster
    assert crossover(rows[:1]) is None
    assert loglog_slope([10, 100, 1000], [3, 300, 30000]) == pytest.approx(2.0)
    assert parse_grid("32") == (32, 32) and parse_grid("24x40") == (24, 40)
    with pytest.raises(argparse.ArgumentTypeError, match="not a grid size"):
        parse_grid("0x3")


def test_bench_tiny_run(tmp_path):
    import json

    from visiontools.bench.hyena import benchmark, markdown_table, plot

    res = benchmark([(4, 4), (3, 5)], dim=16, num_heads=2, max_tokens=64, repeats=1, warmup=0, progress=False)
    assert [r["tokens"] for r in res["rows"]] == [16, 15] and [r["batch"] for r in res["rows"]] == [4, 4]
    for r in res["rows"]:
        assert r["attn_ms"] > 0 and r["hyena_ms"] > 0 and r["attn_peak_bytes"] > 0 and r["hyena_peak_bytes"] > 0
        # a training step holds activations for backward: more than the forward's peak
        assert r["attn_train_peak_bytes"] > r["attn_peak_bytes"] and r["hyena_train_peak_bytes"] > r["hyena_peak_bytes"]
    json.dumps(res)
    table = markdown_table(res)
    assert "| 3x5 | 15 | 4 |" in table and "training-step peak MB" in table
    plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_times_the_hyena_vit_against_its_twin_end_to_end(tmp_path, capsys):
    """``bench hyena --vit-sizes`` times the registered ViT-S pair at each image size; sizes that are
    not multiples of the patch size are one error line before anything runs."""
    from visiontools.cli import main

    out = tmp_path / "h.md"
    assert main(["bench", "hyena", "--grids", "4", "--vit-sizes", "32", "48", "--repeats", "1", "--warmup", "0",
                 "--threads", "1", "--no-progress", "--out-md", str(out),
                 "--out-json", str(out.with_suffix(".json"))]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["vit"]
    assert [(r["image_size"], r["tokens"]) for r in rows] == [(32, 4), (48, 9)]
    assert all(r["attn_s"] > 0 and r["hyena_s"] > 0 for r in rows) and "| 48 px | 9 |" in out.read_text()
    capsys.readouterr()
    assert main(["bench", "hyena", "--vit-sizes", "100"]) == 2
    err = capsys.readouterr().err
    assert "--vit-sizes must be positive multiples of 16" in err and "Traceback" not in err


def test_long_conv_script_measures_every_mode_on_a_tiny_run(tmp_path):
    """scripts/hyena_long_conv.py (the README's FFT-vs-dense table) runs and writes its table."""
    out = tmp_path / "t.md"
    res = subprocess.run([sys.executable, "scripts/hyena_long_conv.py", "--tokens", "64", "--threads", "1",
                          "--repeats", "1", "--batch", "4", "--train-batch", "2", "--out", str(out)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert res.returncode == 0, res.stderr
    g = json.loads(out.with_suffix(".json").read_text())["grids"][0]
    assert [r["model"] for r in g["rows"]] == ["attention", "Hyena, FFT", "Hyena, auto (dense)"]
    assert g["max_abs_diff"] < 1e-5 and all(r["images_per_s"] > 0 and r["train_peak_mb"] > 0 for r in g["rows"])
    assert "| 64 | Hyena, auto (dense) |" in out.read_text()


@pytest.mark.parametrize("mode", ["dense", "auto"])
def test_bf16_autocast_keeps_the_dense_long_conv_in_float32(mode):
    """Under bf16 autocast the dense long convolution (long_conv='dense', and 'auto' on a small grid)
    multiplies float32 matrices in float32: a bf16 input is convolved to within the bf16 rounding of
    each output value (a bf16 matmul would be off by much more where terms cancel)."""
    torch.manual_seed(0)
    H, W, C = 8, 8, 4
    m = Hyena2d(C, filter_hidden=16, long_conv=mode)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ops = m.filter_operators(H, W)
        kernels = m.filter((H, W)).split(C, dim=0)
    assert all(op.dtype == torch.float32 and not op.is_complex() and op.shape == (C, H * W, H * W) for op in ops)
    xb = torch.randn(2, C, H, W).bfloat16()
    for op, k in zip(ops, kernels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = dense_conv2d(xb, op)
        assert yb.dtype == torch.bfloat16
        ref = direct_conv2d(xb.double(), k.double())  # the convolution written as F.conv2d, in float64
        err = (yb.double() - ref).abs()
        assert (err <= 2.0**-8 * ref.abs() + 1e-6).all(), (err / ref.abs()).max()
    with torch.no_grad():  # the module under autocast follows its float32 run to bf16 accuracy
        x = torch.randn(1, H, W, C)
        y32 = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = m(x)
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05 * y32.abs().max().item())
