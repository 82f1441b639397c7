"""visiontools.patches.transformers: ToMe on Hugging Face vision towers (random weights, small configs)."""
import json
import threading

import pytest
import timm
import torch
import transformers as T
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import visiontools
from visiontools.tome.merge import parse_r
from visiontools.patches import transformers as hf_tome
from visiontools.patches.timm import apply_tome as timm_apply_tome, tome_forward as timm_tome_forward
from visiontools.patches.transformers import apply_tome, remove_tome, tome_forward

IMG, PATCH, LAYERS = 32, 4, 3
SMALL = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=IMG, patch_size=PATCH)


def build(name: str, attn: str = "sdpa"):
    """A random-weight model of the named kind, in eval mode, with the given attention implementation."""
    torch.manual_seed(0)
    mlp = dict(intermediate_size=128)
    if name == "ViTForImageClassification":
        m = T.ViTForImageClassification(T.ViTConfig(**SMALL, **mlp, num_labels=10, attn_implementation=attn))
    elif name == "ViTModel":
        m = T.ViTModel(T.ViTConfig(**SMALL, **mlp, attn_implementation=attn))
    elif name == "CLIPVisionModel":
        m = T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, **mlp, attn_implementation=attn))
    elif name == "CLIPModel":
        text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        m = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=dict(SMALL, **mlp), projection_dim=16,
                                     attn_implementation=attn))
    elif name == "Dinov2Model":
        m = T.Dinov2Model(T.Dinov2Config(**SMALL, attn_implementation=attn))
    elif name == "Dinov2WithRegistersModel":
        m = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2,
                                                                   attn_implementation=attn))
    elif name == "SiglipVisionModel":
        m = T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL, **mlp, attn_implementation=attn))
    elif name == "SiglipModel":  # no projections: text and image embeddings share the width
        text = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        m = T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=dict(SMALL, **mlp), attn_implementation=attn))
    else:
        raise KeyError(name)
    return m.eval()


NAMES = ["ViTForImageClassification", "ViTModel", "CLIPVisionModel", "CLIPModel", "Dinov2Model",
         "Dinov2WithRegistersModel", "SiglipVisionModel", "SiglipModel"]
PREFIX = {"Dinov2WithRegistersModel": 3, "SiglipVisionModel": 0, "SiglipModel": 0}  # class + register tokens; others: 1
N_PATCHES = (IMG // PATCH) ** 2


def run(model, x):
    """The model's main output for images ``x``: logits, image embeddings or pooled features."""
    if isinstance(model, (T.CLIPModel, T.SiglipModel)):  # the vision tower of a vision-language model
        return model.get_image_features(pixel_values=x).pooler_output
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def tower(model):
    """The module to call for token counts: the vision tower of a vision-language model, else the model."""
    return model.vision_model if isinstance(model, (T.CLIPModel, T.SiglipModel)) else model


def snapshot(model):
    """Everything remove_tome must restore: classes, instance attributes, state dict."""
    return ([(n, type(m), sorted(vars(m))) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", NAMES)
def test_r0_equals_unpatched_tokens_follow_r_and_remove_restores_bit_for_bit(name, attn):
    model = build(name, attn)
    x = torch.randn(2, 3, IMG, IMG)
    modules, state = snapshot(model)
    with torch.no_grad():
        ref = run(model, x)
        assert apply_tome(model, r=0) is model and hf_tome.is_patched(model)
        assert (run(model, x) - ref).abs().max() <= 1e-5

        apply_tome(model, r=5)
        _, info = tome_forward(tower(model), pixel_values=x)
        n = N_PATCHES + PREFIX.get(name, 1)
        expected = [n - 5 * i for i in range(LAYERS + 1)]
        assert info.tokens_per_layer == expected
        assert info.num_prefix_tokens == PREFIX.get(name, 1)
        assert info.size.shape == (2, expected[-1], 1)
        assert torch.equal(info.size.sum(1), torch.full((2, 1), float(n)))  # every input token counted once
        merged = run(model, x)
        assert merged.shape == ref.shape and not torch.allclose(merged, ref, atol=1e-4)

        remove_tome(model)
        assert not hf_tome.is_patched(model)
        after_modules, after_state = snapshot(model)
        assert after_modules == modules  # same classes, no attribute left behind
        assert after_state.keys() == state.keys() and all(torch.equal(state[k], after_state[k]) for k in state)
        assert torch.equal(run(model, x), ref)


def test_r_schedules_and_caps_follow_merge_rules():
    model = apply_tome(build("ViTModel"), r=(8, -0.5))
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        _, info = tome_forward(model, pixel_values=x)
        rs = parse_r(LAYERS, (8, -0.5))
        n = [N_PATCHES + 1]
        for r in rs:
            n.append(n[-1] - min(r, (n[-1] - 1) // 2))
        assert info.tokens_per_layer == n
        apply_tome(model, r=100)  # capped at half of the unprotected tokens per layer
        _, info = tome_forward(model, pixel_values=x)
        assert info.tokens_per_layer == [65, 33, 17, 9]
        assert model.tome_r == 100


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_chosen_attention_implementation_stays_in_use_with_the_size_mask(attn, monkeypatch):
    import transformers.models.vit.modeling_vit as modeling_vit

    calls = {"sdpa": [], "eager": []}
    sdpa, eager = ALL_ATTENTION_FUNCTIONS["sdpa"], modeling_vit.eager_attention_forward

    def spy(kind, fn):
        def wrapped(module, q, k, v, mask, **kw):
            calls[kind].append(None if mask is None else mask.clone())
            return fn(module, q, k, v, mask, **kw)
        return wrapped

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", spy("sdpa", sdpa))
    monkeypatch.setattr(modeling_vit, "eager_attention_forward", spy("eager", eager))
    model = apply_tome(build("ViTModel", attn), r=4)
    assert model.config._attn_implementation == attn
    with torch.no_grad():
        _, info = tome_forward(model, pixel_values=torch.randn(2, 3, IMG, IMG))
    other = "eager" if attn == "sdpa" else "sdpa"
    assert len(calls[attn]) == LAYERS and not calls[other]
    masks = calls[attn]
    assert masks[0] is None  # nothing merged yet: no mask, so SDPA keeps its fastest kernel
    for mask, n in zip(masks[1:], info.tokens_per_layer[1:]):  # proportional attention: log(size)
        assert mask.shape == (2, 1, 1, n)
    assert torch.equal(masks[-1].exp().sum(-1), torch.full((2, 1, 1), float(N_PATCHES + 1)))

    calls[attn].clear()
    apply_tome(model, r=4, prop_attn=False)
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, IMG, IMG))
    assert calls[attn] == [None] * LAYERS


def timm_twin(hf: T.ViTForImageClassification):
    """The timm VisionTransformer with the same architecture and weights as a HF ViT classifier."""
    c = hf.config
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.hidden_size, depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads, mlp_ratio=c.intermediate_size / c.hidden_size, qkv_bias=True,
        num_classes=c.num_labels, global_pool="token").eval()
    e, sd = hf.vit.embeddings, {}
    sd["cls_token"], sd["pos_embed"] = e.cls_token, e.position_embeddings
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = (e.patch_embeddings.projection.weight,
                                                                  e.patch_embeddings.projection.bias)
    for i, layer in enumerate(hf.vit.layers):
        a, p = layer.attention, f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = layer.layernorm_before.weight, layer.layernorm_before.bias
        sd[p + "attn.qkv.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        sd[p + "attn.qkv.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = a.o_proj.weight, a.o_proj.bias
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = layer.layernorm_after.weight, layer.layernorm_after.bias
        for fc in ("fc1", "fc2"):
            sd[p + f"mlp.{fc}.weight"], sd[p + f"mlp.{fc}.bias"] = getattr(layer.mlp, fc).weight, getattr(layer.mlp, fc).bias
    sd["norm.weight"], sd["norm.bias"] = hf.vit.layernorm.weight, hf.vit.layernorm.bias
    sd["head.weight"], sd["head.bias"] = hf.classifier.weight, hf.classifier.bias
    vit.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    return vit


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("r", [6, (8, -0.5)])
def test_hf_vit_merges_exactly_like_the_timm_adapter(attn, r):
    torch.manual_seed(0)
    hf = T.ViTForImageClassification(T.ViTConfig(**SMALL, intermediate_size=128, num_labels=10, layer_norm_eps=1e-6,
                                                 attn_implementation=attn)).eval()
    tv = timm_twin(hf)
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        assert (tv(x) - hf(pixel_values=x).logits).abs().max() <= 1e-5  # the twin is exact unpatched
        timm_apply_tome(tv, r=r)
        apply_tome(hf, r=r)
        ref, ref_info = timm_tome_forward(tv, x)
        out, info = tome_forward(hf, pixel_values=x)
    assert info.tokens_per_layer == ref_info.tokens_per_layer
    assert torch.allclose(info.size, ref_info.size)
    assert (out.logits - ref).abs().max() <= 1e-5


def zero_positions(model):
    """Remove position embeddings, so that equal patches give equal tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embedding" in name:
                p.zero_()
    return model


@pytest.mark.parametrize("name", NAMES)
def test_proportional_attention_makes_merging_duplicate_tokens_exact(name):
    """An independent reference: with equal patches (two colours, no position embeddings), merged
    tokens are exact copies and proportional attention (layers and SigLIP's pooling head) counts
    each merged token for the copies it holds, so the pooled output must not change at all."""
    model = zero_positions(build(name))
    x = torch.ones(2, 3, IMG, IMG)
    x[:, :, :, IMG // 2:] = -1.0
    x[1] *= 0.5
    with torch.no_grad():
        ref = run(model, x)
        apply_tome(model, r=6)
        _, info = tome_forward(tower(model), pixel_values=x)
        assert info.tokens_per_layer[-1] < info.tokens_per_layer[0]
        assert (run(model, x) - ref).abs().max() <= 1e-4
        apply_tome(model, r=6, prop_attn=False)  # without the size bias, duplicates are over/under-weighted
        assert (run(model, x) - ref).abs().max() > 1e-3


def test_calls_in_threads_do_not_share_state():
    model = apply_tome(build("SiglipVisionModel"), r=7)
    xs = [torch.randn(b, 3, IMG, IMG) for b in (1, 2, 3, 4)]
    with torch.no_grad():
        expected = [run(model, x) for x in xs]
        results = {}

        def work(i):
            with torch.no_grad():  # grad mode is per thread
                for _ in range(3):
                    results[i] = run(model, xs[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(len(xs)))
    assert not any(k.startswith("_tome") or k == "size" for m in model.modules() for k in vars(m))


def test_dispatch_through_visiontools_and_unsupported_models_name_their_class():
    model = build("CLIPVisionModel")
    assert visiontools.apply_tome(model, r=4) is model and model.tome_r == 4
    visiontools.remove_tome(model)
    assert type(model) is T.CLIPVisionModel and not hasattr(model, "tome_r")

    dino_cls = T.Dinov2ForImageClassification(T.Dinov2Config(**SMALL, num_labels=3))
    with pytest.raises(TypeError, match="Dinov2ForImageClassification"):
        visiontools.apply_tome(dino_cls, r=4)
    bert = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64))
    with pytest.raises(TypeError, match="BertModel"):
        apply_tome(bert, r=4)
    with pytest.raises(ValueError, match="not ToMe-patched"):
        remove_tome(build("ViTModel"))
    with pytest.raises(ValueError, match="r must be"):
        apply_tome(build("ViTModel"), r=-1)


def test_gradient_checkpointing_is_refused_in_one_line():
    model = apply_tome(build("ViTModel"), r=4)
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="checkpointing"):
        model(pixel_values=torch.randn(1, 3, IMG, IMG))
    model.activation_checkpointing_disable()
    model(pixel_values=torch.randn(1, 3, IMG, IMG)).pooler_output.sum().backward()  # training works otherwise
    assert model.embeddings.cls_token.grad is not None


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_only_the_vision_tower_of_a_vision_language_model_merges(name):
    model = build(name)
    ids, x = torch.randint(0, 99, (2, 7)), torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=x)
        apply_tome(model, r=6)
        out = model(input_ids=ids, pixel_values=x)
    assert all(type(layer).__name__ == type(layer).__name__.removeprefix("ToMe") for layer in model.text_model.encoder.layers)
    assert torch.equal(out.text_embeds, ref.text_embeds)  # text tower untouched
    assert not torch.allclose(out.image_embeds, ref.image_embeds, atol=1e-4)


def test_attention_masks_and_unmaskable_attention_are_refused_in_one_line():
    model = apply_tome(build("ViTModel"), r=4)
    x = torch.randn(2, 3, IMG, IMG)
    mask = torch.ones(2, N_PATCHES + 1)
    mask[:, -3:] = 0
    with pytest.raises(ValueError, match="cannot be combined with an attention_mask"):
        model(pixel_values=x, attention_mask=mask)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="proportional attention needs .*not 'flex_attention'"):
        model(pixel_values=x)


@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel", "Dinov2Model", "SiglipVisionModel"])
def test_output_hidden_states_shows_the_merged_tokens(name):
    model = apply_tome(build(name), r=5)
    with torch.no_grad():
        out, info = tome_forward(model, pixel_values=torch.randn(2, 3, IMG, IMG), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == info.tokens_per_layer


def test_transformers_4_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(T, "__version__", "4.46.3")
    with pytest.raises(ImportError, match=r"needs transformers>=5 \(installed: 4\.46\.3\): pip install"):
        apply_tome(build("ViTModel"), r=4)


# --- every method and budgets, through the one engine the timm adapter uses --------------------------

@pytest.mark.parametrize("method", ["tofu", "pitome", "prune"])
def test_hf_vit_reduces_exactly_like_the_timm_adapter_with_every_method(method):
    """Each method on a HF ViT equals the same method on its timm twin (whose methods are checked
    against their straightforward implementations in test_merge_methods)."""
    torch.manual_seed(0)
    hf = T.ViTForImageClassification(T.ViTConfig(**SMALL, intermediate_size=128, num_labels=10, layer_norm_eps=1e-6,
                                                 attn_implementation="sdpa")).eval()
    tv = timm_twin(hf)
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        timm_apply_tome(tv, r=6, method=method)
        visiontools.apply_tome(hf, r=6, method=method)
        ref, ref_info = timm_tome_forward(tv, x)
        out, info = tome_forward(hf, pixel_values=x)
    assert hf.vit.tome_method == method
    assert info.tokens_per_layer == ref_info.tokens_per_layer == [65, 59, 53, 47]
    assert torch.allclose(info.size, ref_info.size)
    assert (out.logits - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["tofu", "pitome", "prune"])
@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel", "Dinov2Model", "SiglipVisionModel"])
def test_every_method_is_exact_at_r0_and_reduces_tokens(name, method):
    model = build(name)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = run(model, x)
        visiontools.apply_tome(model, r=0, method=method)
        assert torch.equal(run(model, x), ref)
        visiontools.apply_tome(model, r=4)  # re-applying keeps the method
        assert tower(model).tome_method == method
        _, info = tome_forward(tower(model), pixel_values=x)
    P = PREFIX.get(name, 1)
    assert info.tokens_per_layer == [P + N_PATCHES - 4 * i for i in range(LAYERS + 1)]


@pytest.mark.parametrize("name", ["ViTForImageClassification", "CLIPVisionModel", "Dinov2Model"])
def test_a_flop_budget_is_met_as_counted(name):
    from visiontools.timing import count_flops

    model = build(name)
    t = model.vit if name == "ViTForImageClassification" else tower(model)
    x = torch.zeros(1, 3, IMG, IMG)
    base = count_flops(lambda: t(pixel_values=x))
    visiontools.apply_tome(model, flops=0.7, method="pitome")
    b = model.tome_budget
    assert t.tome_r == b.schedule and sum(b.schedule) > 0 and b.flop_fraction <= 0.7
    assert t.tome_method == "pitome"  # a budget keeps the method
    assert count_flops(lambda: t(pixel_values=x)) / base == pytest.approx(b.flop_fraction, rel=1e-6)
    visiontools.remove_tome(model)
    assert not any(n.startswith("tome_") for m in model.modules() for n in vars(m))


def test_unknown_keywords_and_methods_name_the_fix():
    model = build("ViTModel")
    with pytest.raises(ValueError, match="method"):
        visiontools.apply_tome(model, r=2, method="bogus")
    with pytest.raises(TypeError, match="ratio.*takes.*method"):
        visiontools.apply_tome(model, ratio=0.5)
    with pytest.raises(ValueError, match="not both"):
        visiontools.apply_tome(model, r=2, flops=0.5)


def test_a_patched_model_keeps_its_class_name_for_transformers(tmp_path, capfd):
    """transformers reads the class name: ``save_pretrained`` writes it into the config's ``architectures``
    (which must name a class plain transformers has) and pipelines check it against the models they
    support. The patched classes carry the original names; the saved model loads back unpatched."""
    model = build("ViTForImageClassification")
    visiontools.apply_tome(model, r=4)
    assert type(model).__name__ == "ViTForImageClassification" and type(model) is not T.ViTForImageClassification
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    again = T.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, IMG, IMG)
    visiontools.remove_tome(model)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, model(pixel_values=x).logits)
    visiontools.apply_tome(model, r=4)
    capfd.readouterr()
    T.pipeline("image-classification", model=model, image_processor=T.ViTImageProcessor(size={"height": IMG,
                                                                                          "width": IMG}))
    assert "not supported" not in capfd.readouterr().err
