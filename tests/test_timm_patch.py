"""visiontools.patches.timm: ToMe on timm ViTs (random weights, built offline)."""
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from visiontools.patches.timm import apply_tome, remove_tome, tome_forward
from visiontools.merge import parse_r

torch.manual_seed(0)


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**cfg).eval()


# (timm name, kwargs keeping the real architecture but a small input)
MODELS = [
    ("vit_small_patch16_224", {"img_size": 64}),
    ("deit_small_distilled_patch16_224", {"img_size": 64}),
    ("deit3_small_patch16_224", {"img_size": 64}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 70}),
    ("vit_base_patch16_clip_224", {"img_size": 64}),
    ("vit_medium_patch16_gap_256", {"img_size": 64}),
]


def _models():
    for name, kw in MODELS:
        yield name, lambda name=name, kw=kw: timm.create_model(name, pretrained=False, **kw).eval()
    yield "qk-norm ViT + LayerScale + registers", lambda: tiny_vit(
        qk_norm=True, init_values=1e-1, reg_tokens=2, no_embed_class=True)


@pytest.mark.parametrize("name,make", list(_models()), ids=[n for n, _ in _models()])
def test_r0_matches_unpatched_and_remove_restores_bit_for_bit(name, make):
    model = make()
    H, W = model.patch_embed.img_size
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, r=0)
        assert (model(x) - ref).abs().max() <= 1e-5
        model.tome_r = 4
        merged = model(x)
        assert merged.shape == ref.shape and not torch.allclose(merged, ref)
        remove_tome(model)
        assert type(model).__name__ in ("VisionTransformer", "VisionTransformerDistilled")
        assert not hasattr(model, "tome_r")
        assert torch.equal(model(x), ref)


# --- an independent, loop-based implementation of the paper, to compare against -----------------

def reference_vit_tome(model, img, rs, prop_attn=True):
    """ViT forward with ToMe written from the paper's description, one image at a time, with
    Python loops for the matching and merging (merge in each block between attention and MLP)."""
    P = model.num_prefix_tokens
    outs = []
    for b in range(img.shape[0]):
        x = model.norm_pre(model._pos_embed(model.patch_embed(img[b:b + 1])))[0]  # (N, C)
        size = [1.0] * x.shape[0]
        for blk, r in zip(model.blocks, rs):
            attn = blk.attn
            h = blk.norm1(x)
            N = h.shape[0]
            qkv = (h @ attn.qkv.weight.T + attn.qkv.bias).reshape(N, 3, attn.num_heads, attn.head_dim)
            q, k, v = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)
            q, k = attn.q_norm(q), attn.k_norm(k)
            logits = q @ k.transpose(-1, -2) / attn.head_dim ** 0.5
            if prop_attn:
                logits = logits + torch.tensor(size).log()[None, None, :]
            y = (logits.softmax(-1) @ v).transpose(0, 1).reshape(N, -1)
            x = x + blk.ls1(attn.proj(y))
            keys = k.mean(0)
            # bipartite soft matching on the unprotected tokens
            r = min(r, (N - P) // 2)
            if r > 0:
                A = list(range(P, N, 2))
                B = list(range(P + 1, N, 2))
                kn = F.normalize(keys, dim=-1)
                best = {}
                for a in A:
                    sims = [float(kn[a] @ kn[bb]) for bb in B]
                    j = max(range(len(B)), key=lambda j: sims[j])
                    best[a] = (sims[j], B[j])
                order = sorted(A, key=lambda a: -best[a][0])
                merged, kept = order[:r], order[r:]
                groups = {bb: [bb] for bb in B}
                for a in merged:
                    groups[best[a][1]].append(a)
                new_x, new_size = [x[i] for i in range(P)], [size[i] for i in range(P)]
                for a in kept:
                    new_x.append(x[a])
                    new_size.append(size[a])
                for bb in B:
                    s = sum(size[i] for i in groups[bb])
                    new_x.append(sum(x[i] * size[i] for i in groups[bb]) / s)
                    new_size.append(s)
                x, size = torch.stack(new_x), new_size
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        x = model.norm(x)
        if model.global_pool == "avg":
            w = torch.tensor(size[P:])[:, None]
            pooled = (x[P:] * w).sum(0) / w.sum()
        else:
            pooled = x[0]
        outs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outs)


@pytest.mark.parametrize("kw,r", [
    ({}, 8),
    ({}, (8, -0.5)),
    ({"class_token": False, "global_pool": "avg", "fc_norm": True}, 6),
    ({"reg_tokens": 3, "qk_norm": True, "init_values": 0.5}, [10, 0, 7, 30]),
], ids=["cls-r8", "cls-decreasing", "avgpool-noprefix", "registers-qknorm-list"])
def test_matches_independent_reference_implementation(kw, r):
    model = tiny_vit(**kw)
    x = torch.randn(3, 3, 32, 32)
    rs = parse_r(len(model.blocks), r)
    with torch.no_grad():
        expected = reference_vit_tome(model, x, rs)
        apply_tome(model, r=r)
        out, info = tome_forward(model, x, trace_source=True)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    # token counts follow the schedule, each layer capped at half of the unprotected tokens
    P = model.num_prefix_tokens
    n = 64 + P
    counts = [n]
    for layer_r in rs:
        n -= min(layer_r, (n - P) // 2)
        counts.append(n)
    assert info.tokens_per_layer == counts


def test_source_map_protected_tokens_and_sizes():
    model = apply_tome(tiny_vit(reg_tokens=4), r=12)
    P = model.num_prefix_tokens
    with torch.no_grad():
        _, info = tome_forward(model, torch.randn(2, 3, 32, 32), trace_source=True)
    src, size = info.source, info.size[..., 0]
    assert src.shape == (2, 64) and len(info.layer_sources) == 4
    assert (src >= P).all()  # no patch ever merged into a class/register token
    assert (size[:, :P] == 1).all()
    counts = torch.zeros_like(size).scatter_add_(1, src, torch.ones_like(src, dtype=size.dtype))
    torch.testing.assert_close(counts[:, P:], size[:, P:])  # every patch in exactly one token
    assert int(size.sum(1)[0]) == 64 + P


def test_batch_one_odd_image_sizes_and_changing_shapes_between_calls():
    model = apply_tome(tiny_vit(dynamic_img_size=True, dynamic_img_pad=True), r=5)
    with torch.no_grad():
        for shape in [(1, 3, 32, 32), (2, 3, 37, 23), (1, 3, 45, 61), (3, 3, 32, 32)]:
            x = torch.randn(*shape)
            out, info = tome_forward(model, x, trace_source=True)
            grid = model.patch_embed.dynamic_feat_size(shape[2:])
            assert out.shape == (shape[0], 10)
            assert info.source.shape == (shape[0], grid[0] * grid[1])
            # a sample's result does not depend on what else is in the batch or ran before
            torch.testing.assert_close(model(x[:1]), out[:1], atol=1e-5, rtol=1e-5)


def test_forward_features_and_forward_head_agree_with_forward():
    cls_model = apply_tome(tiny_vit(), r=6)
    avg_model = apply_tome(tiny_vit(class_token=False, global_pool="avg"), r=6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(cls_model.forward_head(cls_model.forward_features(x)), cls_model(x))
        feats, info = avg_model.tome_forward_features(x)
        torch.testing.assert_close(avg_model.forward_head(feats, size=info.size), avg_model(x))
        with pytest.raises(ValueError, match="needs the token sizes"):
            avg_model.forward_head(avg_model.forward_features(x))


def test_two_models_in_two_threads_give_their_own_results():
    models = [apply_tome(tiny_vit(), r=8), apply_tome(tiny_vit(class_token=False, global_pool="avg"), r=3)]
    inputs = [torch.randn(4, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        expected = [m(x) for m, x in zip(models, inputs)]
    results = [[None] * 20, [None] * 20]

    def work(i):
        with torch.no_grad():
            for j in range(20):
                results[i][j] = models[i](inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(2):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i])


def test_gradients_flow_with_and_without_checkpointing():
    for ckpt in (False, True):
        model = apply_tome(tiny_vit(drop_path_rate=0.1), r=6).train()
        model.set_grad_checkpointing(ckpt)
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_torch_compile_matches_eager():
    model = apply_tome(tiny_vit(), r=8)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [-1, 2.5, "16", [1, 2]])
def test_bad_r_is_a_value_error(bad):
    model = tiny_vit()
    with pytest.raises(ValueError):
        if isinstance(bad, list):  # wrong length for 4 blocks, found at the first forward
            apply_tome(model, r=bad)(torch.randn(1, 3, 32, 32))
        else:
            apply_tome(model, r=bad)


@pytest.mark.parametrize("name,kw,match", [
    ("eva02_tiny_patch14_224", {"img_size": 56}, "Eva"),
    ("beit_base_patch16_224", {"img_size": 32, "depth": 1}, "Beit"),
    ("swin_tiny_patch4_window7_224", {}, "SwinTransformer"),
])
def test_unsupported_models_get_a_clear_error(name, kw, match):
    model = timm.create_model(name, pretrained=False, **kw)
    with pytest.raises(TypeError, match=match):
        apply_tome(model, r=4)


def test_masks_are_refused_and_map_pooling_is_refused():
    model = apply_tome(tiny_vit(), r=4)
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.randn(1, 3, 32, 32), is_causal=True)
    with pytest.raises(TypeError, match="map"):
        apply_tome(tiny_vit(global_pool="map"), r=4)


def test_top_level_dispatch():
    import visiontools
    model = visiontools.apply_tome(tiny_vit(), r=3)
    assert model.tome_r == 3
    visiontools.remove_tome(model)
    assert type(model) is VisionTransformer
    with pytest.raises(TypeError, match="no ToMe adapter"):
        visiontools.apply_tome(torch.nn.Linear(2, 2), r=3)
