"""LSH attention ("Reformer: The Efficient Transformer", Kitaev, Kaiser & Levskaya, ICLR 2020) for ViT tokens.

Attention restricted to tokens that hash to the same bucket costs O(N log N) (a sort) plus
O(N * chunk) (attention inside chunks) instead of O(N^2). As in the paper:

- **Shared-QK**: one projection gives the queries; the keys are the queries normalised to unit length
  (``k_j = q_j / |q_j|``), so a query and its own key hash alike.
- **Angular LSH** with random rotations: ``h(x) = argmax([xR ; -xR])`` for a random ``(d, n_buckets/2)``
  matrix ``R``, one independent ``R`` per hashing round (``n_hashes`` rounds).
- Per round, a **stable sort by (bucket, position)**; the sorted sequence is cut into equal chunks of
  ``bucket_size`` tokens, and each chunk attends to itself and one chunk back (the paper's rule) and,
  since vision is not causal, by default also **one chunk forward** (``chunks_after=1``; ``0`` gives
  the paper's look-one-back only). Chunks wrap around within a round.
- A token does **not attend to itself** unless it has no other target (its own logit is set to -1e5,
  the paper's rule; a finite value, so a lone token still gets an output).
- The rounds are combined with weights ``softmax_r(logsumexp of round r's logits)``, which equals
  attention over the union of the rounds' targets when no pair repeats (pairs found by several rounds
  are counted once per round: the de-duplication of the paper's eq. 9 is not done, as in
  ``reformer-pytorch``'s default).
- Sequences are padded to a multiple of ``bucket_size``; padding tokens get their own bucket past the
  last one (so they sort to the end of every round) and are masked as keys.

The number of buckets defaults to the paper's choice, (padded length) / ``bucket_size`` rounded up to
an even number, so that an average bucket fills one chunk.

**Reproducible hashing.** In eval mode the rotations come from ``torch.Generator().manual_seed(seed)``
(``seed`` is kept on the layer and in its ``state_dict``), so the same input always gets the same
buckets. In training they are drawn fresh each forward from torch's global RNG (as the paper redraws
them), which ``torch.utils.checkpoint`` and :mod:`visiontools.reversible` replay, so a recomputed
forward sees the same buckets; plain autograd keeps the sort indices of the forward. Rotations are
drawn on the CPU and moved, so a seed hashes the same on every device.

Everything is vectorised over batch, heads, rounds and chunks (no Python loop over tokens or chunks).
This module imports no timm; :class:`LSHAttention` matches the constructor and call signature of the
``attn_layer`` of timm's ViT ``Block`` (adapter: ``visiontools.patches.timm_lsh``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SELF_LOGIT", "default_n_buckets", "random_rotations", "hash_buckets", "lsh_attention",
           "full_shared_qk_attention", "LSHAttention"]

SELF_LOGIT = -1e5  # logit of a token attending to itself: used only when it has no other target


def default_n_buckets(n: int, bucket_size: int) -> int:
    """The paper's bucket count for ``n`` tokens: padded length / ``bucket_size``, rounded up to even (>= 2)."""
    chunks = -(-n // bucket_size)
    return max(2, chunks + chunks % 2)


def random_rotations(head_dim: int, n_hashes: int, n_buckets: int, generator: Optional[torch.Generator] = None,
                     device=None, dtype=torch.float32) -> torch.Tensor:
    """Random Gaussian rotations ``(head_dim, n_hashes, n_buckets // 2)``, drawn on the CPU (from
    ``generator`` if given, else torch's global RNG) and moved to ``device``."""
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be even and >= 2, got {n_buckets}")
    r = torch.randn(head_dim, n_hashes, n_buckets // 2, generator=generator, dtype=torch.float32)
    return r.to(device=device, dtype=dtype)


def hash_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH buckets of vectors ``x`` (..., N, d) for every round: (..., n_hashes, N) in
    ``[0, n_buckets)``, ``h(x) = argmax([xR ; -xR])``."""
    d, nh, half = rotations.shape
    with torch.no_grad():
        rot = (x @ rotations.reshape(d, nh * half).to(x.dtype)).unflatten(-1, (nh, half))  # (..., N, nh, half)
        return torch.cat([rot, -rot], dim=-1).argmax(dim=-1).transpose(-1, -2).contiguous()


def _chunk_context(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(..., nc, c, *) -> (..., nc, (1+before+after)*c, *): each chunk followed by the chunks it attends to
    (wrapping around; neighbours that would repeat a chunk already included are left out)."""
    nc = t.shape[-3] if t.dim() >= 3 else 1
    parts, seen = [t], {0}
    for s in [-i for i in range(1, before + 1)] + list(range(1, after + 1)):
        if s % nc in seen:
            continue
        seen.add(s % nc)
        parts.append(torch.roll(t, shifts=-s, dims=-3))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else t


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, bucket_size: int,
                  chunks_before: int = 1, chunks_after: int = 1, scale: Optional[float] = None,
                  dropout_p: float = 0.0, training: bool = False, return_buckets: bool = False):
    """Shared-QK LSH attention (see module docstring) of ``qk``/``v`` (B, N, d), e.g. B = batch x heads.

    ``rotations`` (d, n_hashes, n_buckets/2) (:func:`random_rotations`); ``bucket_size`` is the chunk
    length. ``scale`` defaults to ``d ** -0.5``. Returns (B, N, d) (and the (B, n_hashes, N) buckets with
    ``return_buckets``)."""
    if qk.dim() != 3 or v.shape[:2] != qk.shape[:2]:
        raise ValueError(f"qk and v must be (B, N, d) with equal B and N, got {tuple(qk.shape)} and {tuple(v.shape)}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    B, N, d = qk.shape
    dv = v.shape[-1]
    nh = rotations.shape[1]
    c = bucket_size
    n_pad = (-N) % c
    Np = N + n_pad
    nc = Np // c
    scale = d ** -0.5 if scale is None else scale

    buckets = hash_buckets(qk, rotations)                                         # (B, nh, N)
    if n_pad:  # padding: a bucket of its own past the last, so it sorts to the end of each round
        qk = F.pad(qk, (0, 0, 0, n_pad))
        v = F.pad(v, (0, 0, 0, n_pad))
        pad_bucket = 2 * rotations.shape[2]
        buckets = F.pad(buckets, (0, n_pad), value=pad_bucket)
    # stable sort by bucket keeps position order inside a bucket: a sort by (bucket, position)
    order = torch.sort(buckets, dim=-1, stable=True).indices                      # (B, nh, Np)
    idx = order.reshape(B, nh * Np, 1)
    sq = qk.gather(1, idx.expand(-1, -1, d)).view(B, nh, nc, c, d)
    sv = v.gather(1, idx.expand(-1, -1, dv)).view(B, nh, nc, c, dv)
    sk = F.normalize(sq, dim=-1)
    kctx = _chunk_context(sk, chunks_before, chunks_after)                        # (B, nh, nc, w*c, d)
    vctx = _chunk_context(sv, chunks_before, chunks_after)
    w = kctx.shape[-2]
    # self-logits: query i of a chunk is key i of the same chunk (a token occurs once per round)
    bias = torch.zeros(c, w, dtype=qk.dtype, device=qk.device)
    bias.diagonal().fill_(SELF_LOGIT)
    dots = torch.baddbmm(bias, sq.reshape(-1, c, d), kctx.reshape(-1, w, d).transpose(1, 2),
                         alpha=scale).view(B, nh, nc, c, w)
    if n_pad:
        is_pad = (order >= N).view(B, nh, nc, 1, c)
        kpad = _chunk_context(is_pad.transpose(-1, -2), chunks_before, chunks_after).transpose(-1, -2)
        dots = dots.masked_fill(kpad, torch.finfo(dots.dtype).min)
    lse = torch.logsumexp(dots, dim=-1, keepdim=True)                             # (B, nh, nc, c, 1)
    p = torch.exp(dots - lse)
    if dropout_p and training:
        p = F.dropout(p, dropout_p, training=True)
    so = (p.view(-1, c, w) @ vctx.reshape(-1, w, dv)).view(B, nh * Np, dv)
    slse = lse.view(B, nh * Np)
    # undo the sort: sorted slot j of round r holds token order[r, j]
    inv = torch.empty_like(order).scatter_(-1, order, torch.arange(Np, device=order.device).expand_as(order))
    inv = (inv + torch.arange(nh, device=order.device).view(1, nh, 1) * Np).view(B, nh * Np)
    o = so.gather(1, inv.unsqueeze(-1).expand(-1, -1, dv)).view(B, nh, Np, dv)[:, :, :N]
    logits = slse.gather(1, inv).view(B, nh, Np, 1)[:, :, :N]
    if nh == 1:
        out = o[:, 0]
    else:
        out = (o * torch.softmax(logits, dim=1)).sum(dim=1)
    if return_buckets:
        return out, buckets[..., :N]
    return out


def full_shared_qk_attention(qk: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                             q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact shared-QK attention (keys = normalised ``qk``, no self-attention unless a token is alone,
    as in :func:`lsh_attention`): the O(N^2) reference. ``q`` (B, M, d): queries that are the first M
    tokens of ``qk`` (default all)."""
    B, N, d = qk.shape
    scale = d ** -0.5 if scale is None else scale
    q = qk if q is None else q
    M = q.shape[1]
    dots = (q @ F.normalize(qk, dim=-1).transpose(1, 2)) * scale
    eye = torch.zeros(M, N, dtype=dots.dtype, device=dots.device)
    eye[:, :M].diagonal().fill_(SELF_LOGIT)
    dots = dots.masked_fill(eye.bool(), SELF_LOGIT) if N > 1 else dots
    return torch.softmax(dots, dim=-1) @ v


class LSHAttention(nn.Module):
    """Multi-head shared-QK LSH attention behind the attention interface of a ViT block:
    (B, N, dim) -> (B, N, dim).

    The constructor takes the keyword arguments that timm's ``Block`` passes to ``attn_layer``
    (``qkv_bias`` for the QK/V projection, ``proj_bias``, ``attn_drop`` on the attention weights,
    ``proj_drop``; ``qk_norm``/``scale_norm``/``norm_layer`` are refused when set, they have no LSH
    counterpart here) plus the LSH options: ``bucket_size`` (chunk length, default 64), ``n_hashes``
    (rounds, default 4), ``n_buckets`` (default: the paper's, from the length), ``chunks_before``/
    ``chunks_after`` (1/1), ``seed`` (eval-mode rotations).

    Prefix tokens: the first ``num_prefix_tokens`` tokens (class/register tokens; set by the timm
    adapter) are hashed and attended to like the others, but as *queries* they attend exactly to all
    tokens (O(P*N)), so a class token used for pooling sees the whole image, not one bucket.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, bucket_size: int = 64, n_hashes: int = 4,
                 n_buckets: Optional[int] = None, chunks_before: int = 1, chunks_after: int = 1,
                 seed: int = 0, num_prefix_tokens: int = 0, device=None, dtype=None, **kwargs):
        super().__init__()
        if qk_norm or scale_norm:
            raise ValueError("LSHAttention has no qk_norm/scale_norm (its keys are the unit-normalised queries)")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if bucket_size < 1 or n_hashes < 1:
            raise ValueError(f"bucket_size and n_hashes must be >= 1, got {bucket_size} and {n_hashes}")
        if n_buckets is not None and (n_buckets < 2 or n_buckets % 2):
            raise ValueError(f"n_buckets must be even and >= 2, got {n_buckets}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.bucket_size, self.n_hashes, self.n_buckets = bucket_size, n_hashes, n_buckets
        self.chunks_before, self.chunks_after = chunks_before, chunks_after
        self.num_prefix_tokens = num_prefix_tokens
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias, device=device, dtype=dtype)  # shared QK, V
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def bound(cls, **fixed):
        """``cls``, or a subclass that always passes ``fixed`` (e.g. ``n_hashes``) to the constructor
        (timm's ``Block`` calls ``attn_layer`` with a fixed argument set)."""
        if not fixed:
            return cls

        class Bound(cls):
            def __init__(self, dim, **kw):
                super().__init__(dim, **{**kw, **fixed})

        return Bound

    def rotations(self, n: int, device, dtype) -> torch.Tensor:
        """The rotations for an ``n``-token call: seeded in eval, from the global RNG in training."""
        nb = self.n_buckets or default_n_buckets(n, self.bucket_size)
        gen = None if self.training else torch.Generator().manual_seed(int(self.seed))
        return random_rotations(self.head_dim, self.n_hashes, nb, gen, device, dtype)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, "
                f"n_buckets={self.n_buckets or 'auto'}, chunks=(-{self.chunks_before}, +{self.chunks_after}), "
                f"prefix={self.num_prefix_tokens}")

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("LSHAttention supports neither attn_mask nor is_causal")
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        qk, v = self.qkv(x).view(B, N, 2, h, d).permute(2, 0, 3, 1, 4).reshape(2, B * h, N, d).unbind(0)
        rot = self.rotations(N, x.device, qk.dtype)
        out = lsh_attention(qk, v, rot, self.bucket_size, self.chunks_before, self.chunks_after, self.scale,
                            self.attn_drop, self.training)
        p = int(self.num_prefix_tokens or 0)
        if p:
            if p >= N:
                raise ValueError(f"{N} tokens with {p} prefix tokens: nothing to attend to")
            out = torch.cat([full_shared_qk_attention(qk, v, self.scale, q=qk[:, :p]), out[:, p:]], dim=1)
        out = out.view(B, h, N, d).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))
