"""visiontools.models: the one loader (``load``), the one default checkpoint, and the registered
architectures built the way timm builds its own (real default cfgs, no downloadable weights)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import PretrainedCfg

from visiontools import models
from visiontools.data import CIFAR_STATS
from visiontools.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registered_models_have_real_timm_default_cfgs():
    for name in models.REGISTERED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert isinstance(cfg, PretrainedCfg) and cfg.architecture == name and not cfg.has_weights, name
        assert name not in timm.list_pretrained()  # nothing to download
    cfg = timm.create_model("vit_cifar_mini_p4").pretrained_cfg
    assert cfg["architecture"] == "vit_cifar_mini_p4" and cfg["input_size"] == (3, 32, 32)
    assert cfg["num_classes"] == 10 and cfg["mean"] == CIFAR_STATS["cifar10"][0] and cfg["first_conv"] == "patch_embed.proj"
    assert timm.create_model("conformer_vit_cifar_cct", depth=1).pretrained_cfg["first_conv"] == "patch_embed.proj.0"
    big = timm.models.get_pretrained_cfg("hyena_vit_small_224")
    assert big.input_size == (3, 224, 224) and big.num_classes == 1000 and big.mean == timm.data.IMAGENET_DEFAULT_MEAN


def test_a_models_cfg_follows_the_arguments_it_was_built_with():
    m = timm.create_model("vit_cifar_mini_p4", num_classes=100, img_size=48, depth=1)
    cfg = m.pretrained_cfg
    assert cfg["num_classes"] == m.num_classes == 100 and cfg["input_size"] == (3, 48, 48)
    assert cfg["mean"] == CIFAR_STATS["cifar100"][0]
    assert timm.create_model("attn_vit_cifar", img_size=96, depth=1).pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    over = timm.create_model("eva_cifar_mini_p4", depth=1, pretrained_cfg_overlay={"crop_pct": 0.5}).pretrained_cfg
    assert over["crop_pct"] == 0.5 and over["input_size"] == (3, 32, 32)  # the caller's overlay wins


def test_cct_vit_is_a_conv_tokenizer_feeding_plain_timm_blocks_that_tome_merges():
    """``cct_vit_cifar``: the CCT-style tokenizer (conv/BN/ReLU/max-pool, 32x32 -> 8x8) and plain timm
    ``Block`` s, so ToMe's merges skip whole blocks' work: exact at r=0, 2.67 M parameters, and r=6
    removes about a third of the FLOPs (the tokenizer's share is not reduced)."""
    import visiontools
    from timm.models.vision_transformer import Block

    from visiontools.patches.timm_conformer import ConvTokenizer
    from visiontools.timing import count_flops

    torch.manual_seed(0)
    m = timm.create_model("cct_vit_cifar").eval()
    assert isinstance(m.patch_embed, ConvTokenizer) and all(type(b) is Block for b in m.blocks) and len(m.blocks) == 7
    assert m.patch_embed.grid_size == (8, 8) and m.num_prefix_tokens == 0 and m.global_pool == "avg"
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(2.67e6, rel=0.005)
    assert m.pretrained_cfg["first_conv"] == "patch_embed.proj.0"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        visiontools.apply_tome(m, r=0)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)
        full = count_flops(lambda: m(x))
        visiontools.apply_tome(m, r=6)
        merged = count_flops(lambda: m(x))
    assert 1.4 < full / merged < 1.7


@pytest.mark.parametrize("name", ["vit_cifar_mini_p4", "eva_cifar_mini_p4", "hyena_vit_cifar", "lsh_vit_cifar",
                                  "rev_vit_cifar", "conformer_vit_cifar_cct", "cct_vit_cifar"])
def test_pretrained_is_refused_in_one_line(name):
    with pytest.raises(ValueError, match=f"{name} has no downloadable weights; load a visiontools checkpoint"):
        timm.create_model(name, pretrained=True)


def test_load_takes_a_shipped_name_a_file_or_a_timm_name(tmp_path):
    model, desc = models.load("cifar10_vit")
    assert not model.training and desc["model"] == "vit_cifar_mini_p4" and desc["trained"] and desc["classes"][0] == "airplane"
    same, _ = models.load(models.SHIPPED["cifar10_vit"])  # the file itself
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    half, _ = models.load("cifar10_vit", dtype="fp16")
    assert next(half.parameters()).dtype == torch.float16
    vit, d = models.load("vit_cifar_mini_p4", depth=1)
    assert len(vit.blocks) == 1 and not d["trained"] and d["classes"][3] == "cat" and d["mean"] == list(CIFAR_STATS["cifar10"][0])
    again, _ = models.load("vit_cifar_mini_p4", depth=1)
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), again.state_dict().values()))  # seeded
    torch.rand(1)  # away from the state a seeded build ends in
    state = torch.random.get_rng_state()
    models.load("vit_cifar_mini_p4", depth=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is left alone
    tiny, d = models.load("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1)
    assert d["classes"][0] == "tench" and tiny.patch_embed.img_size == (32, 32)


def test_load_errors_are_one_line():
    with pytest.raises(UserError, match=r"unknown model 'vit_cifar_mini_p5': not a shipped checkpoint \(cifar10_cct, cifar10_cct_tome, cifar10_vit.*"
                                        r"did you mean 'vit_cifar_mini_p4'"):
        models.load("vit_cifar_mini_p5")
    with pytest.raises(FileNotFoundError, match="does not exist.*shipped names"):
        models.load("runs/nothing/last.safetensors")
    with pytest.raises(UserError, match="no model given"):
        models.load(" ")
    with pytest.raises(UserError, match="img_size cannot be changed for checkpoint cifar10_vit"):
        models.load("cifar10_vit", img_size=64)
    with pytest.raises(UserError, match="Hugging Face hub only: it needs pretrained=True"):
        models.create_model("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
    with pytest.raises(UserError) as e:
        models.load("x y")
    assert "\n" not in str(e.value)


def test_default_checkpoint_is_the_cct_and_its_architecture():
    assert models.DEFAULT_CHECKPOINT == "cifar10_cct" and models.DEFAULT_CHECKPOINT in models.SHIPPED
    model, desc = models.load_default_model()
    assert desc["model"] == models.DEFAULT_ARCHITECTURE == "cct_vit_cifar" and type(model).__name__ == "VisionTransformer"
    assert model.num_prefix_tokens == 0 and len(model.blocks) == 7  # plain timm Blocks: ToMe saves their full cost
