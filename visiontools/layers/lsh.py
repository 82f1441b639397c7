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
them), which ``torch.utils.checkpoint`` and :mod:`visiontools.layers.reversible` replay, so a recomputed
forward sees the same buckets; plain autograd keeps the sort indices of the forward. Rotations are
drawn on the CPU and moved, so a seed hashes the same on every device.

Everything is vectorised over batch, heads, rounds and chunks (no Python loop over tokens or chunks).
This module imports no timm; :class:`LSHAttention` matches the constructor and call signature of the
``attn_layer`` of timm's ViT ``Block`` (adapter: ``visiontools.patches.timm_lsh``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from visiontools.layers import bound_class

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
        # argmax over [rot ; -rot] without building it: the largest entry, or the most negative one
        top, i_top = rot.max(dim=-1)
        low, i_low = rot.min(dim=-1)
        return torch.where(top >= -low, i_top, i_low + half).transpose(-1, -2).contiguous()


def _neighbour_shifts(nc: int, before: int, after: int) -> list[int]:
    """Chunk offsets a chunk attends to: itself, ``before`` back, ``after`` forward (wrapping; no chunk twice)."""
    shifts, seen = [0], {0}
    for s in [-i for i in range(1, before + 1)] + list(range(1, after + 1)):
        if s % nc not in seen:
            seen.add(s % nc)
            shifts.append(s)
    return shifts


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _FlashChunkAttention(torch.autograd.Function):
    """Softmax attention of (M, 1, c, D) queries over (M, 1, w, D) keys/values with an additive (c, w)
    mask, returning the output and the row log-sum-exps, through PyTorch's fused CPU flash-attention
    kernel (no (c, w) probability tensor is kept). The last column of ``v`` must be all ones: backward
    passes the log-sum-exp's gradient through it (``d lse_i / d s_ij = p_ij``, which is what the kernel
    gives a ones column of values once that column of the output is zeroed), so one kernel call
    returns the gradients of both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        out = out.clone()
        out[..., -1] = 0
        g = g_out.clone()
        g[..., -1] = g_lse
        dq, dk, dv = _FLASH_CPU_BWD(g.contiguous(), q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=ctx.scale)
        return dq, dk, dv, None, None


def _use_flash(x: torch.Tensor, dropout: bool) -> bool:
    return (_FLASH_CPU is not None and _FLASH_CPU_BWD is not None and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and not dropout)


def _check_lsh_args(qk: torch.Tensor, v: torch.Tensor, bucket_size: int, impl: str, dropout: bool) -> bool:
    """Validate the arguments of :func:`lsh_attention`; returns whether the flash kernel runs the chunks."""
    if qk.dim() != 3 or v.shape[:2] != qk.shape[:2]:
        raise ValueError(f"qk and v must be (B, N, d) with equal B and N, got {tuple(qk.shape)} and {tuple(v.shape)}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    if impl not in ("auto", "flash", "matmul"):
        raise ValueError(f"impl must be 'auto', 'flash' or 'matmul', got {impl!r}")
    flash = _use_flash(qk, dropout) if impl == "auto" else impl == "flash"
    if flash and not _use_flash(qk, dropout):
        raise ValueError("impl='flash' needs float32/float64 CPU tensors, no attention dropout, and a PyTorch "
                         "with the CPU flash-attention kernel")
    return flash


def _sorted_chunks(buckets: torch.Tensor, c: int, chunks_before: int, chunks_after: int):
    """Per round, the stable sort by bucket (``order`` (B, nh, Np)), and as flat row indices into the
    (B * Np) tokens: each sorted chunk's own rows and the rows of the chunks it attends to
    (itself, ``chunks_before`` back, ``chunks_after`` forward, wrapping inside the round)."""
    B, nh, Np = buckets.shape
    nc = Np // c
    # stable sort by bucket keeps position order inside a bucket: a sort by (bucket, position)
    order = torch.sort(buckets, dim=-1, stable=True).indices                      # (B, nh, Np)
    rows = (order + torch.arange(B, device=order.device).view(B, 1, 1) * Np).view(B, nh, nc, c)
    # the keys of chunk i: the rows of chunks i, i-1, i+1 (wrapping inside the round): gathered in one
    # index_select straight from the unsorted tokens (its backward is one index_add)
    shifts = _neighbour_shifts(nc, chunks_before, chunks_after)
    ctx_rows = torch.cat([torch.roll(rows, -sh, dims=2) for sh in shifts], dim=3).reshape(-1)
    return order, rows.reshape(-1), ctx_rows, len(shifts) * c


def _chunks_flash(qk, k, v, rows, ctx_rows, c: int, w: int, N: int, scale: float):
    """Attention inside the sorted chunks through the fused CPU flash kernel (:class:`_FlashChunkAttention`):
    outputs (B * nh * Np, dv) and log-sum-exps (B * nh * Np) in sorted order."""
    B, Np, d = qk.shape
    dv = v.shape[-1]
    # extra columns: q' = [q, 0.., 1, 0], k' = [k, 0.., pad bias, 0], v' = [v, 0.., 0, 1] (the ones
    # column carries the log-sum-exp's gradient; the pad-bias column masks padding keys)
    D = max(d, dv) + 2
    col = qk.new_zeros(B, Np, 1)
    one = qk.new_ones(B, Np, 1)
    padb = col
    if Np > N:
        padb = qk.new_zeros(B, Np, 1)
        padb[:, N:] = -1e9
    qx = torch.cat([F.pad(qk, (0, D - 2 - d)), one, col], -1).view(B * Np, D)
    kx = torch.cat([F.pad(k, (0, D - 2 - d)), padb, col], -1).view(B * Np, D)
    vx = torch.cat([F.pad(v, (0, D - 2 - dv)), col, one], -1).view(B * Np, D)
    mask = torch.zeros(c, w, dtype=qk.dtype, device=qk.device)
    mask.diagonal().fill_(SELF_LOGIT)
    so, lse = _FlashChunkAttention.apply(qx.index_select(0, rows).view(-1, 1, c, D),
                                         kx.index_select(0, ctx_rows).view(-1, 1, w, D),
                                         vx.index_select(0, ctx_rows).view(-1, 1, w, D), mask, scale)
    return so[..., :dv].reshape(-1, dv), lse.reshape(-1)


def _chunks_matmul(qk, k, v, rows, ctx_rows, c: int, w: int, N: int, scale: float, dropout_p: float):
    """Attention inside the sorted chunks with matmul + softmax (any device/dtype; attention dropout
    ``dropout_p`` when non-zero): outputs (B * nh * Np, dv) and log-sum-exps in sorted order."""
    B, Np, d = qk.shape
    dv = v.shape[-1]
    sq = qk.reshape(B * Np, d).index_select(0, rows).view(-1, c, d)
    kctx = k.reshape(B * Np, d).index_select(0, ctx_rows).view(-1, w, d)
    vctx = v.reshape(B * Np, dv).index_select(0, ctx_rows).view(-1, w, dv)
    dots = (sq @ kctx.transpose(1, 2)).mul_(scale)
    dots[..., :c].diagonal(dim1=-2, dim2=-1).fill_(SELF_LOGIT)  # self chunk comes first
    if Np > N:
        kpad = (ctx_rows % Np >= N).view(-1, 1, w)
        dots = dots.masked_fill(kpad, torch.finfo(dots.dtype).min)
    # softmax, and the log-sum-exp from it: lse = max - log(max p) (its gradient is p, as it should be)
    p = torch.softmax(dots, dim=-1)
    lse = dots.amax(-1) - torch.log(p.amax(-1))
    if dropout_p:
        p = F.dropout(p, dropout_p, training=True)
    return (p @ vctx).view(-1, dv), lse.reshape(-1)


def _unsort_and_combine(so: torch.Tensor, slse: torch.Tensor, order: torch.Tensor, N: int) -> torch.Tensor:
    """Undo each round's sort of the chunk outputs and combine the rounds with weights
    ``softmax_r(log-sum-exp)``: (B, N, dv)."""
    B, nh, Np = order.shape
    dv = so.shape[-1]
    # sorted slot j of round r holds token order[r, j]
    inv = torch.empty_like(order).scatter_(-1, order, torch.arange(Np, device=order.device).expand_as(order))
    inv = (inv + torch.arange(B * nh, device=order.device).view(B, nh, 1) * Np)[:, :, :N].reshape(-1)
    o = so.index_select(0, inv).view(B, nh, N, dv)
    if nh == 1:
        return o[:, 0]
    logits = slse.index_select(0, inv).view(B, nh, N, 1)
    return (o * torch.softmax(logits, dim=1)).sum(dim=1)


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor, bucket_size: int,
                  chunks_before: int = 1, chunks_after: int = 1, scale: Optional[float] = None,
                  dropout_p: float = 0.0, training: bool = False, return_buckets: bool = False,
                  impl: str = "auto"):
    """Shared-QK LSH attention (see module docstring) of ``qk``/``v`` (B, N, d), e.g. B = batch x heads.

    ``rotations`` (d, n_hashes, n_buckets/2) (:func:`random_rotations`); ``bucket_size`` is the chunk
    length. ``scale`` defaults to ``d ** -0.5``. ``impl``: ``"flash"`` runs the attention inside chunks
    through PyTorch's fused CPU flash-attention kernel (float32/64 on CPU, no attention dropout),
    ``"matmul"`` through plain matmul + softmax (any device/dtype, dropout), ``"auto"`` picks flash
    where it applies. Returns (B, N, d) (and the (B, n_hashes, N) buckets with ``return_buckets``)."""
    dropout = bool(dropout_p and training)
    flash = _check_lsh_args(qk, v, bucket_size, impl, dropout)
    N, d = qk.shape[1], qk.shape[2]
    c = bucket_size
    n_pad = (-N) % c
    scale = d ** -0.5 if scale is None else scale

    buckets = hash_buckets(qk, rotations)                                         # (B, nh, N)
    if n_pad:  # padding: a bucket of its own past the last, so it sorts to the end of each round
        qk = F.pad(qk, (0, 0, 0, n_pad))
        v = F.pad(v, (0, 0, 0, n_pad))
        buckets = F.pad(buckets, (0, n_pad), value=2 * rotations.shape[2])
    order, rows, ctx_rows, w = _sorted_chunks(buckets, c, chunks_before, chunks_after)
    k = F.normalize(qk, dim=-1)
    if flash:
        so, slse = _chunks_flash(qk, k, v, rows, ctx_rows, c, w, N, scale)
    else:
        so, slse = _chunks_matmul(qk, k, v, rows, ctx_rows, c, w, N, scale, dropout_p if dropout else 0.0)
    out = _unsort_and_combine(so, slse, order, N)
    if return_buckets:
        return out, buckets[..., :N]
    return out


def full_shared_qk_attention(qk: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                             q: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Exact shared-QK attention (keys = normalised ``qk``, no self-attention unless a token is alone,
    as in :func:`lsh_attention`): the O(N^2) reference. ``q`` (B, M, d): queries that are the first M
    tokens of ``qk`` (default all). ``dropout_p``: dropout on the attention weights (pass it only in
    training)."""
    B, N, d = qk.shape
    scale = d ** -0.5 if scale is None else scale
    q = qk if q is None else q
    M = q.shape[1]
    dots = (q @ F.normalize(qk, dim=-1).transpose(1, 2)) * scale
    eye = torch.zeros(M, N, dtype=dots.dtype, device=dots.device)
    eye[:, :M].diagonal().fill_(SELF_LOGIT)
    dots = dots.masked_fill(eye.bool(), SELF_LOGIT) if N > 1 else dots
    p = torch.softmax(dots, dim=-1)
    if dropout_p:
        p = F.dropout(p, dropout_p, training=True)
    return p @ v


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
                 seed: int = 0, num_prefix_tokens: int = 0, impl: str = "auto", device=None, dtype=None, **kwargs):
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
        self.impl = impl
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias, device=device, dtype=dtype)  # shared QK, V
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def bound(cls, **fixed):
        """``cls``, or a subclass of the same name that always passes ``fixed`` (e.g. ``n_hashes``) to the
        constructor (:func:`visiontools.layers.bound_class`)."""
        return bound_class(cls, **fixed)

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
                            self.attn_drop, self.training, impl=self.impl)
        p = int(self.num_prefix_tokens or 0)
        if p:
            if p >= N:
                raise ValueError(f"{N} tokens with {p} prefix tokens: nothing to attend to")
            drop = self.attn_drop if self.training else 0.0  # as the LSH rows: dropout in training only
            out = torch.cat([full_shared_qk_attention(qk, v, self.scale, q=qk[:, :p], dropout_p=drop), out[:, p:]],
                            dim=1)
        out = out.view(B, h, N, d).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))
