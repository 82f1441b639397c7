"""An r larger than a block can merge is allowed, reported once (a warning naming the cap), and bench
tables label such a row with the r its blocks applied (issue 47)."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import visiontools
from visiontools.cli import main


def tiny_vit(img: int):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=img, depth=4, num_classes=10).eval()


def forward_warnings(model, img: int, calls: int = 3) -> list[str]:
    """The warnings of ``calls`` forward passes under Python's default filter (each shown once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with torch.no_grad():
            for _ in range(calls):
                model(torch.randn(1, 3, img, img))
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_an_r_above_the_cap_is_applied_capped_and_reported_once():
    model = visiontools.apply_tome(tiny_vit(80), r=1000)  # 25 patches + the class token
    msgs = forward_warnings(model, 80)
    assert msgs == ["ToMe r 1000 is more than block 0 can merge: a block merges at most half of its unprotected "
                    "tokens (12 of 26 there), so the r applied per block is 12,6,3,2 (requested: "
                    "1000,1000,1000,1000)"], msgs
    _, info = visiontools.patches.timm.tome_forward(model, torch.randn(1, 3, 80, 80))
    assert info.tokens_per_layer == [26, 14, 8, 5, 3]  # allowed: the capped r is applied
    model.tome_r = 3  # within every block's cap: silent
    assert forward_warnings(model, 80) == []


def test_a_solved_budget_is_the_schedule_as_applied_and_never_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the solve's trial schedules nor the result warn
        model = visiontools.apply_tome(tiny_vit(64), flops=0.5)
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    n = 16
    for r in model.tome_r:
        assert r <= n // 2
        n -= r


def test_bench_labels_a_capped_row_with_the_r_applied(capsys):
    with pytest.warns(UserWarning, match="at most half of its unprotected tokens"):
        rc = main(["bench", "--model", "cifar10_vit", "--r", "999", "8", "--batch-size", "1", "--repeats", "1",
                   "--warmup", "0", "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| ToMe r=[32,16,8,4,2,1] (asked r=999, capped) | 65 -> 3 |" in out, out
    assert "| ToMe r=8 | 65 -> 25 |" in out and "| ToMe r=999 |" not in out, out


def test_bench_onnx_labels_a_capped_row_with_the_r_applied(monkeypatch, capsys):
    """The labels only: export and onnxruntime are stood in for by the PyTorch model itself."""
    import visiontools.export as export

    class Session:
        def __init__(self, model):
            self.model = model

        def get_inputs(self):
            return [type("Input", (), {"name": "x"})]

        def run(self, _, feed):
            with torch.no_grad():
                return [self.model(torch.from_numpy(feed["x"])).numpy()]

    monkeypatch.setattr(export, "export_onnx", lambda m, x, path, dynamic_batch: m)
    monkeypatch.setattr(export, "onnx_session", lambda m, threads: Session(m))
    monkeypatch.setattr(export, "max_abs_diff", lambda m, s, x: 0.0)
    with pytest.warns(UserWarning, match="at most half"):
        assert main(["bench", "onnx", "--model", "cifar10_vit", "--r", "999", "8", "--batch-size", "1",
                     "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| ToMe r=[32,16,8,4,2,1] (asked r=999, capped) (ONNX) | 65 -> 3 |" in out, out
    assert "| ToMe r=8 (ONNX) | 65 -> 25 |" in out and "r=999 (ONNX)" not in out, out


def test_eval_labels_a_capped_row_with_the_r_applied(datasets_dir):
    from visiontools.evaluate import evaluate

    with pytest.warns(UserWarning, match="at most half of its unprotected tokens"):
        res = evaluate(checkpoint="cifar10_vit", data_dir=str(datasets_dir / "cifar10"), per_class=1, rs=[999, 8],
                       methods=("tome", "pitome"), timing_batch_size=2, repeats=1, warmup=0, progress=False)
    names = [row["name"] for row in res["rows"]]
    assert names == ["unpatched", "ToMe r=[32,16,8,4,2,1] (asked r=999, capped)", "ToMe r=8",
                     "pitome r=[32,16,8,4,2,1] (asked r=999, capped)", "pitome r=8"], names
