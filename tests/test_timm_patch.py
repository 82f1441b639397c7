"""visiontools.patches.timm: ToMe on timm ViTs (random weights, built offline)."""
import math
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.vision_transformer import VisionTransformer

from visiontools.patches.timm import apply_tome, remove_tome, tome_forward
from visiontools.tome.merge import parse_r

torch.manual_seed(0)


def assert_near(out, expected, rel=5e-6):
    """Equal up to float32 rounding: the patch (fused SDPA) and the eager reference differ by at most
    9.5e-7 of the largest logit in every case measured here, so ``rel`` leaves a 5x margin."""
    assert out.shape == expected.shape
    gap, scale = (out - expected).abs().max().item(), expected.abs().max().item()
    assert gap <= rel * scale, f"max abs difference {gap:.3g} > {rel:g} x {scale:.3g}"


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
    ("vit_betwixt_patch16_reg4_gap_256", {"img_size": 64, "init_values": 1.0}),
]
EVA_MODELS = [
    ("eva02_tiny_patch14_224", {"img_size": 56}),
    ("eva02_tiny_patch14_224", {"img_size": 56, "global_pool": "map"}),
    ("eva02_tiny_patch14_224", {"img_size": 56, "global_pool": "avgmax", "class_token": False}),
    ("eva02_tiny_patch14_224", {"img_size": 56, "global_pool": "max"}),
]


def gated_vit(**kw):
    """A tiny ViT whose attention layers have timm's sigmoid output gate (``Attention(gated=True)``;
    ``VisionTransformer`` has no switch for it, so the layers are rebuilt)."""
    model = tiny_vit(**kw)
    torch.manual_seed(1)
    for blk in model.blocks:
        a = blk.attn
        blk.attn = Attention(48, num_heads=3, qkv_bias=True, qk_norm=not isinstance(a.q_norm, torch.nn.Identity),
                             scale_norm=not isinstance(a.norm, torch.nn.Identity), gated=True,
                             attn_drop=a.attn_drop.p, norm_layer=torch.nn.LayerNorm).eval()
    return model


def _models():
    for name, kw in MODELS:
        yield name, lambda name=name, kw=kw: timm.create_model(name, pretrained=False, **kw).eval()
    yield "qk-norm ViT + LayerScale + registers", lambda: tiny_vit(
        qk_norm=True, init_values=1e-1, reg_tokens=2, no_embed_class=True)
    yield "scale-norm ViT", lambda: tiny_vit(scale_attn_norm=True)
    yield "gated-attention ViT", lambda: gated_vit()
    yield "map-pool ViT", lambda: tiny_vit(global_pool="map")
    yield "max-pool ViT", lambda: tiny_vit(global_pool="max", class_token=False)
    yield "avgmax-pool ViT + registers", lambda: tiny_vit(global_pool="avgmax", reg_tokens=2)
    for name, kw in EVA_MODELS:
        yield f"{name} pool={kw.get('global_pool', 'avg')}", lambda name=name, kw=kw: timm.create_model(name, pretrained=False, **kw).eval()


def _state(model):
    """Every module's attribute names and classes (to check that remove_tome leaves nothing behind)."""
    return {name: (type(m), sorted(vars(m))) for name, m in model.named_modules()}


@pytest.mark.parametrize("name,make", list(_models()), ids=[n for n, _ in _models()])
def test_r0_matches_unpatched_and_remove_restores_bit_for_bit(name, make):
    model = make()
    H, W = model.patch_embed.img_size
    x = torch.randn(2, 3, H, W)
    state = _state(model)
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, r=0)
        assert (model(x) - ref).abs().max() <= 1e-5
        model.tome_r = 4
        merged, info = tome_forward(model, x)
        assert merged.shape == ref.shape and not torch.allclose(merged, ref)
        P, n = model.num_prefix_tokens, model.patch_embed.num_patches + model.num_prefix_tokens
        counts = [n]
        for _ in model.blocks:
            n -= min(4, (n - P) // 2)
            counts.append(n)
        assert info.tokens_per_layer == counts
        remove_tome(model)
        assert _state(model) == state  # class restored, no tome_* attribute left on any module
        assert torch.equal(model(x), ref)


# --- the reference implementation's code path, written out to compare against ----------------
#
# facebookresearch/ToMe (tome/merge.py, tome/patch/timm.py) step by step: eager attention with
# log(size) added to the logits, metric = keys averaged over heads, bipartite soft matching over
# the WHOLE sequence split alternately (class token in A, distillation token in B) with -inf
# scores for protected tokens, unmerged A tokens sorted when there is a class token, merge
# closures applied as merge(x * size, "sum") / merge(size, "sum"). The reference protects only
# the class and distillation tokens; register tokens are generalised the same way (every prefix
# token protected, in whichever set the alternate split puts it).

def reference_bipartite_soft_matching(metric, r, num_protected, class_token):
    """Returns the reference's ``merge(x, mode)`` closure for one block (or None when r <= 0)."""
    t = metric.shape[1]
    r = min(r, (t - num_protected) // 2)
    if r <= 0:
        return None
    pa, pb = (num_protected + 1) // 2, num_protected // 2  # protected tokens in set A / set B
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores[..., :pa, :] = -math.inf  # class (and register) tokens in A: never a source
        scores[..., :, :pb] = -math.inf  # distillation (and register) tokens in B: never a destination
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token or num_protected:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge_fn(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        # protected tokens back in front in their original order (reference: cls, dist, rest)
        prefix = [(unm if i % 2 == 0 else dst)[:, i // 2:i // 2 + 1] for i in range(num_protected)]
        return torch.cat(prefix + [unm[:, pa:], dst[:, pb:]], dim=1)

    return merge_fn


def reference_attention(attn, x, size):
    """timm ``Attention.forward`` (eager path, every option) plus log(size) on the logits."""
    B, N, C = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    y = (attn.attn_drop(logits.softmax(dim=-1)) @ v).transpose(1, 2).reshape(B, N, attn.attn_dim)
    y = attn.norm(y)
    if gate is not None:
        y = y * gate
    return attn.proj_drop(attn.proj(y)), k.mean(1)


def reference_vit_tome(model, img, rs, prop_attn=True):
    """Logits of a timm ViT with ToMe along the reference implementation's code path."""
    P = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    size = None
    for blk, r in zip(model.blocks, rs):
        x_attn, metric = reference_attention(blk.attn, blk.norm1(x), size if prop_attn else None)
        x = x + blk.drop_path1(blk.ls1(x_attn))
        merge_fn = reference_bipartite_soft_matching(metric, r, P, model.cls_token is not None)
        if merge_fn is not None:
            if size is None:
                size = torch.ones_like(x[..., 0, None])
            x = merge_fn(x * size, mode="sum")
            size = merge_fn(size, mode="sum")
            x = x / size
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = model.norm(x)
    w = torch.ones_like(x[..., :1]) if size is None else size
    if model.global_pool in ("token", ""):
        return model.forward_head(x)  # class token (DeiT: class and distillation heads averaged)
    x, w = x[:, P:], w[:, P:]
    if model.global_pool == "map":  # attention pooling, proportional like the blocks' attention
        x = model.attn_pool(x, attn_mask=w.log()[:, None, None, :, 0] if prop_attn else None)
    elif model.global_pool == "max":  # a max over tokens: sizes play no part
        x = x.amax(dim=1)
    else:  # size-weighted average, as the reference's MAE patch pools; avgmax adds the max
        avg = (x * w).sum(dim=1) / w.sum(dim=1)
        x = avg if model.global_pool == "avg" else 0.5 * (x.amax(dim=1) + avg)
    return model.head(model.head_drop(model.fc_norm(x)))


REFERENCE_CASES = [  # (id, model maker, r)
    ("cls-r8", lambda: tiny_vit(), 8),
    ("cls-decreasing", lambda: tiny_vit(), (8, -0.5)),
    ("avgpool-noprefix", lambda: tiny_vit(class_token=False, global_pool="avg", fc_norm=True), 6),
    ("registers-qknorm-list", lambda: tiny_vit(reg_tokens=3, qk_norm=True, init_values=0.5), [10, 0, 7, 30]),
    ("scale-norm", lambda: tiny_vit(scale_attn_norm=True), 7),
    ("gated", lambda: gated_vit(scale_attn_norm=True), 7),
    ("map-pool", lambda: tiny_vit(global_pool="map"), 7),
    ("max-pool", lambda: tiny_vit(global_pool="max", class_token=False), 7),
    ("avgmax-pool-registers", lambda: tiny_vit(global_pool="avgmax", reg_tokens=2), 7),
] + [(name, lambda name=name, kw=kw: timm.create_model(name, pretrained=False, **kw).eval(), 2) for name, kw in [
    ("vit_small_patch16_224", {"img_size": 80}),
    ("deit_small_distilled_patch16_224", {"img_size": 80}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 70, "init_values": 1.0}),
    ("vit_medium_patch16_gap_256", {"img_size": 80}),
    ("vit_betwixt_patch16_reg4_gap_256", {"img_size": 80, "init_values": 1.0, "depth": 6}),
]]


@pytest.mark.parametrize("make,r", [c[1:] for c in REFERENCE_CASES], ids=[c[0] for c in REFERENCE_CASES])
def test_matches_reference_implementation(make, r):
    model = make()
    H, W = model.patch_embed.img_size
    x = torch.randn(2, 3, H, W)
    rs = parse_r(len(model.blocks), r)
    with torch.no_grad():
        expected = reference_vit_tome(model, x, rs)
        apply_tome(model, r=r)
        out, info = tome_forward(model, x, trace_source=True)
    assert_near(out, expected)
    assert_near(model(x), expected)
    # token counts follow the schedule, each layer capped at half of the unprotected tokens
    P = model.num_prefix_tokens
    n = model.patch_embed.num_patches + P
    counts = [n]
    for layer_r in rs:
        n -= min(layer_r, (n - P) // 2)
        counts.append(n)
    assert info.tokens_per_layer == counts


@pytest.mark.parametrize("fused", [True, False], ids=["fused-sdpa", "eager"])
def test_attention_dropout_is_applied_in_train_mode(fused):
    """Same seed, same dropout masks: at r=0 the patched model in train mode equals timm's; with
    r>0 (eager attention) it equals the reference, whose attention dropout is timm's module."""
    model = tiny_vit(attn_drop_rate=0.5).train()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model(x)
        assert not torch.allclose(expected, model.eval()(x).detach(), atol=1e-3)  # dropout matters here
        apply_tome(model.train(), r=0)
        torch.manual_seed(1)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
        if not fused:
            model.tome_r = 6
            torch.manual_seed(2)
            out = model(x)
            torch.manual_seed(2)
            assert_near(out, reference_vit_tome(model, x, parse_r(4, 6)))


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
    ("eva02_tiny_patch14_224", {"img_size": 56, "attn_type": "rope"}, "AttentionRope"),
    ("eva02_tiny_patch14_224", {"img_size": 56, "use_post_norm": True}, "EvaBlockPostNorm"),
    ("vit_small_patch16_224", {"img_size": 32, "global_pool": "prr"}, "AttentionPoolPrr"),
    ("beit_base_patch16_224", {"img_size": 32, "depth": 1}, "Beit"),
    ("swin_tiny_patch4_window7_224", {}, "SwinTransformer"),
])
def test_unsupported_models_get_a_clear_error(name, kw, match):
    model = timm.create_model(name, pretrained=False, **kw)
    with pytest.raises(TypeError, match=match):
        apply_tome(model, r=4)


def test_masks_are_refused():
    model = apply_tome(tiny_vit(), r=4)
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.randn(1, 3, 32, 32), is_causal=True)


@pytest.mark.parametrize("pool", ["avgmax", "map"])
def test_sized_pools_need_sizes_in_forward_head(pool):
    model = apply_tome(tiny_vit(global_pool=pool), r=6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, info = model.tome_forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, size=info.size), model(x))
        with pytest.raises(ValueError, match="needs the token sizes"):
            model.forward_head(feats)


def eva(**kw):
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, **kw).eval()


def reference_eva_tome(model, img, rs, rope_rule="mean"):
    """Logits of a timm EVA with ToMe along the reference's code path (as ``reference_vit_tome``),
    with EVA's attention (rotary embeddings on the non-prefix tokens, keys before rotation as the
    metric) and each merged token's sin/cos embedding merged like a feature (``mean``: size-weighted
    mean; ``circular``: then rescaled to unit length)."""
    P = model.num_prefix_tokens
    x, rope = model._pos_embed(model.patch_embed(img))
    x = model.norm_pre(x)
    rope = torch.cat([torch.zeros(P, rope.shape[-1]), rope]).expand(x.shape[0], -1, -1)  # a row per token
    size = None
    for blk, r in zip(model.blocks, rs):
        a, h = blk.attn, blk.norm1(x)
        B, N, C = h.shape
        q, k, v = F.linear(h, a.qkv.weight, torch.cat((a.q_bias, a.k_bias, a.v_bias))).reshape(
            B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        metric = k.mean(1)
        q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope[:, None, P:])], dim=2)
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope[:, None, P:])], dim=2)
        logits = (q * a.scale) @ k.transpose(-2, -1)
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        y = a.proj(a.norm((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, -1)))
        x = x + blk.gamma_1 * y if blk.gamma_1 is not None else x + y
        merge_fn = reference_bipartite_soft_matching(metric, r, P, model.cls_token is not None)
        if merge_fn is not None:
            if size is None:
                size = torch.ones_like(x[..., 0, None])
            rope = merge_fn(rope * size, mode="sum") / merge_fn(size, mode="sum")
            if rope_rule == "circular":
                sin, cos = rope.chunk(2, dim=-1)
                rope = torch.cat([sin, cos], dim=-1) / (sin * sin + cos * cos).sqrt().clamp_min(1e-12).repeat(1, 1, 2)
            x = merge_fn(x * size, mode="sum")
            size = merge_fn(size, mode="sum")
            x = x / size
        y = blk.mlp(blk.norm2(x))
        x = x + blk.gamma_2 * y if blk.gamma_2 is not None else x + y
    x = model.norm(x)
    x = (x * size)[:, P:].sum(dim=1) / size[:, P:].sum(dim=1)
    return model.head(model.fc_norm(x))


@pytest.mark.parametrize("rule", ["mean", "circular"])
def test_eva_matches_reference_implementation(rule):
    model = eva(global_pool="avg")
    x = torch.randn(2, 3, 56, 56)
    rs = parse_r(len(model.blocks), 3)
    with torch.no_grad():
        expected = reference_eva_tome(model, x, rs, rule)
        out, info = tome_forward(apply_tome(model, r=3, rope_rule=rule), x)
    assert_near(out, expected)
    assert info.tokens_per_layer == [17, 14, 11, 8, 5, 3, 2, 2, 2, 2, 2, 2, 2]  # 16 patches + cls; r capped at half


def test_eva_rope_rules():
    """Each rotary-embedding rule is a different model at r>0 and the same one at r=0; a bad rule
    is a ValueError."""
    model, x = eva(), torch.randn(2, 3, 56, 56)
    outs = {}
    with torch.no_grad():
        for rule in ("mean", "circular", "dst"):
            apply_tome(model, r=0, rope_rule=rule)
            outs[rule, 0] = model(x)
            model.tome_r = 4
            outs[rule, 4] = model(x)
    for rule in ("circular", "dst"):
        torch.testing.assert_close(outs[rule, 0], outs["mean", 0], atol=0, rtol=0)
        assert (outs[rule, 4] - outs["mean", 4]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="rope_rule"):
        apply_tome(model, r=4, rope_rule="centroid")
    assert apply_tome(eva(), r=2).tome_rope_rule == "circular"


def test_top_level_dispatch():
    import visiontools
    model = visiontools.apply_tome(tiny_vit(), r=3)
    assert model.tome_r == 3
    visiontools.remove_tome(model)
    assert type(model) is VisionTransformer
    with pytest.raises(TypeError, match="no ToMe adapter"):
        visiontools.apply_tome(torch.nn.Linear(2, 2), r=3)


def test_unsupported_models_and_keywords_are_named_in_one_line():
    """A reversible or LSH ViT, an unknown keyword and a model no adapter handles each get a
    TypeError that names the class (or keyword) and what is supported, never an internal error."""
    import visiontools
    from visiontools.patches.timm_lsh import swap_attention_for_lsh
    from visiontools.patches.timm_reversible import make_reversible

    def vit():
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4)

    with pytest.raises(TypeError, match="'ratio'; it takes r, prop_attn, rope_rule, method, flops"):
        visiontools.apply_tome(vit(), ratio=0.5)
    with pytest.raises(TypeError, match="blocks are a ReversibleSequence"):
        visiontools.apply_tome(make_reversible(vit()), r=2)
    with pytest.warns(UserWarning):
        lsh = swap_attention_for_lsh(vit(), bucket_size=4, n_hashes=1)
    with pytest.raises(TypeError, match="attention LSHAttention is not timm"):
        visiontools.apply_tome(lsh, r=2)
    from visiontools.models import create_model

    registered = create_model("lsh_vit_cifar", embed_dim=32, depth=2, num_heads=2)  # attn_layer with bound options
    with pytest.raises(TypeError, match="attention LSHAttention is not timm"):
        visiontools.apply_tome(registered, r=2)
    with pytest.raises(TypeError, match="remove_tome: Conv2d .* supported: timm"):
        visiontools.remove_tome(torch.nn.Conv2d(1, 1, 1))


def test_reapplying_keeps_the_method_and_a_budget_keeps_it_too():
    import visiontools

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3, num_classes=4).eval()
    visiontools.apply_tome(model, r=2, method="pitome")
    visiontools.apply_tome(model, r=4)
    assert model.tome_method == "pitome"
    visiontools.apply_tome(model, flops=0.8)
    assert model.tome_method == "pitome" and model.tome_budget.flop_fraction <= 0.8
    visiontools.apply_tome(model, r=4, method="tome")
    assert model.tome_method == "tome"


@pytest.mark.parametrize("method", ["tome", "prune"])
def test_checkpointing_gives_the_same_gradients(method):
    """Activation checkpointing recomputes each block from a copy of the token state as it was before
    that block: gradients (of sizes, rope and weights alike) equal those without checkpointing."""
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for ckpt in (False, True):
        model = apply_tome(tiny_vit(global_pool="avg"), r=6, method=method).train()
        model.set_grad_checkpointing(ckpt)
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
