"""visiontools.tome.methods through apply_tome(method=...): ToFu, PiToMe and pruning against
straightforward per-image implementations written from the papers, plus every guarantee of the patch."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from visiontools.tome.merge import parse_r
from visiontools.patches.timm import apply_tome, remove_tome, tome_forward
from visiontools.tome.vis import group_count, render_merges

NEW_METHODS = ["tofu", "pitome", "prune"]


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**cfg).eval()


def assert_near(out, expected, rel=1e-5):
    gap, scale = (out - expected).abs().max().item(), expected.abs().max().item()
    assert gap <= rel * scale, f"max abs difference {gap:.3g} > {rel:g} x {scale:.3g}"


# --- straightforward implementations, one image and one python list of tokens at a time -------------
#
# Each token is a dict: its feature vector "x", its size "s" (patches behind it) and "src", the set of
# input patches it holds. Order never matters to a plain ViT after the position embedding (attention
# is permutation-equivariant and the pools are symmetric), so tokens are kept in whatever order is
# simplest here, and source maps are compared as partitions.

def naive_attention(attn, x, size, prop_attn):
    """Eager attention of one image ``x`` (N, C): output, keys averaged over heads, attention probs (H, N, N)."""
    N, C = x.shape
    qkv = attn.qkv(x[None]).reshape(1, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0][0]), attn.k_norm(qkv[1][0]), qkv[2][0]  # (H, N, D)
    logits = (q * attn.scale) @ k.transpose(-1, -2)
    if prop_attn:
        logits = logits + size.log()[None, None, :]
    probs = logits.softmax(-1)
    y = (probs @ v).transpose(0, 1).reshape(N, -1)
    return attn.proj(y), k.mean(0), probs


def cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


def naive_tome_matching(keys, r, P):
    """ToMe's bipartite matching on one image (from the paper): even positions form A, odd B; each
    unprotected A token's best unprotected B token; the r best edges merge. Returns the merged
    [(a, b)] and the output order of the reference implementation: prefix, unmerged A (in position
    order when there is a prefix, else in falling similarity), then the unprotected B tokens."""
    N = len(keys)
    A = [i for i in range(0, N, 2) if i >= P]
    B = [j for j in range(1, N, 2) if j >= P]
    edges = []
    for i in A:
        best = max(B, key=lambda j: cos(keys[i], keys[j]))
        edges.append((cos(keys[i], keys[best]), i, best))
    edges.sort(key=lambda e: -e[0])
    unmerged = [i for _, i, _ in edges[r:]]
    order = list(range(P)) + (sorted(unmerged) if P else unmerged) + B
    return [(i, j) for _, i, j in edges[:r]], order


def naive_step(tokens, keys, probs, r, P, method, layer, L):
    """One reduction step on the token list of one image; returns the new list."""
    N = len(tokens)
    r = min(r, (N - P) // 2)
    if r <= 0:
        return tokens
    drop, into = set(), {}  # token i dropped, or merged into token j
    order = list(range(N))  # output order of the surviving tokens
    if method == "tofu":
        pairs, order = naive_tome_matching(keys, r, P)
        if layer <= L // 2:  # ToFu prunes in early layers
            drop = {i for i, _ in pairs}
        else:
            into = dict(pairs)
    elif method == "pitome":
        margin = 0.75 - 0.75 * layer / L
        idx = list(range(P, N))
        energy = {i: sum(F.elu(torch.tensor(cos(keys[i], keys[j]) - margin)).item() for j in idx) / len(idx)
                  for i in idx}
        ranked = sorted(idx, key=lambda i: -energy[i])[:2 * r]  # highest energy first
        A, B = ranked[0::2], ranked[1::2]
        into = {a: max(B, key=lambda b: cos(keys[a], keys[b])) for a in A}
    elif method == "prune":
        if P:  # attention the class token pays, averaged over heads
            score = probs[:, 0, :].mean(0)
        else:  # attention received, averaged over queries and heads
            score = probs.mean(dim=(0, 1))
        idx = sorted(range(P, N), key=lambda i: float(score[i]))
        drop = set(idx[:r])
    out, groups = [], {}
    for i, t in enumerate(tokens):
        if i in drop:
            continue
        if i in into:
            groups.setdefault(into[i], []).append(t)
        else:
            groups.setdefault(i, []).insert(0, t)
    for i in [i for i in order if i in groups]:
        members = groups[i]
        if len(members) == 1:
            out.append(members[0])
            continue
        s = sum(m["s"] for m in members)
        x = sum(m["x"] * m["s"] for m in members) / s
        if method == "tofu":  # MLERP: the average rescaled to the largest norm of the group
            x = x * max(float(m["x"].norm()) for m in members) / x.norm()
        out.append({"x": x, "s": s, "src": set().union(*(m["src"] for m in members))})
    return out


def naive_forward(model, img, rs, method, prop_attn=True):
    """Logits and final groups of patches (list of sets; pruned patches absent) for one image."""
    P = model.num_prefix_tokens
    x0 = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
    tokens = [{"x": x0[i], "s": 1.0, "src": {i - P} if i >= P else set()} for i in range(len(x0))]
    L = len(model.blocks)
    for layer, (blk, r) in enumerate(zip(model.blocks, rs)):
        x = torch.stack([t["x"] for t in tokens])
        size = torch.tensor([t["s"] for t in tokens])
        y, keys, probs = naive_attention(blk.attn, blk.norm1(x), size, prop_attn)
        x = x + blk.ls1(y)
        for t, v in zip(tokens, x):
            t["x"] = v
        tokens = naive_step(tokens, keys, probs, r, P, method, layer, L)
        x = torch.stack([t["x"] for t in tokens])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        for t, v in zip(tokens, x):
            t["x"] = v
    x = model.norm(torch.stack([t["x"] for t in tokens]))
    if model.global_pool == "token":
        feat = x[0]
    else:
        w = torch.tensor([t["s"] for t in tokens])[P:, None]
        feat = (x[P:] * w).sum(0) / w.sum()
    logits = model.head(model.fc_norm(feat[None]))[0]
    return logits, [t["src"] for t in tokens[P:]]


def partition(source):
    """A source map row as a set of frozensets of patches (pruned patches, -1, left out)."""
    groups = {}
    for patch, tok in enumerate(source.tolist()):
        if tok >= 0:
            groups.setdefault(tok, set()).add(patch)
    return {frozenset(g) for g in groups.values()}


CASES = [  # (id, model maker, r)
    ("cls-r8", lambda: tiny_vit(), 8),
    ("cls-decreasing", lambda: tiny_vit(depth=6), (8, -0.5)),
    ("avgpool-noprefix", lambda: tiny_vit(class_token=False, global_pool="avg", fc_norm=True), 6),
    ("registers-qknorm-list", lambda: tiny_vit(reg_tokens=3, qk_norm=True, init_values=0.5), [10, 0, 7, 30]),
]


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("make,r", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_straightforward_implementation(method, make, r):
    model = make()
    x = torch.randn(3, 3, 32, 32)
    rs = parse_r(len(model.blocks), r)
    with torch.no_grad():
        apply_tome(model, r=r, method=method)
        out, info = tome_forward(model, x, trace_source=True)
        for b in range(x.shape[0]):
            expected, groups = naive_forward(model, x[b], rs, method)
            assert_near(out[b], expected)
            assert partition(info.source[b]) == {frozenset(g) for g in groups}  # same tokens kept/merged/pruned
    # pruning methods leave patches in no token; merging methods keep every patch
    pruned = (info.source < 0).any().item()
    assert pruned == (method == "prune" or (method == "tofu" and rs[0] > 0))


def _models():
    yield "cls", lambda: tiny_vit()
    yield "registers", lambda: tiny_vit(reg_tokens=2, no_embed_class=True)
    yield "avgpool", lambda: tiny_vit(class_token=False, global_pool="avg")
    yield "eva02", lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56).eval()


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("name,make", list(_models()), ids=[n for n, _ in _models()])
def test_r0_equals_unpatched_and_remove_restores_bit_for_bit(method, name, make):
    model = make()
    H, W = model.patch_embed.img_size
    x = torch.randn(2, 3, H, W)
    state = {n: (type(m), sorted(vars(m))) for n, m in model.named_modules()}
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, r=0, method=method)
        assert torch.equal(model(x), ref)
        model.tome_r = 4
        out, info = tome_forward(model, x, trace_source=True)
        assert out.shape == ref.shape and not torch.allclose(out, ref)
        P = model.num_prefix_tokens
        final = info.tokens_per_layer[-1]
        for b in range(2):  # every output token but the prefix holds at least one patch
            assert group_count(info.source[b]) == final - P
        # per-call state: an image gives the same result alone as in a batch
        torch.testing.assert_close(model(x[1:]), out[1:], atol=1e-5, rtol=1e-5)
        remove_tome(model)
        assert {n: (type(m), sorted(vars(m))) for n, m in model.named_modules()} == state
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_protected_prefix_tokens_are_never_touched(method):
    """Registers and the class token stay first and untouched (bit for bit); no other token maps to
    them; sizes add up (pruning loses the dropped tokens' sizes; ToFu merges in layer 3 of 4)."""
    from visiontools.tome import methods as merge_methods

    torch.manual_seed(0)
    P, N = 3, 20
    metric, x = torch.randn(2, N, 8), torch.randn(2, N, 8)
    imp = torch.rand(2, N - P)
    red = merge_methods.plan(method, 6, P, 3, 4, metric, imp)
    assert (red.index[:, :P] == torch.arange(P)).all() and (red.keep[:, :P] == torch.arange(P)).all()
    assert not ((red.index[:, P:] >= 0) & (red.index[:, P:] < P)).any()
    out, size = merge_methods.reduce_wavg(red, x, None, merge_methods.merge_norm(method, 3, 4))
    assert torch.equal(out[:, :P], x[:, :P]) and out.shape[1] == N - 6
    assert size.sum(1).squeeze(-1).tolist() == [N - (6 if method == "prune" else 0)] * 2


@pytest.mark.parametrize("method", NEW_METHODS)
def test_torch_compile_matches_eager(method):
    model = apply_tome(tiny_vit(), r=8, method=method)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_gradients_flow(method):
    model = apply_tome(tiny_vit(drop_path_rate=0.1), r=6, method=method).train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0


def test_mlerp_keeps_the_largest_norm_and_the_direction_of_the_average():
    from visiontools.tome.methods import mlerp

    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    slots = torch.tensor([[[0], [0], [1]]])
    avg = torch.tensor([[[1.5, 0.5], [5.0, 5.0]]])
    out = mlerp(avg, x, slots, 2)
    torch.testing.assert_close(out[0, 0].norm(), torch.tensor(3.0))
    torch.testing.assert_close(out[0, 0] / out[0, 0].norm(), avg[0, 0] / avg[0, 0].norm())
    torch.testing.assert_close(out[0, 1], avg[0, 1])


def test_bad_method_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown method 'fast'; choose one of tome, tofu, pitome, prune"):
        apply_tome(tiny_vit(), r=4, method="fast")


def test_render_merges_paints_pruned_patches():
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    source = torch.tensor([0, -1, 1, 1])
    out = render_merges(img, source, (2, 2), outline=None, removed=(0, 0, 255))
    px = out.load()
    assert px[3, 0] == (0, 0, 255) and px[0, 0] == (200, 100, 50)  # patch 1 (top right) pruned
    assert group_count(source) == 2
