"""`bench vit`'s token-count ideal (issue 46): the unpatched blocks timed alone at each schedule's
token counts, summed; the overhead of the reduction step is the measured time beyond that."""
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
