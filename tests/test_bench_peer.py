"""`bench vit --peer-tome PATH` (issue 46): the original ToMe timed in the same run, its logits
compared with ours. The peer here is a small stand-in checkout written to tmp_path (no network):
``tome/patch/timm.py`` with the original's interface (``apply_patch(model)``, then ``model.r = r``)."""
import sys

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from visiontools.bench.peer import load_peer_patch
from visiontools.bench.vit import benchmark_vit, markdown_table
from visiontools.cli import main
from visiontools.errors import UserError

PATCH = '''
from tome.merge import R_SCALE  # the peer's own absolute imports resolve inside its checkout
from visiontools.patches.timm import apply_tome


def apply_patch(model, trace_source=False, prop_attn=True):
    apply_tome(model, r=0, prop_attn=prop_attn)
    model.__class__ = type("PeerToMe", (model.__class__,), {
        "r": property(lambda self: self.tome_r, lambda self, v: setattr(self, "tome_r", v * R_SCALE))})
'''


def fake_checkout(root, r_scale: int):
    (root / "tome" / "patch").mkdir(parents=True)
    (root / "tome" / "__init__.py").write_text("raise ImportError('the package __init__ must not run')\n")
    (root / "tome" / "patch" / "__init__.py").write_text("raise ImportError('nor this one')\n")
    (root / "tome" / "merge.py").write_text(f"R_SCALE = {r_scale}\n")
    (root / "tome" / "patch" / "timm.py").write_text(PATCH)
    return root


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()


def test_peer_is_timed_and_its_logits_compared(tmp_path):
    apply_patch = load_peer_patch(fake_checkout(tmp_path / "ToMe", r_scale=1))
    assert not any(k == "tome" or k.startswith("tome.") for k in sys.modules)  # nothing left behind
    res = benchmark_vit(tiny_vit(), [4], batch_size=2, repeats=1, warmup=0, progress=False, peer_patch=apply_patch)
    names = [row["name"] for row in res["rows"]]
    assert names == ["timm (fused SDPA)", "ToMe r=4", "original ToMe r=4"]
    ours, peer = res["rows"][1:]
    assert peer["tokens_per_layer"] == ours["tokens_per_layer"] == [17, 13, 9, 5]
    assert peer["peer_max_abs_diff"] < 1e-5 and peer["peer_top1_agree"]
    assert peer["ours_over_peer"] == pytest.approx(ours["img_per_s"] / peer["img_per_s"])
    assert "- original ToMe r=4: ours runs " in markdown_table(res, "t") and "top-1 agrees" in markdown_table(res, "t")


def test_a_peer_that_merges_differently_is_reported(tmp_path):
    apply_patch = load_peer_patch(fake_checkout(tmp_path / "ToMe", r_scale=0))  # never merges
    res = benchmark_vit(tiny_vit(), [4], batch_size=2, repeats=1, warmup=0, progress=False, peer_patch=apply_patch)
    assert res["rows"][2]["peer_max_abs_diff"] > 1e-3


def test_peer_path_that_is_not_a_checkout_is_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match=r"--peer-tome .*: not a checkout of facebookresearch/ToMe \(.*tome/patch/timm.py "
                                        r"not found\); clone https://github.com/facebookresearch/ToMe"):
        load_peer_patch(tmp_path)
    assert main(["bench", "vit", "--peer-tome", str(tmp_path), "--model", "vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visiontools: error: --peer-tome ")


def test_cli_labels_the_peer_rows(tmp_path, capsys):
    peer = fake_checkout(tmp_path / "ToMe", r_scale=1)
    # 17 tokens, 12 blocks: r=1 is never capped, so the rows keep the label r=1
    assert main(["bench", "vit", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch-size", "1",
                 "--repeats", "1", "--warmup", "0", "--r", "1", "--no-ideal", "--no-progress",
                 "--peer-tome", str(peer)]) == 0
    out = capsys.readouterr().out
    assert "| ToMe r=1 |" in out and "| original ToMe r=1 |" in out and "- original ToMe r=1: ours runs " in out
