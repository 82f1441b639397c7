"""Guards for guarantees the docs make that had no failing test (issue 44): diffusion transformers refuse
Flux Kontext-style inputs, processors other than diffusers' defaults and gradient checkpointing with
gradients on (docs/diffusion-transformers.md, Limits); a diffusion budget is counted on a meta-device
twin, never on the model itself (docs/methods-budgets.md); removing a UNet patch keeps a processor set
after patching (docs/stable-diffusion.md)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from test_diffusers_dit import tiny
from test_diffusers_patch import tiny_unet

from visiontools.patches.diffusers import apply_tome_sd, remove_tome_sd
from visiontools.patches.diffusers_dit import apply_tome_dit, is_patched, remove_tome_dit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T, FH, FW = 5, 8, 6


def flux_ids(first=0.0):
    ids = torch.zeros(FH, FW, 3)
    ids[..., 0] = first
    ids[..., 1], ids[..., 2] = torch.arange(FH)[:, None], torch.arange(FW)[None]
    return ids.reshape(-1, 3)


def flux_inputs():
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.randn(2, 16, 3, 3, generator=g), size=(FH, FW), mode="bilinear")
    return dict(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=torch.randn(2, T, 16, generator=g),
                pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.full((2,), 0.5),
                img_ids=flux_ids(), txt_ids=torch.zeros(T, 3))


def sd3_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 16, 12, generator=g), encoder_hidden_states=torch.randn(2, T, 16,
                                                                                                     generator=g),
                pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.full((2,), 500.0))


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


@pytest.mark.parametrize("mode", ["merge", "downsample"])
def test_flux_kontext_style_reference_tokens_are_refused_in_one_line(mode):
    """Reference-image tokens appended to the image sequence (ids with another first coordinate, on the
    same grid): the patch refuses the call with one line naming the cause and the fix, rather than
    reducing a sequence whose layout it does not know; the next plain call runs as before."""
    model = tiny("flux")
    kw = flux_inputs()
    kontext = dict(kw, hidden_states=torch.cat([kw["hidden_states"], kw["hidden_states"].flip(1)], dim=1),
                   img_ids=torch.cat([flux_ids(), flux_ids(first=1.0)]))
    assert run(model, kontext).shape[1] == 2 * FH * FW  # the unpatched model takes it
    apply_tome_dit(model, ratio=0.5, mode=mode)
    out = run(model, kw)
    with pytest.raises(ValueError, match=r"^ToMe for Flux: 96 image tokens, but img_ids place them on a 8x6 grid "
                                         r"\(48 tokens\); .*Kontext.* remove_tome") as e:
        run(model, kontext)
    assert "\n" not in str(e.value)
    assert torch.equal(run(model, kw), out)
    remove_tome_dit(model)
    assert run(model, kontext).shape[1] == 2 * FH * FW


def test_a_dit_with_a_custom_processor_is_refused_with_a_type_error():
    """A processor other than diffusers' defaults and their IP-Adapter processors (a custom one) is
    refused, naming the attention, its processor and the fix; nothing is patched."""
    class Custom(AttnProcessor2_0):
        pass

    model = tiny("sd3")
    model.transformer_blocks[1].attn.set_processor(Custom())
    with pytest.raises(TypeError, match=r"transformer_blocks\.1\.attn runs a Custom; .*set_default_attn_processor"):
        apply_tome_dit(model, ratio=0.5)
    assert not is_patched(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"


def test_a_dit_refuses_gradient_checkpointing_with_gradients_on():
    """As for UNets: a checkpointed block would be recomputed in backward, after the call whose grid it
    needs; the error names the ways out, and each of them works."""
    model = tiny("sd3").train()
    kw = sd3_inputs()
    apply_tome_dit(model, ratio=0.5)
    model(**kw).sample.square().mean().backward()  # training without checkpointing works
    assert model.transformer_blocks[0].attn.to_q.weight.grad.abs().sum() > 0
    model.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="gradient checkpointing with gradients on; call "
                                           "disable_gradient_checkpointing"):
        model(**kw)
    state = getattr(model, "_visiontools_tome_dit")
    assert state.ctx.hw is None  # the refused call left nothing behind
    with torch.no_grad():
        model(**kw)  # without gradients checkpointing is off anyway
    model.disable_gradient_checkpointing()
    model(**kw).sample.mean().backward()


@pytest.mark.parametrize("kind", ["sd3", "unet"])
def test_a_diffusion_budget_never_runs_the_model_itself(kind):
    """Budgets are counted on a meta-device twin: the model's own forward is never called while counting,
    and its weights, device and dtype stay as they were."""
    if kind == "sd3":
        model, apply = tiny("sd3"), apply_tome_dit
    else:
        model = tiny_unet(sample_size=8)
        apply = apply_tome_sd
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="out of reach"):  # two counts (none, the most merging), then refused
        apply(model, flops=0.05)
    assert calls == []
    assert all(v.device.type == "cpu" and torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_removing_a_unet_patch_keeps_a_processor_set_after_patching():
    """``remove_tome_sd`` restores only the processors that are still the patch's own: one the user set
    after patching stays, the others get their original processor back."""
    class Mine(AttnProcessor2_0):
        pass

    unet = tiny_unet(sample_size=8)
    before = dict(unet.attn_processors)
    apply_tome_sd(unet, ratio=0.5, max_downsample=2)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    mine = Mine()
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(mine)
    remove_tome_sd(unet)
    after = unet.attn_processors
    assert after[name] is mine
    assert all(after[k] is p for k, p in before.items() if k != name)


def test_eval_compare_refuses_a_checkpoint_with_other_classes():
    """docs/training-evaluation.md: a ``--compare`` checkpoint with other classes (not only another
    normalisation) is refused, naming the key; one trained on the same data is accepted."""
    from visiontools.evaluate import load_comparisons
    from visiontools.models import load_default_model

    _, desc = load_default_model()
    cpu = torch.device("cpu")
    assert list(load_comparisons(["cifar10_vit"], desc, cpu)) == ["cifar10_vit"]
    swapped = {**desc, "classes": list(reversed(desc["classes"]))}
    with pytest.raises(ValueError, match=r"--compare cifar10_vit: its classes \(\['airplane'.*differs from the "
                                         r"evaluated model's \(\['truck'"):
        load_comparisons(["cifar10_vit"], swapped, cpu)
