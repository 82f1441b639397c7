"""The token-mixer bench (visiontools bench mixers) and the reversible memory bench (bench reversible)."""
import json

import torch

from visiontools.bench import mixers as bench_mixers
from visiontools.bench import reversible as bench_reversible
from visiontools.cli import main


def test_bench_mixers_tiny_run_writes_every_mixer_and_metric(tmp_path):
    out = tmp_path / "m.json"
    rc = main(["bench", "mixers", "--grids", "4", "9", "--dim", "16", "--num-heads", "2", "--bucket-size", "8",
               "--hashes", "1", "2", "--reformer-hashes", "2", "--repeats", "1", "--warmup", "0", "--no-progress",
               "--out-json", str(out), "--plot", str(tmp_path / "m.png")])
    assert rc == 0 and (tmp_path / "m.png").stat().st_size > 0
    res = json.loads(out.read_text())
    names = {"sdpa", "hyena", "lsh1", "lsh2", "proj", "lsh2_back", "reformer2"}
    assert set(res["mixers"]) == names
    r16, r81 = res["rows"]
    assert (r16["tokens"], r81["tokens"]) == (16, 81)
    for key in ("fwd_ms", "fwd_bwd_ms", "peak_bytes"):
        assert set(r81[key]) == names and all(v > 0 for v in r81[key].values()), key
    # 16 tokens fit one 8+8+8 window of visiontools LSH: exact; 81 tokens do not
    assert r16["rel_error"]["lsh1"] < 1e-5 and r81["rel_error"]["lsh1"] > 1e-3
    assert r81["rel_error"]["sdpa"] == 0 and r81["rel_error"]["hyena"] is None
    # the attention-core ratio takes the projections-only time off both sides
    t = r81["fwd_bwd_ms"]
    core = res["summary"]["reformer_over_lsh_core_fwd_bwd"]["reformer2/lsh2_back"]["81"]
    assert core == (t["reformer2"] - t["proj"]) / (t["lsh2_back"] - t["proj"])
    assert "proj" not in res["summary"]["lsh_beats_sdpa_time_from"]


def test_projections_row_is_the_lsh_layers_linear_layers():
    from visiontools.layers.lsh import LSHAttention

    proj, lsh = bench_mixers.Projections(24), LSHAttention(24, 3)
    assert [p.shape for p in proj.parameters()] == [p.shape for p in lsh.parameters()]
    assert proj(torch.randn(2, 5, 24)).shape == (2, 5, 24)


def test_first_beating_needs_every_larger_size():
    rows = [{"tokens": n, "t": {"a": a, "b": 1.0}} for n, a in [(1, 0.5), (2, 2.0), (3, 0.5), (4, 0.4)]]
    assert bench_mixers._first_beating(rows, "a", "b", "t") == 3
    rows[-1]["t"]["a"] = 3.0
    assert bench_mixers._first_beating(rows, "a", "b", "t") is None


def test_bench_reversible_tiny_run(tmp_path):
    res = bench_reversible.benchmark(depths=(1, 4), dim=16, heads=2, img_size=16, patch_size=4, batch_size=2,
                                     repeats=1, warmup=0, cifar_models=("rev_vit_cifar",), cifar_batch=2,
                                     progress=False)
    assert [r["depth"] for r in res["rows"]] == [1, 4]
    d4 = res["rows"][1]["peak_bytes"]
    assert d4["reversible"] < d4["plain"]  # activations of 4 blocks vs one block's
    assert res["cifar_models"][0]["peak_bytes"] > 0
    assert "| 4 |" in bench_reversible.markdown_table(res)
