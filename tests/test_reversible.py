"""Reversible ViT blocks (visiontools.layers.reversible, visiontools.patches.timm_reversible)."""
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import visiontools.models  # noqa: F401  (registers rev_vit_*)
from visiontools.layers.reversible import RevCoupling, ReversibleSequence


def _grads(model, x, y, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mixer,kwargs", [("attention", {}), ("hyena", {}),
                                          ("lsh", {"bucket_size": 4, "n_hashes": 2})])
def test_reversible_gradients_equal_plain_autograd_with_dropout_and_drop_path(mixer, kwargs):
    torch.manual_seed(0)
    m = timm.create_model("rev_vit_cifar", mixer=mixer, mixer_kwargs=kwargs or None, embed_dim=16, depth=3,
                          num_heads=2, img_size=16, drop_rate=0.1, proj_drop_rate=0.2, attn_drop_rate=0.2,
                          drop_path_rate=0.3).double().train()
    assert isinstance(m.blocks, ReversibleSequence)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    rev = _grads(m, x, y, seed=1)
    m.blocks.reversible = False
    plain = _grads(m, x, y, seed=1)
    other = _grads(m, x, y, seed=2)  # dropout really is on: another seed gives other gradients
    assert len(rev) == len(plain) == len(list(m.parameters()))
    worst = max((rev[n] - plain[n]).abs().max().item() for n in rev)
    assert worst <= 1e-6, worst
    assert max((other[n] - plain[n]).abs().max().item() for n in rev) > 1e-3


def test_reversible_backward_rebuilds_instead_of_storing():
    # the autograd graph of the reversible stack holds only its two outputs, not per-block activations
    torch.manual_seed(0)
    blocks = [RevCoupling(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)))
              for _ in range(6)]
    seq = ReversibleSequence(blocks)
    x = torch.randn(3, 5, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = seq(x)
    assert len(saved) == 2  # y1 and y2 of the last block
    out.sum().backward()
    seq.reversible = False
    x2 = x.detach().clone().requires_grad_(True)
    seq(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_rev_vit_has_the_parameters_of_its_plain_twin_and_refuses_bad_mixer():
    assert sum(p.numel() for p in timm.create_model("rev_vit_cifar").parameters()) == \
        sum(p.numel() for p in timm.create_model("attn_vit_cifar").parameters())
    with pytest.raises(ValueError, match="unknown mixer 'conv'"):
        timm.create_model("rev_vit_cifar", mixer="conv")


def test_tiny_reversible_vit_learns_real_cifar10(fit_losses):
    torch.manual_seed(0)
    losses = fit_losses(timm.create_model("rev_vit_cifar", embed_dim=32, depth=2, num_heads=2))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.4, losses


def test_shipped_reversible_checkpoint_classifies_real_cifar10_at_its_recorded_accuracy(recorded_subset):
    from visiontools.models import SHIPPED, load_checkpoint_model
    from visiontools.layers.reversible import ReversibleSequence

    assert SHIPPED["rev_cifar10"].stat().st_size < 1e6
    model, meta = load_checkpoint_model("rev_cifar10")
    assert isinstance(model.blocks, ReversibleSequence) and not model.training
    acc, _, _ = recorded_subset(model, meta)
    assert acc == pytest.approx(meta["subset_accuracy"]["top1"], abs=1.0) and acc > 25.0  # trained (chance is 10%)
    assert meta["params"] == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ guards (issue 25): RNG, autocast, layer scale

def test_reversible_backward_leaves_the_callers_rng_where_plain_autograd_does():
    """The backward replays the forward's dropout/drop-path randomness, then must hand the caller's
    RNG back untouched: the same state as after plain autograd's backward (which draws nothing)."""
    torch.manual_seed(0)
    m = timm.create_model("rev_vit_cifar", embed_dim=16, depth=2, num_heads=2, img_size=16, drop_rate=0.1,
                          proj_drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 16, 16)
    states = {}
    for reversible in (True, False):
        m.blocks.reversible = reversible
        torch.manual_seed(123)
        out = m(x)
        after_forward = torch.get_rng_state()
        out.sum().backward()
        states[reversible] = (after_forward, torch.get_rng_state(), torch.rand(3))
    torch.manual_seed(123)
    assert not torch.equal(states[True][0], torch.get_rng_state())  # dropout really drew numbers
    assert torch.equal(states[True][0], states[False][0])
    assert torch.equal(states[True][1], states[False][1])  # after backward: as plain autograd leaves it
    assert torch.equal(states[True][1], states[True][0])   # i.e. where the forward left it
    assert torch.equal(states[True][2], states[False][2])


class _Probe(nn.Module):
    """Records the dtype of what it sees and whether gradients are on, and passes it on."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, x):
        self.log.append((x.dtype, torch.is_grad_enabled()))
        return x


def test_reversible_recompute_runs_under_the_forwards_autocast():
    torch.manual_seed(0)
    log = []

    def stack():
        torch.manual_seed(0)
        return ReversibleSequence([RevCoupling(nn.Sequential(nn.Linear(8, 8), _Probe(log), nn.GELU()),
                                               nn.Sequential(nn.Linear(8, 8), nn.GELU())) for _ in range(2)])

    x = torch.randn(3, 5, 8)
    grads = {}
    for reversible in (True, False):
        seq = stack()
        seq.reversible = reversible
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = seq(xi)
        log.clear()
        out.float().pow(2).sum().backward()  # backward outside the autocast region
        if reversible:  # the recompute (gradients on) saw what the forward saw: bf16 from the Linear
            assert log == [(torch.bfloat16, True)] * 2, log
        grads[reversible] = [xi.grad] + [p.grad for p in seq.parameters()]
    for a, b in zip(grads[True], grads[False]):  # the same function as plain autograd under autocast
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)
    # and a forward without autocast is recomputed without it, even if backward runs inside one
    seq = stack()
    out = seq(x.clone().requires_grad_(True))
    log.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.pow(2).sum().backward()
    assert log == [(torch.float32, True)] * 2, log


def test_layer_scale_inside_f_and_g_gets_the_gradients_of_the_written_out_coupling():
    """make_reversible on a timm ViT with LayerScale (init_values): gamma of ls1 (inside F) and ls2
    (inside G) get gradients equal to those of the coupling written out from the original blocks."""
    from timm.models.vision_transformer import VisionTransformer

    from visiontools.patches.timm_reversible import make_reversible

    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                          init_values=0.3).eval()
    with torch.no_grad():
        for b in m.blocks:
            b.ls1.gamma.uniform_(0.2, 0.8)
            b.ls2.gamma.uniform_(0.2, 0.8)
    blocks = list(m.blocks)
    x = torch.randn(2, 3, 16, 16)

    def written_out():
        h = m._pos_embed(m.patch_embed(x))
        x1 = x2 = h
        for b in blocks:
            x1 = x1 + b.ls1.gamma * b.attn(b.norm1(x2))
            x2 = x2 + b.ls2.gamma * b.mlp(b.norm2(x1))
        return m.forward_head(m.norm((x1 + x2) / 2))

    ref_out = written_out()
    ref_out.pow(2).sum().backward()
    ref = {id(p): p.grad.clone() for p in m.parameters()}
    m.zero_grad()
    make_reversible(m)
    out = m(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    out.pow(2).sum().backward()
    for b in blocks:
        for g in (b.ls1.gamma, b.ls2.gamma):
            assert g.grad is not None and g.grad.abs().max() > 0
            torch.testing.assert_close(g.grad, ref[id(g)], rtol=1e-4, atol=1e-6)
    for p in m.parameters():
        torch.testing.assert_close(p.grad, ref[id(p)], rtol=1e-4, atol=1e-6)
