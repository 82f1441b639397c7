"""Token merging through grid operations (visiontools/tome/merge_grid.py, visiontools/layers/grid.py,
patches/timm_grid.py): merged tokens are spread over the grid with the source map, the grid
operation runs, and the result is averaged back into the same groups. Checked against an
independent dense-matrix reference, end to end on Conformer and Hyena ViTs."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import visiontools.models  # noqa: F401  (registers the Conformer and Hyena ViTs)
from visiontools.layers.conformer import ConformerBlock, ConvMlp
from visiontools.layers.grid import GridLayout
from visiontools.layers.hyena import HyenaAttention, direct_conv2d
from visiontools.tome.merge_grid import reduce_to_groups, through_grid, unmerge_to_grid
from visiontools.patches.timm import apply_tome, remove_tome, tome_forward
from visiontools.patches.timm_grid import configure_grid

TINY = dict(embed_dim=32, depth=3, num_heads=2)


def random_layout(B, P, H, W, M, seed=0):
    """A merged layout: the H*W patches split into M non-empty groups at random (per image)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        groups = torch.arange(H * W) % M
        rows.append(groups[torch.randperm(H * W, generator=g)])
    grid_src = torch.stack(rows)
    size = torch.stack([torch.bincount(r, minlength=M) for r in grid_src]).float()[..., None]
    source = torch.cat([torch.arange(P).expand(B, -1), P + grid_src], dim=1)
    size = torch.cat([torch.ones(B, P, 1), size], dim=1)
    return GridLayout(P, H, W, source, size), grid_src


class Dense:
    """Reference: unmerge = A @ t and group mean = A^T g / |group|, with A the (B, H*W, M) one-hot
    assignment matrix of patches to merged tokens."""

    def __init__(self, grid_src, M, H, W):
        self.A = F.one_hot(grid_src, M).float()
        self.H, self.W = H, W

    def run(self, op, t):
        B = t.shape[0]
        g = op((self.A @ t).reshape(B, self.H, self.W, -1)).reshape(B, self.H * self.W, -1)
        return (self.A.transpose(1, 2) @ g) / self.A.sum(1)[..., None]

    def grid_mean(self, t):
        return (self.A @ t).mean(1, keepdim=True)


def test_unmerge_then_reduce_is_identity_and_reduce_is_group_mean():
    layout, grid_src = random_layout(2, 0, 4, 5, 7)
    t = torch.randn(2, 7, 3)
    g = unmerge_to_grid(t, grid_src, 4, 5)
    assert g.shape == (2, 4, 5, 3)
    torch.testing.assert_close(reduce_to_groups(g, grid_src, 7), t)
    y = torch.randn(2, 4, 5, 3)
    ref = Dense(grid_src, 7, 4, 5)
    torch.testing.assert_close(reduce_to_groups(y, grid_src, 7),
                               (ref.A.transpose(1, 2) @ y.reshape(2, 20, 3)) / ref.A.sum(1)[..., None])
    with pytest.raises(ValueError, match=r"\(B, H\*W\)"):
        unmerge_to_grid(t, grid_src[:, :-1], 4, 5)


def test_layout_run_equals_dense_reference_for_a_convolution():
    torch.manual_seed(0)
    layout, grid_src = random_layout(2, 1, 5, 6, 11)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
    op = lambda g: conv(g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # noqa: E731
    t = torch.randn(2, 11, 4)
    torch.testing.assert_close(layout.run(op, t), Dense(grid_src, 11, 5, 6).run(op, t))
    torch.testing.assert_close(through_grid(op, t, grid_src, 5, 6), layout.run(op, t))


def _ref_conformer_block(blk: ConformerBlock, x, layout, dense):
    """ConformerBlock.run on merged tokens, written out with the dense reference for every grid op."""
    P = layout.prefix

    def ffn(mlp, h):
        h = mlp.fc1(h)
        dw = lambda g: mlp.dw(g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # noqa: E731
        h = torch.cat([h[:, :P], dense.run(dw, h[:, P:])], dim=1)
        return mlp.fc2(mlp.act(h))

    x = x + 0.5 * ffn(blk.ff1, blk.norm_ff1(x))
    B, N, C = x.shape
    a = blk.attn
    q, k, v = a.qkv(blk.norm_attn(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / a.head_dim ** 0.5 + layout.size.log()[:, None, None, :, 0]
    x = x + a.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))
    x = torch.cat([x[:, :P], x[:, P:] + dense.run(blk.conv, x[:, P:])], dim=1)
    x = x + 0.5 * ffn(blk.ff2, blk.norm_ff2(x))
    return blk.norm_out(x)


@pytest.mark.parametrize("P", [0, 2])
def test_conformer_block_on_merged_tokens_equals_reference(P):
    torch.manual_seed(0)
    blk = ConformerBlock(16, 2, mlp_ratio=2.0, kernel_size=3, conv_ffn=True, num_prefix_tokens=P).eval()
    H, W, M = 6, 7, 15
    layout, grid_src = random_layout(2, P, H, W, M, seed=1)
    x = torch.randn(2, P + M, 16)
    y, out_layout = blk.run(x, layout, prop_attn=True)
    assert out_layout is layout
    torch.testing.assert_close(y, _ref_conformer_block(blk, x, layout, Dense(grid_src, M, H, W)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("P", [0, 1])
def test_hyena_on_merged_tokens_equals_reference(P):
    """Hyena's short and long convolutions through unmerge -> convolution -> group mean; the long
    convolution of the reference is a direct (non-FFT) convolution; prefix tokens read the grid mean."""
    torch.manual_seed(0)
    attn = HyenaAttention(16, order=2, num_prefix_tokens=P).eval()
    H, W, M = 5, 6, 13
    layout, grid_src = random_layout(2, P, H, W, M, seed=2)
    dense = Dense(grid_src, M, H, W)
    x = torch.randn(2, P + M, 16)
    mix = attn.mixer
    t, pre = x[:, P:], x[:, :P]
    u = dense.run(lambda g: mix.short_conv(g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), mix.in_proj(t))
    v, *gates = u.split(16, dim=-1)
    kernels = mix.filter((H, W)).split(16, dim=0)
    if P:
        c = mix.short_conv
        up = mix.in_proj(pre) * c.weight[:, 0, 1, 1] + c.bias
        vp, *gates_p = up.split(16, dim=-1)
    for n in range(2):
        lc = lambda g, k=kernels[n]: direct_conv2d(g.permute(0, 3, 1, 2), k).permute(0, 2, 3, 1)  # noqa: E731
        z = dense.run(lc, v) + v * mix.skip[n]
        if P:
            vp = gates_p[n] * (dense.grid_mean(v) + vp * mix.skip[n])
        v = gates[n] * z
    ref = mix.out_proj(v)
    if P:
        ref = torch.cat([mix.out_proj(vp), ref], dim=1)
    torch.testing.assert_close(attn.forward_layout(x, layout), ref, rtol=1e-4, atol=1e-5)


def _conv_ffn_vit():
    from timm.models.vision_transformer import VisionTransformer
    return configure_grid(VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                            num_classes=10, mlp_layer=ConvMlp, dynamic_img_size=True))


MODELS = {
    "conformer_vit_cifar": lambda: timm.create_model("conformer_vit_cifar", **TINY),
    "conformer_vit_cifar_cct": lambda: timm.create_model("conformer_vit_cifar_cct", **TINY),
    "conformer_cls_token": lambda: timm.create_model("conformer_vit_small_224", img_size=32, patch_size=4,
                                                     embed_dim=32, depth=3, num_heads=2, num_classes=10),
    "hyena_vit_cifar": lambda: timm.create_model("hyena_vit_cifar", depth=3),
    "hyena_cls_token": lambda: timm.create_model("hyena_vit_small_224", img_size=32, patch_size=4,
                                                 embed_dim=32, depth=3, num_heads=2, num_classes=10),
    "vit_conv_ffn": _conv_ffn_vit,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_r0_equals_unpatched_and_remove_restores_bit_for_bit(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    for h, w in [(32, 32), (24, 40)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref = model(x)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            patched = apply_tome(model, r=0)
            assert type(patched).__name__.startswith("ToMe")
            torch.testing.assert_close(patched(x), ref, rtol=0, atol=1e-5)
            patched.tome_r = 4
            merged = patched(x)
            assert merged.shape == ref.shape and torch.isfinite(merged).all()
            remove_tome(model)
            assert not type(model).__name__.startswith("ToMe")
            assert torch.equal(model(x), ref)
            assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["conformer_cls_token", "hyena_vit_cifar", "conformer_vit_cifar_cct"])
def test_merged_source_map_covers_every_patch_once(name):
    torch.manual_seed(0)
    model = apply_tome(MODELS[name]().eval(), r=(6, -0.5))
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        out, info = tome_forward(model, x, trace_source=True)
        plain = model(x)
    torch.testing.assert_close(out, plain)
    P = info.num_prefix_tokens
    counts = info.tokens_per_layer
    assert counts[0] == P + 8 * 12 and counts[-1] < counts[0] and counts == sorted(counts, reverse=True)
    assert info.source.shape == (3, 8 * 12)
    M = counts[-1]
    for b in range(3):
        s = info.source[b]
        assert s.min() >= P and s.max() < M  # every patch in exactly one non-prefix token
        bc = torch.bincount(s, minlength=M)
        assert (bc[P:] > 0).all()  # every merged token holds at least one patch
        torch.testing.assert_close(bc[P:].float(), info.size[b, P:, 0])  # sizes are the patch counts
    for src, n in zip(info.layer_sources, counts[1:]):
        assert src.max() < n


def test_training_through_merged_grid_ops_and_errors():
    torch.manual_seed(0)
    model = apply_tome(timm.create_model("conformer_vit_cifar_cct", **TINY).train(), r=8)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="r must be >= 0"):
        apply_tome(timm.create_model("conformer_vit_cifar", **TINY), r=-1)
    m = timm.create_model("conformer_vit_cifar", global_pool="map", **TINY)
    with pytest.raises(TypeError, match="global_pool='map'"):
        apply_tome(m, r=2)


def test_plain_and_grid_vits_get_their_own_patched_class():
    """Both are timm VisionTransformer: patching one kind first must not give the other its class."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    for order in (["plain", "grid"], ["grid", "plain"]):
        models = {"plain": VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                             num_classes=10).eval(),
                  "grid": timm.create_model("conformer_vit_cifar", **TINY).eval()}
        for kind in order:
            ref = models[kind](x)
            m = apply_tome(models[kind], r=3)
            assert type(m).__name__.startswith("ToMeGrid") == (kind == "grid")
            assert tome_forward(m, x)[1].tokens_per_layer[-1] < 64
            m.tome_r = 0
            torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)


def test_grid_models_meet_a_flop_budget_and_refuse_other_methods():
    """A flops= budget solves a schedule through the grid operations (and meets it); methods other
    than ToMe are not wired through them: refused at apply and when set later, never ignored."""
    from visiontools.timing import count_flops

    torch.manual_seed(0)
    for name, target in (("hyena_vit_cifar", 0.8), ("conformer_vit_cifar_cct", 0.95)):  # tiny: grid ops dominate
        model = timm.create_model(name, embed_dim=32, depth=2, num_heads=2).eval()
        x = torch.randn(1, 3, 32, 32)
        apply_tome(model, flops=target)  # on a fresh model: Hyena's filter cache is still empty
        b = model.tome_budget
        assert model.tome_r == b.schedule and sum(b.schedule) > 0 and b.flop_fraction <= target
        model.tome_r = 0
        base = count_flops(lambda: model(x))  # r=0: the unpatched model's FLOPs (steady state)
        model.tome_r = b.schedule
        assert count_flops(lambda: model(x)) / base == pytest.approx(b.flop_fraction, rel=1e-6)
        tokens = tome_forward(model, x)[1].tokens_per_layer
        assert tokens[:2] == [64, 64 - b.schedule[0]] and tokens[2] < tokens[1]
    with pytest.raises(ValueError, match="grid operations"):
        apply_tome(timm.create_model("hyena_vit_cifar", embed_dim=32, depth=2, num_heads=2), r=2, method="pitome")
    with pytest.raises(ValueError, match="grid operations"):
        apply_tome(model, r=2, method="prune")  # already patched: still refused
    with pytest.raises(ValueError, match="grid operations"):
        model.tome_method = "pitome"  # refused when set, not silently ignored
    assert model.tome_method == "tome"


# ------------------------------------------------------------------ guards (issue 25): prop_attn and the Hyena metric

def _sizes(source: torch.Tensor, P: int, M: int) -> torch.Tensor:
    """Token sizes (B, M) from a source map (B, patches) -> token index (prefix tokens counted in)."""
    size = torch.stack([torch.bincount(s, minlength=M) for s in source]).float()
    size[:, :P] = 1
    return size


def _attention_ref(qkv, proj, num_heads, h, size):
    """Multi-head attention written out, with log(size) added to the logits of every query."""
    B, N, C = h.shape
    d = C // num_heads
    q, k, v = qkv(h).reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * d ** -0.5 + size.log()[:, None, None, :]
    return proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


def _record(module, store, key, what="output"):
    def hook(m, args, out):
        store[key] = (out if what == "output" else args[0]).detach()
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("name", ["conformer_vit_cifar", "conformer_cls_token", "vit_conv_ffn"])
def test_grid_blocks_use_proportional_attention_on_merged_tokens(name):
    """Block 0 merges; block 1 attends over the merged tokens with log(size) added (prop_attn=True,
    the default), checked against attention written out; prop_attn=False gives another output."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    blk = model.blocks[1]
    conformer = isinstance(blk, ConformerBlock)
    seen = {}
    hooks = [_record(blk.norm_attn if conformer else blk.norm1, seen, "h")]
    if conformer:
        hooks.append(blk.attn.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out[0].detach())))
    else:
        hooks.append(_record(blk.ls1, seen, "y", what="input"))
    x = torch.randn(2, 3, 32, 32)
    apply_tome(model, r=[10, 0, 0])
    with torch.no_grad():
        out, info = tome_forward(model, x, trace_source=True)
        P, M = info.num_prefix_tokens, info.tokens_per_layer[1]
        assert M == info.tokens_per_layer[0] - 10
        size = _sizes(info.layer_sources[0], P, M)
        assert size.max() > 1 and seen["h"].shape[1] == M
        attn = blk.attn
        ref = _attention_ref(attn.qkv, attn.proj, attn.num_heads, seen["h"], size)
        torch.testing.assert_close(seen["y"], ref, rtol=1e-4, atol=1e-5)
        plain = _attention_ref(attn.qkv, attn.proj, attn.num_heads, seen["h"], torch.ones_like(size))
        assert (seen["y"] - plain).abs().max() > 1e-3  # the bias matters here
        apply_tome(model, r=[10, 0, 0], prop_attn=False)
        no_prop = model(x)
        torch.testing.assert_close(seen["y"], plain, rtol=1e-4, atol=1e-5)
        assert (no_prop - out).abs().max() > 1e-4
        model.tome_r = 0  # nothing merged: log(1) = 0, prop_attn cannot matter
        a = model(x)
        model.tome_prop_attn = True
        torch.testing.assert_close(model(x), a, rtol=0, atol=1e-6)
    for h in hooks:
        h.remove()


def _bipartite_groups(metric: torch.Tensor, r: int, P: int) -> torch.Tensor:
    """ToMe's bipartite matching written out: tokens at even positions (A) each pick their most
    cosine-similar odd-position token (B), the r best pairs merge; tokens before P never take part.
    Returns per image a group label for every patch (two patches share a group iff they merged)."""
    B, N, _ = metric.shape
    labels = torch.arange(P, N).repeat(B, 1)
    m = F.normalize(metric, dim=-1)
    for b in range(B):
        best = []
        for a in range(P + (P % 2), N, 2):  # even positions past the prefix
            cands = [(float(m[b, a] @ m[b, j]), j) for j in range(1, N, 2) if j >= P]
            score, j = max(cands)
            best.append((score, a, j))
        for _, a, j in sorted(best, reverse=True)[:r]:
            labels[b, a - P] = j
    return labels


def _same_group(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, :, None] == labels[:, None, :]


@pytest.mark.parametrize("name", ["hyena_vit_cifar", "hyena_cls_token"])
def test_hyena_blocks_merge_by_the_mixed_tokens(name):
    """A Hyena block has no keys: its merge follows bipartite matching on the tokens after the Hyena
    residual (block input + mixer output), not on the block input."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    blk = model.blocks[0]
    with torch.no_grad():  # at init the mixer's output is tiny next to the residual: make them comparable
        blk.attn.mixer.out_proj.weight.mul_(400.0)
    seen = {}
    hooks = [blk.norm1.register_forward_hook(lambda m, a, out: seen.__setitem__("x", a[0].detach())),
             _record(blk.ls1, seen, "y", what="input")]
    apply_tome(model, r=[7, 0, 0])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, info = tome_forward(model, x, trace_source=True)
    for h in hooks:
        h.remove()
    P = info.num_prefix_tokens
    got = _same_group(info.layer_sources[0])
    mixed = seen["x"] + seen["y"]  # eval: drop path and layer scale are identities here
    assert torch.equal(got, _same_group(_bipartite_groups(mixed, 7, P)))
    assert [len(s.unique()) for s in info.layer_sources[0]] == [64 - 7] * 2  # 7 tokens merged away
    ratio = (seen["y"].norm(dim=-1) / seen["x"].norm(dim=-1)).median()
    assert 0.3 < ratio < 3, ratio
    for other in (seen["x"], seen["y"]):  # block input or mixer output alone would merge other tokens
        assert not torch.equal(got, _same_group(_bipartite_groups(other, 7, P)))
