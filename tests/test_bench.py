"""visiontools.bench.vit / timing: structure and FLOP accounting (speed itself is measured in benchmarks)."""
import json

import torch
import torch.nn.functional as F

from visiontools.bench.vit import benchmark_vit, markdown_table
from visiontools.tome.r_text import r_argument
from visiontools.cli import main
from visiontools.timing import count_flops, interleaved_times


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(2, 3, 50, 16)
    # QK^T and AV: 2 matmuls of 2*N*N*d FLOPs per head
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * 2 * 2 * 3 * 50 * 50 * 16
    mask = torch.zeros(2, 1, 1, 50)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask)) == 2 * 2 * 2 * 3 * 50 * 50 * 16


def test_interleaved_times_runs_every_candidate_in_rotating_order():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(v) for v in times.values()] == [3, 3]
    reports = []  # a UI callback sees every round start, then 1.0
    interleaved_times({"a": lambda: reports.append(len(reports))}, repeats=2, warmup=1,
                      progress=lambda f, text: reports.append((f, text)))
    assert reports == [(0.0, "warm-up round 1 of 3"), 1, (1 / 3, "timing round 2 of 3"), 3,
                       (2 / 3, "timing round 3 of 3"), 5, (1.0, "done")]


def test_r_argument_is_the_one_grammar_with_argparse_errors():
    import argparse

    import pytest

    assert r_argument("16") == 16
    assert r_argument("16,-0.5") == (16, -0.5)
    assert r_argument("4,4,2") == [4, 4, 2]
    with pytest.raises(argparse.ArgumentTypeError, match="not an r setting: 'x'; use an int r"):
        r_argument("x")


def test_every_r_option_reads_the_same_grammar():
    """bench, eval, video and export parse --r with parse_r_text: the same text gives the same tome_r."""
    from visiontools.cli import build_parser

    parser = build_parser()
    common = {"bench": ["bench", "vit"], "onnx": ["bench", "onnx"], "eval": ["eval"],
              "video": ["video", "--in", "a.mp4", "--out", "b.mp4"], "export": ["export", "--model", "m", "--out", "m.onnx"]}
    for text, want in (("8", 8), ("8,-0.5", (8, -0.5)), ("8,8,4,4", [8, 8, 4, 4])):
        for name, argv in common.items():
            got = parser.parse_args([*argv, "--r", text]).r
            assert (got[0] if name in ("bench", "onnx", "eval") else got) == want, (name, text, got)
    assert parser.parse_args(["eval", "--schedule", "8,1"]).schedule == [[8, 1]]  # run() reads it as (8, 1.0)


def test_resolve_dtype_is_the_one_reading_of_dtype_names(monkeypatch):
    import pytest

    from visiontools.timing import dtype_label, resolve_dtype

    for name, want in (("fp32", torch.float32), ("off", torch.float32), (None, torch.float32), ("bf16", torch.bfloat16),
                       ("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("half", torch.float16),
                       (torch.float16, torch.float16), ("auto", torch.float32)):
        assert resolve_dtype(name, "cpu") == want, name
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float16  # no bf16 on this GPU
    assert resolve_dtype("auto", "cuda", auto="fp16") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert [dtype_label(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="unknown dtype 'fp8': use auto, fp32, bf16 or fp16"):
        resolve_dtype("fp8")


def test_write_results_prints_writes_and_plots(tmp_path, capsys):
    """The one reporting path of the bench targets: table printed, markdown/JSON/plot written, each named."""
    from argparse import Namespace

    from visiontools.timing import save_figure, subplots, write_results

    def plot(result, path):
        fig, ax = subplots()
        ax.plot(result["xs"])
        save_figure(fig, path)

    args = Namespace(out_md=tmp_path / "a" / "t.md", out_json=tmp_path / "b" / "t.json", plot=tmp_path / "c" / "t.png")
    write_results(args, "| t |", {"xs": [1, 2]}, plot=plot, header="head")
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| t |" and all(f"wrote {p}" in out for p in (args.out_md, args.out_json, args.plot))
    assert args.out_md.read_text() == "head\n\n| t |\n" and json.loads(args.out_json.read_text()) == {"xs": [1, 2]}
    assert args.plot.read_bytes()[:4] == b"\x89PNG"
    write_results(Namespace(out_md=None, out_json=None), "| u |", {}, echo=False)  # no --plot option: fine
    assert capsys.readouterr().out == ""


def test_benchmark_rows_and_flop_ratio():
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    res = benchmark_vit(model, [8, (8, -0.5)], batch_size=2, repeats=1, warmup=0, progress=False)
    base, r8, dec = res["rows"]
    assert base["flop_ratio"] == 1 and base["final_tokens"] is None
    assert r8["final_tokens"] == 65 - 4 * 8 and r8["flop_ratio"] > 1.3
    assert dec["flop_ratio"] > r8["flop_ratio"]  # merging early saves more
    assert all(row["img_per_s"] > 0 for row in res["rows"])
    assert "ToMe r=8 (inflect -0.5)" in markdown_table(res, "tiny")
    assert r8["tokens_per_layer"] == [65, 57, 49, 41, 33]
    table = markdown_table(res, "tiny")
    assert "| ToMe r=8 | 65 -> 41 |" in table and "| timm (fused SDPA) | all |" in table


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch-size", "2",
          "--repeats", "1", "--warmup", "0", "--r", "4", "--out-json", str(out)])
    res = json.loads(out.read_text())
    assert res["baseline_fused_attn"] is True and len(res["rows"]) == 2
    n = 17  # 4x4 patches + class token; r=4 per block, capped at half the patches, 12 blocks
    for _ in range(12):
        n -= min(4, (n - 1) // 2)
    assert res["rows"][1]["final_tokens"] == n == 2
    assert "| ToMe r=[4,4,4,2,1,0,0,0,0,0,0,0] (asked r=4, capped) |" in capsys.readouterr().out  # the r applied


def test_count_flops_counts_a_steady_state_call():
    """Work a model caches on its first call (Hyena's inference-mode filters) is not per-call work."""
    import timm

    import visiontools.models  # noqa: F401  (registers hyena_vit_cifar)

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    fresh = timm.create_model("hyena_vit_cifar", embed_dim=32, depth=2, num_heads=2).eval()
    twin = timm.create_model("hyena_vit_cifar", embed_dim=32, depth=2, num_heads=2).eval()
    with torch.inference_mode():
        twin(x)  # its filters are cached already
    assert count_flops(lambda: fresh(x)) == count_flops(lambda: twin(x))
    calls = []
    count_flops(lambda: calls.append(1))
    assert calls == [1, 1]  # one uncounted warm-up call, one counted


def test_count_flops_counts_ffts_which_torch_misses():
    """Hyena's long convolutions are FFTs: 5·n·log2(n) per complex transform of n points, half for real."""
    x = torch.randn(2, 3, 8, 8)
    spec = torch.fft.rfft2(x, s=(16, 16))  # zero-padded, as in Hyena: 6 real transforms of 256 points
    assert count_flops(lambda: torch.fft.rfft2(x, s=(16, 16))) == 2.5 * 6 * 256 * 8
    assert count_flops(lambda: torch.fft.irfft2(spec, s=(16, 16))) == 2.5 * 6 * 256 * 8
    assert count_flops(lambda: torch.fft.fft(x, dim=-1)) == 2.5 * 48 * 8 * 3  # real input: one-sided
    xc = torch.randn(2, 3, 8, 8, dtype=torch.complex64)
    assert count_flops(lambda: torch.fft.fft(xc, dim=-1)) == 5 * 48 * 8 * 3
    w = torch.randn(8, 8)
    assert count_flops(lambda: x @ w) == 2 * 48 * 8 * 8  # torch's own formulas still apply


def test_bench_and_eval_write_token_counts_the_same_way():
    """The same tokens per layer read "65 -> 25" (entering the first -> the last block, class token
    included) in bench vit's table, eval's table and the demo's speed table; unpatched rows read "all"."""
    from visiontools.tome.r_text import TOKENS_HEADER, token_span
    from visiontools.evaluate import markdown_table as eval_table

    tokens = [65, 57, 49, 41, 33, 25, 17]  # cifar10_vit at r=8: 6 blocks
    assert token_span(tokens) == "65 -> 25" and token_span(None) == "all"
    common = {"speedup": 1.5, "flop_ratio": 1.6}
    bench_md = markdown_table({"batch_size": 2, "img_size": [32, 32], "dtype": "float32", "machine": "CPU", "rows": [
        {"name": "ToMe r=8", "tokens_per_layer": tokens, "final_tokens": 17, "img_per_s": 10.0,
         "gflops_per_img": 0.1, "measured_over_ideal": 0.9, **common}]}, "t")
    eval_md = eval_table({"rows": [{"name": "ToMe r=8", "tokens_per_layer": tokens, "params": 1e6, "top1": 50.0,
                                    "top5": 90.0, "images_per_s": 10.0, "gflops": 0.1, **common}]})
    for md in (bench_md, eval_md):
        assert TOKENS_HEADER in md and "| ToMe r=8 | " in md and " 65 -> 25 |" in md and "| 17 |" not in md, md


def test_bench_without_a_target_lists_the_targets_and_exits_0():
    """`visiontools bench` alone prints the targets with their one-line help (it used to start a
    13-minute ViT-B run); options without a target still mean `bench vit`."""
    import os
    import re
    import subprocess
    import sys
    import time

    from visiontools.cli import BENCH_TARGETS, normalize_argv

    assert normalize_argv(["bench"]) == ["bench"]
    assert normalize_argv(["bench", "--model", "m", "--r", "8"]) == ["bench", "vit", "--model", "m", "--r", "8"]
    assert normalize_argv(["bench", "sd", "--steps", "2"])[:2] == ["bench", "sd"]
    assert normalize_argv(["bench", "--help"]) == ["bench", "--help"]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "visiontools.cli", "bench"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stderr == "", out
    assert time.perf_counter() - start < 60
    for name, (_, help_) in BENCH_TARGETS.items():  # each target on its own line, with its help
        assert re.search(rf"^    {name}\b", out.stdout, re.M) and help_.split(":")[0] in out.stdout, (name, out.stdout)
    assert "usage: visiontools bench" in out.stdout and "im/s" not in out.stdout
