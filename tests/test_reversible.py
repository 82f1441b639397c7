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
