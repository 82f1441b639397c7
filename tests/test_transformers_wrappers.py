"""No silent no-ops on transformers wrapper models (issue 47): ``model.tome_r = ...`` (and every ToMe
setting the docs name) on a model that holds the patched vision tower takes effect (random weights)."""
import pytest
import torch

from visiontools.patches.transformers import WRAPPERS, apply_tome, remove_tome, tome_forward

from test_transformers_patch import IMG, build, run, snapshot


@pytest.mark.parametrize("name", ["ViTForImageClassification", "CLIPModel", "SiglipModel"])
def test_setting_tome_r_on_a_wrapper_takes_effect(name):
    model = build(name)
    x = torch.randn(2, 3, IMG, IMG)
    modules, state = snapshot(model)
    with torch.no_grad():
        plain = run(model, x)
        apply_tome(model, r=8)
        merged = run(model, x)
        inner = getattr(model, WRAPPERS[name])
        model.tome_r = 0  # the README's idiom, on the model the user holds
        assert inner.tome_r == 0 and model.tome_r == 0
        assert torch.allclose(run(model, x), plain, atol=1e-5)  # unmerged again
        model.tome_r = 4
        _, info = tome_forward(inner, pixel_values=x)  # set on the wrapper, counted on its tower
        assert info.tokens_per_layer[1] == info.tokens_per_layer[0] - 4
        model.tome_r = 8
        assert torch.equal(run(model, x), merged)
        model.tome_prop_attn, model.tome_method = False, "prune"  # the other settings the docs name
        assert (inner.tome_prop_attn, inner.tome_method) == (False, "prune")
        assert not torch.allclose(run(model, x), merged, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-4)  # r=8 does merge: the checks above can fail
    remove_tome(model)
    assert snapshot(model)[0] == modules and not hasattr(model, "tome_r")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_budget_is_the_towers_on_the_wrapper():
    model = build("ViTForImageClassification")
    apply_tome(model, flops=0.7)
    assert model.tome_budget is model.vit.tome_budget and model.tome_r == model.vit.tome_r
    assert len(model.tome_r) == 3  # one r per layer, solved for the tower
