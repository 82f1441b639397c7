"""Proportional attention (ToMe's ``log(size)`` added to the attention logits) on several kernels, timed
interleaved in one process at one shape, against today's path (issue 46):

- ``sdpa (B,1,1,N) mask``: today's path (``patches/timm.py``: ``size_bias`` as SDPA's additive mask);
- ``sdpa aligned mask``: the mask built once per block as ``(B, 1, N, N_pad)`` with ``N_pad`` a multiple
  of 16, passed as its ``[..., :N]`` view (aligned rows, as the CUDA memory-efficient kernel wants them);
  timed with its construction (once per block is once per call here) and without it;
- ``flex_attention``: ``torch.nn.attention.flex_attention`` with a ``score_mod`` adding ``log(size)`` of
  the key, compiled (``torch.compile``; its compile time is printed) and eager;
- ``sdpa, log(size) as an extra q/k channel``: no mask at all, so any fused kernel may run: q gets
  8 more channels ``[1, 0, ...]``, k gets ``[log(size) / scale, 0, ...]`` and v 8 zero channels (head
  widths stay multiples of 8), so that ``scale * q'k'`` is ``scale * qk + log(size)``; the output's
  first D channels are kept;
- ``sdpa, no mask``: a lower bound, not exact (sizes ignored).

Each output is checked against today's path (largest absolute difference). Usage::

    python scripts/prop_attn_kernels.py --batch 1 --heads 6 --tokens 197 --threads 1 --repeats 30
    python scripts/prop_attn_kernels.py --device cuda --dtype bf16 --batch 256 --heads 12 --tokens 133
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from visiontools.timing import interleaved_times, machine_description, median


def kernels(q, k, v, size) -> dict:
    """name -> zero-argument call of every variant on ``q, k, v`` ``(B, H, N, D)`` and sizes ``(B, N, 1)``."""
    B, N = size.shape[:2]
    bias = size.log().view(B, 1, 1, N)
    pad = (N + 15) // 16 * 16

    def aligned_mask():
        m = q.new_zeros(B, 1, N, pad)
        m[..., :N] = bias
        return m[..., :N]
    prebuilt = aligned_mask()
    D, scale = q.shape[-1], q.shape[-1] ** -0.5

    def folded():
        one = q.new_zeros(*q.shape[:3], 8)
        one[..., 0] = 1
        logs = k.new_zeros(*k.shape[:3], 8)
        logs[..., 0] = (size.log() / scale).view(B, 1, N)
        q2, k2, v2 = torch.cat([q, one], -1), torch.cat([k, logs], -1), torch.cat([v, torch.zeros_like(one)], -1)
        return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :D]
    fns = {"sdpa (B,1,1,N) mask (today)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
           "sdpa aligned mask, built": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=aligned_mask()),
           "sdpa aligned mask, prebuilt": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=prebuilt),
           "sdpa, log(size) as an extra q/k channel": folded,
           "sdpa, no mask (not exact)": lambda: F.scaled_dot_product_attention(q, k, v)}
    from torch.nn.attention.flex_attention import flex_attention

    log_size = size.log().view(B, N)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + log_size[b, kv_idx]
    compiled = torch.compile(flex_attention, dynamic=False)
    t0 = time.perf_counter()
    compiled(q, k, v, score_mod=score_mod)
    print(f"flex_attention compile: {time.perf_counter() - t0:.1f} s")
    fns["flex_attention, compiled"] = lambda: compiled(q, k, v, score_mod=score_mod)
    fns["flex_attention, eager"] = lambda: flex_attention(q, k, v, score_mod=score_mod)
    return fns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="q, k, v and mask dtype")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, args.tokens, args.head_dim, generator=g).to(device, dtype)
               for _ in range(3))
    size = torch.randint(1, 5, (args.batch, args.tokens, 1), generator=g).to(device, dtype)
    fns = kernels(q, k, v, size)
    today = "sdpa (B,1,1,N) mask (today)"
    with torch.inference_mode():
        ref = fns[today]()
        diffs = {name: (fn() - ref).float().abs().max().item() for name, fn in fns.items()}
    times = interleaved_times(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    base = median(times[today])
    print(f"B={args.batch} H={args.heads} N={args.tokens} D={args.head_dim}, {args.dtype}, {args.warmup} warm-up + "
          f"{args.repeats} interleaved rounds; {machine_description(device)}\n")
    print("| kernel | median ms | speed vs today | max abs diff to today |\n|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {median(t) * 1e3:.3f} | {base / median(t):.2f}x | {diffs[name]:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
