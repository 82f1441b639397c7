"""Conv-augmented ViTs (visiontools/layers/conformer.py, patches/timm_conformer.py, the conformer_vit_* models):
shapes on square and non-square grids, true 2D neighbourhoods of the depthwise convolutions, prefix
tokens skipping the convolutions, gradients, errors, and a tiny model training on real CIFAR-10."""
import pytest
import timm
import torch

import visiontools.models  # noqa: F401  (registers conformer_vit_*)
from visiontools.layers.conformer import ConformerBlock, ConvMlp, ConvModule, conv_stem
from visiontools.layers.grid import GridLayout
from visiontools.patches.timm_grid import configure_grid

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def _box(H, W, i, j, k):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[max(i - k // 2, 0):i + k // 2 + 1, max(j - k // 2, 0):j + k // 2 + 1] = True
    return m


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("k", [3, 5])
def test_conv_module_sees_exactly_the_kxk_neighbourhood(norm, k):
    torch.manual_seed(0)
    mod = ConvModule(16, kernel_size=k, conv_norm=norm).eval()
    H, W = 7, 9
    for (i, j) in [(3, 4), (0, 0), (6, 8), (1, 7)]:
        x = torch.zeros(1, H, W, 16)
        x[0, i, j] = torch.randn(16)
        changed = (mod(x) - mod(torch.zeros_like(x))).abs().amax(-1)[0] > 1e-6
        assert torch.equal(changed, _box(H, W, i, j, k)), (i, j)


def test_conv_mlp_neighbourhood_and_prefix_bypass():
    torch.manual_seed(0)
    mlp = ConvMlp(8, 24, dw_kernel=3).eval()
    H, W = 5, 6
    mlp.num_prefix_tokens, mlp.grid_size = 1, (H, W)
    x = torch.zeros(2, 1 + H * W, 8)
    x[:, 1 + 2 * W + 3] = torch.randn(8)  # patch (2, 3)
    diff = (mlp(x) - mlp(torch.zeros_like(x))).abs().amax(-1)
    assert torch.equal(diff[0, 1:].reshape(H, W) > 1e-6, _box(H, W, 2, 3, 3))
    # the prefix token bypasses the depthwise convolution: a plain MLP of itself
    plain = mlp.fc2(mlp.act(mlp.fc1(x[:, :1])))
    torch.testing.assert_close(mlp(x)[:, :1], plain)


def test_block_prefix_tokens_skip_the_convolution():
    """With attention switched off, a prefix token's output does not depend on the grid at all,
    while grid outputs change exactly around a perturbed patch: ConvFFN 3x3, conv module 3x3 and
    ConvFFN 3x3 in a row reach 7x7."""
    torch.manual_seed(0)
    blk = ConformerBlock(16, 2, mlp_ratio=2.0, kernel_size=3, conv_ffn=True, num_prefix_tokens=2).eval()
    blk.grid_size = (9, 11)
    with torch.no_grad():
        blk.attn.proj.weight.zero_()
        blk.attn.proj.bias.zero_()
    H, W = 9, 11
    x = torch.randn(1, 2 + H * W, 16)
    x2 = x.clone()
    x2[0, 2 + 4 * W + 6] += torch.randn(16)  # perturb patch (4, 6)
    y, y2 = blk(x), blk(x2)
    torch.testing.assert_close(y[:, :2], y2[:, :2], rtol=0, atol=0)
    changed = (y - y2).abs().amax(-1)[0, 2:].reshape(H, W) > 1e-6
    assert torch.equal(changed, _box(H, W, 4, 6, 7))


@pytest.mark.parametrize("grid", [(8, 8), (4, 12), (5, 3), (1, 1)])
def test_block_shapes_on_grids(grid):
    H, W = grid
    for p in (0, 1, 3):
        blk = ConformerBlock(24, 3, conv_ffn=True, num_prefix_tokens=p)
        blk.grid_size = (H, W)
        x = torch.randn(2, p + H * W, 24)
        assert blk(x).shape == x.shape
        y, layout = blk.run(x, GridLayout(p, H, W))
        assert y.shape == x.shape and layout == GridLayout(p, H, W)


@pytest.mark.parametrize("name,sizes", [
    ("conformer_vit_cifar", [(32, 32), (48, 64), (16, 40)]),
    ("conformer_vit_cifar_cct", [(32, 32), (64, 32), (24, 40)]),
])
def test_registered_models_run_at_other_resolutions(name, sizes):
    model = timm.create_model(name, **TINY).eval()
    for h, w in sizes:
        assert model(torch.randn(2, 3, h, w)).shape == (2, 10)
        feats = model.forward_features(torch.randn(1, 3, h, w))
        assert feats.shape == (1, (h // 4) * (w // 4), 32)


def test_small_224_builds_with_class_token_and_runs_non_square():
    model = timm.create_model("conformer_vit_small_224", embed_dim=48, depth=1, num_heads=2).eval()
    conv = model.blocks[0].conv.dw
    assert model.num_prefix_tokens == 1 and conv.kernel_size == (7, 7) and conv.groups == conv.in_channels == 48
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert model(torch.randn(1, 3, 96, 160)).shape == (1, 1000)


def test_conv_tokenizer_is_the_patch_embedding():
    model = timm.create_model("conformer_vit_cifar_cct", **TINY)
    stem = model.patch_embed.proj
    assert [type(m).__name__ for m in stem] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2
    assert stem(torch.randn(1, 3, 32, 32)).shape == (1, 32, 8, 8)
    assert conv_stem(3, 40, 8)(torch.randn(1, 3, 40, 24)).shape == (1, 40, 5, 3)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = timm.create_model("conformer_vit_cifar_cct", **TINY).train()
    out = model(torch.randn(4, 3, 32, 32))
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_conv_ffn_in_a_plain_timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    model = configure_grid(VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                             num_classes=10, mlp_layer=ConvMlp, dynamic_img_size=True)).eval()
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 10)


def test_errors_are_one_clear_line():
    with pytest.raises(ValueError, match="conv_norm must be one of"):
        ConvModule(8, conv_norm="group")
    with pytest.raises(ValueError, match="kernel_size must be an odd integer"):
        ConvModule(8, kernel_size=4)
    with pytest.raises(ValueError, match="power-of-2 patch"):
        timm.create_model("conformer_vit_cifar_cct", patch_size=6, **TINY)
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model("conformer_vit_cifar", pretrained=True)
    with pytest.raises(ValueError, match="neither attn_mask"):
        ConformerBlock(8, 2, num_prefix_tokens=0)(torch.randn(1, 4, 8), attn_mask=torch.zeros(4, 4))


def test_tiny_model_trains_on_real_cifar10(datasets_dir, tmp_path):
    """A few hundred real CIFAR-10 images, 4 epochs: the training loss falls, and the checkpoint
    loads back into the same model."""
    from visiontools.models import load_checkpoint_model
    from visiontools.train import load_config, train

    cfg = load_config(None, [])
    cfg.update(model="conformer_vit_cifar_cct", model_kwargs=dict(TINY), data_dir=str(datasets_dir / "cifar10"),
               train_per_class=16, test_per_class=4, epochs=4, batch_size=32, lr=3e-3, warmup_epochs=0.5,
               threads=1, out_dir=str(tmp_path / "run"), ema_decay=0.9)
    train(cfg, progress=False)
    log = [__import__("json").loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in log]
    assert losses[-1] < losses[0] - 0.1, losses
    model, desc = load_checkpoint_model(tmp_path / "run" / "last.safetensors")
    assert desc["model"] == "conformer_vit_cifar_cct"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_cpu_recipe_config_loads_and_builds():
    from pathlib import Path

    from visiontools.train import load_config
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "conformer_cifar10_cpu.yaml")
    assert cfg["model"] == "conformer_vit_cifar_cct" and cfg["ema_decay"] and cfg["warmup_epochs"] == 1.0
    model = timm.create_model(cfg["model"], num_classes=10, **cfg["model_kwargs"])
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 2.0e6


def test_each_tokenizer_token_is_centred_on_its_4x4_cell():
    """The merge picture draws token (i, j) of the conv tokenizer over pixels [4i, 4i+4) x [4j, 4j+4):
    the centre of mass of the token's input gradient (its receptive field) lies in that cell."""
    torch.manual_seed(0)
    model = timm.create_model("conformer_vit_cifar_cct", **TINY).eval()
    assert tuple(model.patch_embed.grid_size) == (8, 8) and tuple(model.patch_embed.patch_size) == (4, 4)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    tokens = model.patch_embed.proj(x)  # (1, C, 8, 8)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i, j in [(0, 0), (3, 5), (7, 7), (4, 0)]:
        (g,) = torch.autograd.grad(tokens[0, :, i, j].pow(2).sum(), x, retain_graph=True)
        w = g.abs().sum(1)[0]
        cy, cx = (w * ys).sum() / w.sum(), (w * xs).sum() / w.sum()
        assert 4 * i - 0.5 <= cy <= 4 * i + 3.5 and 4 * j - 0.5 <= cx <= 4 * j + 3.5, (i, j, cy, cx)


def test_shipped_conformer_checkpoint_classifies_real_cifar10_at_its_recorded_accuracy(recorded_subset):
    """conformer_cifar10: fp16, under 10 MB, trained in at most 2 hours, and its card's numbers hold."""
    from visiontools.models import SHIPPED, load_checkpoint_model

    path = SHIPPED["conformer_cifar10"]
    assert path.stat().st_size < 10e6
    model, meta = load_checkpoint_model("conformer_cifar10")
    assert meta["model"] == "conformer_vit_cifar_cct" and not model.training
    assert meta["weights_dtype"] == "float16" and meta["training_minutes"] <= 120
    full = meta["test_accuracy"]  # whole test split, fp16 weights
    assert full["n"] == 10000 and full["top1"] >= 85.0
    assert sorted(full["per_class_top1"]) == sorted(meta["classes"])
    assert sum(full["per_class_top1"].values()) / 10 == pytest.approx(full["top1"], abs=1e-3)  # 1,000 per class
    rec = meta["subset_accuracy"]
    acc, pred, labels = recorded_subset(model, meta)
    assert acc == pytest.approx(rec["top1"], abs=1.0)
    for c, name in enumerate(meta["classes"][:3]):  # per-class numbers come from the right class
        sub = subset_per_class(pred, labels, c)
        assert sub == pytest.approx(rec["per_class_top1"][name], abs=1e-3)


def subset_per_class(pred, labels, c):
    return 100.0 * (pred[labels == c] == c).float().mean().item()
