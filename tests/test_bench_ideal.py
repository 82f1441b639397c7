"""`bench vit`'s token-count ideal (issue 46): the unpatched blocks timed alone at each schedule's
token counts, summed; the overhead of the reduction step is the measured time beyond that."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from visiontools.bench.ideal import TokenCountIdeal, block_parts, ideal_columns, part_counts
from visiontools.bench.vit import benchmark_vit, markdown_table


def tiny_vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5, **kw).eval()


def test_block_halves_compose_to_the_block():
    """The attention half then the MLP half is exactly the unpatched block (with layer scale too)."""
    for model in (tiny_vit(), tiny_vit(init_values=0.1)):
        blk = model.blocks[0]
        parts = block_parts(blk)
        x = torch.randn(2, 17, 32)
        with torch.no_grad():
            assert torch.equal(parts["mlp"](parts["attn"](x)), blk(x))
    assert block_parts(torch.nn.Linear(2, 2)).keys() == {"block"}


def test_part_counts_put_attention_before_the_merge_and_mlp_after():
    assert part_counts([17, 13, 9], whole=False) == [("attn", 17), ("mlp", 13), ("attn", 13), ("mlp", 9)]
    assert part_counts([17, 13, 9], whole=True) == [("block", 17), ("block", 13)]


def test_ideal_time_is_the_rest_plus_the_blocks_at_the_schedule():
    model = tiny_vit()
    sched = {"base": [17, 17, 17, 17], "r=4": [17, 13, 9, 5]}
    parts = TokenCountIdeal(model.blocks, sched, batch=2, width=32, device="cpu")
    # one kind of block: attn at 17, 13, 9 and mlp at 17, 13, 9, 5
    assert sorted(parts.fns) == sorted(f"ideal: {p}@{n} #0" for p, ns in (("attn", (17, 13, 9)),
                                                                              ("mlp", (17, 13, 9, 5))) for n in ns)
    med = {k: float(k.split("@")[1].split()[0]) * (1e-3 if "attn" in k else 2e-3) for k in parts.fns}
    base_s = 0.5
    assert parts.ideal(base_s, sched["base"], sched["base"], med) == pytest.approx(base_s)
    rest = base_s - 3 * (17e-3 + 34e-3)
    expect = rest + (17 + 13 + 9) * 1e-3 + (13 + 9 + 5) * 2e-3
    assert parts.ideal(base_s, sched["base"], sched["r=4"], med) == pytest.approx(expect)
    with torch.inference_mode():
        assert all(f().shape[1] == int(k.split("@")[1].split()[0]) for k, f in parts.fns.items())
    with pytest.raises(ValueError, match="tokens per layer must list 4 counts, got 3"):
        parts.ideal(base_s, sched["base"], [17, 13, 9], med)


def test_ideal_columns():
    c = ideal_columns(measured_s=0.5, base_s=0.8, ideal_s=0.4, merging_blocks=4)
    assert c["ideal_speedup"] == pytest.approx(2.0) and c["share_of_ideal"] == pytest.approx(0.8)
    assert c["overhead_share"] == pytest.approx(0.2) and c["overhead_per_block_s"] == pytest.approx(0.025)


def test_bench_vit_reports_the_token_count_ideal():
    res = benchmark_vit(tiny_vit(), [4], batch_size=2, repeats=1, warmup=0, progress=False)
    base, r4 = res["rows"]
    assert base["ideal_speedup"] == pytest.approx(1.0) and base["share_of_ideal"] == pytest.approx(1.0)
    assert r4["tokens_per_layer"] == [17, 13, 9, 5]
    assert r4["share_of_ideal"] == pytest.approx(r4["ideal_s"] / r4["median_s"])
    assert r4["overhead_share"] == pytest.approx(1 - r4["share_of_ideal"])
    assert r4["ideal_speedup"] == pytest.approx(base["median_s"] / r4["ideal_s"])
    assert set(res["ideal_parts_s"]) == {f"ideal: attn@{n} #0" for n in (17, 13, 9)} | {
        f"ideal: mlp@{n} #0" for n in (17, 13, 9, 5)}
    table = markdown_table(res, "tiny")
    assert "| token-count ideal | share of ideal | overhead (share, per merging block) |" in table
    assert f"| {r4['ideal_speedup']:.2f}x | {r4['share_of_ideal']:.2f} |" in table
    no_ideal = benchmark_vit(tiny_vit(), [4], batch_size=2, repeats=1, warmup=0, progress=False, ideal=False)
    assert "ideal_speedup" not in no_ideal["rows"][1] and "| - | - | - |" in markdown_table(no_ideal, "t")


# --------------------------------------------------------------------- diffusion models (bench sd, bench dit)

def _sd_unets():
    from test_diffusers_patch import install_recorders, tiny_unet

    from visiontools.bench.sd import _patch

    base = tiny_unet()
    log = install_recorders(base)  # every copy's innermost processor records (query, key/value tokens) in log
    memo = {id(log): log, **{id(p): p for p in base.parameters()}}
    unets = {"sdpa": base, **{f"{m}@0.5": _patch(copy.deepcopy(base, dict(memo)), m, 0.5, 1)
                              for m in ("merge", "downsample")}}
    return unets, log


def test_sd_ideal_counts_are_the_sizes_the_patched_unet_attends_over():
    """bench sd's ideal records, per candidate, the batch and the query/key-value tokens each
    attention of the patched levels attends with: the sizes diffusers' own processor receives."""
    from test_diffusers_patch import inputs

    from visiontools.bench.sd import _attention_ideal
    from visiontools.patches.diffusers import transformer_blocks

    unets, log = _sd_unets()
    x, t, e = inputs(h=16, w=12, batch=2)
    fns = {k: (lambda u=u: u(x, t, e)) for k, u in unets.items()}
    parts = _attention_ideal(unets, fns, max_downsample=1, device="cpu")
    x1 = tuple(n + "." for n, _, ds in transformer_blocks(unets["sdpa"]) if ds == 1)  # the patched level
    assert len(x1) == 3
    for name, fn in fns.items():
        log.clear()
        with torch.inference_mode():
            fn()
        seen = [(q, kv) for n, q, kv in log if n.startswith(x1)]
        assert [(q, kv) for _, _, q, kv in parts.calls[name]] == seen
        assert {b for _, b, _, _ in parts.calls[name]} == {2}
    # x1 level: 3 blocks, attn1 (self) then attn2 (7 text tokens); 16x12 = 192 tokens
    assert [c[2:] for c in parts.calls["sdpa"]] == [(192, 192), (192, 7)] * 3
    assert [c[2:] for c in parts.calls["merge@0.5"]] == [(96, 96), (192, 7)] * 3  # half the tokens merge
    assert [c[2:] for c in parts.calls["downsample@0.5"]] == [(192, 108), (192, 7)] * 3  # keys/values: 12x9
    # attn1 and attn2 have the same parameter shapes here (text width = 32 channels): one kind
    assert sorted(parts.fns) == sorted({"ideal: attn@192/192 x2 #0", "ideal: attn@192/7 x2 #0",
                                        "ideal: attn@96/96 x2 #0", "ideal: attn@192/108 x2 #0"})
    with torch.inference_mode():  # each part runs the unpatched attention at its sizes
        assert parts.fns["ideal: attn@96/96 x2 #0"]().shape == (2, 96, 32)


def test_attention_ideal_time_is_the_rest_plus_the_calls_at_the_candidate_sizes():
    from visiontools.bench.ideal import AttentionIdeal

    attns = [torch.nn.Module() for _ in range(2)]
    for a in attns:
        a.to_q, a.to_k, a.to_v = (torch.nn.Linear(8, 8) for _ in range(3))
        a.heads = 2
    calls = {"base": [(0, 1, 16, 16), (1, 1, 16, 16)], "cand": [(0, 1, 8, 8), (1, 1, 16, 16)]}
    parts = AttentionIdeal(attns, calls, "cpu")
    assert sorted(parts.fns) == ["ideal: attn@16/16 x1 #0", "ideal: attn@8/8 x1 #0"]  # one kind: same shapes
    med = {"ideal: attn@16/16 x1 #0": 0.04, "ideal: attn@8/8 x1 #0": 0.01}
    cols = parts.columns({"base": 0.5, "cand": 0.4}, "base", med)
    ideal_s = 0.5 - 0.08 + 0.05
    assert cols["cand"]["ideal_s"] == pytest.approx(ideal_s)
    assert cols["cand"]["ideal_speedup"] == pytest.approx(0.5 / ideal_s)
    assert cols["cand"]["overhead_per_block_s"] == pytest.approx(0.4 - ideal_s)  # one call changed
    assert cols["base"]["ideal_speedup"] == pytest.approx(1.0) and cols["base"]["overhead_s"] == pytest.approx(0)


@pytest.mark.parametrize("kind", ["flux", "sd3", "pixart"])
def test_dit_ideal_counts_are_the_sizes_the_patched_model_attends_over(kind, monkeypatch):
    """bench dit's ideal records each attention call's sizes: image tokens merged (half of them) or
    image keys/values downsampled (8x6 -> 6x5 grid), text tokens (5) as they were; the same sizes
    SDPA itself is called with."""
    from test_diffusers_dit import inputs, tiny

    from visiontools.bench.dit import _attention_ideal, candidate_calls

    models, outs = {}, {}
    fns = candidate_calls(tiny(kind), inputs(kind), [("merge", 0.5), ("downsample", 0.5)], outs, models)
    parts = _attention_ideal(models, fns, "cpu")
    txt, joint = 5, kind != "pixart"  # PixArt: image self-attention, then cross-attention to the text
    full, merged, kv = (n + txt * joint for n in (48, 24, 30))
    expect = {"unpatched": (full, full), "merge@0.5": (merged, merged), "downsample@0.5": (full, kv)}
    for name, (q, k) in expect.items():
        sizes = [c[2:] for c in parts.calls[name]]
        assert sizes == ([(q, k)] * {"flux": 3, "sd3": 2}[kind] if joint else [(q, k), (48, txt)] * 2)
        seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

        def logged(*a, **kw):
            q, k = a[:2] if len(a) >= 2 else (kw["query"], kw["key"])
            seen.append((q.shape[0], q.shape[-2], k.shape[-2]))
            return sdpa(*a, **kw)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", logged)
        fns[name]()
        monkeypatch.undo()
        assert [c[1:] for c in parts.calls[name]] == seen


def test_profile_patched_tabulates_the_step_functions_only_and_puts_them_back():
    from test_diffusers_dit import inputs, tiny

    from visiontools.bench.dit import candidate_calls
    from visiontools.bench.profile import profile_patched, profile_table
    from visiontools.tome import merge2d

    originals = merge2d.plan_merge_2d, merge2d.merge_2d, merge2d.unmerge
    fns = candidate_calls(tiny("sd3"), inputs("sd3"), [("merge", 0.5), ("downsample", 0.5)], {})
    merge, down = profile_patched(fns["merge@0.5"], repeats=1), profile_patched(fns["downsample@0.5"], repeats=1)
    assert (merge2d.plan_merge_2d, merge2d.merge_2d, merge2d.unmerge) == originals
    assert merge["steps"] == 2 * 3  # 2 blocks: plan, merge, unmerge (merge_2d inside them is not a step of its own)
    assert down["steps"] == 2  # one key/value downsampling per block
    assert {r["op"] for r in down["rows"]} >= {"aten::_upsample_nearest_exact2d"}
    assert "aten::_upsample_nearest_exact2d" not in {r["op"] for r in merge["rows"]}
    assert not {r["op"] for r in merge["rows"] + down["rows"]} & {"aten::addmm", "aten::linear", "aten::mm"}
    assert 0 < merge["total_us"] < merge["forward_us"] and merge["ops"] > down["ops"] > 0
    flux = candidate_calls(tiny("flux"), inputs("flux"), [("merge", 0.5)], {})["merge@0.5"]
    assert profile_patched(flux, repeats=1)["steps"] == 3 * 4  # and the merged rotary table (its merge_2d inside)
    assert "(6 steps, " in profile_table("m", merge) and "% of the forward's operator time" in profile_table("m", merge)
    with pytest.raises(RuntimeError, match="boom"):
        profile_patched(lambda: (_ for _ in ()).throw(RuntimeError("boom")), repeats=1)
    assert (merge2d.plan_merge_2d, merge2d.merge_2d, merge2d.unmerge) == originals


def test_bench_sd_and_dit_report_the_ideal_and_profile(tmp_path, capsys):
    """The CLI end to end: the ideal's columns beside the FLOP ratio, from the attention calls each
    candidate made; --profile tables of our candidates; --no-ideal leaves dashes; not with --loop."""
    import json

    from visiontools.cli import main

    fast = ["--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress", "--device", "cpu"]
    assert main(["bench", "sd", "--tiny", "--resolutions", "64", "--candidates", "merge@0.5", "downsample@0.5",
                 "--profile", *fast, "--out-json", str(tmp_path / "sd.json"), "--out-md", str(tmp_path / "sd.md")]) == 0
    sd = json.loads((tmp_path / "sd.json").read_text())["rows"]
    # the tiny SD UNet at 64 px: a 8x8 latent, 1 + 2 blocks at x1, each with attn1 and attn2 (77 text tokens)
    assert [c[2:] for c in sd[1]["attention_calls"]] == [[32, 32], [64, 77]] * 3
    for r in sd:
        assert r["share_of_ideal"] == pytest.approx(r["ideal_s"] / r["blocks_s"])
        assert r["ideal_speedup"] == pytest.approx(sd[0]["blocks_s"] / r["ideal_s"])
    assert sd[1]["profile"]["steps"] == 3 * 3 and sd[2]["profile"]["steps"] == 3 and "profile" not in sd[0]
    md = (tmp_path / "sd.md").read_text()
    assert "| FLOP ratio | patched-level blocks s | blocks speed-up | token-count ideal | share of ideal |" in md
    assert "**merge@0.5 at 64²: reduction steps** (9 steps, " in md
    assert main(["bench", "dit", "--tiny", "--models", "sd3", "--resolution", "128", "--candidates", "merge@0.5",
                 "--no-ideal", *fast, "--out-json", str(tmp_path / "dit.json")]) == 0
    dit = json.loads((tmp_path / "dit.json").read_text())
    assert "ideal_speedup" not in dit["rows"][1] and dit["dtype"] == "fp32"
    assert "| 1.00 | - | - | - |" in capsys.readouterr().out
    assert main(["bench", "dit", "--loop", "--profile", "--tiny"]) == 2
    assert "visiontools: error: --profile and --no-ideal time single calls; leave them out with --loop" in \
        capsys.readouterr().err


def test_cuda_graphs_is_refused_off_cuda_in_one_line(capsys):
    from visiontools.cli import main

    assert main(["bench", "vit", "--model", "vit_tiny_patch16_224", "--cuda-graphs", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("visiontools: error: --cuda-graphs needs a CUDA device (torch.compile's reduce-overhead "
                           "mode captures CUDA graphs), not cpu: use --device cuda, or leave --cuda-graphs out")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        benchmark_vit(tiny_vit(), [4], batch_size=2, repeats=1, warmup=0, progress=False, cuda_graphs=True)


def test_proportional_attention_kernels_agree_with_todays_path():
    """scripts/prop_attn_kernels.py: the aligned mask is today's path bit for bit, flex_attention's
    log(size) score_mod within float32 rounding, and leaving the mask out is not exact."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts/prop_attn_kernels.py"
    spec = importlib.util.spec_from_file_location("prop_attn_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 21, 16, generator=g) for _ in range(3))
    size = torch.randint(1, 5, (2, 21, 1), generator=g).float()
    fns = mod.kernels(q, k, v, size)
    with torch.inference_mode():
        ref = fns["sdpa (B,1,1,N) mask (today)"]()
        out = {name: fn() for name, fn in fns.items()}
    assert torch.equal(out["sdpa aligned mask, built"], ref) and torch.equal(out["sdpa aligned mask, prebuilt"], ref)
    for name in ("flex_attention, compiled", "flex_attention, eager", "sdpa, log(size) as an extra q/k channel"):
        torch.testing.assert_close(out[name], ref, atol=1e-5, rtol=1e-5)
    assert (out["sdpa, no mask (not exact)"] - ref).abs().max() > 1e-2


@pytest.mark.parametrize("argv, needle", [
    (["sd", "--loop", "--methods", "merge"], "--methods set the single-call benchmark, which --loop does not run"),
    (["sd", "--loop", "--ratios", "0.3", "--batch", "2"], "--ratios, --batch set the single-call benchmark"),
    (["sd", "--loop", "--candidates", "merge@0.5"], "--candidates set the single-call benchmark"),
    (["dit", "--loop", "--candidates", "merge@0.3"], "(choose its candidates with --loop-candidates)"),
    (["sd", "--steps", "4"], "--steps set the denoising loops: add --loop, or leave them out"),
    (["dit", "--loop-candidates", "pab"], "--loop-candidates set the denoising loops: add --loop"),
])
def test_an_option_the_mode_ignores_is_one_line(capsys, argv, needle):
    """``bench sd|dit --loop`` with a single-call option changed, or a loop option without ``--loop``:
    one line naming it (before: silently ignored), before any model is built."""
    from visiontools.cli import main

    assert main(["bench", *argv, "--tiny"]) == 2
    err = capsys.readouterr().err
    # the first diffusers import in a process may log torch's own warnings (torchao): only ours are counted
    ours = [line for line in err.splitlines() if line.startswith("visiontools")]
    assert len(ours) == 1 and ours[0].startswith("visiontools: error: ") and needle in ours[0], err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("target", ["sd", "dit"])
def test_the_single_call_defaults_the_loop_check_knows_are_the_parsers(target):
    """``SINGLE_CALL_DEFAULTS`` equal the parser's defaults, so an untouched option is never refused."""
    import argparse
    import importlib

    mod = importlib.import_module(f"visiontools.bench.{target}")
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    args = parser.parse_args([])
    assert {k: getattr(args, k) for k in mod.SINGLE_CALL_DEFAULTS} == mod.SINGLE_CALL_DEFAULTS


def test_a_loop_cache_the_model_cannot_take_is_refused_when_named(capsys):
    """``--loop-candidates fbc`` on a UNet (diffusers' first-block cache needs ``cache_context``): one line,
    not a quiet skip of what the user asked for."""
    from visiontools.cli import main

    assert main(["bench", "sd", "--loop", "--tiny", "--resolutions", "64", "--steps", "2", "--repeats", "1",
                 "--warmup", "0", "--loop-candidates", "merge@0.5", "fbc", "--no-progress"]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("visiontools")]  # not torch's
    assert ours == ["visiontools: error: --loop-candidates fbc: diffusers' fbc/taylorseer caches need a model with "
                    "cache_context, such as Flux; leave it out for SD 1.5 (tiny) 64²"], ours


def test_bench_dit_latents_at_a_small_resolution():
    """``bench dit --resolution 64``: latents smaller than 8 cells a side (before: an interpolation traceback)."""
    import torch

    from visiontools.bench.dit import _smooth_like

    g = torch.Generator().manual_seed(0)
    packed, grid = _smooth_like(torch.zeros(1, 16, 64), g), _smooth_like(torch.zeros(1, 4, 8, 8), g)
    assert packed.shape == (1, 16, 64) and grid.shape == (1, 4, 8, 8) and packed.std() > 0
