"""The library-agnostic ToMe algorithms in visiontools.tome.merge."""
import pytest
import torch

from visiontools.tome.merge import (
    bipartite_soft_matching, index_map, init_source, merge, merge_rope, merge_source, merge_wavg, parse_r, unmerge,
)


def test_parse_r_constant_list_and_paper_schedule():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(3, [1, 2, 3]) == [1, 2, 3]
    assert parse_r(3, (8, 0.0)) == [8, 8, 8]
    dec = parse_r(12, (16, -0.5))
    assert dec[0] == 24 and dec[-1] == 8  # merges more early, less late, same total as r=16
    assert all(a >= b for a, b in zip(dec, dec[1:]))
    assert sum(dec) == pytest.approx(16 * 12, abs=12)


@pytest.mark.parametrize("bad", [-1, 2.5, 16.0, True, "8", [1, -2, 3], (8,), (8, "x")])
def test_parse_r_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        parse_r(3, bad)


def test_parse_r_list_length_must_match():
    with pytest.raises(ValueError, match="one entry per layer"):
        parse_r(4, [1, 2])


def _random(B=3, N=21, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=g)


def test_matching_merges_r_tokens_and_caps_at_half():
    x = _random()
    m = bipartite_soft_matching(x, 4, num_protected=1)
    assert merge(m, x).shape == (3, 17, 8)
    m = bipartite_soft_matching(x, 100, num_protected=1)  # 20 unprotected -> at most 10 merge
    assert m.r == 10 and merge(m, x).shape == (3, 11, 8)


def test_matching_picks_the_most_similar_pairs():
    # tokens 0..5 (A = 0,2,4; B = 1,3,5): A0 is a copy of B5, the rest are orthogonal-ish
    x = torch.eye(6)[None]
    x[0, 0] = x[0, 5]
    m = bipartite_soft_matching(x, 1)
    assert m.src_idx.flatten().tolist() == [0] and m.dst_idx.flatten().tolist() == [2]


def test_weighted_average_preserves_mass_and_protects_prefix():
    x = _random(N=23)
    size = torch.randint(1, 4, (3, 23, 1)).float()
    m = bipartite_soft_matching(x, 7, num_protected=3)
    y, s = merge_wavg(m, x, size)
    assert y.shape == (3, 16, 8) and s.shape == (3, 16, 1)
    torch.testing.assert_close((y * s).sum(1), (x * size).sum(1))
    torch.testing.assert_close(s.sum(1), size.sum(1))
    torch.testing.assert_close(y[:, :3], x[:, :3])  # protected tokens untouched and in front
    torch.testing.assert_close(s[:, :3], size[:, :3])


def test_source_map_covers_every_token_once_and_matches_sizes():
    x = _random(N=33)
    source = init_source(3, 33)
    size = None
    for r in (6, 5, 4):
        m = bipartite_soft_matching(x, r, num_protected=1)
        source = merge_source(m, source)
        x, size = merge_wavg(m, x, size)
    assert source.shape == (3, 33)
    counts = torch.zeros(3, x.shape[1]).scatter_add_(1, source, torch.ones(3, 33))
    torch.testing.assert_close(counts, size[..., 0])  # each patch is in exactly one token
    assert (source[:, 0] == 0).all()


def test_unmerge_restores_unmerged_tokens_and_copies_merged_ones():
    x = _random(N=17)
    m = bipartite_soft_matching(x, 5, num_protected=1)
    y = merge(m, x, mode="mean")
    back = unmerge(y, index_map(m))
    idx = index_map(m)
    assert back.shape == x.shape
    for b in range(3):
        for i in range(17):
            torch.testing.assert_close(back[b, i], y[b, idx[b, i]])
        # tokens alone in their group come back exactly
        alone = [i for i in range(17) if (idx[b] == idx[b, i]).sum() == 1]
        torch.testing.assert_close(back[b, alone], x[b, alone])


def test_split_is_the_references_alternate_split_of_the_whole_sequence():
    # class token (0) in A, patch 0 (index 1) in B: a patch at index 2 that copies index 1 merges into it
    x = torch.eye(7)[None]
    x[0, 2] = x[0, 1]
    m = bipartite_soft_matching(x, 1, num_protected=1)
    assert m.src_idx.flatten().tolist() == [1] and m.dst_idx.flatten().tolist() == [0]
    # a distillation token (index 1, set B) is never a destination, even for its exact copy
    x = torch.eye(7)[None]
    x[0, 2] = x[0, 1]
    x[0, 4] = x[0, 3]
    m = bipartite_soft_matching(x, 1, num_protected=2)
    assert m.src_idx.flatten().tolist() == [2] and m.dst_idx.flatten().tolist() == [1]
    # a class token is never a source, even when it copies a B token
    x = torch.eye(7)[None]
    x[0, 0] = x[0, 1]
    m = bipartite_soft_matching(x, 3, num_protected=1)
    assert 0 not in m.src_idx.flatten().tolist() and m.unm_idx.numel() == 0


def test_unmerged_tokens_keep_their_order_only_with_protected_tokens():
    x = _random(B=4, N=40, seed=3)
    assert all((bipartite_soft_matching(x, 5, p).unm_idx.diff(dim=1) > 0).all() for p in (1, 2, 5))
    unsorted = bipartite_soft_matching(x, 5, 0).unm_idx  # the reference keeps similarity order
    assert not (unsorted.diff(dim=1) > 0).all()


def _rope(B, N, D, seed=0):
    """Random rotary embeddings in timm's cat layout: ``cat([sin, cos], -1)`` of per-token angles."""
    ang = torch.rand(B, N, D, generator=torch.Generator().manual_seed(seed)) * 6.28
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def _rotate(q, rope):
    """Interleaved rotation as timm's ``apply_rot_embed`` (half=False) does it."""
    sin, cos = rope.chunk(2, dim=-1)
    rot = torch.stack([-q[..., 1::2], q[..., ::2]], dim=-1).reshape(q.shape)
    return q * cos + rot * sin


def test_merge_rope_rules():
    B, N, D, P = 2, 19, 8, 1
    x, rope = _random(B=B, N=N), _rope(B, N, D)
    size = torch.randint(1, 4, (B, N, 1)).float()
    m = bipartite_soft_matching(x, 6, num_protected=P)
    idx = index_map(m)
    q = _random(B=B, N=1, C=D, seed=5).expand(B, N, D)  # one query vector, rotated at every position
    mean, circ, dst = (merge_rope(m, rope, size, rule) for rule in ("mean", "circular", "dst"))
    # mean: the merged token's rotated vector is the size-weighted mean of its members' rotated vectors
    rotated = _rotate(q, rope) * size
    expected = torch.stack([torch.zeros(mean.shape[1], D).index_add_(0, idx[b], rotated[b]) for b in range(B)])
    weight = torch.stack([torch.zeros(mean.shape[1]).index_add_(0, idx[b], size[b, :, 0]) for b in range(B)])
    torch.testing.assert_close(_rotate(q[:, :mean.shape[1]], mean)[:, P:], (expected / weight[..., None])[:, P:])
    # circular: a rotation (unit sin/cos pairs), same angle as the mean
    sin, cos = circ[:, P:].chunk(2, dim=-1)
    torch.testing.assert_close(sin ** 2 + cos ** 2, torch.ones_like(sin))
    torch.testing.assert_close(torch.atan2(sin, cos), torch.atan2(*mean[:, P:].chunk(2, dim=-1)))
    # dst: a merged group carries its destination's (the B token's) rope
    for b in range(B):
        for out_i in range(P, dst.shape[1]):
            members = (idx[b] == out_i).nonzero().flatten().tolist()
            keeper = [i for i in members if len(members) == 1 or i % 2 == 1][0]  # B tokens: odd positions
            torch.testing.assert_close(dst[b, out_i], rope[b, keeper])
            if len(members) == 1:  # unmerged tokens keep their own rope under every rule
                for r in (mean, circ):
                    torch.testing.assert_close(r[b, out_i], rope[b, members[0]])
    with pytest.raises(ValueError, match="rope rule"):
        merge_rope(m, rope, size, "centroid")


def test_parse_r_text_reads_every_documented_form():
    import re

    from visiontools.tome.merge import check_r
    from visiontools.tome.r_text import parse_r_text

    cases = {"16": 16, " 0 ": 0, "16,-0.5": (16, -0.5), "8,0.5": (8, 0.5), "8,+1": (8, 1.0), "8,1e-1": (8, 0.1),
             "8,8,4,4": [8, 8, 4, 4], "8,4": [8, 4], " 4, 4 ,2 ": [4, 4, 2], "[8]": [8], "(8,1)": (8, 1.0),
             "[8,4]": [8, 4]}
    for text, want in cases.items():
        got = parse_r_text(text)
        assert got == want and type(got) is type(want), (text, got)
        check_r(got)  # every result is a valid tome_r
    for bad in ("", "x", "1.5", "16,x", "(1,2,3)", "[8,-0.5]", "[]", "()"):
        with pytest.raises(ValueError, match=f"not an r setting: {re.escape(repr(bad))}.*per-layer list"):
            parse_r_text(bad)
    for bad in ("-1", "8,-2,4", "(-1,0.5)"):
        with pytest.raises(ValueError, match=f"r must be >= 0 .*got {re.escape(repr(bad))}; use an int r"):
            parse_r_text(bad)
    with pytest.raises(ValueError, match="inflection must be a finite number"):
        parse_r_text("16,nan")


def test_the_r_grammar_imports_no_torch():
    """Command-line parsers build their --r option from visiontools.tome.r_text without loading torch."""
    import subprocess
    import sys

    code = ("import sys, visiontools.tome.r_text as t; assert t.r_argument('8,-0.5') == (8, -0.5); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
