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


def test_onnx_export_of_the_trained_cifar_vit_classifies_real_images_like_pytorch(tmp_path, datasets_dir):
    from visiontools.data import load_cifar, normalize
    from visiontools.models import load_checkpoint_model

    model, desc = load_checkpoint_model("cifar10_vit")
    apply_tome(model, r=4)
    ds = load_cifar("cifar10", "test", datasets_dir / "cifar10", max_per_class=10)
    x = normalize(ds.images, desc["mean"], desc["std"])
    path = export.export_onnx(model, x[:1], tmp_path / "cifar10_vit_tome.onnx")
    with torch.inference_mode():
        ref = model(x)
    logits = export.onnx_logits(export.onnx_session(path), x)  # 100 real images through the dynamic batch
    assert (logits - ref).abs().max() <= 1e-4
    assert torch.equal(logits.argmax(1), ref.argmax(1))
    assert (ref.argmax(1) == ds.labels).float().mean() > 0.5  # a trained model, not noise


def tiny_tome_eva(r=6):
    """A tiny EVA-02-style model (rotary embeddings, SwiGLU) with ToMe."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    model = Eva(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10,
                use_rot_pos_emb=True, swiglu_mlp=True, ref_feat_shape=(8, 8)).eval()
    torch.nn.init.normal_(model.head.weight)  # timm's tiny head init gives ~1e-4 logits; make them O(1)
    return apply_tome(model, r=r)


@pytest.mark.parametrize("make", [
    lambda r: tiny_tome_vit(r=r, global_pool="avg", class_token=False, reg_tokens=2),  # size-weighted pool, registers
    lambda r: tiny_tome_eva(r=r),
], ids=["vit-avg-registers", "eva-rope"])
def test_onnx_export_runs_in_onnxruntime_with_pytorchs_logits(tmp_path, make):
    model = make((8, -0.5))
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
        merged, unmerged = model(x), apply_tome(make(0), r=0)(x)
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


def test_cli_exports_the_default_checkpoint_without_model_or_r(tmp_path, capsys):
    """With no --model and no --r, export writes the library's one default checkpoint (cifar10_cct, its
    trained weights) at r=8, as eval, video and the demo default to it."""
    from visiontools import models
    from visiontools.cli import build_parser

    # the --model default that --help shows
    for command in (["export", "--out", "x.onnx"], ["video", "--in", "x.mp4", "--out", "y.webm"]):
        assert build_parser().parse_args(command).model == models.DEFAULT_CHECKPOINT, command
    out = tmp_path / "default.onnx"
    assert main(["export", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"exporting {models.DEFAULT_CHECKPOINT} (r=8)" in text
    assert "tokens per block: 64 -> 56 -> 48 -> 40 -> 32 -> 24 -> 16 -> 8" in text
    model, _ = models.load_default_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = apply_tome(model, r=8)(x)
    got = export.onnx_logits(export.onnx_session(str(out)), x)
    assert torch.allclose(got, expected, atol=1e-4)  # the shipped weights, merged


def one_line_error(argv, capsys) -> str:
    """Run ``visiontools export argv`` in-process; assert exit status 2 and one stderr line; return it."""
    try:
        rc = main(["export", *argv])
    except SystemExit as e:  # rejected by the argument parser
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert lines[0].startswith(("visiontools: error: ", "visiontools export: error: ")), lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--model", "no_such_vit", "--out", "{tmp}/m.onnx"], "unknown model 'no_such_vit'"),
    (["--model", "test_vit", "--out", "{tmp}/m.txt"], "--out must name a .onnx file"),
    (["--model", "test_vit", "--out", "{tmp}/missing/m.onnx"], "folder of --out does not exist"),
    (["--model", "test_vit", "--r", "-2", "--out", "{tmp}/m.onnx"], "r must be >= 0"),
    (["--model", "test_vit", "--r", "x", "--out", "{tmp}/m.onnx"], "not an r setting"),
    (["--model", "resnet18", "--out", "{tmp}/m.onnx"], "resnet18 is a ResNet; export supports timm ViTs and EVAs"),
    (["--model", "{tmp}/missing.safetensors", "--out", "{tmp}/m.onnx"], "missing.safetensors"),
    (["--model", "test_vit", "--batch-size", "0", "--out", "{tmp}/m.onnx"], "--batch-size must be >= 1"),
    (["--model", "test_vit", "--img-size", "32", "32", "32", "--out", "{tmp}/m.onnx"], "--img-size takes one or two"),
    (["--model", "test_vit", "--opset", "0", "--out", "{tmp}/m.onnx"], "--opset must be"),
    (["--model", "test_vit", "--atol", "0", "--out", "{tmp}/m.onnx"], "--atol must be > 0"),
])
def test_cli_bad_input_gives_one_line(tmp_path, argv, message, capsys):
    """Every everyday mistake: one ``visiontools: error:`` line on stderr and exit status 2 (not 1)."""
    line = one_line_error([a.format(tmp=tmp_path) for a in argv], capsys)
    assert message in line, line
    assert not list(tmp_path.iterdir())


def test_missing_export_extra_names_the_fix(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs onnxruntime: pip install 'visiontools\[export\]'"):
        export.require_onnx()
    line = one_line_error(["--model", "test_vit", "--out", str(tmp_path / "m.onnx")], capsys)
    assert line.startswith("visiontools: error: ONNX export needs onnxruntime"), line


def test_cli_fails_when_onnxruntime_disagrees(tmp_path, monkeypatch, capsys):
    real = export.onnx_logits
    monkeypatch.setattr(export, "onnx_logits", lambda session, x: real(session, x) + 1e-3)  # a broken export
    line = one_line_error(["--model", "test_vit", "--img-size", "32", "--r", "1", "--out", str(tmp_path / "m.onnx")],
                          capsys)
    assert line.startswith("visiontools: error: onnxruntime's logits differ from PyTorch's by 1.00e-03 > --atol"), line
    assert "--no-check" in line


def test_bench_onnx_compares_the_exports_and_writes_its_table(tmp_path, capsys):
    import json

    out_json, out_md = tmp_path / "onnx.json", tmp_path / "onnx.md"
    assert main(["bench", "onnx", "--model", "test_vit", "--img-size", "64", "--r", "2", "--batch-size", "2",
                 "--repeats", "1", "--warmup", "0", "--threads", "1",
                 "--out-json", str(out_json), "--out-md", str(out_md)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["name"] for r in rows] == ["unpatched (ONNX)", "ToMe r=2 (ONNX)"]
    assert [r["final_tokens"] for r in rows] == [None, 5]
    assert rows[0]["flop_ratio"] == 1.0 and rows[1]["flop_ratio"] > 1.2
    assert all(r["max_abs_diff"] <= 1e-4 and len(r["times_s"]) == 1 for r in rows)
    assert "| ToMe r=2 (ONNX) | 17 -> 7 |" in out_md.read_text() and "onnxruntime" in capsys.readouterr().out


# ------------------------------------------------------------------ guards (issue 25): what the CLI flags export

def test_cli_no_prop_attn_and_static_batch_change_the_exported_model(tmp_path, monkeypatch):
    """--no-prop-attn exports attention without the log(size) bias (no Log in the graph; the logits of
    the patched model with prop_attn=False, not those of the default export); --static-batch fixes
    the batch dimension of input and output to --batch-size, which is otherwise symbolic."""
    import onnxruntime as ort

    exported = {}  # ONNX path -> the model the CLI exported to it
    real = export.export_onnx

    def recording(model, x, path, *args, **kwargs):
        exported[path] = model
        return real(model, x, path, *args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", recording)
    paths = {}
    for name, flags in (("default", []), ("changed", ["--no-prop-attn", "--static-batch", "--batch-size", "2"])):
        paths[name] = tmp_path / f"{name}.onnx"
        torch.manual_seed(0)  # test_vit has random weights: the same ones in both exports
        assert main(["export", "--model", "test_vit", "--img-size", "32", "--r", "3", "--out", str(paths[name]),
                     "--no-check", *flags]) == 0
    graphs = {k: onnx.load(str(p)).graph for k, p in paths.items()}

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert "Log" in {n.op_type for n in graphs["default"].node}
    assert "Log" not in {n.op_type for n in graphs["changed"].node}
    assert [isinstance(d, str) for d in dims(graphs["default"].input[0])] == [True, False, False, False]
    assert isinstance(dims(graphs["default"].output[0])[0], str)
    assert dims(graphs["changed"].input[0]) == [2, 3, 32, 32] and dims(graphs["changed"].output[0]) == [2, 1000]

    model = exported[paths["default"]]
    other = exported[paths["changed"]]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    sessions = {k: export.onnx_session(p, threads=1) for k, p in paths.items()}
    logits = {k: export.onnx_logits(s, x) for k, s in sessions.items()}
    with torch.inference_mode():
        ref = {prop: apply_tome(model, r=3, prop_attn=prop)(x) for prop in (True, False)}
    assert (logits["default"] - ref[True]).abs().max() <= 1e-4
    assert (logits["changed"] - ref[False]).abs().max() <= 1e-4
    assert (logits["changed"] - logits["default"]).abs().max() > 1e-3
    assert export.onnx_logits(sessions["default"], x[:1]).shape == (1, 1000)  # dynamic: any batch
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        export.onnx_logits(sessions["changed"], x[:1])
