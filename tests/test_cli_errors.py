"""A user's everyday mistakes end in one line on stderr and exit status 2, never a traceback; and the
honest-output and API-consistency rules of issue 14 (random-weight notices, refused epochs=0, one
table per `bench sd` resolution, no profiler noise, validated tome_r, ...)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from visiontools.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv, *needles, env=None, monkeypatch=None):
    """Run ``visiontools argv`` in-process; assert exit status 2 and one stderr line holding ``needles``."""
    if env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_unknown_model_suggests_the_closest(capsys):
    line = one_line_error(capsys, ["bench", "--model", "vit_bse_patch16_224"], "unknown model 'vit_bse_patch16_224'",
                          "did you mean 'vit_base_patch16_224'")
    assert line.startswith("visiontools: error:")
    one_line_error(capsys, ["eval", "--model", "no_such_vit", "--dataset", "cifar10"], "unknown model 'no_such_vit'")
    one_line_error(capsys, ["train", "--model", "vit_cifar_mini_p5", "--data-dir", "nowhere"],
                   "unknown model 'vit_cifar_mini_p5'", "did you mean 'vit_cifar_mini_p4'")  # before the data


def test_unsupported_model_is_one_line(capsys):
    one_line_error(capsys, ["bench", "--model", "resnet18", "--batch-size", "1", "--repeats", "1", "--warmup", "0"],
                   "ToMe supports timm VisionTransformer", "needs a timm VisionTransformer")


@pytest.mark.parametrize("argv", [["bench", "--r", "-1"], ["eval", "--r", "-1"], ["bench", "--r", "8,-2,4"]])
def test_negative_r_is_refused_by_the_parser(capsys, argv):
    one_line_error(capsys, argv, "r must be >= 0", "--help")


def test_missing_data_says_where_to_get_it(capsys, tmp_path):
    one_line_error(capsys, ["eval", "--data-dir", str(tmp_path / "nowhere"), "--no-progress"],
                   "nowhere does not exist", "--data-dir", "--download")
    one_line_error(capsys, ["train", "--set", f"data_dir={tmp_path / 'nowhere'}", "--set", f"out_dir={tmp_path / 'o'}",
                            "--no-progress"], "--data-dir")


def test_existing_output_folder(capsys, tmp_path):
    (tmp_path / "last.safetensors").write_bytes(b"x")
    one_line_error(capsys, ["train", "--set", f"out_dir={tmp_path}"], "already exists", "--overwrite", "--out-dir")


def test_unsupported_method_or_budget_on_a_grid_model_is_one_line(capsys):
    one_line_error(capsys, ["eval", "--checkpoint", "conformer_cifar10", "--r", "4", "--method", "pitome",
                            "--per-class", "1", "--no-progress"], "method='pitome'", "grid operations", "method='tome'")
    one_line_error(capsys, ["eval", "--checkpoint", "hyena_cifar10", "--r", "0", "--budget", "0.05",
                            "--per-class", "1", "--no-progress"], "FLOP fraction of 0.05 is out of reach")


def test_set_typo_suggests_the_key(capsys):
    one_line_error(capsys, ["train", "--config", "configs/vit_cifar10_cpu.yaml", "--set", "epoch=2"],
                   "unknown config key 'epoch'", "did you mean 'epochs'")


def test_epochs_zero_is_refused(capsys):
    one_line_error(capsys, ["train", "--set", "epochs=0"], "epochs must be an integer >= 1")


def test_batch_larger_than_the_data(capsys, tmp_path, datasets_dir):
    one_line_error(capsys, ["train", "--data-dir", str(datasets_dir / "cifar10"), "--set", "train_per_class=2",
                            "--set", "test_per_class=1", "--batch-size", "64", "--out-dir", str(tmp_path / "o"),
                            "--no-progress"], "batch_size 64 is larger than the 20 training images", "--batch-size")


def test_debug_flag_and_variable_show_the_traceback(capsys, monkeypatch):
    from visiontools.errors import UserError

    with pytest.raises(UserError, match="epochs"):
        main(["train", "--set", "epochs=0", "--debug"])
    monkeypatch.setenv("VISIONTOOLS_DEBUG", "1")
    with pytest.raises(UserError, match="epochs"):
        main(["train", "--set", "epochs=0"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    import visiontools.train as train_mod

    def broken(*a, **k):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(train_mod, "train", broken)
    with pytest.raises(KeyError):
        main(["train", "--set", "epochs=1"])


def test_missing_extra_says_what_to_install(capsys, monkeypatch):
    import visiontools

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the sd extra were not installed
    one_line_error(capsys, ["bench", "sd", "--tiny", "--resolutions", "64"], "optional package 'diffusers'",
                   "pip install -e '.[sd]'")

    class Pipeline:
        unet = None

    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[sd\]'"):
        visiontools.apply_tome(Pipeline(), ratio=0.5)


def test_unet_with_r_says_ratio():
    import visiontools

    class Pipeline:
        unet = None

    with pytest.raises(TypeError, match="take ratio="):
        visiontools.apply_tome(Pipeline(), r=8)


def test_pretrained_offline_fails_fast_in_one_line(tmp_path):
    """No hub (a closed local port stands for it) and an empty cache: one line in seconds, not a
    minute of retries; the same with HF_HUB_OFFLINE=1."""
    for extra in ({"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}):
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **extra}
        env.pop("VISIONTOOLS_DEBUG", None)
        code = ("import time, sys; from visiontools.cli import main; t = time.time(); "
                "rc = main(['bench', '--model', 'vit_tiny_patch16_224', '--pretrained']); "
                "print(f'{time.time() - t:.1f}'); sys.exit(rc)")
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "pretrained weights for 'vit_tiny_patch16_224' are not in the local cache" in lines[0]
        assert "leave out --pretrained" in lines[0]
        # One stderr line means no hub retries ("Retrying in 8s [Retry 5/5]" lines, ~50 s before); the bound
        # is loose because the time includes importing timm and building the model on a shared machine.
        assert float(res.stdout.strip()) < 40


def test_demo_port_honours_gradio_server_port(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert build_parser().parse_args(["demo"]).port == 7999
    assert build_parser().parse_args(["demo", "--port", "8001"]).port == 8001
    monkeypatch.delenv("GRADIO_SERVER_PORT")
    assert build_parser().parse_args(["demo"]).port == 7860


def test_demo_without_diffusers_says_what_to_install(monkeypatch):
    import gradio as gr

    from visiontools.demos import app, hyena_tab, sd_tab, state

    monkeypatch.setattr(sd_tab, "available", lambda: False)
    monkeypatch.setattr(hyena_tab, "available", lambda: False)
    with gr.Blocks() as demo:
        app.add_tabs(gr, state.Shared(), [sd_tab, hyena_tab])
    texts = [getattr(b, "value", None) for b in demo.blocks.values()]
    assert sd_tab.MISSING in texts and "pip install -e '.[sd]'" in sd_tab.MISSING


# ----------------------------------------------------------------------------- honest output

def test_eval_of_random_weights_says_so_and_repeats(tmp_path, datasets_dir):
    outs = []
    for i in range(2):
        prefix = tmp_path / f"run{i}"
        assert main(["eval", "--model", "vit_cifar_mini_p4", "--dataset", "cifar10", "--data-dir",
                     str(datasets_dir / "cifar10"), "--per-class", "2", "--r", "4", "--timing-batch-size", "2",
                     "--repeats", "1", "--warmup", "0", "--no-progress", "--out", str(prefix)]) == 0
        result = json.loads(prefix.with_suffix(".json").read_text())
        assert result["random_weights"] is True
        assert "random weights: accuracy is meaningless" in result["notice"]
        assert "random weights: accuracy is meaningless" in prefix.with_suffix(".md").read_text()
        outs.append([(r["top1"], r["loss"]) for r in result["rows"]])
    assert outs[0] == outs[1]  # the initialisation is seeded


def test_shipped_checkpoint_eval_has_no_notice(datasets_dir):
    from visiontools.evaluate import evaluate, markdown_table

    res = evaluate(data_dir=str(datasets_dir / "cifar10"), per_class=1, rs=[], timing_batch_size=2, repeats=1,
                   warmup=0, progress=False)
    assert res["random_weights"] is False and "notice" not in res
    assert "meaningless" not in markdown_table(res)


def test_eval_reports_of_two_runs_last_checkpoints_do_not_collide():
    from visiontools.evaluate import output_prefix

    def prefix(ckpt, model=None, out=None):
        return output_prefix(Namespace(out=out, model=model), ckpt, "cifar10")

    a, b = prefix("runs/a/last.safetensors"), prefix("runs/b/last.safetensors")
    assert a != b and a.name == "a_last_cifar10"
    assert prefix("cifar10_vit") == Path("runs/eval/cifar10_vit_cifar10")
    assert prefix("x", model="vit_small_patch16_224") == Path("runs/eval/vit_small_patch16_224_cifar10")
    assert prefix("x", out="here/p") == Path("here/p")


def test_eval_default_data_dir_is_trains():
    from visiontools.data import DEFAULT_DATA_DIR
    from visiontools.train import DEFAULTS

    assert DEFAULTS["data_dir"] == DEFAULT_DATA_DIR
    assert (ROOT / DEFAULT_DATA_DIR / "test").is_dir()


def test_resume_with_changed_epochs_warns(tmp_path, datasets_dir, capsys):
    args = ["train", "--data-dir", str(datasets_dir / "cifar10"), "--set", "train_per_class=4", "--set",
            "test_per_class=1", "--set", "model_kwargs={depth: 1, embed_dim: 16, num_heads: 2}", "--batch-size", "8",
            "--set", "threads=1", "--set", "warmup_epochs=0.5", "--out-dir", str(tmp_path), "--no-progress"]
    assert main(args + ["--epochs", "1"]) == 0  # stopped past its warm-up: a longer schedule differs from there
    capsys.readouterr()
    assert main(args + ["--epochs", "2", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "schedule for 1 epochs" in err and "epochs=2" in err
    assert main(args + ["--epochs", "2", "--resume"]) == 0  # same epochs: no schedule warning
    assert "schedule for" not in capsys.readouterr().err


def test_bench_sd_prints_one_table_per_resolution(capsys):
    assert main(["bench", "sd", "--tiny", "--resolutions", "64", "--candidates", "merge@0.5", "--repeats", "1",
                 "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("| latent (image) |") == 1


def test_cpu_peak_memory_without_the_profiler():
    from visiontools.bench.memory import peak_bytes

    def fn():
        a = torch.ones(1000)          # 4000 bytes
        b = a + 1                     # 8000 live
        del a
        c = b * 2                     # 8000 live (a freed)
        c.add_(1)                     # in place: nothing new
        return c[:10]                 # a view: nothing new

    assert peak_bytes(fn) == 8000


def test_bench_hyena_prints_no_profiler_lines(tmp_path):
    res = subprocess.run([sys.executable, "-m", "visiontools.cli", "bench", "hyena", "--grids", "8", "--dim", "32",
                          "--num-heads", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for noise in ("USDT", "gpuGetDeviceCount", "External init callback", "ERROR"):
        assert noise not in res.stderr + res.stdout, res.stderr


def test_evaluate_does_not_import_train():
    res = subprocess.run([sys.executable, "-c", "import sys, visiontools.evaluate as e, visiontools.distributed; "
                          "import inspect; assert 'visiontools.train' not in inspect.getsource(e); "
                          "assert 'visiontools.train' not in sys.modules"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- small API consistency

def test_tome_r_is_validated_on_assignment():
    from timm.models.vision_transformer import VisionTransformer

    from visiontools.patches.timm import apply_tome

    model = apply_tome(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), r=1)
    for bad in (-1, 1.5, (2, -0.5, 1), [1, -1]):
        with pytest.raises(ValueError):
            model.tome_r = bad
    assert model.tome_r == 1
    model.tome_r = (2, -0.5)
    assert model.tome_r == (2, -0.5)


def test_remove_on_unpatched_models_raises_the_same_way():
    from diffusers import UNet2DConditionModel
    from timm.models.vision_transformer import VisionTransformer

    import visiontools

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    for model in (vit, unet):
        with pytest.raises(ValueError, match="is not ToMe-patched"):
            visiontools.remove_tome(model)


def test_render_merges_accepts_an_int_grid_side():
    from PIL import Image

    from visiontools.tome.vis import render_merges

    img = Image.new("RGB", (56, 56), (10, 20, 30))
    source = torch.arange(196) // 2
    assert render_merges(img, source, 14).tobytes() == render_merges(img, source, (14, 14)).tobytes()


def test_demo_on_a_busy_port_says_port(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        line = one_line_error(capsys, ["demo", "--port", str(port), "--threads", "1"], f"127.0.0.1:{port}",
                              "--port N", "GRADIO_SERVER_PORT")
    assert "in use" in line


def test_cpu_peak_memory_of_a_training_step_sees_a_reversible_backward():
    """A reversible ViT's backward recomputes each block inside a custom autograd Function: those
    tensors count (torch.profiler's CPU allocator events reported a quarter of this peak)."""
    import timm

    import visiontools.models  # noqa: F401  (registers rev_vit_cifar)
    from visiontools.bench.memory import peak_memory

    torch.manual_seed(0)
    model = timm.create_model("rev_vit_cifar", depth=2).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def one_block_recompute():  # F and G of one block, with autograd: what the backward rebuilds at least
        blk = list(model.blocks.children())[0][0]  # ReversibleSequence -> ModuleList -> RevCoupling
        h = model._pos_embed(model.patch_embed(x)).detach().requires_grad_()
        (blk.f(h) + blk.g(h)).sum().backward()

    step()  # create the .grad buffers first, so both measurements exclude them
    peak = peak_memory(step, torch.device("cpu"), autograd=True)
    assert peak >= peak_memory(one_block_recompute, torch.device("cpu"), autograd=True) > 0


HEAVY = ("torch", "timm", "diffusers", "gradio", "transformers", "cv2", "onnxruntime")


@pytest.mark.parametrize("code", [
    "import visiontools.cli; visiontools.cli.build_parser()",
    "import visiontools.cli\ntry:\n    visiontools.cli.main(['--help'])\nexcept SystemExit:\n    pass",
    "import visiontools.cli\ntry:\n    visiontools.cli.main(['bench', '--help'])\nexcept SystemExit:\n    pass",
    "import visiontools.cli; visiontools.cli.main(['bench'])",
    "import visiontools.cli\ntry:\n    visiontools.cli.main(['eval', '--help'])\nexcept SystemExit:\n    pass",
])
def test_help_and_the_parser_import_no_heavy_module(code):
    """`visiontools --help` answers in well under a second: building the parser (and the top-level or
    `bench` help) imports no command module, hence no torch, timm, diffusers or gradio (a module check,
    not a flaky wall-time one). A command's module is imported when that command is parsed; `eval`'s
    imports torch only when it runs, so `visiontools eval --help` is fast too."""
    probe = code + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _all_parsers(parser, name="visiontools"):
    """``(command name, parser)`` for the parser and every (nested) command parser, options loaded."""
    import argparse

    parser.format_help()  # loads a lazy command parser's options
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action._name_parser_map.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_help_shows_each_default_once():
    """No option's help says its default twice ("(default: torch's choice) (default: None)"): the
    formatter appends "(default: X)" only to help that does not already mention its default."""
    import re

    seen = 0
    for name, parser in _all_parsers(build_parser()):
        text = parser.format_help()
        entries = re.split(r"\n(?=  -)", text)  # one entry per option (with its wrapped help lines)
        for entry in entries:
            flat = " ".join(entry.split())
            if "(default: " in flat:
                seen += 1
                assert flat.lower().count("default") == 1, (name, flat)
            assert "(default: None)" not in flat, (name, flat)
    assert seen > 20  # the formatter still shows defaults that the help does not mention
    eval_help = " ".join(build_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert "untimed warm-up rounds (default: 1)" in eval_help  # visiontools.defaults.WARMUP
    assert "(default): not measured (default: 0)" not in eval_help and "(default): not measured" in eval_help
