"""Guards for the ViT-side guarantees (issue 44): activation checkpointing of a ToMe-patched timm model,
FLOP budgets at another input size (timm and transformers), the r grammar as people type it, and
loading (a checkpoint that does not fit its model, a timm name in another dtype)."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from timm.models.vision_transformer import VisionTransformer

import visiontools
import visiontools.patches.timm
import visiontools.patches.transformers
from visiontools import models
from visiontools.errors import UserError
from visiontools.timing import count_flops
from visiontools.tome.r_text import parse_r_text, r_argument

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**cfg).eval()


# ------------------------------------------------------------------ activation checkpointing

def test_grad_checkpointing_really_recomputes_the_patched_blocks():
    """With ``set_grad_checkpointing()`` each block of a ToMe-patched model keeps no activations: its
    forward runs again in backward (every MLP twice per step), and fewer tensors are saved for backward.
    Without it, each MLP runs once. Under no_grad nothing is recomputed."""
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    counts, saved = {}, {}
    for ckpt in (False, True):
        model = visiontools.apply_tome(_tiny_vit(), r=4).train()
        model.set_grad_checkpointing(ckpt)
        calls = []
        for i, blk in enumerate(model.blocks):
            blk.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))  # (recomputation stops early,
            # once the last saved tensor is back: inside the MLP, before a forward hook would fire)
        n_saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n_saved.append(1) or t, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        counts[ckpt], saved[ckpt] = sorted(calls), len(n_saved)
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        calls.clear()
        with torch.no_grad():
            model(x)
        assert sorted(calls) == [0, 1, 2]
    assert counts[False] == [0, 1, 2]
    assert counts[True] == [0, 0, 1, 1, 2, 2]  # each block's forward again in backward
    assert saved[True] < saved[False] / 2


# ------------------------------------------------------------------ budgets at another input size

def test_a_timm_budget_is_solved_at_each_input_size_and_the_counts_are_kept_apart(monkeypatch):
    """The same model solved at 32 px and at 48 px: each schedule meets its budget as counted
    independently at its own size; the count cache keeps one entry per size (a re-solve at 32 px
    counts nothing and gives the first answer again)."""
    import visiontools.timing as timing

    model = _tiny_vit(dynamic_img_size=True)
    fractions = {}
    for side in (32, 48):
        x = torch.zeros(1, 3, side, side)
        base = count_flops(lambda: model(x))
        visiontools.apply_tome(model, flops=0.6, input_size=(side, side))
        b = model.tome_budget
        assert model.tome_r == b.schedule and b.flop_fraction <= 0.6
        assert count_flops(lambda: model(x)) / base == pytest.approx(b.flop_fraction, rel=1e-6)
        fractions[side] = (b.schedule, b.flop_fraction)
        visiontools.remove_tome(model)
    assert fractions[32] != fractions[48]
    visiontools.apply_tome(model, flops=0.6, input_size=(32, 32))
    visiontools.apply_tome(model, flops=0.6, input_size=(48, 48))
    shapes = {k[0] for k in model.tome_flop_cache}
    assert shapes == {(1, 3, 32, 32), (1, 3, 48, 48)}
    calls = []
    real = timing.count_flops
    monkeypatch.setattr(timing, "count_flops", lambda fn, warmup=True: calls.append(1) or real(fn, warmup))
    visiontools.apply_tome(model, flops=0.6, input_size=(32, 32))
    assert calls == [] and (model.tome_budget.schedule, model.tome_budget.flop_fraction) == fractions[32]


SMALL_HF = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=4)


@pytest.mark.parametrize("cls,config", [(T.Dinov2Model, T.Dinov2Config), (T.ViTModel, T.ViTConfig),
                                        (T.CLIPVisionModel, T.CLIPVisionConfig)], ids=["dinov2", "vit", "clip"])
def test_a_transformers_budget_is_counted_at_its_input_size(cls, config):
    """``input_size`` on a transformers model: the schedule meets the budget as counted at that size
    (DINOv2 interpolates its position embeddings; ViT and CLIP are called with
    ``interpolate_pos_encoding=True``, as a call at that size must be), not at ``config.image_size``."""
    torch.manual_seed(0)
    model = cls(config(**SMALL_HF)).eval()
    kw = {} if cls is T.Dinov2Model else {"interpolate_pos_encoding": True}
    x = torch.zeros(1, 3, 48, 48)
    base = count_flops(lambda: model(pixel_values=x, **kw))
    visiontools.apply_tome(model, flops=0.7, input_size=(48, 48))
    b = model.tome_budget
    assert b.flop_fraction <= 0.7 and model.tome_r == b.schedule
    assert count_flops(lambda: model(pixel_values=x, **kw)) / base == pytest.approx(b.flop_fraction, rel=1e-6)
    small = torch.zeros(1, 3, 32, 32)  # the same schedule keeps another fraction at config.image_size
    at_32 = count_flops(lambda: model(pixel_values=small))
    visiontools.remove_tome(model)
    assert at_32 / count_flops(lambda: model(pixel_values=small)) != pytest.approx(b.flop_fraction, rel=1e-3)


def test_a_timm_budget_at_a_size_the_model_cannot_take_is_one_line():
    model = _tiny_vit()
    with pytest.raises(ValueError, match=r"^input_size=\(48, 48\) is not the \(32, 32\) this model takes: build it "
                                         r"with dynamic_img_size=True .* or leave input_size out$"):
        visiontools.apply_tome(model, flops=0.6, input_size=(48, 48))


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_a_budget_that_fails_leaves_the_model_as_it_was(kind):
    """An unreachable budget is an error, and the model is not left patched at a trial's (or the
    default) r: an unpatched model stays unpatched, a patched one keeps its settings."""
    if kind == "timm":
        model = _tiny_vit()
        patched = lambda: isinstance(model, visiontools.patches.timm.ToMeVisionTransformer)  # noqa: E731
    else:
        torch.manual_seed(0)
        model = T.ViTModel(T.ViTConfig(**SMALL_HF)).eval()
        patched = lambda: visiontools.patches.transformers.is_patched(model)  # noqa: E731
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x) if kind == "timm" else model(pixel_values=x).last_hidden_state
        with pytest.raises(ValueError, match="out of reach"):
            visiontools.apply_tome(model, flops=0.02)
        assert not patched() and not any(n.startswith("tome_") for n in vars(model))
        out = model(x) if kind == "timm" else model(pixel_values=x).last_hidden_state
        assert torch.equal(out, ref)
        visiontools.apply_tome(model, r=2, method="pitome", prop_attn=False)
        with pytest.raises(ValueError, match="out of reach"):
            visiontools.apply_tome(model, flops=0.02, method="tofu")
    assert patched() and model.tome_r == 2 and model.tome_method == "pitome" and model.tome_prop_attn is False
    assert not hasattr(model, "tome_budget")


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_a_plain_r_after_a_budget_drops_the_budget(kind):
    """Re-applying with a plain r replaces an earlier budget: ``tome_budget`` goes with it, so nothing
    (eval's budget column, a saved card) reports a budget that no longer runs."""
    if kind == "timm":
        model = _tiny_vit()
    else:
        torch.manual_seed(0)
        model = T.ViTModel(T.ViTConfig(**SMALL_HF)).eval()
    visiontools.apply_tome(model, flops=0.7)
    assert model.tome_budget.target_flops == 0.7 and model.tome_r == model.tome_budget.schedule
    visiontools.apply_tome(model, r=2)
    assert model.tome_r == 2 and getattr(model, "tome_budget", None) is None


# ------------------------------------------------------------------ the r grammar as people type it

@pytest.mark.parametrize("text,expected", [
    ("8, 4", [8, 4]), (" 8 ,4 ", [8, 4]), ("8, 8, 4, 4", [8, 8, 4, 4]), (" 16 , -0.5 ", (16, -0.5)),
    ("16, 0.5", (16, 0.5)), ("[ 8, 4 ]", [8, 4]), ("( 16 , 1 )", (16, 1.0)), (" 16 ", 16),
])
def test_r_text_with_spaces(text, expected):
    r = parse_r_text(text)
    assert r == expected and type(r) is type(expected)


@pytest.mark.parametrize("text", ["16,inf", "16,-inf", "16, +inf", "(16, inf)", "16,nan"])
def test_an_infinite_inflection_is_one_clear_error(text):
    with pytest.raises(ValueError, match=re.escape(f"the inflection must be a finite number, got {text!r};")):
        parse_r_text(text)
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="finite number"):
        r_argument(text)


# ------------------------------------------------------------------ loading

def _copy_checkpoint(tmp_path, edit):
    """``cifar10_vit``'s file with its tensors edited by ``edit(tensors)``, its metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = models.SHIPPED["cifar10_vit"]
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.pop(next(k for k in t if k.endswith("blocks.1.attn.qkv.weight"))),
     r"missing .*blocks\.1\.attn\.qkv\.weight"),
    (lambda t: t.__setitem__(next(iter(t)).rsplit(".", 1)[0] + ".extra_weight", torch.zeros(2)),
     r"unexpected .*extra_weight"),
], ids=["missing", "extra"])
def test_a_checkpoint_with_a_missing_or_extra_key_is_one_line(tmp_path, edit, words):
    path = _copy_checkpoint(tmp_path, edit)
    with pytest.raises(UserError, match=words) as e:
        models.load(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "vit_cifar_mini_p4" in msg
    from visiontools.cli import error_line
    assert error_line(e.value) == msg


def test_a_checkpoint_with_a_mis_shaped_tensor_is_one_line(tmp_path):
    def edit(t):
        k = next(k for k in t if k.endswith("head.weight"))
        t[k] = t[k][:5]
    path = _copy_checkpoint(tmp_path, edit)
    with pytest.raises(UserError, match=r"head\.weight") as e:
        models.load(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype,expected", [("fp16", torch.float16), (torch.float64, torch.float64),
                                            ("float32", torch.float32)])
def test_load_a_timm_name_in_a_dtype(dtype, expected):
    """``models.load("<timm name>", dtype=...)`` builds the same seeded weights, cast to that dtype."""
    model, desc = models.load("vit_cifar_mini_p4", dtype=dtype, depth=1)
    assert {p.dtype for p in model.parameters()} == {expected} and not desc["trained"]
    ref, _ = models.load("vit_cifar_mini_p4", depth=1)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b.to(expected))
    x = torch.randn(1, 3, 32, 32, dtype=expected)
    with torch.no_grad():
        assert model(x).dtype == expected
    json.dumps({k: v for k, v in desc.items() if k != "classes"})  # the description stays plain data
