"""Guards for the ToMe engine behind the public API (issue 25), through ``visiontools.apply_tome`` /
``visiontools.remove_tome`` only: a FLOP budget of the whole model merges nothing, and a DINOv2 with
a non-unit layer scale stays exact at r=0."""
import pytest
import timm
import torch
import transformers as T
from timm.models.vision_transformer import VisionTransformer

import visiontools
import visiontools.models  # noqa: F401  (registers hyena_vit_cifar)


def _tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10).eval()


def _tiny_hyena():
    torch.manual_seed(0)
    return timm.create_model("hyena_vit_cifar", embed_dim=32, depth=2, num_heads=2).eval()


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_hyena], ids=["vit", "hyena-grid"])
@pytest.mark.parametrize("budget", [dict(flops=1.0), dict(flops=1), dict(speedup=1.0)])
def test_a_budget_of_the_whole_model_is_accepted_and_merges_nothing(make, budget):
    """flops=1.0 (all of the unpatched model's FLOPs; likewise speedup=1.0) is a valid budget: the
    schedule is all zeros, its FLOP fraction exactly 1, and the output the unpatched model's."""
    model = make()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        visiontools.apply_tome(model, **budget)
        depth = len(model.blocks)
        assert model.tome_budget.schedule == [0] * depth and list(model.tome_r) == [0] * depth
        assert model.tome_budget.flop_fraction == 1.0
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
        visiontools.remove_tome(model)
        assert torch.equal(model(x), ref)


SMALL_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, layerscale_value=0.5)


@pytest.mark.parametrize("cls,config", [
    (T.Dinov2Model, T.Dinov2Config(**SMALL_DINO)),
    (T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig(**SMALL_DINO, num_register_tokens=2)),
], ids=["dinov2", "dinov2-registers"])
def test_dinov2_with_a_non_unit_layer_scale_is_exact_at_r0(cls, config):
    """The patched layer must apply DINOv2's layer scale (lambda1 after attention, lambda2 after the
    MLP) where the model does: at 0.5 (not 1) a missing or misplaced scale changes the output."""
    torch.manual_seed(0)
    model = cls(config).eval()
    scales = [(layer.layer_scale1.lambda1, layer.layer_scale2.lambda1) for layer in model.encoder.layer]
    assert all(torch.equal(s, torch.full_like(s, 0.5)) for pair in scales for s in pair)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=x)
        for prop_attn in (True, False):
            visiontools.apply_tome(model, r=0, prop_attn=prop_attn)
            out = model(pixel_values=x)
            torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-6)
            torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-6)
        visiontools.apply_tome(model, r=4)
        merged = model(pixel_values=x).last_hidden_state
        assert merged.shape[1] == ref.last_hidden_state.shape[1] - 2 * 4 and torch.isfinite(merged).all()
        visiontools.remove_tome(model)
        assert torch.equal(model(pixel_values=x).last_hidden_state, ref.last_hidden_state)
