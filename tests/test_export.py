"""visiontools.export and `visiontools export`: ToMe ViTs through torch.export and ONNX (onnxruntime)."""
import importlib.util

import onnx
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from visiontools import export
from visiontools.cli import main
from visiontools.patches.timm import apply_tome, tome_forward


def tiny_tome_vit(r=8, **kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    cfg.update(kw)
    return apply_tome(VisionTransformer(**cfg).eval(), r=r)


def test_torch_export_fixes_token_counts_and_keeps_a_dynamic_batch():
    model = tiny_tome_vit(r=8)
    x = torch.randn(2, 3, 32, 32)
    assert export.token_counts(model, x) == [65, 57, 49, 41, 33]
    program = export.export_program(model, x)
    with torch.inference_mode():
        for batch in (1, 3):
            xb = torch.randn(batch, 3, 32, 32)
            ref, info = tome_forward(model, xb)
            assert info.tokens_per_layer[-1] == 33
            assert (program.module()(xb) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg", "class_token": False, "reg_tokens": 2}],
                         ids=["class-token", "avg-pool+registers"])
def test_onnx_export_runs_in_onnxruntime_with_pytorchs_logits(tmp_path, kw):
    model = tiny_tome_vit(r=(8, -0.5), **kw)
    x = torch.randn(1, 3, 32, 32)
    path = export.export_onnx(model, x, tmp_path / "tome.onnx")
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 32, 32] and isinstance(dims[0], str)  # image size fixed, batch dynamic
    session = export.onnx_session(path, threads=1)
    for batch in (1, 4):
        xb = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            ref = model(xb)
        assert (export.onnx_logits(session, xb) - ref).abs().max() <= 1e-4
    with torch.inference_mode():
        merged, unmerged = model(x), apply_tome(tiny_tome_vit(**kw), r=0)(x)
    assert not torch.allclose(merged, unmerged, atol=1e-3)  # the ONNX model really merges


def test_cli_exports_and_checks_a_patched_vit(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", "test_vit", "--img-size", "64", "--r", "2", "--out", str(out),
                 "--program", str(tmp_path / "model.pt2")]) == 0
    text = capsys.readouterr().out
    assert "tokens per block: 17 -> 15 -> 13 -> 11 -> 9 -> 7 -> 5" in text
    assert "onnxruntime vs PyTorch: max |logit difference|" in text
    assert out.stat().st_size > 0 and (tmp_path / "model.pt2").stat().st_size > 0
    program = torch.export.load(str(tmp_path / "model.pt2"))
    assert program.module()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("argv,message", [
    (["--model", "no_such_vit", "--out", "{tmp}/m.onnx"], "unknown model 'no_such_vit'"),
    (["--model", "test_vit", "--out", "{tmp}/m.txt"], "--out must name a .onnx file"),
    (["--model", "test_vit", "--out", "{tmp}/missing/m.onnx"], "folder of --out does not exist"),
    (["--model", "test_vit", "--r", "-2", "--out", "{tmp}/m.onnx"], "r must be >= 0"),
])
def test_cli_bad_input_gives_one_line(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", *[a.format(tmp=tmp_path) for a in argv]])
    if e.value.code == 2:  # rejected by the argument parser (bench.parse_schedule refuses r < 0): one stderr line
        text = capsys.readouterr().err.strip()
        assert text.startswith("visiontools export: error: ")
    else:
        text = str(e.value)
        assert text.startswith("error: ")
    assert message in text and "\n" not in text


def test_missing_export_extra_names_the_fix(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs onnxruntime: pip install 'visiontools\[export\]'"):
        export.require_onnx()
    with pytest.raises(SystemExit, match=r"^error: ONNX export needs onnxruntime"):
        main(["export", "--model", "test_vit", "--out", str(tmp_path / "m.onnx")])


def test_cli_fails_when_onnxruntime_disagrees(tmp_path, monkeypatch):
    real = export.onnx_logits
    monkeypatch.setattr(export, "onnx_logits", lambda session, x: real(session, x) + 1e-3)  # a broken export
    with pytest.raises(SystemExit, match=r"^error: onnxruntime's logits differ from PyTorch's by 1\.00e-03 > --atol"):
        main(["export", "--model", "test_vit", "--img-size", "32", "--r", "1", "--out", str(tmp_path / "m.onnx")])
