"""Bench output reads right (issue 47): `bench dit` prints each table once and a tiny model's size,
`bench hyena` says its crossover in a sentence, `bench mixers` explains its LSH errors and never ends
on an empty slope line. Tiny sizes, one thread, one round."""
from __future__ import annotations

import json

from visiontools.cli import main

FAST = ["--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress"]


def stdout_of(capsys, argv) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_bench_dit_prints_each_table_once_and_a_tiny_models_size(capsys):
    out = stdout_of(capsys, ["bench", "dit", "--tiny", "--models", "sd3", "--resolution", "128", "--candidates",
                             "merge@0.5", *FAST])
    assert out.count("| model (blocks) | candidate |") == 1, out
    assert out.count("| sd3 | merge@0.5 |") == 1, out
    assert "sd3: 24k parameters" in out and "0M parameters" not in out, out


def test_bench_hyena_says_its_crossover_in_a_sentence(capsys, tmp_path):
    from visiontools.bench.hyena import markdown_table

    js = tmp_path / "h.json"
    out = stdout_of(capsys, ["bench", "hyena", "--grids", "4", "8", "--max-tokens", "64", "--dim", "32",
                             "--num-heads", "2", "--out-json", str(js), *FAST])
    assert "faster than attention not" not in out and "\nCrossover: Hyena is " in out, out
    result = json.loads(js.read_text())
    result.update(crossover_tokens=16, crossover_tokens_regen=None)
    text = markdown_table(result)
    assert ("Crossover: Hyena is faster than attention from 16 tokens on. With its filters regenerated: Hyena is "
            "not faster than attention at the largest size measured (64 tokens).") in text, text


def test_bench_mixers_explains_its_errors_and_its_slopes(capsys):
    out = stdout_of(capsys, ["bench", "mixers", "--grids", "4", "8", "--dim", "32", "--num-heads", "2",
                             "--bucket-size", "8", "--hashes", "1", "--reformer-hashes", *FAST])
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1] == ("- log-log slope of fwd+bwd time vs tokens: not computed, it needs two grids of at "
                         "least 1024 tokens"), lines[-1]
    note = next(line for line in lines if line.startswith("The error is ||output - exact|| / ||exact||."))
    assert "buckets of about 8 tokens" in note and "not a bug" in note
    assert lines.index(note) > next(i for i, line in enumerate(lines) if line.startswith("**Relative error"))
