"""ToMe / token downsampling for diffusers diffusion transformers (patches/diffusers_dit.py):
SD3/3.5, PixArt and Flux, on tiny random configs (offline)."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

import visiontools
from visiontools.patches import diffusers_dit as dit
from visiontools.patches.diffusers_dit import apply_tome_dit, is_patched, patched_blocks, remove_tome_dit

torch.set_num_threads(min(2, torch.get_num_threads()))

H, W, T = 16, 12, 5  # SD3/PixArt latent (patch 2 -> 8x6 grid); text tokens
FH, FW = 8, 6  # Flux packed grid


def tiny(kind: str, seed: int = 0):
    """A tiny random transformer: ``sd3``, ``sd35`` (dual attention + rms qk-norm), ``pixart`` or ``flux``."""
    torch.manual_seed(seed)
    if kind in ("sd3", "sd35"):
        extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if kind == "sd35" else {}
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4, **extra).eval()
    if kind == "pixart":
        return PixArtTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16,
                                        caption_channels=16, norm_type="ada_norm_single",
                                        num_embeds_ada_norm=1000).eval()
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()


def flux_ids(h=FH, w=FW):
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    return ids.reshape(-1, 3)


def inputs(kind: str, t=500.0, seed=1, batch=2):
    """Keyword inputs of one transformer call (smooth latents, as a denoiser sees them mid-way)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, T, 16, generator=g)
    ts = torch.full((batch,), t)
    if kind == "flux":
        x = F.interpolate(torch.randn(batch, 16, 3, 3, generator=g), size=(FH, FW), mode="bilinear")
        return dict(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=text,
                    pooled_projections=torch.randn(batch, 8, generator=g), timestep=ts / 1000, img_ids=flux_ids(),
                    txt_ids=torch.zeros(T, 3))
    x = F.interpolate(torch.randn(batch, 4, 4, 3, generator=g), size=(H, W), mode="bilinear")
    if kind == "pixart":
        return dict(hidden_states=x, encoder_hidden_states=text, timestep=ts,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=torch.randn(batch, 8, generator=g),
                timestep=ts)


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


KINDS = ["sd3", "sd35", "pixart", "flux"]
MODES = ["merge", "downsample"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_ratio_zero_is_exact_and_remove_restores_bit_for_bit(kind, mode):
    model = tiny(kind)
    kw = inputs(kind)
    ref = run(model, kw)
    procs = dict(model.attn_processors)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    visiontools.apply_tome(model, ratio=0.0, mode=mode)
    assert is_patched(model) and torch.equal(run(model, kw), ref)
    visiontools.apply_tome(model, ratio=0.5, mode=mode)  # re-applying replaces the patch
    assert not torch.equal(run(model, kw), ref)
    visiontools.remove_tome(model)
    assert not is_patched(model) and torch.equal(run(model, kw), ref)
    assert all(model.attn_processors[k] is p for k, p in procs.items())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="not ToMe-patched"):
        remove_tome_dit(model)


@pytest.mark.parametrize("kind", ["sd3", "sd35", "flux"])
def test_own_processor_matches_diffusers_when_nothing_is_reduced(kind):
    """Downsampling to the same grid runs this adapter's processor end to end without dropping a
    token: it must reproduce diffusers' processors (projections, qk-norms, RoPE, stream order)."""
    model = tiny(kind)
    kw = inputs(kind)
    ref = run(model, kw)
    apply_tome_dit(model, ratio=0.01, mode="downsample")  # kv grid rounds up to the full grid
    out = run(model, kw)
    assert rel(out, ref) < 1e-5


class KeyCounter:
    """Records (query tokens, key tokens) of every SDPA call while active."""

    def __init__(self, monkeypatch):
        self.calls = []
        sdpa = F.scaled_dot_product_attention

        def counting(*args, **kw):
            q, k = (args + (kw.get("query"), kw.get("key")))[:2] if len(args) >= 2 else (kw["query"], kw["key"])
            self.calls.append((q.shape[-2], k.shape[-2]))
            return sdpa(*args, **kw)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)


def expected_calls(kind: str, mode: str, ratio: float) -> list[tuple[int, int]]:
    """(query, key) token counts each attention of the tiny model must see, text tokens always full."""
    h, w = (FH, FW) if kind == "flux" else (H // 2, W // 2)
    n = h * w
    if mode == "merge":
        q = k = n - int(n * ratio)
    else:
        kh, kw = dit.merge2d.kv_grid_size(h, w, ratio)
        q, k = n, kh * kw
    if kind == "pixart":  # self-attention (image only), then cross-attention (all queries) to the T text tokens
        return [(q, k), (n, T)] * 2
    if kind == "sd35":  # joint attention, then the image-only attn2; then a plain joint block
        return [(q + T, k + T), (q, k), (q + T, k + T)]
    return [(q + T, k + T)] * (3 if kind == "flux" else 2)  # flux: 1 double + 2 single (text prefix kept)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_image_tokens_reduced_text_untouched_output_close(kind, mode, monkeypatch):
    model = tiny(kind)
    kw = inputs(kind)
    ref = run(model, kw)
    apply_tome_dit(model, ratio=0.5, mode=mode)
    counter = KeyCounter(monkeypatch)
    out = run(model, kw)
    assert counter.calls == expected_calls(kind, mode, 0.5)
    assert out.shape == ref.shape and 0 < rel(out, ref) < 0.1
    assert torch.equal(run(model, kw), out)  # deterministic per call


def test_text_stream_gets_all_text_tokens():
    """The context projections of SD3 and Flux see every text token, and Flux's single-stream
    blocks project the full text prefix, while the image tokens they see are merged."""
    for kind in ("sd3", "flux"):
        model = tiny(kind)
        seen = []
        for name, m in model.named_modules():
            if name.endswith(("add_k_proj", "attn.to_k")):
                m.register_forward_hook(lambda mod, a, o, name=name: seen.append((name, a[0].shape[1])))
        apply_tome_dit(model, ratio=0.5, mode="merge")
        run(model, inputs(kind))
        n = FH * FW if kind == "flux" else (H // 2) * (W // 2)
        merged = n - n // 2
        assert all(c == T for nm, c in seen if "add_k_proj" in nm) and any("add_k_proj" in nm for nm, _ in seen)
        img = [c for nm, c in seen if "to_k" in nm]
        if kind == "flux":  # single blocks: text prefix and merged image projected separately
            assert img == [merged, merged, T, merged, T]
        else:
            assert img == [merged, merged]


def test_merge_plan_is_seeded_by_the_timestep():
    model = tiny("sd3")
    apply_tome_dit(model, ratio=0.5, mode="merge")
    seen = []  # the destinations block 0 merges into, recorded while the block runs (state of the current patch)
    model.transformer_blocks[0].attn.register_forward_hook(
        lambda m, a, o: seen.append(getattr(model, dit._ATTR).slots[0].plan.dst_pos))
    for t in (500, 500, 499):
        run(model, inputs("sd3", t=t))
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    apply_tome_dit(model, ratio=0.5, mode="merge", seed=1)
    run(model, inputs("sd3", t=500))
    assert not torch.equal(seen[0], seen[3])
    apply_tome_dit(model, ratio=0.5, mode="merge", use_rand=False)
    run(model, inputs("sd3", t=499))
    grid = torch.arange(48).reshape(8, 6)
    assert torch.equal(seen[4], grid[::2, ::2].flatten())  # top-left of each 2x2 window


def test_flux_rope_rules_all_run_and_dropping_positions_is_worse(monkeypatch):
    model = tiny("flux")
    kw = inputs("flux")
    ref = run(model, kw)
    errs = {}
    for rule in dit.ROPE_RULES:
        apply_tome_dit(model, ratio=0.5, rope=rule)
        errs[rule] = rel(run(model, kw), ref)
    assert len(set(errs.values())) == len(errs)  # each rule is wired
    real = dit._merged_rope
    no_position = lambda p, c, s, r: tuple(x * 0 + i for x, i in zip(real(p, c, s, r), (1, 0)))  # noqa: E731
    monkeypatch.setattr(dit, "_merged_rope", no_position)
    apply_tome_dit(model, ratio=0.5, rope="mean")  # merged tokens without positions
    assert rel(run(model, kw), ref) > 1.3 * max(errs.values())


def test_blocks_selects_what_is_patched(monkeypatch):
    model = tiny("flux")
    apply_tome_dit(model, ratio=0.5, mode="downsample", blocks=[0, "single_transformer_blocks.1"])
    assert patched_blocks(model) == ["transformer_blocks.0", "single_transformer_blocks.1"]
    counter = KeyCounter(monkeypatch)
    run(model, inputs("flux"))
    n, (kh, kw) = FH * FW, dit.merge2d.kv_grid_size(FH, FW, 0.5)
    assert [k for _, k in counter.calls] == [kh * kw + T, n + T, kh * kw + T]


@pytest.mark.parametrize("kind", ["sd3", "pixart"])
@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(kind, mode):
    model = tiny(kind)
    kw = inputs(kind)
    apply_tome_dit(model, ratio=0.5, mode=mode)
    ref = run(model, kw)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # graph breaks raise here
    torch._dynamo.reset()
    assert torch.equal(run(compiled, kw), ref)
    assert torch.equal(run(compiled, inputs(kind, t=499)), run(model, inputs(kind, t=499)))


def test_torch_compile_flux():
    """Flux reads its grid from img_ids (one graph break); the compiled model matches eager."""
    model = tiny("flux")
    kw = inputs("flux")
    apply_tome_dit(model, ratio=0.5, mode="merge")
    ref = run(model, kw)
    torch._dynamo.reset()
    assert torch.equal(run(torch.compile(model, backend="eager"), kw), ref)


def test_a_second_concurrent_call_is_refused():
    model = tiny("sd3")
    kw = inputs("sd3")
    apply_tome_dit(model, ratio=0.5)
    solo = run(model, kw)
    entered, go, result = threading.Event(), threading.Event(), {}

    def block_once(module, args, kwargs):
        if not entered.is_set():
            entered.set()
            go.wait(30)
    hook = model.transformer_blocks[0].register_forward_pre_hook(block_once, with_kwargs=True)
    worker = threading.Thread(target=lambda: result.setdefault("out", run(model, kw)))
    worker.start()
    assert entered.wait(30)
    with pytest.raises(RuntimeError, match="already running"):
        run(model, kw)
    go.set()
    worker.join(30)
    hook.remove()
    assert torch.equal(result["out"], solo) and torch.equal(run(model, kw), solo)
    state = getattr(model, dit._ATTR)
    assert state.ctx.hw is None and all(s.plan is None for s in state.slots)


def test_errors():
    model = tiny("sd3")
    with pytest.raises(ValueError, match="mode must be one of"):
        visiontools.apply_tome(model, ratio=0.5, mode="prune")
    with pytest.raises(ValueError, match="ratio"):
        visiontools.apply_tome(model, ratio=1.0, mode="downsample")
    with pytest.raises(ValueError, match="ratio"):
        visiontools.apply_tome(model, ratio=-0.1)
    with pytest.raises(ValueError, match="rope must be one of"):
        apply_tome_dit(model, rope="xy")
    with pytest.raises(ValueError, match="out of range"):
        apply_tome_dit(model, blocks=[7])
    with pytest.raises(ValueError, match="no block named"):
        apply_tome_dit(model, blocks=["blocks.0"])
    with pytest.raises(TypeError, match="unexpected keyword 'max_downsample'"):
        visiontools.apply_tome(model, max_downsample=2)
    with pytest.raises(TypeError, match="SD3Transformer2DModel, PixArtTransformer2DModel, FluxTransformer2DModel"):
        apply_tome_dit(torch.nn.Linear(2, 2))
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        apply_tome_dit(model)
    assert not is_patched(model)


def tiny_pipeline(kind: str):
    """A pipeline of scheduler + tiny VAE + tiny transformer (no text encoders: the call passes
    prompt embeddings) and the keyword arguments of a 2-step call returning latents."""
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           PixArtAlphaPipeline, StableDiffusion3Pipeline)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    g = torch.Generator().manual_seed(2)
    e, pooled = torch.randn(1, T, 16, generator=g), torch.randn(1, 8, generator=g)
    common = dict(num_inference_steps=2, height=16, width=24, output_type="latent")
    if kind == "pixart":
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tiny("pixart"),
                                   scheduler=DPMSolverMultistepScheduler())
        mask = torch.ones(1, T)
        return pipe, dict(prompt_embeds=e, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=-e,
                          negative_prompt_attention_mask=mask, use_resolution_binning=False, **common)
    none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    if kind == "flux":
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=tiny("flux"), **none)
        return pipe, dict(prompt_embeds=e, pooled_prompt_embeds=pooled, **common)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=tiny("sd3"),
                                    text_encoder_3=None, tokenizer_3=None, **none)
    return pipe, dict(prompt_embeds=e, pooled_prompt_embeds=pooled, negative_prompt_embeds=-e,
                      negative_pooled_prompt_embeds=-pooled, **common)


@pytest.mark.parametrize("kind,mode", [("pixart", "merge"), ("flux", "downsample"), ("sd3", "merge")])
def test_pipeline_is_patched_through_its_transformer(kind, mode):
    pipe, kw = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(generator=torch.Generator().manual_seed(0), **kw).images
    ref = generate()
    visiontools.apply_tome(pipe, ratio=0.5, mode=mode)
    assert is_patched(pipe) and is_patched(pipe.transformer) and len(patched_blocks(pipe)) >= 2
    out = generate()
    assert out.shape == ref.shape and 0 < rel(out, ref) < 0.1 and torch.equal(generate(), out)
    visiontools.remove_tome(pipe)
    assert torch.equal(generate(), ref)


def test_dit_and_unet_settings_share_one_definition_and_one_check():
    """Both adapters' settings derive from one keyword-only dataclass and pass the same check."""
    import dataclasses

    from visiontools.patches import diffusers as sd

    shared = [f.name for f in dataclasses.fields(sd.ToMe2dConfig)]
    for cls in (dit.ToMeDiTConfig, sd.ToMeSDConfig):
        assert [f.name for f in dataclasses.fields(cls)][:len(shared)] == shared
        with pytest.raises(TypeError):
            cls(0.5)  # keyword-only: a positional value cannot land in the wrong field
    for check, cls in ((dit._check_config, dit.ToMeDiTConfig), (sd._check_config, sd.ToMeSDConfig)):
        with pytest.raises(ValueError, match=r"sx must be an integer >= 1, got 0"):
            check(cls(sx=0))
        with pytest.raises(ValueError, match=r"similarity_dtype must be one of"):
            check(cls(similarity_dtype="fp8"))
    with pytest.raises(ValueError, match=r"merge_mlp applies to mode='merge' only"):
        dit._check_config(dit.ToMeDiTConfig(mode="downsample", merge_mlp=True))
    with pytest.raises(ValueError, match=r"rope must be one of"):
        dit._check_config(dit.ToMeDiTConfig(rope="none"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["tofu", "pitome"])
def test_methods_reduce_the_same_tokens_and_stay_close(kind, method, monkeypatch):
    model = tiny(kind)
    kw = inputs(kind)
    ref = run(model, kw)
    tome = run(apply_tome_dit(model, ratio=0.5), kw)
    visiontools.apply_tome(model, ratio=0.5, method=method)
    counter = KeyCounter(monkeypatch)
    out = run(model, kw)
    assert counter.calls == expected_calls(kind, "merge", 0.5)  # the same token counts as ToMe
    assert out.shape == ref.shape and not torch.equal(out, tome) and 0 < rel(out, ref) < 0.1
    remove_tome_dit(model)
    assert torch.equal(run(model, kw), ref)


def test_a_pruned_token_keeps_its_destination_rotary_position():
    x = torch.randn(2, 36, 8)
    keep = dit.merge2d.plan_merge_2d(x, 6, 6, 12, seed=2, reduce="keep")
    cos, sin = torch.randn(36, 4), torch.randn(36, 4)
    at_dst = dit._merged_rope(keep, cos, sin, "dst")
    for rule in ("mean", "angle"):
        assert all(torch.equal(a, b) for a, b in zip(dit._merged_rope(keep, cos, sin, rule), at_dst))
        averaged = dit._merged_rope(keep._replace(reduce="mlerp"), cos, sin, rule)  # positions still averaged
        assert not torch.equal(averaged[0], at_dst[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_budget_is_the_smallest_ratio_meeting_it_at_the_size_and_text_length(kind, mode):
    from visiontools.timing import count_flops

    model = tiny(kind)
    kw = dit.dit_example_inputs(model, 96, 128, 5, device="cpu")  # what the solve counts, on the real model
    image = kw["hidden_states"]  # 96x128 px: a 12x16 latent; Flux packs 2x2 of it into a token
    assert tuple(image.shape[1:]) == ((6 * 8, 16) if kind == "flux" else (4, 12, 16))
    assert kw["encoder_hidden_states"].shape[1] == 5

    def fraction(ratio):
        apply_tome_dit(model, ratio=ratio, mode=mode)
        return count_flops(lambda: model(**kw), warmup=False) / base

    base = count_flops(lambda: model(**kw), warmup=False)
    visiontools.apply_tome(model, speedup=1.1, mode=mode, size=(96, 128), text_tokens=5)
    b = model.tome_budget
    assert b.size == (96, 128) and b.target_speedup == 1.1 and b.flop_fraction <= 1 / 1.1
    upper = 0.75 if mode == "merge" else 63 / 64
    assert fraction(b.ratio - upper / 256) > 1 / 1.1  # one bisection step less does not meet it
    assert fraction(b.ratio) == pytest.approx(b.flop_fraction, rel=1e-9)


def test_budget_defaults_and_errors():
    model = tiny("sd3")  # sample_size 8: 64 px by default, with SD3's 333 text tokens
    apply_tome_dit(model, flops=0.95)
    b = model.tome_budget
    assert b.size == (64, 64) and dit.TEXT_TOKENS["SD3Transformer2DModel"] == 333
    from visiontools.timing import count_flops

    kw = dit.dit_example_inputs(model, 64, 64, 333, device="cpu")
    with_budget = count_flops(lambda: model(**kw), warmup=False)
    remove_tome_dit(model)
    assert not hasattr(model, "tome_budget")
    assert with_budget / count_flops(lambda: model(**kw), warmup=False) == pytest.approx(b.flop_fraction, rel=1e-9)
    for kwargs, message in [(dict(ratio=0.5, speedup=1.2), "ratio or a budget"),
                            (dict(text_tokens=77), "text_tokens= is what a budget is counted at"),
                            (dict(flops=0.9, text_tokens=0), "text_tokens must be a positive integer"),
                            (dict(flops=0.9, size=4), "size is the image size in pixels"),
                            (dict(flops=0.3), r"out of reach: the largest ratio \(0.75\) keeps .* of this transformer "
                                              r"at 64x64 pixels; patch more blocks")]:
        with pytest.raises(ValueError, match=message):
            apply_tome_dit(model, **kwargs)
    assert not is_patched(model)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_budget_on_a_pipeline_counts_at_its_vae_scale(kind):
    """The test pipelines' one-block VAE has ``vae_scale_factor`` 1, not 8: a 32x48 px image is a
    32x48 latent, and the solve must count that (the default size too: ``sample_size`` x 1)."""
    from visiontools.timing import count_flops

    pipe, _ = tiny_pipeline(kind)
    assert pipe.vae_scale_factor == 1
    model = pipe.transformer
    n_text = dit.TEXT_TOKENS[type(model).__name__]
    kw = dit.dit_example_inputs(model, 32, 48, n_text, device="cpu", scale=1)
    base = count_flops(lambda: model(**kw), warmup=False)
    visiontools.apply_tome(pipe, flops=0.9, size=(32, 48))
    b = model.tome_budget
    assert b.size == (32, 48)
    assert count_flops(lambda: model(**kw), warmup=False) / base == pytest.approx(b.flop_fraction, rel=1e-9)
    if kind == "sd3":
        visiontools.apply_tome(pipe, flops=0.95)
        assert model.tome_budget.size == (model.config.sample_size,) * 2


def test_bench_dit_times_every_method(tmp_path):
    """``visiontools bench dit`` (tiny): tofu and pitome are merge mode with another rule, so they do
    the same work as merge with different outputs; a method outside the four is named in the error."""
    import argparse
    import json

    from visiontools.bench import dit as bench_dit

    parser = argparse.ArgumentParser()
    bench_dit.add_arguments(parser)
    out = tmp_path / "dit.json"
    args = parser.parse_args(["--tiny", "--models", "sd3", "flux", "--resolution", "256", "--candidates", "merge@0.5",
                              "tofu@0.5", "pitome@0.5", "downsample@0.5", "--repeats", "1", "--device", "cpu",
                              "--out-json", str(out), "--out-md", str(tmp_path / "dit.md")])
    assert bench_dit.run(args) == 0
    rows = json.loads(out.read_text())["rows"]
    for model in ("sd3", "flux"):
        r = {x["candidate"]: x for x in rows if x["model"] == model}
        assert list(r) == ["unpatched", "merge@0.5", "tofu@0.5", "pitome@0.5", "downsample@0.5"]
        assert r["merge@0.5"]["flops"] == r["tofu@0.5"]["flops"] == r["pitome@0.5"]["flops"] < r["unpatched"]["flops"]
        assert len({r[k]["rel_l2"] for k in ("merge@0.5", "tofu@0.5", "pitome@0.5")}) == 3
        assert all(0 < r[k]["rel_l2"] < 1 for k in r if k != "unpatched")
    with pytest.raises(ValueError, match="method must be one of merge, downsample, tofu, pitome"):
        bench_dit.parse_candidates(["prune@0.5"])
