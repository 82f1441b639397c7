"""Token mixers over sequence length: timm SDPA attention vs Hyena vs LSH attention vs reformer-pytorch.

Each candidate is one token-mixing layer (the ``attn`` of a ViT block) of the same width and heads:
timm's ``Attention`` (fused ``scaled_dot_product_attention``, exact), :class:`visiontools.layers.hyena.HyenaAttention`
(order 2), :class:`visiontools.layers.lsh.LSHAttention` at each ``--hashes`` count, and, when installed (the
``bench`` extra), ``reformer_pytorch.LSHSelfAttention`` at each ``--reformer-hashes`` count with the same
bucket size. visiontools' LSH looks one chunk back and one forward by default; reformer-pytorch looks
one back only, so a second visiontools row, "back only" (``chunks_after=0``), runs its exact setting.
A "projections only" row runs the linear layers both LSH layers have (shared QK and V in, output out;
the same matmuls in each) without the attention between them: the floor of an LSH layer's time, so
the summary also gives the reformer-pytorch/visiontools ratio of the attention cores (time minus it).

At every token count (a square grid: Hyena needs one) all candidates are timed interleaved in one
process (``visiontools.timing.interleaved_times``, medians): the forward (eval, inference mode) and a
forward+backward (train mode, gradient of the output sum). Peak memory is that of one forward+backward
(``visiontools.bench.memory.peak_memory``: on a CPU, the tensor storages every operator returns, counted
until freed). The error of each
approximation is measured on the attention core alone, on the same Gaussian ``qk``/``v`` (one head):
``||out - exact|| / ||exact||``, where "exact" is full shared-QK softmax attention (keys = normalised
queries, no self-attention), the function both LSH implementations approximate.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from visiontools.bench.hyena import loglog_slope
from visiontools.bench.memory import peak_memory
from visiontools.timing import (
    add_run_arguments, interleaved_times, machine_description, median, save_figure, subplots, write_results,
)

DEFAULT_GRIDS = [14, 16, 32, 48, 64, 96, 128]


class Projections(torch.nn.Module):
    """An LSH layer's linear layers alone: ``(B, N, dim) -> (B, N, dim)`` through the shared QK/V input
    projection (``dim -> 2 dim``) and the output projection, with no attention between them."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 2 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qk, v = self.qkv(x).chunk(2, dim=-1)
        return self.proj(qk + v)


def build_mixers(dim: int, num_heads: int, bucket_size: int, hashes, reformer_hashes, device) -> dict:
    """name -> token-mixing layer (B, N, dim) -> (B, N, dim), see module docstring."""
    from timm.layers import Attention

    from visiontools.layers.hyena import HyenaAttention
    from visiontools.layers.lsh import LSHAttention

    torch.manual_seed(0)
    mixers = {"sdpa": Attention(dim, num_heads, qkv_bias=True),
              "hyena": HyenaAttention(dim, num_heads, num_prefix_tokens=0)}
    if not getattr(mixers["sdpa"], "fused_attn", True):
        raise RuntimeError("timm Attention is not using fused SDPA here (TIMM_FUSED_ATTN=0?)")
    for h in hashes:
        mixers[f"lsh{h}"] = LSHAttention(dim, num_heads, bucket_size=bucket_size, n_hashes=h)
    mixers["proj"] = Projections(dim)
    if reformer_hashes:
        try:
            from reformer_pytorch import LSHSelfAttention
        except ImportError as e:
            raise SystemExit("reformer-pytorch is not installed: pip install 'visiontools[bench]' "
                             "(or pass --reformer-hashes with no values)") from e
        for h in reformer_hashes:
            mixers[f"lsh{h}_back"] = LSHAttention(dim, num_heads, bucket_size=bucket_size, n_hashes=h, chunks_after=0)
            mixers[f"reformer{h}"] = LSHSelfAttention(dim, heads=num_heads, bucket_size=bucket_size, n_hashes=h,
                                                      causal=False)
    return {k: m.to(device) for k, m in mixers.items()}


def _call(name: str, m, x, bucket_size: int, grid):
    if name == "hyena":
        m.grid_size = grid
    if name.startswith("reformer") and x.shape[1] % (2 * bucket_size):
        # reformer-pytorch needs a multiple of 2*bucket_size: pad and mask, as its users must
        n = x.shape[1]
        pad = (-n) % (2 * bucket_size)
        mask = torch.ones(x.shape[0], n + pad, dtype=torch.bool, device=x.device)
        mask[:, n:] = False
        return m(torch.nn.functional.pad(x, (0, 0, 0, pad)), input_mask=mask)[:, :n]
    return m(x)


def approximation_errors(n: int, head_dim: int, bucket_size: int, hashes, reformer_hashes, device,
                         seed: int = 0) -> dict:
    """Relative error of each LSH variant against exact shared-QK attention on Gaussian qk/v (n tokens)."""
    from visiontools.layers.lsh import default_n_buckets, lsh_attention, random_rotations

    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(1, n, head_dim, generator=g).to(device)
    v = torch.randn(1, n, head_dim, generator=g).to(device)
    with torch.inference_mode():
        ref = torch.cat([_exact_rows(qk, v, i, min(n, i + 1024)) for i in range(0, n, 1024)], 1)
        err = lambda out: ((out - ref).norm() / ref.norm()).item()  # noqa: E731
        res = {"sdpa": 0.0, "hyena": None}
        nb = default_n_buckets(n, bucket_size)
        for h in hashes:
            rot = random_rotations(head_dim, h, nb, torch.Generator().manual_seed(seed + 1), device)
            res[f"lsh{h}"] = err(lsh_attention(qk, v, rot, bucket_size))
        if reformer_hashes:
            from reformer_pytorch.reformer_pytorch import LSHAttention as RefLSH
            pad = (-n) % (2 * bucket_size)
            qkp, vp = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (qk, v))
            mask = torch.arange(n + pad, device=device)[None] < n
            for h in reformer_hashes:
                rot = random_rotations(head_dim, h, nb, torch.Generator().manual_seed(seed + 1), device)
                res[f"lsh{h}_back"] = err(lsh_attention(qk, v, rot, bucket_size, chunks_after=0))
                torch.manual_seed(seed + 1)
                out = RefLSH(bucket_size=bucket_size, n_hashes=h, causal=False)(qkp, vp, input_mask=mask)[0]
                res[f"reformer{h}"] = err(out[:, :n])
    return res


def _exact_rows(qk, v, i, j):
    """Rows i:j of exact shared-QK attention (queries in blocks, so 16k tokens fit in memory)."""
    from visiontools.layers.lsh import SELF_LOGIT
    d = qk.shape[-1]
    dots = (qk[:, i:j] @ torch.nn.functional.normalize(qk, dim=-1).transpose(1, 2)) * d ** -0.5
    idx = torch.arange(i, j, device=qk.device)
    dots[:, idx - i, idx] = SELF_LOGIT
    return torch.softmax(dots, -1) @ v


def benchmark(grids, dim: int = 192, num_heads: int = 3, bucket_size: int = 64, hashes=(1, 2, 4, 8),
              reformer_hashes=(1, 4), device="cpu", repeats: int = 3, warmup: int = 1, progress: bool = True,
              max_exact_tokens: int = 1 << 30) -> dict:
    """Forward, forward+backward, peak memory and error of every mixer at every grid (batch 1)."""
    device = torch.device(device)
    mixers = build_mixers(dim, num_heads, bucket_size, hashes, reformer_hashes, device)
    rows = []
    it = list(grids)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="token counts", unit="size")
    for H, W in it:
        n = H * W
        x = torch.randn(1, n, dim, device=device)
        xg = x.clone().requires_grad_(True)
        names = [k for k in mixers if k != "sdpa" or n <= max_exact_tokens]

        def fwd(k):
            mixers[k].eval()
            with torch.inference_mode():
                _call(k, mixers[k], x, bucket_size, (H, W))

        def fwd_bwd(k):
            mixers[k].train()
            with torch.inference_mode(False), torch.enable_grad():  # interleaved_times runs in inference mode
                _call(k, mixers[k], xg, bucket_size, (H, W)).sum().backward()
            xg.grad = None
            for p in mixers[k].parameters():
                p.grad = None

        t_f = interleaved_times({k: (lambda k=k: fwd(k)) for k in names}, repeats=repeats, warmup=warmup, device=device)
        t_fb = interleaved_times({k: (lambda k=k: fwd_bwd(k)) for k in names}, repeats=repeats, warmup=warmup,
                                 device=device)
        mem = {k: peak_memory(lambda k=k: fwd_bwd(k), device, autograd=True) for k in names}
        errs = approximation_errors(n, dim // num_heads, bucket_size, hashes, reformer_hashes, device)
        row = {"grid": [H, W], "tokens": n,
               "fwd_ms": {k: 1e3 * median(t_f[k]) for k in names},
               "fwd_bwd_ms": {k: 1e3 * median(t_fb[k]) for k in names},
               "peak_bytes": mem, "rel_error": {k: errs.get(k) for k in names},
               "fwd_times_s": t_f, "fwd_bwd_times_s": t_fb}
        rows.append(row)
        if progress:
            it.set_postfix(tokens=n, sdpa=f"{row['fwd_ms'].get('sdpa', float('nan')):.0f}ms")
        del x, xg
    names = list(mixers)
    return {"machine": machine_description(device), "device": str(device), "dim": dim, "num_heads": num_heads,
            "bucket_size": bucket_size, "hashes": list(hashes), "reformer_hashes": list(reformer_hashes),
            "batch": 1, "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
            "mixers": names, "rows": rows, "summary": summarize(rows, names)}


def _first_beating(rows, a: str, b: str, key: str):
    """Smallest token count from which ``a`` < ``b`` (in ``key``) at every larger size measured, or None."""
    found = None
    for r in sorted(rows, key=lambda r: r["tokens"]):
        va, vb = r[key].get(a), r[key].get(b)
        if va is None or vb is None:
            continue
        found = (found or r["tokens"]) if va < vb else None
    return found


def summarize(rows, names) -> dict:
    """Crossovers against SDPA, reformer-pytorch/visiontools time ratios, log-log slopes."""
    out = {"lsh_beats_sdpa_time_from": {}, "lsh_beats_sdpa_memory_from": {}, "reformer_over_lsh_fwd_bwd": {},
           "reformer_over_lsh_fwd": {}, "reformer_over_lsh_core_fwd_bwd": {}, "slope_fwd_bwd": {}}
    for k in names:
        if k.startswith("lsh") or k == "hyena":  # (not "proj": a floor, not a mixer)
            out["lsh_beats_sdpa_time_from"][k] = _first_beating(rows, k, "sdpa", "fwd_bwd_ms")
            out["lsh_beats_sdpa_memory_from"][k] = _first_beating(rows, k, "sdpa", "peak_bytes")
        if k.startswith("reformer"):
            h = k[len("reformer"):]
            for mine in (f"lsh{h}_back", f"lsh{h}"):
                for key, dst in (("fwd_bwd_ms", "reformer_over_lsh_fwd_bwd"), ("fwd_ms", "reformer_over_lsh_fwd")):
                    out[dst][f"{k}/{mine}"] = {r["tokens"]: r[key][k] / r[key][mine] for r in rows
                                               if k in r[key] and mine in r[key]}
            t = [r["fwd_bwd_ms"] for r in rows]
            out["reformer_over_lsh_core_fwd_bwd"][f"{k}/lsh{h}_back"] = {
                r["tokens"]: (m[k] - m["proj"]) / (m[f"lsh{h}_back"] - m["proj"]) for r, m in zip(rows, t)
                if {k, "proj", f"lsh{h}_back"} <= m.keys()}
        big = [r for r in rows if r["tokens"] >= 1024 and k in r["fwd_bwd_ms"]]
        out["slope_fwd_bwd"][k] = loglog_slope([r["tokens"] for r in big], [r["fwd_bwd_ms"][k] for r in big])
    return out


LABELS = {"sdpa": "SDPA attention (exact)", "hyena": "Hyena (order 2)",
          "proj": "projections only (both LSH layers' linear layers)"}


def label(k: str) -> str:
    if k in LABELS:
        return LABELS[k]
    if k.startswith("reformer"):
        return f"reformer-pytorch, {k[8:]} hash(es), back only"
    h = k[3:].split("_")[0]
    return f"visiontools LSH, {h} hash(es)" + (", back only" if k.endswith("_back") else ", back+fwd")


ERROR_NOTE = ("The error is ||output - exact|| / ||exact||. Gaussian queries and values have no structure, so exact "
              "attention spreads over all tokens and its output is close to the mean of all values, a short vector; "
              "LSH attends within buckets of about {bucket} tokens and returns a mean of those, far longer. So the "
              "error grows with the tokens and, with few hashes, passes 1 (further from exact than an all-zero "
              "output) near a thousand tokens: the method on its hardest input, not a bug (reformer-pytorch, back only, gives the same "
              "errors). Images have structure: docs/reformer.md gives the accuracy cost on CIFAR-10.")


def markdown_table(result: dict) -> str:
    """Per-mixer tables (fwd ms, fwd+bwd ms, peak MB, error) and the summary."""
    names, rows = result["mixers"], result["rows"]
    head = "| mixer | " + " | ".join(str(r["tokens"]) for r in rows) + " |"
    sep = "|---|" + "---:|" * len(rows)
    out = [f"Token mixers, width {result['dim']}, {result['num_heads']} heads, bucket size {result['bucket_size']}, "
           f"batch 1, fp32, {result['threads']} thread(s), medians of {result['repeats']} interleaved rounds, "
           f"{result['machine']}", ""]
    for key, title, fmt in (("fwd_ms", "Forward ms (eval)", "{:.1f}"),
                            ("fwd_bwd_ms", "Forward+backward ms (train)", "{:.1f}"),
                            ("peak_bytes", "Peak memory of forward+backward, MB", None),
                            ("rel_error", "Relative error vs exact shared-QK attention (Gaussian qk/v, one head)",
                             "{:.3f}")):
        out += [f"**{title}** (columns: tokens)", "", head, sep]
        for k in names:
            cells = []
            for r in rows:
                v = r[key].get(k)
                cells.append("–" if v is None else (f"{v / 2**20:.1f}" if fmt is None else fmt.format(v)))
            out.append(f"| {label(k)} | " + " | ".join(cells) + " |")
        if key == "rel_error":
            out += ["", ERROR_NOTE.format(bucket=result["bucket_size"])]
        out.append("")
    s = result["summary"]
    say = lambda v: f"from {v} tokens" if v else "not in the range measured"  # noqa: E731
    for k, v in s["lsh_beats_sdpa_time_from"].items():
        out.append(f"- {label(k)} faster than SDPA (fwd+bwd): {say(v)}; less peak memory: "
                   f"{say(s['lsh_beats_sdpa_memory_from'][k])}.")
    for pair, by_n in s["reformer_over_lsh_fwd_bwd"].items():
        fw = s["reformer_over_lsh_fwd"][pair]
        out.append(f"- time ratio {pair} (fwd+bwd / fwd): " +
                   ", ".join(f"{n}: {r:.2f}/{fw[n]:.2f}" for n, r in by_n.items()))
    for pair, by_n in s["reformer_over_lsh_core_fwd_bwd"].items():
        out.append(f"- time ratio {pair} of the attention cores (fwd+bwd minus projections only): " +
                   ", ".join(f"{n}: {r:.2f}" for n, r in by_n.items()))
    slopes = ", ".join(f"{k} {v:.2f}" for k, v in s["slope_fwd_bwd"].items() if v is not None)
    out.append("- log-log slope of fwd+bwd time vs tokens (>= 1024): " + slopes if slopes else
               "- log-log slope of fwd+bwd time vs tokens: not computed, it needs two grids of at least 1024 tokens")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    """Log-log plots of forward+backward time, peak memory and error against tokens."""
    rows = result["rows"]
    fig, axes = subplots(1, 3, figsize=(15, 4.5))
    for k in result["mixers"]:
        style = "o-" if k == "sdpa" else "s-" if k == "hyena" else "^--" if k.startswith("reformer") else \
            "v:" if k.endswith("_back") else "k." if k == "proj" else "x-"
        for ax, key, scale in ((axes[0], "fwd_bwd_ms", 1), (axes[1], "peak_bytes", 2**-20), (axes[2], "rel_error", 1)):
            pts = [(r["tokens"], r[key][k] * scale) for r in rows if r[key].get(k)]
            if pts:
                ax.loglog(*zip(*pts), style, label=label(k), alpha=0.8)
    for ax, yl in zip(axes, ("fwd+bwd ms (batch 1)", "peak MB, fwd+bwd", "relative error vs exact")):
        ax.set_xlabel("tokens")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"token mixers, width {result['dim']}, bucket {result['bucket_size']}, {result['threads']} "
                 f"thread(s), {result['machine']}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools bench mixers``."""
    from visiontools.bench.hyena import parse_grid

    p.add_argument("--grids", type=parse_grid, nargs="+", default=[(g, g) for g in DEFAULT_GRIDS], metavar="HxW",
                   help="token grids (tokens = H*W), e.g. 14 64 128")
    p.add_argument("--dim", type=int, default=192, help="mixer width")
    p.add_argument("--num-heads", type=int, default=3, help="heads (attention and both LSH)")
    p.add_argument("--bucket-size", type=int, default=64, help="LSH chunk/bucket size (both LSH implementations)")
    p.add_argument("--hashes", type=int, nargs="+", default=[1, 2, 4, 8], help="visiontools LSH hash rounds")
    p.add_argument("--reformer-hashes", type=int, nargs="*", default=[1, 4],
                   help="reformer-pytorch hash rounds (each also runs visiontools LSH back-only); none: skip it")
    p.add_argument("--max-exact-tokens", type=int, default=1 << 30,
                   help="skip SDPA above this many tokens (its time grows as tokens^2)")
    add_run_arguments(p)
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of time, memory and error vs tokens")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``visiontools bench mixers``."""
    from visiontools.timing import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0 or args.bucket_size < 1 or min(args.hashes) < 1:
        from visiontools.errors import UserError
        raise UserError("--repeats, --bucket-size and --hashes must be >= 1 and --warmup >= 0")
    result = benchmark(args.grids, dim=args.dim, num_heads=args.num_heads, bucket_size=args.bucket_size,
                       hashes=args.hashes, reformer_hashes=args.reformer_hashes or [],
                       device=resolve_device(args.device), repeats=args.repeats, warmup=args.warmup,
                       progress=not args.no_progress, max_exact_tokens=args.max_exact_tokens)
    write_results(args, markdown_table(result), result, plot=plot)
    return 0
