"""The README and the documentation pages (docs/*.md) must keep working when pasted: every
``visiontools`` command in their code blocks parses with the real argument parser, every repository
path they name exists, the README's quick commands run as written, and the numbers they share with
stored results agree with them."""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from visiontools.cli import build_parser, normalize_argv

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The README and every documentation page; docs/results/ holds tables written by the benchmarks.
DOC_FILES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")
                                   if "results" not in p.relative_to(ROOT / "docs").parts)
DOCS = {name: (ROOT / name).read_text() for name in DOC_FILES}

# Commands of the README run verbatim by test_quick_commands_run_as_written (each must stay in the README).
QUICK = [
    "visiontools eval --per-class 10 --r 4 8 --timing-batch-size 32 --repeats 2 --warmup 1 --no-progress --out runs/eval/quick",
    "visiontools bench --model cifar10_vit --batch-size 32 --r 8 --repeats 2 --warmup 1 --threads 1",
    "visiontools bench hyena --grids 8 16 --max-tokens 1024 --repeats 2 --warmup 1 --threads 1 --no-progress",
]
# Documented commands that are run with tiny settings appended (as written they take minutes on 10,000 images).
SHORTENED = {
    "visiontools eval --checkpoint attn_cifar10 --compare hyena_cifar10 --r 8":
        ["--per-class", "2", "--timing-batch-size", "4", "--repeats", "1", "--warmup", "0", "--no-progress"],
}
# Top-level folders whose paths the README and docs name (outputs under runs/ are not expected to exist).
REPO_PREFIXES = ("visiontools/", "patches/", "demos/", "configs/", "docs/", "scripts/", "tests/", ".ci/",
                 "../shared/")


def shell_blocks(text: str) -> list[str]:
    """The fenced code blocks that hold shell commands (bash, sh, console, or no language)."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S)
            if m.group(1) in ("", "bash", "sh", "shell", "console")]


def commands(text: str) -> list[list[str]]:
    """Every command in the shell blocks, as argv lists: continuation lines joined, comments dropped,
    ``a && b`` and ``a; b`` split."""
    out = []
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            cmd: list[str] = []
            for tok in tokens + [";"]:
                if tok in ("&&", ";", "||", "|"):
                    if cmd:
                        out.append(cmd)
                    cmd = []
                else:
                    cmd.append(tok)
    return out


def visiontools_argv(cmd: list[str]) -> list[str] | None:
    """The arguments after ``visiontools`` (also ``.venv/bin/visiontools``, ``torchrun ... -m
    visiontools.cli`` and ``python -m visiontools.cli``, after any ``VAR=value``), or None for other
    commands."""
    while cmd and re.fullmatch(r"[A-Za-z_]\w*=\S*", cmd[0]):
        cmd = cmd[1:]
    if not cmd:
        return None
    if Path(cmd[0]).name == "visiontools":
        return cmd[1:]
    for i in range(len(cmd) - 1):
        if cmd[i] == "-m" and cmd[i + 1] == "visiontools.cli":
            return cmd[i + 2:]
    return None


def visiontools_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command as written, arguments after ``visiontools``) for every visiontools command in ``text``."""
    return [(" ".join(c), argv) for c in commands(text) if (argv := visiontools_argv(c)) is not None]


README_COMMANDS = visiontools_commands(README)
# (file, command as written, arguments) for the README and every docs page
DOC_COMMANDS = [(name, text, argv) for name in DOC_FILES for text, argv in visiontools_commands(DOCS[name])]


def test_the_docs_show_visiontools_commands():
    assert "README.md" in DOC_FILES and "docs/hyena.md" in DOC_FILES
    assert not any(name.startswith("docs/results/") for name in DOC_FILES)
    assert {argv[0] for _, argv in README_COMMANDS} >= {"eval", "bench", "demo"}
    assert len(DOC_COMMANDS) >= 30
    assert {argv[0] for _, _, argv in DOC_COMMANDS} >= {"train", "eval", "bench", "demo", "export", "video"}


@pytest.mark.parametrize("name,text,argv", DOC_COMMANDS, ids=[f"{n}: {t[:70]}" for n, t, _ in DOC_COMMANDS])
def test_every_documented_command_parses(name, text, argv, capsys):
    parser = build_parser()
    try:
        args = parser.parse_args(normalize_argv(argv))
    except SystemExit as e:  # --help exits 0; a parse error exits 2 with the reason on stderr
        assert e.code == 0, f"{name}: command does not parse: {text}\n{capsys.readouterr().err}"
        return
    assert callable(args._run)


def test_parse_check_catches_a_broken_command(capsys):
    """The check above fails for a command the parser rejects (guards the test itself)."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(normalize_argv(["eval", "--no-such-option"]))
    assert e.value.code == 2


def named_paths(text: str) -> set[str]:
    """Repository paths named anywhere in a text (code blocks, inline code, links)."""
    pattern = r"(?<![\w./-])((?:" + "|".join(re.escape(p) for p in REPO_PREFIXES) + r")[\w./{},*-]*)"
    out = set()
    for m in re.finditer(pattern, text):
        path = m.group(1).rstrip(".,:;")
        brace = re.search(r"\{([^}]*)\}", path)
        variants = [path[:brace.start()] + alt + path[brace.end():] for alt in brace.group(1).split(",")] \
            if brace else [path]
        out.update(variants)
    return out


def test_path_check_finds_the_paths():
    """Guards the check below: the paths of a docs page and of the README are found."""
    assert {"configs/vit_cifar10_cpu.yaml", "docs/results/bench_cifar10_vit_cpu_1threads.md",
            "docs/results/bench_cifar10_vit_cpu_2threads.md"} <= named_paths(DOCS["docs/training-evaluation.md"])
    assert "docs/hyena.md" in named_paths(README)
    assert named_paths("see `visiontools/no_such_module.py`") == {"visiontools/no_such_module.py"}


@pytest.mark.parametrize("name", DOC_FILES)
def test_every_path_the_docs_name_exists(name):
    paths = named_paths(DOCS[name])
    missing = [p for p in sorted(paths) if not glob.glob(str(ROOT / p))]
    assert not missing, f"{name} names paths that do not exist: {missing}"


def sandbox(tmp_path: Path) -> Path:
    """A directory that looks like a checkout (repository folders linked, ../shared beside it), so
    commands run as written write their outputs (runs/...) into the temporary folder."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", "artifacts", ".venv", ".git"):
            (repo / entry.name).symlink_to(entry)
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    return repo


def run_readme_command(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "visiontools.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_quick_commands_run_as_written(tmp_path, datasets_dir):
    shown = {text for text, _ in README_COMMANDS}
    repo = sandbox(tmp_path)
    for text in QUICK:
        assert text in shown, f"the README no longer shows {text!r}: update QUICK"
        res = run_readme_command(shlex.split(text)[1:], repo)
        assert res.returncode == 0, f"{text}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr and "USDT" not in res.stderr, res.stderr[-3000:]
    assert (repo / "runs/eval/quick.json").is_file()


@pytest.mark.parametrize("text", list(SHORTENED))
def test_long_commands_run_as_written_with_tiny_settings(text, tmp_path, datasets_dir):
    assert text in {t for _, t, _ in DOC_COMMANDS}, f"no page shows {text!r} any more: update SHORTENED"
    repo = sandbox(tmp_path)
    res = run_readme_command(shlex.split(text)[1:] + SHORTENED[text], repo)
    assert res.returncode == 0, f"{text}\n{res.stderr[-3000:]}"
    assert "hyena_cifar10" in res.stdout
    for noise in ("USDT", "gpuGetDeviceCount", "External init callback"):  # no profiler lines with Hyena models
        assert noise not in res.stderr + res.stdout


def test_shared_numbers_agree_with_the_stored_results():
    """The demo, the README and the training page quote the shipped default's and the plain ViT's
    accuracy from one source (their cards), and the Hyena crossover in the README and on the Hyena page
    is the one docs/results/bench_hyena_cpu.* report."""
    from visiontools.demos.model_cache import accuracy_note

    for shipped in ("cifar10_cct", "cifar10_vit"):
        card = json.loads((ROOT / f"visiontools/checkpoints/{shipped}.json").read_text())
        top1 = f"{card['eval']['rows'][0]['top1']:.1f}"
        assert f"top-1 {top1}%" in accuracy_note(card)
        for name in ("README.md", "docs/training-evaluation.md"):
            assert f"**{top1} % top-1**" in DOCS[name], (shipped, name)
    hyena = json.loads((ROOT / "docs/results/bench_hyena_cpu.json").read_text())
    co = hyena["crossover_tokens"]
    assert f"from {co} tokens on" in (ROOT / "docs/results/bench_hyena_cpu.md").read_text()
    for name in ("README.md", "docs/hyena.md"):
        assert f"faster than attention from {co:,} tokens on" in DOCS[name], name
