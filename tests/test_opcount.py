"""The cheaper ToMe reduction step: the same merges as the reference path, and an operation count
that must not grow back (issue 46)."""
import pytest
import torch

from visiontools.tome.merge import bipartite_soft_matching, merge_step, merge_wavg
from visiontools.tome.opcount import count_ops, reduction_step_ops

# One steady-state step (tokens carry sizes) of ViT-B/16 at batch 8, r=16, class token, with the
# proportional-attention mask, counted under inference mode on the CPU. Before issue 46 the step was
# bipartite_soft_matching + merge_wavg: 42 aten operations (17 of them kernels) and 49.5 MB.
STEP_OPS = 37
STEP_BYTES = 16e6


def test_reduction_step_operation_count_does_not_grow():
    c = reduction_step_ops(batch=8, tokens=197, width=768, r=16, prefix=1)
    assert c.ops <= STEP_OPS, dict(c.by_op)
    assert c.bytes <= STEP_BYTES
    assert "aten.cat" in c.by_op and c.by_op["aten.cat"] == 1  # one small index concatenation, no 769-channel one
    old = count_ops(lambda: merge_wavg(bipartite_soft_matching(torch.randn(8, 197, 64), 16, 1),
                                       torch.randn(8, 197, 768), torch.ones(8, 197, 1))[1].log())
    assert old.ops > c.ops and old.bytes > 2.5 * c.bytes


def test_op_counter_counts_views_kernels_and_bytes():
    x = torch.randn(4, 8)
    c = count_ops(lambda: (x[:, :2] * 2).sum())
    assert dict(c.by_op) == {"aten.slice": 1, "aten.mul": 1, "aten.sum": 1}
    assert (c.ops, c.kernels) == (3, 2)
    assert c.bytes == (4 * 2 * 4) * 2 + (4 * 2 * 4) + 4  # mul reads 8 floats, writes 8; sum reads 8, writes 1


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.parametrize("B,N,r", [(1, 17, 4), (3, 65, 8), (2, 30, 20)])
def test_merge_step_makes_the_reference_merges(prefix, sized, B, N, r):
    """merge_step == bipartite_soft_matching + merge_wavg: same tokens (1e-5), same sizes, same order,
    r capped at half of the unprotected tokens (the last case asks for more)."""
    g = torch.Generator().manual_seed(B * N + r + prefix)
    x = torch.randn(B, N, 24, generator=g)
    metric = torch.randn(B, N, 16, generator=g)
    size = torch.randint(1, 5, (B, N, 1), generator=g).float() if sized else None
    ref_x, ref_size = merge_wavg(bipartite_soft_matching(metric, r, prefix), x, size)
    out, out_size = merge_step(x, metric, r, prefix, size)
    assert out.shape == ref_x.shape and out.shape[1] == N - min(r, (N - prefix) // 2)
    assert torch.equal(out_size, ref_size)
    torch.testing.assert_close(out, ref_x, atol=1e-5, rtol=1e-5)


def test_merge_step_gradients_match_the_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 16, generator=g)
    metric = torch.randn(2, 33, 8, generator=g)
    size = torch.randint(1, 4, (2, 33, 1), generator=g).float()
    grads = []
    for fn in (lambda x: merge_step(x, metric, 8, 1, size)[0],
               lambda x: merge_wavg(bipartite_soft_matching(metric, 8, 1), x, size)[0]):
        xi = x.clone().requires_grad_(True)
        (fn(xi) * torch.arange(25.0)[None, :, None]).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
