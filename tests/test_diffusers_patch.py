"""ToMe-SD / token downsampling for diffusers UNets (patches/diffusers.py, visiontools/tome/merge2d.py).

Offline: every model is built from a tiny config with random weights.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import tomesd
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from visiontools.tome import merge2d
from visiontools.patches import diffusers as sd_patch
from visiontools.patches.diffusers import apply_tome_sd, is_patched, patched_blocks, remove_tome_sd

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """SD-1.x-like layout: attention at x1 and x2, none at x4."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-like layout: no attention at x1, attention at x2 and x4, text_time conditioning."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=32, norm_num_groups=8,
    ).eval()


def inputs(h=13, w=18, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h, w, generator=g), torch.tensor(500), torch.randn(batch, 7, 32, generator=g)


def run(unet, x, t, e, **kw):
    with torch.no_grad():
        return unet(x, t, e, **kw).sample


class Recorder(AttnProcessor2_0):
    """SDPA processor that records (query tokens, key/value tokens) of each call."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name = log, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        kv = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        self.log.append((self.name, hidden_states.shape[1], kv.shape[1]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_recorders(unet):
    log = []
    unet.set_attn_processor({name: Recorder(log, name) for name in unet.attn_processors})
    return log


# ---------------------------------------------------------------------------------------------- merge2d


@pytest.mark.parametrize("sx,sy", [(2, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (12, 5)])
def test_merge2d_matches_tomesd_with_fixed_destinations(h, w, sx, sy):
    from tomesd.merge import bipartite_soft_matching_random2d

    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(0))
    r = int(h * w * 0.5)
    m = merge2d.plan_merge_2d(x, h, w, merge2d.num_merged(h * w, 0.5, sx, sy, h, w), sx, sy, seed=None)
    ours = merge2d.unmerge(merge2d.merge_2d(m, x), m.index)
    tm, tu = bipartite_soft_matching_random2d(x, w, h, sx, sy, min(r, h * w - (h // sy) * (w // sx)), no_rand=True)
    assert merge2d.merge_2d(m, x).shape == tm(x).shape
    torch.testing.assert_close(ours, tu(tm(x)), rtol=0, atol=0)


def test_merge2d_destinations_one_per_window_and_deterministic():
    h, w = 9, 10  # 4 x 5 full windows, one row left over
    for seed in (None, 3, torch.tensor(3)):
        dst, src = merge2d.destinations(h, w, 2, 2, seed)
        assert dst.numel() == 20 and src.numel() == h * w - 20
        assert torch.equal(torch.sort(torch.cat([dst, src])).values, torch.arange(h * w))
        win = (dst // w // 2) * 5 + (dst % w) // 2
        assert torch.equal(torch.sort(win).values, torch.arange(20))
    a, _ = merge2d.destinations(h, w, 2, 2, 3)
    b, _ = merge2d.destinations(h, w, 2, 2, 3)
    c, _ = merge2d.destinations(h, w, 2, 2, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    off = merge2d.window_offsets(10000, 4, 7)
    assert off.min() == 0 and off.max() == 3 and (off.bincount() > 2200).all()  # roughly uniform


def test_merge2d_merge_is_mean_and_unmerge_restores_shapes():
    h, w = 6, 6
    x = torch.randn(1, h * w, 8)
    m = merge2d.plan_merge_2d(x, h, w, 18, seed=1)
    y = merge2d.merge_2d(m, x)
    assert y.shape == (1, 18, 8) and m.index.max() == 17
    # every merged token is the mean of the input tokens that map to it
    idx = m.index[..., None].expand(-1, -1, 8)
    expect = torch.zeros(1, 18, 8).scatter_reduce(1, idx, x, "mean", include_self=False)
    torch.testing.assert_close(y, expect)
    assert merge2d.unmerge(y, m.index).shape == x.shape


def test_downsample_tokens_sizes_and_avg():
    x = torch.randn(2, 12 * 10, 4)
    assert merge2d.kv_grid_size(12, 10, 0.75) == (6, 5)
    assert merge2d.kv_grid_size(13, 9, 0.75) == (7, 5)
    y = merge2d.downsample_tokens(x, 12, 10, (6, 5), "avg")
    ref = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(2, 4, 12, 10), 2)
    torch.testing.assert_close(y, ref.flatten(2).transpose(1, 2))
    assert merge2d.downsample_tokens(x, 12, 10, (9, 8)).shape == (2, 72, 4)
    with pytest.raises(ValueError, match="tokens"):
        merge2d.downsample_tokens(x, 11, 10, (6, 5))


# ------------------------------------------------------------------------------------- patch: UNet


# tomesd's own test of these settings: same float32 SDPA arithmetic, merged means summed in another
# order, so the outputs (about unit scale) agree to a few float32 ulps; unpatched differs by ~0.06.
@pytest.mark.parametrize("settings", [{}, dict(merge_crossattn=True, merge_mlp=True),
                                      dict(merge_attn=False, merge_mlp=True), dict(sx=3, sy=2)])
@pytest.mark.parametrize("h,w,max_downsample", [(16, 16, 1), (13, 18, 1), (16, 12, 2)])
def test_unet_output_equals_tomesd_with_fixed_destinations(settings, h, w, max_downsample):
    unet = tiny_unet()
    x, t, e = inputs(h, w)
    ref = run(unet, x, t, e)
    tomesd.apply_patch(unet, ratio=0.5, max_downsample=max_downsample, use_rand=False, **settings)
    theirs = run(unet, x, t, e)
    tomesd.remove_patch(unet)
    assert (theirs - ref).abs().max() > 1e-2  # the merge changes the output ...
    apply_tome_sd(unet, ratio=0.5, max_downsample=max_downsample, use_rand=False, similarity_dtype="float32",
                  **settings)
    torch.testing.assert_close(run(unet, x, t, e), theirs, rtol=0, atol=2e-6)  # ... identically in both


def record_plans(monkeypatch):
    """Record (h, w, sx, sy, seed, sim_dtype, plan) of every merge plan the SD patch makes."""
    plans, plan = [], merge2d.plan_merge_2d

    def recording(metric, h, w, r, sx=2, sy=2, seed=None, sim_dtype=None, **method):
        out = plan(metric, h, w, r, sx, sy, seed, sim_dtype, **method)
        plans.append(dict(metric=metric, h=h, w=w, sx=sx, sy=sy, seed=seed, sim_dtype=sim_dtype, plan=out, **method))
        return out

    monkeypatch.setattr(merge2d, "plan_merge_2d", recording)
    return plans


def test_random_destinations_depend_on_timestep_seed_and_block_only(monkeypatch):
    unet = tiny_unet()
    x, t, e = inputs(12, 12)
    plans = record_plans(monkeypatch)
    apply_tome_sd(unet, ratio=0.5, seed=5)

    def dsts(timestep, **kw):
        plans.clear()
        run(unet, x, torch.tensor(timestep), e, **kw)
        assert len(plans) == 3  # the three x1 blocks
        return [p["plan"].dst_pos for p in plans]

    a = dsts(500)
    assert all(torch.equal(u, v) for u, v in zip(a, dsts(500)))  # deterministic per timestep
    b = dsts(499)
    assert all(not torch.equal(u, v) for u, v in zip(a, b))  # re-drawn for every block at a new timestep
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # and differ between blocks
    for d in a + b:  # still one destination per 2x2 window
        assert torch.equal(torch.sort((d // 12 // 2) * 6 + (d % 12) // 2).values, torch.arange(36))
    apply_tome_sd(unet, ratio=0.5, seed=6)
    assert all(not torch.equal(u, v) for u, v in zip(a, dsts(500)))
    apply_tome_sd(unet, ratio=0.5, use_rand=False)
    top_left = merge2d.destinations(12, 12, 2, 2)[0]
    assert all(torch.equal(d, top_left) for d in dsts(500) + dsts(499))


@pytest.mark.parametrize("sx,sy", [(3, 2), (2, 3), (1, 4)])
def test_non_square_windows_one_destination_per_sy_rows_by_sx_columns(monkeypatch, sx, sy):
    unet = tiny_unet()
    h, w = 13, 18  # 13 = 6*2+1 = 4*3+1 = 3*4+1 rows; 18 = 6*3 = 9*2 = 18*1 columns
    x, t, e = inputs(h, w)
    plans = record_plans(monkeypatch)
    apply_tome_sd(unet, ratio=0.5, sx=sx, sy=sy)
    run(unet, x, t, e)
    assert len(plans) == 3
    for p in plans:
        d = p["plan"].dst_pos
        windows = (d // w // sy) * (w // sx) + (d % w) // sx
        assert torch.equal(torch.sort(windows).values, torch.arange((h // sy) * (w // sx)))
        assert (d // w < (h // sy) * sy).all()  # the left-over bottom row holds no destination
        assert p["plan"].r == int(h * w * 0.5)


def test_similarity_dtype_reaches_the_matching_and_auto_picks_bf16_only_on_bf16_cpus(monkeypatch):
    unet = tiny_unet()
    x, t, e = inputs(12, 12)
    plans = record_plans(monkeypatch)
    cases = [("float32", True, torch.float32), ("bfloat16", False, torch.bfloat16), ("float16", False, torch.float16),
             ("input", True, None), ("auto", True, torch.bfloat16), ("auto", False, None)]
    for choice, fast_cpu, expected in cases:
        monkeypatch.setattr(sd_patch, "_CPU_FAST_BF16", fast_cpu)
        apply_tome_sd(unet, ratio=0.5, similarity_dtype=choice)
        plans.clear()
        run(unet, x, t, e)
        assert [p["sim_dtype"] for p in plans] == [expected] * 3, (choice, fast_cpu)
    monkeypatch.setattr(sd_patch, "_CPU_FAST_BF16", True)  # auto keeps half-precision tokens' own dtype
    assert sd_patch._similarity_dtype("auto", torch.zeros(1, dtype=torch.float16)) is None
    # the dtype changes which tokens pair up: bf16 rounding reorders near-equal similarities
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 1, 64, generator=g) + 0.02 * torch.randn(2, 32 * 32, 64, generator=g)
    p32 = merge2d.plan_merge_2d(tokens, 32, 32, 512, sim_dtype=torch.float32)
    p16 = merge2d.plan_merge_2d(tokens, 32, 32, 512, sim_dtype=torch.bfloat16)
    assert not torch.equal(p32.index, p16.index)


def test_cpu_bf16_probe_reads_the_cpu_flags(tmp_path):
    def probe(flags):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return sd_patch._cpu_has_fast_bf16(str(path))

    assert probe("fpu sse2 avx2 avx512f avx512_bf16") and probe("fpu amx_tile amx_bf16")
    assert not probe("fpu sse2 avx2 avx512f") and not probe("amx_bf16x")
    assert not sd_patch._cpu_has_fast_bf16(str(tmp_path / "missing"))


def test_downsample_method_sets_how_keys_and_values_are_resampled():
    unet = tiny_unet()
    x, t, e = inputs(12, 10)
    seen = []

    class KV(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            seen.append((hidden_states, encoder_hidden_states))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(KV())
    for method in ("nearest-exact", "avg", "bilinear", "area"):
        apply_tome_sd(unet, ratio=0.75, mode="downsample", downsample_method=method)
        seen.clear()
        run(unet, x, t, e)
        (q, kv), = seen
        torch.testing.assert_close(kv, merge2d.downsample_tokens(q, 12, 10, (6, 5), method), rtol=0, atol=0)
        if method != "nearest-exact":
            assert not torch.allclose(kv, merge2d.downsample_tokens(q, 12, 10, (6, 5), "nearest-exact"))


@pytest.mark.parametrize("mode", ["merge", "downsample"])
def test_ratio_zero_is_identical_and_remove_restores_bit_for_bit(mode):
    unet = tiny_unet()
    x, t, e = inputs()
    ref = run(unet, x, t, e)
    apply_tome_sd(unet, ratio=0.0, mode=mode, max_downsample=2)
    assert is_patched(unet)
    assert torch.equal(run(unet, x, t, e), ref)
    apply_tome_sd(unet, ratio=0.5, mode=mode, max_downsample=2)  # re-apply replaces the patch
    patched = run(unet, x, t, e)
    assert not torch.equal(patched, ref)
    rel = ((patched - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5
    remove_tome_sd(unet)
    assert not is_patched(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())  # no hook left behind
    assert torch.equal(run(unet, x, t, e), ref)
    with pytest.raises(ValueError, match="not ToMe-patched"):  # as remove_tome on an unpatched ViT
        remove_tome_sd(unet)


def test_top_level_apply_tome_dispatches_to_the_diffusers_adapter():
    import visiontools

    unet = tiny_unet()
    x, t, e = inputs()
    ref = run(unet, x, t, e)
    assert visiontools.apply_tome(unet, ratio=0.75, mode="downsample") is unet and is_patched(unet)
    assert not torch.equal(run(unet, x, t, e), ref)
    visiontools.remove_tome(unet)
    assert not is_patched(unet) and torch.equal(run(unet, x, t, e), ref)


@pytest.mark.parametrize("h,w", [(16, 16), (13, 18), (9, 7)])
def test_tokens_seen_by_each_attention_match_ratio(h, w):
    unet = tiny_unet()
    x, t, e = inputs(h, w)
    x1, x2, x4 = merge2d.grid_at(h, w, 1), merge2d.grid_at(h, w, 2), merge2d.grid_at(h, w, 4)
    n1, n2, n4 = x1[0] * x1[1], x2[0] * x2[1], x4[0] * x4[1]
    full = {"down_blocks.0": n1, "up_blocks.2": n1, "down_blocks.1": n2, "up_blocks.1": n2, "mid_block": n4}

    log = install_recorders(unet)
    apply_tome_sd(unet, ratio=0.5, mode="merge")  # default max_downsample: x1 only on this layout
    assert [ds for _, ds in patched_blocks(unet)] == [1, 1, 1]
    run(unet, x, t, e)
    seen = {(name.split(".attentions")[0], name.rsplit(".", 2)[-2]): (q, kv) for name, q, kv in log}
    want1 = n1 - merge2d.num_merged(n1, 0.5, 2, 2, *x1)
    assert want1 == n1 - n1 // 2
    assert len(seen) == 10
    for (blk, attn), (q, kv) in seen.items():
        level1 = full[blk] == n1
        if attn == "attn1":
            assert (q, kv) == ((want1, want1) if level1 else (full[blk], full[blk])), (blk, attn)
        else:
            assert q == full[blk] and kv == 7

    log.clear()
    apply_tome_sd(unet, ratio=0.75, mode="downsample", max_downsample=2)
    run(unet, x, t, e)
    k1, k2 = merge2d.kv_grid_size(*x1, 0.75), merge2d.kv_grid_size(*x2, 0.75)
    self_attn = sorted({(q, kv) for name, q, kv in log if name.endswith("attn1.processor")})
    assert self_attn == sorted({(n1, k1[0] * k1[1]), (n2, k2[0] * k2[1]), (n4, n4)})
    assert k1 == (-(-x1[0] // 2), -(-x1[1] // 2))


def test_merge_crossattn_and_mlp_use_the_plan_and_work_with_chunked_feed_forward():
    unet = tiny_unet()
    x, t, e = inputs(12, 12)
    ref = run(unet, x, t, e)
    log = install_recorders(unet)
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True, merge_mlp=True)
    calls = []
    hooks = [b.ff.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
             for name, b in unet.named_modules() if name in dict(patched_blocks(unet))]
    out = run(unet, x, t, e)
    assert {(q, kv) for n, q, kv in log if n.startswith("down_blocks.0") and "attn2" in n} == {(72, 7)}
    assert calls == [72, 72, 72]  # the ff hooks registered after ours see merged tokens
    for hk in hooks:
        hk.remove()
    patched = [b for name, b in unet.named_modules() if name in dict(patched_blocks(unet))]
    for b in patched:  # feed-forward chunks along the tokens are left unmerged, and still work
        b.set_chunk_feed_forward(8, dim=1)
    chunked = run(unet, x, t, e)
    for b in patched:
        b.set_chunk_feed_forward(None, 0)
    assert not torch.equal(chunked, out)
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True, merge_mlp=False)
    # chunking the feed-forward changes only the BLAS call shapes (0 difference on the project's CPU)
    torch.testing.assert_close(chunked, run(unet, x, t, e), rtol=0, atol=2e-6)
    remove_tome_sd(unet)
    assert torch.equal(run(unet, x, t, e), ref)


@pytest.mark.parametrize("mode", ["merge", "downsample"])
def test_grids_smaller_than_a_window_run_unmerged(mode):
    unet = tiny_unet()
    x, t, e = inputs(5, 3)  # x4 level: 2x1 tokens, no full 2x2 window
    ref = run(unet, x, t, e)
    log = install_recorders(unet)
    apply_tome_sd(unet, ratio=0.5, mode=mode, max_downsample=4)
    out = run(unet, x, t, e)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert ("mid_block.attentions.0.transformer_blocks.0.attn1.processor", 2, 2) in log
    assert merge2d.num_merged(2, 0.5, 2, 2, 2, 1) == 0


def test_keyword_call_and_seeded_determinism():
    unet = tiny_unet()
    x, t, e = inputs()
    apply_tome_sd(unet, ratio=0.5, mode="merge", seed=5)
    a = run(unet, x, t, e)
    with torch.no_grad():
        b = unet(sample=x, timestep=t, encoder_hidden_states=e).sample
    assert torch.equal(a, b)
    assert torch.equal(run(unet, x, t, e), a)  # no state carried from call to call
    apply_tome_sd(unet, ratio=0.5, mode="merge", seed=5)
    assert torch.equal(run(unet, x, t, e), a)
    for dtype in ("float32", "bfloat16"):  # the matching matmul's dtype only changes which tokens pair up
        apply_tome_sd(unet, ratio=0.5, mode="merge", seed=5, similarity_dtype=dtype)
        out = run(unet, x, t, e)
        assert torch.equal(run(unet, x, t, e), out) and torch.isfinite(out).all()


def test_no_plan_outlives_a_call_and_a_second_concurrent_call_is_refused():
    import threading

    unet = tiny_unet()
    x, t, e = inputs(12, 12)
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True)
    solo = run(unet, x, t, e)
    state = unet._visiontools_tome_sd
    assert state.slots and all(s.plan is None for s in state.slots) and state.ctx.hw is None

    entered, go, result = threading.Event(), threading.Event(), {}

    class Blocking(AttnProcessor2_0):
        def __call__(self, *args, **kw):
            entered.set()
            go.wait(30)
            return super().__call__(*args, **kw)

    remove_tome_sd(unet)
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(Blocking())
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True)
    worker = threading.Thread(target=lambda: result.setdefault("out", run(unet, x, t, e)))
    worker.start()
    assert entered.wait(30)
    with pytest.raises(RuntimeError, match="already running"):
        run(unet, x, t, e)
    go.set()
    worker.join(30)
    assert torch.equal(result["out"], solo)  # the running call was not disturbed by the refused one
    assert torch.equal(run(unet, x, t, e), solo)


def test_sdxl_style_unet_is_patched_by_default_and_warns_when_nothing_is():
    unet = tiny_sdxl_unet()
    x, t, e = inputs(12, 10)
    cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    ref = run(unet, x, t, e, added_cond_kwargs=cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_tome_sd(unet, ratio=0.5)
    blocks = patched_blocks(unet)
    assert len(blocks) == 3 and {ds for _, ds in blocks} == {2}  # 1 down + 2 up transformer blocks at x2
    out = run(unet, x, t, e, added_cond_kwargs=cond)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    with pytest.warns(UserWarning, match="patched 0 of"):
        apply_tome_sd(unet, ratio=0.5, max_downsample=1)
    assert torch.equal(run(unet, x, t, e, added_cond_kwargs=cond), ref)
    remove_tome_sd(unet)
    assert torch.equal(run(unet, x, t, e, added_cond_kwargs=cond), ref)


@pytest.mark.parametrize("mode", ["merge", "downsample"])
def test_torch_compile_fullgraph(mode):
    unet = tiny_unet()
    x, t, e = inputs()
    apply_tome_sd(unet, ratio=0.5, mode=mode)
    ref = run(unet, x, t, e)
    compiled = torch.compile(unet, fullgraph=True, backend="eager")  # graph breaks raise here
    torch._dynamo.reset()
    assert torch.equal(run(compiled, x, t, e), ref)  # the eager backend runs the same kernels
    assert torch.equal(run(compiled, x, torch.tensor(499), e), run(unet, x, torch.tensor(499), e))


def test_errors():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="ratio"):
        apply_tome_sd(unet, ratio=0.8)  # > 1 - 1/(2*2)
    with pytest.raises(ValueError, match="ratio"):
        apply_tome_sd(unet, ratio=-0.1)
    with pytest.raises(ValueError, match="ratio"):
        apply_tome_sd(unet, ratio=1.0, mode="downsample")
    with pytest.raises(TypeError, match="ratio"):
        apply_tome_sd(unet, ratio="0.5")
    with pytest.raises(ValueError, match="mode"):
        apply_tome_sd(unet, mode="prune")
    with pytest.raises(ValueError, match="max_downsample"):
        apply_tome_sd(unet, max_downsample=3)
    with pytest.raises(ValueError, match="mode='merge' only"):
        apply_tome_sd(unet, mode="downsample", merge_mlp=True)
    with pytest.raises(ValueError, match="sx"):
        apply_tome_sd(unet, sx=0)
    with pytest.raises(ValueError, match="similarity_dtype"):
        apply_tome_sd(unet, similarity_dtype="int8")
    with pytest.raises(ValueError, match="downsample_method"):
        apply_tome_sd(unet, mode="downsample", downsample_method="lanczos")
    with pytest.raises(ValueError, match=r"method='prune' is not offered for diffusion models.*method='tofu'"):
        apply_tome_sd(unet, method="prune")
    with pytest.raises(ValueError, match=r"method must be one of \('tome', 'tofu', 'pitome'\)"):
        apply_tome_sd(unet, method="evit")
    with pytest.raises(ValueError, match="method='pitome' applies to mode='merge' only"):
        apply_tome_sd(unet, mode="downsample", method="pitome")
    assert not is_patched(unet)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        apply_tome_sd(torch.nn.Linear(2, 2))
    from diffusers import UNet2DModel

    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        apply_tome_sd(UNet2DModel(sample_size=8, block_out_channels=(32, 32), norm_num_groups=8,
                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))
    no_attn = tiny_unet(down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                        mid_block_type="UNetMidBlock2D")
    with pytest.raises(TypeError, match="no transformer blocks"):
        apply_tome_sd(no_attn)
    apply_tome_sd(unet)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    with pytest.raises(RuntimeError, match="outside a forward"):
        block(torch.randn(1, 64, 32), encoder_hidden_states=torch.randn(1, 7, 32))


def test_fused_qkv_projections():
    """Merge mode wraps diffusers' fused q/k/v processor; downsample mode, which needs a separate
    key/value projection, refuses it with the fix in the message and leaves the UNet unpatched."""
    unet = tiny_unet()
    x, t, e = inputs(12, 10)
    ref = run(unet, x, t, e)
    unet.fuse_qkv_projections()
    # the same dot products, only the BLAS blocking may differ: a few float32 ulps of unit-scale outputs
    # (0 on the project's CPU)
    torch.testing.assert_close(run(unet, x, t, e), ref, rtol=0, atol=2e-6)
    apply_tome_sd(unet, ratio=0.0)
    torch.testing.assert_close(run(unet, x, t, e), ref, rtol=0, atol=2e-6)
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True)
    fused_merged = run(unet, x, t, e)
    assert not torch.allclose(fused_merged, ref, atol=1e-4)
    remove_tome_sd(unet)
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        apply_tome_sd(unet, ratio=0.5, mode="downsample")
    assert not is_patched(unet)
    unet.unfuse_qkv_projections()
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True)
    torch.testing.assert_close(run(unet, x, t, e), fused_merged, rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["merge", "downsample"])
def test_processors_replaced_after_patching_warn_once(mode):
    unet = tiny_unet()
    x, t, e = inputs(12, 12)
    ref = run(unet, x, t, e)
    apply_tome_sd(unet, ratio=0.5, mode=mode)
    patched = run(unet, x, t, e)
    unet.set_attn_processor(AttnProcessor2_0())  # drops our wrappers
    n = len(patched_blocks(unet))
    with pytest.warns(UserWarning, match=rf"{n} of {n} patched attention processors were replaced"):
        out = run(unet, x, t, e)
    assert torch.equal(out, ref)  # what the warning says: these attentions run without ToMe
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(unet, x, t, e)  # once per patch, not every step
        apply_tome_sd(unet, ratio=0.5, mode=mode)
        assert torch.equal(run(unet, x, t, e), patched)


@pytest.mark.parametrize("mode", ["merge", "downsample"])
def test_training_works_but_gradient_checkpointing_is_refused(mode):
    unet = tiny_unet().train()
    x, t, e = inputs(12, 12)
    apply_tome_sd(unet, ratio=0.5, mode=mode)
    unet(x, t, e).sample.square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight.grad.abs().sum() > 0

    unet.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        unet(x, t, e)
    state = unet._visiontools_tome_sd
    assert state.ctx.hw is None and all(s.plan is None for s in state.slots)
    unet.eval()
    expected = run(unet, x, t, e)  # under no_grad nothing is recomputed, so it runs
    unet.disable_gradient_checkpointing()
    assert torch.equal(run(unet, x, t, e), expected)


# ------------------------------------------------------------------------------------- pipeline


def tiny_sd_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=16)).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=tiny_unet(),
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = text_encoder(ids).last_hidden_state  # (prompt, negative prompt); no tokenizer offline
    return pipe, embeds[:1], embeds[1:]


def test_pipeline_generates_with_each_mode_deterministically():
    pipe, pos, neg = tiny_sd_pipeline()

    def generate(seed=0):
        return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=40, width=56, num_inference_steps=2,
                    guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(seed)).images

    ref = generate()
    assert ref.shape == (1, 40, 56, 3)
    images = {}
    for mode in ("merge", "downsample"):
        apply_tome_sd(pipe, ratio=0.5, mode=mode)
        assert len(patched_blocks(pipe)) == 3
        images[mode] = generate()
        assert images[mode].shape == ref.shape and (images[mode] >= 0).all() and (images[mode] <= 1).all()
        assert not (images[mode] == ref).all()
        assert (generate() == images[mode]).all()  # same seed, same image, without re-applying
        remove_tome_sd(pipe)
    assert not (images["merge"] == images["downsample"]).all()
    assert (generate() == ref).all()


# ------------------------------------------------------------------------------------- benchmark


def test_bench_sd_tiny_smoke(tmp_path):
    import argparse
    import json

    from visiontools.bench import sd as bench_sd

    parser = argparse.ArgumentParser()
    bench_sd.add_arguments(parser)
    out = tmp_path / "sd.json"
    args = parser.parse_args(["--tiny", "--resolutions", "72", "--candidates", "tomesd@0.5", "merge@0.5",
                              "downsample@0.75", "tofu@0.5", "pitome@0.5", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                              "--similarity-dtype", "float32", "--out-json", str(out), "--out-md", str(tmp_path / "sd.md")])
    assert bench_sd.run(args) == 0
    md = (tmp_path / "sd.md").read_text()
    assert "| 9² (72²) | downsample | 0.75 |" in md and "CPU" in md
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["similarity_dtype"] == "float32"
    assert [(r["method"], r["ratio"]) for r in rows] == [("sdpa", 0), ("tomesd", 0.5), ("merge", 0.5),
                                                         ("downsample", 0.75), ("tofu", 0.5), ("pitome", 0.5)]
    assert rows[0]["rel_l2"] == 0 and rows[0]["flop_ratio"] == 1
    for r in rows[1:]:
        assert r["flop_ratio"] > 1 and 0 < r["rel_l2"] < 1 and r["median_s"] > 0
    for r in rows:  # time inside the patched-level blocks: part of each call, one value per timed round
        assert len(r["blocks_times_s"]) == 1 and 0 < r["blocks_s"] < r["median_s"]
    # tomesd, our merge mode and its ToFu and PiToMe variants do the same work, with different outputs
    assert rows[1]["flops"] == rows[2]["flops"] == rows[4]["flops"] == rows[5]["flops"]
    assert len({rows[i]["rel_l2"] for i in (2, 4, 5)}) == 3
    with pytest.raises(ValueError, match="METHOD@RATIO"):
        bench_sd.run(parser.parse_args(["--tiny", "--candidates", "merge"]))
    with pytest.raises(ValueError, match="merge ratios must be in"):  # downsample allows up to < 1
        bench_sd.run(parser.parse_args(["--tiny", "--candidates", "downsample@0.9", "merge@0.9"]))


# ------------------------------------------------------------------ guards (issue 25): per-call seeds, plan lifetime

def test_fractional_timesteps_get_their_own_per_call_seeds(monkeypatch):
    """Schedulers with fractional timesteps (Euler, DPM++, Karras sigmas: close together near t=0)
    must not share destinations between steps: every distinct timestep seeds its own draw, the
    same timestep the same one (int or float)."""
    unet = tiny_unet()
    x, _, e = inputs(12, 12, batch=1)
    plans = record_plans(monkeypatch)
    apply_tome_sd(unet, ratio=0.5, seed=3)
    timesteps = [500.0, 500.25, 500.5, 0.0, 0.03, 0.0625, 999.0, 999.03, 14.6, 14.62]

    def seeds(t):
        plans.clear()
        run(unet, x, torch.tensor(t), e)
        assert len(plans) == 3
        return [int(p["seed"]) for p in plans], [p["plan"].dst_pos for p in plans]

    got = {t: seeds(t) for t in timesteps}
    first = [s[0] for s, _ in got.values()]
    assert len(set(first)) == len(timesteps), dict(zip(timesteps, first))
    for t in timesteps:
        assert seeds(t)[0] == got[t][0]  # deterministic
        assert len(set(got[t][0])) == 3  # and different for each block of the call
    assert seeds(500)[0] == got[500.0][0]  # an int timestep seeds like the same float
    # a different seed means different destinations (for most of the windows, with 36 per block)
    assert not torch.equal(got[0.0][1][0], got[0.03][1][0]) and not torch.equal(got[999.0][1][0], got[999.03][1][0])


def test_a_blocks_plan_is_cleared_when_that_block_returns():
    """Each patched block has its merge plan while it runs and none once it has returned: when a
    block starts, no other block still holds one (not only at the end of the UNet call)."""
    unet = tiny_unet()
    x, t, e = inputs(12, 12)
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True, merge_mlp=True)
    state = unet._visiontools_tome_sd
    names = [n for n, _ in patched_blocks(unet)]
    assert len(names) == len(state.slots) == 3
    events = []

    def on_start(i):
        def hook(module, args):
            events.append(("start", i, [s.plan is not None for s in state.slots]))
        return hook

    def on_end(i):
        def hook(module, args, out):
            events.append(("end", i, [s.plan is not None for s in state.slots]))
        return hook

    hooks = []
    for i, name in enumerate(names):  # registered after the patch's own hooks, so they run after them
        block = unet.get_submodule(name)
        hooks += [block.register_forward_pre_hook(on_start(i)), block.register_forward_hook(on_end(i))]
    seen_in_attn = []
    block0 = unet.get_submodule(names[0])
    hooks.append(block0.attn1.register_forward_pre_hook(
        lambda m, a: seen_in_attn.append(state.slots[0].plan is not None)))
    run(unet, x, t, e)
    for h in hooks:
        h.remove()
    assert seen_in_attn == [True]
    assert [(kind, i) for kind, i, _ in events] == [(k, i) for i in range(3) for k in ("start", "end")]
    for kind, i, held in events:
        expected = [kind == "start" and j == i for j in range(3)]
        assert held == expected, (kind, i, held)


# ------------------------------------------------------------------ methods on the grid: tofu, pitome


def test_merge2d_reduce_rules_keep_and_mlerp():
    torch.manual_seed(0)
    x = torch.randn(2, 8 * 8, 16)
    keep = merge2d.plan_merge_2d(x, 8, 8, 24, seed=3, reduce="keep")
    mean, mlerp = keep._replace(reduce="mean"), keep._replace(reduce="mlerp")
    n_unm = x.shape[1] - keep.dst_pos.numel() - keep.r
    yk, ym, yl = (merge2d.merge_2d(p, x) for p in (keep, mean, mlerp))
    assert yk.shape == ym.shape == yl.shape == (2, 64 - 24, 16)
    # keep: the merged sources are pruned, every destination keeps its own value
    assert torch.equal(yk[:, n_unm:], x[:, keep.dst_pos]) and torch.equal(yk[:, :n_unm], ym[:, :n_unm])
    # mlerp: the mean's direction at the largest norm of the group (averaging alone shrinks it)
    group_max = torch.zeros(2, 40).scatter_reduce(1, keep.index, x.norm(dim=-1), "amax", include_self=False)
    torch.testing.assert_close(yl.norm(dim=-1), group_max)
    torch.testing.assert_close(torch.nn.functional.normalize(yl, dim=-1), torch.nn.functional.normalize(ym, dim=-1))
    assert (ym.norm(dim=-1) < group_max - 1e-3).sum() >= 20
    assert torch.equal(merge2d.merge_2d(keep, x, "mean"), ym)  # an explicit mode overrides the plan's
    with pytest.raises(ValueError, match="reduce must be one of"):
        merge2d.plan_merge_2d(x, 8, 8, 24, reduce="max")


def test_energy_match_merges_redundant_sources_not_the_best_matched():
    # source 0 matches destination 0 exactly and nothing else (isolated); source 1 is fairly similar
    # to every destination (a dense region); source 2 to none
    scores = torch.tensor([[[1.0, -0.9, -0.9, -0.9], [0.8, 0.8, 0.8, 0.8], [-0.5, -0.5, -0.5, -0.5]]])
    from visiontools.tome.merge import match_scores

    assert match_scores(scores, 1)[1].tolist() == [[0]]  # ToMe: the best match
    unm, src, dst = merge2d.energy_match(scores, 1, margin=0.5)
    assert src.tolist() == [[1]] and dst.tolist() == [[0]] and unm.tolist() == [[0, 2]]
    # in general: the r sources of highest mean ELU(cos - margin), each to its most similar destination
    torch.manual_seed(1)
    scores = torch.rand(2, 30, 10) * 2 - 1
    unm, src, dst = merge2d.energy_match(scores, 12, margin=0.3)
    energy = torch.nn.functional.elu(scores - 0.3).mean(-1)
    assert torch.equal(src.sort(1)[0], energy.topk(12, dim=1)[1].sort(1)[0])
    assert torch.equal(dst, scores.argmax(-1).gather(1, src))
    assert torch.equal(torch.cat([unm, src], 1).sort(1)[0], torch.arange(30).expand(2, -1))
    # half-precision scores (the ELU runs in fp16, the mean in float32): nearly the same sources
    scores = torch.rand(2, 3000, 500) * 2 - 1
    src32 = merge2d.energy_match(scores, 1000, margin=0.3)[1]
    unm16, src16, dst16 = merge2d.energy_match(scores.half(), 1000, margin=0.3)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 1000 for a, b in zip(src32, src16)]
    assert min(overlap) > 0.97 and src16.dtype == torch.int64
    assert torch.equal(dst16, scores.half().argmax(-1).gather(1, src16))


@pytest.mark.parametrize("method", ["tofu", "pitome"])
def test_methods_on_a_unet_same_tokens_per_attention_rules_by_block(method, monkeypatch):
    unet = tiny_unet()
    x, t, e = inputs()
    ref = run(unet, x, t, e)
    log = install_recorders(unet)
    original_plan = merge2d.plan_merge_2d
    plans = record_plans(monkeypatch)
    apply_tome_sd(unet, ratio=0.5, max_downsample=2)
    tome = run(unet, x, t, e)
    tome_plans, tome_log = list(plans), list(log)
    plans.clear(), log.clear()
    apply_tome_sd(unet, ratio=0.5, max_downsample=2, method=method)
    out = run(unet, x, t, e)
    n = len(plans)
    assert n == len(tome_plans) == 6 and log == tome_log  # same blocks, same tokens in every attention: same FLOPs
    assert [p["plan"].r for p in plans] == [p["plan"].r for p in tome_plans]
    # ToMe-SD's matching on each block's own input (the same input only in the first block)
    same_src = [torch.equal(p["plan"].src_pos, original_plan(p["metric"], p["h"], p["w"], p["plan"].r, p["sx"],
                                                             p["sy"], p["seed"], p["sim_dtype"]).src_pos) for p in plans]
    if method == "tofu":  # ToMe's matching; pruned in blocks 0..n//2, MLERP after
        assert [p["reduce"] for p in plans] == ["keep"] * (n // 2 + 1) + ["mlerp"] * (n - n // 2 - 1)
        assert all(same_src) and [p["energy_margin"] for p in plans] == [None] * n
        assert torch.equal(plans[0]["plan"].src_pos, tome_plans[0]["plan"].src_pos)
    else:  # other sources (by energy), averaged; margin 0.75 falling linearly over the patched blocks
        assert [p["reduce"] for p in plans] == ["mean"] * n and not any(same_src)
        assert [p["energy_margin"] for p in plans] == pytest.approx([0.75 - 0.75 * i / n for i in range(n)])
    assert torch.isfinite(out).all() and not torch.equal(out, tome)
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.5
    assert visiontools_apply(unet, method) is unet
    remove_tome_sd(unet)
    assert torch.equal(run(unet, x, t, e), ref)


def visiontools_apply(unet, method):
    """The one-line entry point takes ``method=`` for UNets too."""
    import visiontools

    return visiontools.apply_tome(unet, ratio=0.5, method=method)


# ------------------------------------------------------------------------------------ budgets


def test_flops_budget_picks_the_smallest_ratio_that_meets_it_at_the_given_size():
    from visiontools.timing import count_flops

    unet = tiny_unet()
    x, t, e, _ = sd_patch.unet_example_inputs(unet.config, 12, 20)  # what the solve counts: 96x160 px, 77 text tokens

    def fraction(ratio):  # counted on the real UNet, patched by ratio
        apply_tome_sd(unet, ratio=ratio, max_downsample=2)
        return count_flops(lambda: unet(x, t, e)) / base

    base = count_flops(lambda: unet(x, t, e))
    apply_tome_sd(unet, flops=0.9, size=(96, 160), max_downsample=2)
    b = unet.tome_budget
    assert b.size == (96, 160) and b.target_flops == 0.9 and b.target_speedup is None
    assert getattr(unet, sd_patch._ATTR).config.ratio == b.ratio and 0 < b.ratio < 0.75
    budgeted = run(unet, x, t, e)
    assert fraction(b.ratio - 0.75 / 256) > 0.9  # one bisection step less does not meet it
    assert fraction(b.ratio) == pytest.approx(b.flop_fraction, rel=1e-9) and b.flop_fraction <= 0.9
    assert torch.equal(run(unet, x, t, e), budgeted)  # the budget's patch is the patch by its ratio
    assert b.predicted_speedup == pytest.approx(1 / b.flop_fraction)


def test_speedup_budget_default_size_downsample_mode_and_errors():
    import visiontools

    unet = tiny_unet()  # sample_size 16: the default size is 128 px
    apply_tome_sd(unet, speedup=1.05, mode="downsample", max_downsample=2)
    b = unet.tome_budget
    assert b.size == (128, 128) and b.target_speedup == 1.05 and b.flop_fraction <= 1 / 1.05 and 0 < b.ratio < 1
    apply_tome_sd(unet, ratio=0.5)  # re-applying with a ratio drops the budget
    assert not hasattr(unet, "tome_budget")
    visiontools.apply_tome(unet, flops=0.95, size=(96, 160))
    assert unet.tome_budget.size == (96, 160) and unet.tome_budget.flop_fraction <= 0.95
    remove_tome_sd(unet)
    assert not hasattr(unet, "tome_budget") and not is_patched(unet)
    for kw, message in [(dict(ratio=0.5, flops=0.9), "ratio or a budget"),
                        (dict(flops=0.9, speedup=1.2), "exactly one of flops="),
                        (dict(flops=1.5), "flops is the fraction"),
                        (dict(speedup=0.5), "speedup must be >= 1"),
                        (dict(flops=0.2), r"out of reach: the largest ratio \(0.75\) keeps .* at 128x128 pixels with "
                                          r"max_downsample=None; patch more levels"),
                        (dict(size=256), "size= is what a budget is counted at"),
                        (dict(flops=0.9, size=(0, 64)), "size is the image size in pixels"),
                        (dict(flops=0.9, size="512"), "size is the image size in pixels")]:
        with pytest.raises(ValueError, match=message):
            apply_tome_sd(unet, **kw)
    assert not is_patched(unet)
