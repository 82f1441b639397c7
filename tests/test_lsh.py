"""LSH attention (visiontools.layers.lsh) and its timm adapter (visiontools.patches.timm_lsh)."""
import math
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import visiontools.models  # noqa: F401  (registers lsh_vit_*)
from visiontools.layers.lsh import (SELF_LOGIT, LSHAttention, default_n_buckets, full_shared_qk_attention,
                             hash_buckets, lsh_attention, random_rotations)
from visiontools.patches.timm_lsh import lsh_layers, swap_attention_for_lsh


def rotations(d, n_hashes, n_buckets, seed=0, dtype=torch.float64):
    return random_rotations(d, n_hashes, n_buckets, torch.Generator().manual_seed(seed), dtype=dtype)


def naive_lsh(qk, v, rot, c, before=1, after=1):
    """The paper's definition, token by token with Python loops: per round, sort by (bucket, position),
    cut into chunks of c (padding has its own last bucket and is never a key), each query attends to its
    chunk and `before`/`after` neighbours (wrapping, no chunk twice), never to itself unless alone;
    rounds combined with softmax over their log-sum-exps."""
    B, N, d = qk.shape
    nh = rot.shape[1]
    Np = N + (-N) % c
    nc = Np // c
    bk = hash_buckets(qk, rot)
    out = torch.zeros_like(v)
    for b in range(B):
        outs, lses = [], []
        for r in range(nh):
            key = [(int(bk[b, r, i]), i) for i in range(N)] + [(10**9, i) for i in range(N, Np)]
            order = [i for _, i in sorted(key)]
            chunk_of = {tok: j // c for j, tok in enumerate(order)}
            o_r, l_r = torch.zeros(N, v.shape[-1], dtype=v.dtype), torch.zeros(N, dtype=v.dtype)
            for i in range(N):
                ci = chunk_of[i]
                chunks = []
                for s in [0] + [-k for k in range(1, before + 1)] + list(range(1, after + 1)):
                    if (ci + s) % nc not in chunks:
                        chunks.append((ci + s) % nc)
                keys = [t for cj in chunks for t in order[cj * c:(cj + 1) * c] if t < N]
                logits = torch.stack([
                    torch.tensor(SELF_LOGIT, dtype=qk.dtype) if t == i else
                    qk[b, i] @ F.normalize(qk[b, t], dim=0) / math.sqrt(d) for t in keys])
                lse = torch.logsumexp(logits, 0)
                o_r[i] = torch.softmax(logits, 0) @ v[b, keys]
                l_r[i] = lse
            outs.append(o_r)
            lses.append(l_r)
        w = torch.softmax(torch.stack(lses), 0)
        out[b] = (torch.stack(outs) * w[..., None]).sum(0)
    return out


@pytest.mark.parametrize("N,n_hashes", [(40, 1), (64, 3), (50, 2)])
def test_one_chunk_equals_full_shared_qk_attention(N, n_hashes):
    torch.manual_seed(0)
    qk, v = torch.randn(2, N, 8, dtype=torch.float64), torch.randn(2, N, 8, dtype=torch.float64)
    out = lsh_attention(qk, v, rotations(8, n_hashes, 2), bucket_size=64)  # one chunk: every token sees all
    ref = full_shared_qk_attention(qk, v)
    assert (out - ref).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hash_is_the_argmax_over_rotations_and_their_negations(dtype):
    """h(x) = argmax([xR ; -xR]) for every round, vector by vector, first index on a tie."""
    torch.manual_seed(0)
    x = torch.randn(2, 37, 8, dtype=dtype)
    rot = rotations(8, 3, 6, dtype=dtype)
    got = hash_buckets(x, rot)
    assert got.shape == (2, 3, 37)
    for b in range(2):
        for r in range(3):
            for i in range(37):
                proj = [float(x[b, i] @ rot[:, r, j]) for j in range(3)]
                scores = proj + [-p for p in proj]
                assert got[b, r, i] == scores.index(max(scores)), (b, r, i)
    tie = torch.tensor([[1.0, 0.0]], dtype=dtype)  # x.R = [1, -1]: scores [1, -1, -1, 1] tie at 0 and 3
    assert hash_buckets(tie, torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=dtype).view(2, 1, 2)).tolist() == [[0]]


@pytest.mark.parametrize("impl", ["flash", "matmul"])
def test_matches_token_by_token_definition_with_padding_and_odd_length(impl):
    torch.manual_seed(1)
    for N, c, nh, before, after in [(37, 8, 2, 1, 1), (37, 8, 3, 1, 0), (20, 4, 1, 1, 1), (9, 4, 2, 1, 1)]:
        qk, v = torch.randn(2, N, 6, dtype=torch.float64), torch.randn(2, N, 5, dtype=torch.float64)
        rot = rotations(6, nh, default_n_buckets(N, c), seed=N + c)
        out = lsh_attention(qk, v, rot, c, before, after, impl=impl)
        assert out.shape == (2, N, 5)
        assert (out - naive_lsh(qk, v, rot, c, before, after)).abs().max() < 1e-10, (N, c, nh, before, after)


@pytest.mark.parametrize("impl", ["flash", "matmul"])
def test_padding_is_never_attended(impl):
    # the values of padding would be zeros; if padding were a key, scaling v of real tokens would not
    # scale the output exactly
    torch.manual_seed(2)
    qk, v = torch.randn(1, 30, 8, dtype=torch.float64), torch.randn(1, 30, 8, dtype=torch.float64)
    rot = rotations(8, 2, default_n_buckets(30, 8))
    a = lsh_attention(qk, v, rot, 8, impl=impl)
    assert torch.allclose(lsh_attention(qk, v + 1.0, rot, 8, impl=impl), a + 1.0, atol=1e-12)


def test_flash_and_matmul_agree_in_float32_with_gradients():
    torch.manual_seed(4)
    qk = torch.randn(3, 300, 16, requires_grad=True)
    v = torch.randn(3, 300, 16, requires_grad=True)
    rot = rotations(16, 4, default_n_buckets(300, 32), dtype=torch.float32)
    outs = []
    for impl in ("flash", "matmul"):
        out = lsh_attention(qk, v, rot, 32, impl=impl)
        g = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), [qk, v])
        outs.append((out, *g))
    for a, b in zip(*outs):
        assert (a - b).abs().max() < 1e-4
    with pytest.raises(ValueError, match="impl='flash' needs"):
        lsh_attention(qk.bfloat16(), v.bfloat16(), rot, 32, impl="flash")


def test_a_token_attends_to_itself_only_without_other_targets():
    qk = torch.randn(1, 1, 4, dtype=torch.float64)
    v = torch.randn(1, 1, 4, dtype=torch.float64)
    assert torch.allclose(lsh_attention(qk, v, rotations(4, 1, 2), 4), v)  # alone: itself
    qk = torch.randn(1, 2, 4, dtype=torch.float64)
    v = torch.randn(1, 2, 4, dtype=torch.float64)
    out = lsh_attention(qk, v, rotations(4, 1, 2), 4)
    assert torch.allclose(out, v.flip(1))  # two tokens in one chunk: each sees only the other


def test_error_against_full_attention_falls_with_n_hashes():
    torch.manual_seed(0)
    qk = torch.randn(4, 512, 16)
    v = torch.randn(4, 512, 16)
    ref = full_shared_qk_attention(qk, v)
    errs = []
    for nh in (1, 2, 4, 8):
        e = [((lsh_attention(qk, v, rotations(16, nh, default_n_buckets(512, 32), seed=s, dtype=torch.float32),
                             32) - ref).norm() / ref.norm()).item() for s in range(3)]
        errs.append(float(np.mean(e)))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.75 * errs[0], errs


@pytest.mark.parametrize("impl", ["flash", "matmul"])
def test_gradients_match_finite_differences(impl):
    torch.manual_seed(3)
    qk = torch.randn(1, 21, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 21, 4, dtype=torch.float64, requires_grad=True)
    rot = rotations(4, 2, default_n_buckets(21, 4))
    assert torch.autograd.gradcheck(lambda a, b: lsh_attention(a, b, rot, 4, impl=impl), (qk, v), eps=1e-7, atol=1e-6)


def test_layer_hashes_reproducibly_in_eval_and_draws_from_global_rng_in_training():
    m = LSHAttention(32, num_heads=2, bucket_size=8, n_hashes=2, seed=5).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    m.eval()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert torch.equal(m(x), a)  # eval: the layer's seed, not the global RNG
    m.seed.fill_(6)
    assert not torch.allclose(m(x), a)
    m.train()
    torch.manual_seed(0)
    t0 = m(x)
    torch.manual_seed(0)
    assert torch.equal(m(x), t0)
    torch.manual_seed(1)
    assert not torch.allclose(m(x), t0)


def test_prefix_tokens_attend_exactly_to_all_tokens():
    torch.manual_seed(0)
    m = LSHAttention(16, num_heads=2, bucket_size=4, n_hashes=1, num_prefix_tokens=1).double().eval()
    x = torch.randn(1, 33, 16, dtype=torch.float64)
    out = m(x)
    qk, v = m.qkv(x).view(1, 33, 2, 2, 8).permute(2, 0, 3, 1, 4).reshape(2, 2, 33, 8).unbind(0)
    cls = full_shared_qk_attention(qk, v, q=qk[:, :1]).view(1, 2, 1, 8).transpose(1, 2).reshape(1, 1, 16)
    assert torch.allclose(out[:, :1], m.proj(cls), atol=1e-12)


def test_layer_rejects_bad_options():
    with pytest.raises(ValueError, match="n_buckets must be even"):
        LSHAttention(16, num_heads=2, n_buckets=3)
    with pytest.raises(ValueError, match="qk_norm"):
        LSHAttention(16, num_heads=2, qk_norm=True)
    with pytest.raises(ValueError, match="attn_mask"):
        LSHAttention(16, num_heads=2)(torch.randn(1, 4, 16), attn_mask=torch.ones(4, 4, dtype=torch.bool))


def test_registered_models_build_and_run():
    for name, size in [("lsh_vit_cifar", 32), ("lsh_vit_cifar_p2", 32)]:
        m = timm.create_model(name).eval()
        assert isinstance(m.blocks[0].attn, LSHAttention)
        assert m(torch.randn(2, 3, size, size)).shape == (2, 10)
    m = timm.create_model("lsh_vit_small_224", depth=1).eval()
    assert lsh_layers(m)[0].num_prefix_tokens == 1
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_registered_layers_hash_with_their_own_eval_seeds_and_a_checkpoint_keeps_its_own():
    m = timm.create_model("lsh_vit_cifar").eval()
    layers = lsh_layers(m)
    assert [int(a.seed) for a in layers] == list(range(len(layers)))
    r0, r1 = (a.rotations(64, torch.device("cpu"), torch.float32) for a in layers[:2])
    assert not torch.equal(r0, r1)  # independent rotations per layer
    from visiontools.models import load_checkpoint_model
    shipped, _ = load_checkpoint_model("lsh_cifar10")  # saved before per-layer seeds: its seeds stay 0
    assert [int(a.seed) for a in lsh_layers(shipped)] == [0] * len(lsh_layers(shipped))


def test_swap_keeps_q_v_proj_warns_and_trains():
    torch.manual_seed(0)
    m = timm.create_model("vit_cifar_mini_p4", depth=2).eval()
    ref = m.blocks[0].attn.qkv.weight.detach().clone()
    with pytest.warns(UserWarning, match="shared-QK"):
        swap_attention_for_lsh(m, bucket_size=16, n_hashes=2)
    a = m.blocks[0].attn
    assert isinstance(a, LSHAttention) and a.num_prefix_tokens == 1
    assert torch.equal(a.qkv.weight, torch.cat([ref[:192], ref[384:]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_attention_for_lsh(m)  # already swapped: nothing changes, no warning
    m.train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_tiny_lsh_vit_learns_real_cifar10(fit_losses):
    torch.manual_seed(0)
    losses = fit_losses(timm.create_model("lsh_vit_cifar", embed_dim=32, depth=2, num_heads=2))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.4, losses


def test_shipped_lsh_checkpoint_classifies_real_cifar10_at_its_recorded_accuracy(recorded_subset):
    from visiontools.models import SHIPPED, load_checkpoint_model

    assert SHIPPED["lsh_cifar10"].stat().st_size < 1e6
    model, meta = load_checkpoint_model("lsh_cifar10")
    assert isinstance(model.blocks[0].attn, LSHAttention) and not model.training
    acc, _, _ = recorded_subset(model, meta)
    assert acc == pytest.approx(meta["subset_accuracy"]["top1"], abs=1.0) and acc > 25.0  # trained (chance is 10%)
    assert meta["params"] == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ guards (issue 25): bucket count, swap, dropout

@pytest.mark.parametrize("n,c", [(1, 8), (8, 8), (9, 8), (16, 8), (17, 8), (24, 8), (64, 64), (65, 64),
                                 (129, 64), (196, 64), (257, 32), (1024, 64)])
def test_default_bucket_count_is_padded_chunks_rounded_up_to_even(n, c):
    chunks = math.ceil(n / c)                       # chunks of the padded sequence
    expected = max(2, 2 * math.ceil(chunks / 2))     # rounded up to an even number, at least 2
    assert default_n_buckets(n, c) == expected
    layer = LSHAttention(16, num_heads=2, bucket_size=c, n_hashes=3).eval()
    assert layer.rotations(n, torch.device("cpu"), torch.float32).shape == (8, 3, expected // 2)


def test_swap_gives_each_layer_seed_plus_index_and_copies_q_v_weights_and_biases():
    torch.manual_seed(0)
    m = timm.create_model("vit_cifar_mini_p4", depth=3).eval()
    dim = m.embed_dim
    with torch.no_grad():  # timm initialises biases to zero: make them tell q, k and v apart
        for blk in m.blocks:
            blk.attn.qkv.bias.normal_()
            blk.attn.proj.bias.normal_()
    old = [(b.attn.qkv.weight.detach().clone(), b.attn.qkv.bias.detach().clone(),
            b.attn.proj.weight.detach().clone(), b.attn.proj.bias.detach().clone(), b.attn.num_heads) for b in m.blocks]
    with pytest.warns(UserWarning, match="shared-QK"):
        swap_attention_for_lsh(m, bucket_size=128, n_hashes=1, seed=10)  # one chunk: exact shared-QK attention
    layers = lsh_layers(m)
    assert [int(a.seed) for a in layers] == [10, 11, 12]
    x = torch.randn(2, 65, dim)
    for a, (w, b, pw, pb, heads) in zip(layers, old):
        assert torch.equal(a.qkv.weight, torch.cat([w[:dim], w[2 * dim:]]))
        assert torch.equal(a.qkv.bias, torch.cat([b[:dim], b[2 * dim:]]))
        assert torch.equal(a.proj.weight, pw) and torch.equal(a.proj.bias, pb)
        # reference: timm's query and value projections (with their biases), keys = unit queries,
        # no self-attention, the output projection
        d = dim // heads
        q = (x @ w[:dim].T + b[:dim]).view(2, 65, heads, d).transpose(1, 2)
        v = (x @ w[2 * dim:].T + b[2 * dim:]).view(2, 65, heads, d).transpose(1, 2)
        logits = q @ F.normalize(q, dim=-1).transpose(-1, -2) * d ** -0.5
        logits = logits.masked_fill(torch.eye(65, dtype=torch.bool), SELF_LOGIT)
        ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 65, dim) @ pw.T + pb
        with torch.no_grad():
            assert (a(x) - ref).abs().max() < 1e-4


def test_attention_dropout_drops_attention_weights_in_training_only():
    """v = identity makes the output the attention matrix itself: in training each weight is either
    dropped (0) or scaled by 1 / (1 - p); in eval it is the exact attention."""
    torch.manual_seed(0)
    N = 24
    qk = torch.randn(1, N, 4, dtype=torch.float64)
    eye = torch.eye(N, dtype=torch.float64)[None]
    rot = rotations(4, 1, 2)
    logits = (qk @ F.normalize(qk, dim=-1).transpose(1, 2)) / 2.0
    ref = logits.masked_fill(torch.eye(N, dtype=torch.bool), SELF_LOGIT).softmax(-1)
    for impl in ("auto", "matmul"):
        out = lsh_attention(qk, eye, rot, bucket_size=N, dropout_p=0.5, training=False, impl=impl)
        assert torch.allclose(out, ref, atol=1e-12)
    out = lsh_attention(qk, eye, rot, bucket_size=N, dropout_p=0.5, training=True)
    off = ~torch.eye(N, dtype=torch.bool)[None]
    dropped = out[off] == 0
    assert torch.allclose(out[off][~dropped], 2 * ref[off][~dropped], atol=1e-12)
    assert 0.35 < dropped.double().mean() < 0.65, dropped.double().mean()
    # the layer: attn_drop changes training outputs only (one chunk: the hashing does not matter)
    layer = LSHAttention(16, num_heads=2, bucket_size=64, n_hashes=1, attn_drop=0.5, num_prefix_tokens=1).double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    ev = layer.eval()(x)
    torch.manual_seed(1)
    assert torch.equal(layer.eval()(x), ev)
    layer.train()
    t1, t2 = layer(x), layer(x)
    assert not torch.allclose(t1[:, 1:], ev[:, 1:]) and not torch.allclose(t1[:, 1:], t2[:, 1:])
    assert not torch.allclose(t1[:, :1], ev[:, :1])  # the class token's exact attention is dropped too
    mean = torch.stack([layer(x) for _ in range(300)]).mean(0)  # inverted dropout: unbiased
    assert (mean - ev).abs().max() < 0.15 * ev.abs().max(), (mean - ev).abs().max()
    layer.attn_drop = 0.0
    assert torch.allclose(layer(x), ev, atol=1e-12)
