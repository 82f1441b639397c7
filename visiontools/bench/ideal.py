"""The token-count ideal of a token-reduction candidate: what its token counts alone would save.

A merged model runs each block on fewer tokens, plus the reduction step (matching, gathers, size
bookkeeping, the proportional-attention mask). The FLOP ratio is not reachable on real hardware (a
matrix with 20 rows runs less efficiently than one with 197), so ``bench vit`` also measures the
**token-count ideal**: the *unpatched* blocks, each timed alone at the token counts it sees under the
schedule, on the same batch. ToMe merges between attention and MLP, so block ``l`` runs its attention
half at ``n_l`` tokens and its MLP half at ``n_{l+1}``; both halves are timed separately.

With ``T_base`` the unpatched model's time, ``a(n)``/``m(n)`` the halves' times at ``n`` tokens and
``rest = T_base - sum_l (a(N) + m(N))`` (patch embedding, head and whatever runs between blocks):

- ideal time ``= rest + sum_l (a(n_l) + m(n_{l+1}))``; the ideal speedup is ``T_base`` over it;
- share of ideal ``=`` ideal time / the candidate's measured time (1.0: the reduction step is free);
- overhead ``=`` measured time - ideal time, shown as a share of the measured time.

Every part is timed interleaved with the models themselves (``visiontools.timing.interleaved_times``).

The diffusion models (``bench sd``, ``bench dit``) reduce tokens inside attention only (merged
queries/keys/values, or downsampled keys/values); norms and feed-forward layers keep the full grid.
Their ideal (:class:`AttentionIdeal`) records the batch and the query and key/value token counts of
every attention call the patched model makes and times the *unpatched* attention (projections, SDPA,
output projection) at those sizes: ideal time ``=`` unpatched time ``-`` its attention calls ``+``
the candidate's attention calls, each timed alone. ``bench sd`` applies it to the transformer blocks
at the patched levels (the blocks' time inside the UNet call), ``bench dit`` to the whole model.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def block_parts(block: torch.nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The halves of a pre-norm transformer block as the unpatched model runs them: ``attn``
    (``x + attn(norm1(x))``) and ``mlp`` (``x + mlp(norm2(x))``), with layer scale where the block has
    it. A block without these parts is timed whole: ``{"block": block}`` (its merge then counts at
    the tokens entering it)."""
    if not all(hasattr(block, k) for k in ("norm1", "attn", "norm2", "mlp")):
        return {"block": block}
    ident = torch.nn.Identity()
    ls1, ls2 = getattr(block, "ls1", ident), getattr(block, "ls2", ident)
    g1, g2 = getattr(block, "gamma_1", None), getattr(block, "gamma_2", None)  # timm's EvaBlock

    def attn(x):
        y = ls1(block.attn(block.norm1(x)))
        return x + (y if g1 is None else g1 * y)

    def mlp(x):
        y = ls2(block.mlp(block.norm2(x)))
        return x + (y if g2 is None else g2 * y)
    return {"attn": attn, "mlp": mlp}


def _signature(block: torch.nn.Module) -> tuple:
    """Blocks with the same class and parameter shapes run the same work: timed once per token count."""
    return (type(block).__name__, *(tuple(p.shape) for p in block.parameters()))


def part_counts(tokens: list[int], whole: bool) -> list[tuple[str, int]]:
    """``(part, tokens)`` for each block of a schedule, from the tokens entering each block and after
    the last (``tokens_per_layer``): the attention half at ``n_l``, the MLP half at ``n_{l+1}``."""
    if whole:
        return [("block", n) for n in tokens[:-1]]
    return [p for l in range(len(tokens) - 1) for p in (("attn", tokens[l]), ("mlp", tokens[l + 1]))]


class _PartsIdeal:
    """The skeleton of a token-count ideal: :attr:`fns` (zero-argument calls of unpatched parts, keyed
    ``"ideal: ..."``, timed interleaved with the models) and the ideal time of a schedule from their
    medians. A subclass says which keys a schedule runs (:meth:`_keys`)."""

    fns: dict[str, Callable[[], object]]

    def _keys(self, schedule) -> list[str]:
        raise NotImplementedError

    def blocks_time(self, schedule, medians: dict[str, float]) -> float:
        """Seconds of the unpatched parts at the sizes of ``schedule``: the sum over its parts."""
        return sum(medians[k] for k in self._keys(schedule))

    def ideal(self, base_s: float, base_schedule, schedule, medians: dict[str, float]) -> float:
        """The ideal time of ``schedule``: ``rest`` (the unpatched time ``base_s`` less its parts at
        ``base_schedule``) plus the parts at the schedule's sizes."""
        rest = base_s - self.blocks_time(base_schedule, medians)
        return rest + self.blocks_time(schedule, medians)


class TokenCountIdeal(_PartsIdeal):
    """The parts to time for the token-count ideal of several schedules of one model's ``blocks``,
    and the ideal times from their medians. ``schedules``: name -> tokens per layer (entering each
    block, then after the last); ``batch``, ``width``: the token tensors' batch and channels;
    ``wrap(fn)``: how a call runs (autocast). :attr:`fns` are keyed ``"ideal: <part>@<n> #<k>"``."""

    def __init__(self, blocks, schedules: dict[str, list[int]], batch: int, width: int, device,
                 wrap: Callable[[Callable[[], object]], object] = lambda f: f()):
        self.blocks = list(blocks)
        sigs = [_signature(b) for b in self.blocks]
        self.kind = {s: k for k, s in enumerate(dict.fromkeys(sigs))}
        self.layer_kind = [self.kind[s] for s in sigs]
        self.parts = [block_parts(b) for b in self.blocks]
        self.schedules = schedules
        self.fns = {}
        inputs: dict[int, torch.Tensor] = {}
        for tokens in schedules.values():
            for l, (part, n) in self._layer_parts(tokens):
                key = self.key(l, part, n)
                if key not in self.fns:
                    x = inputs.setdefault(n, torch.randn(batch, n, width, device=device))
                    fn = self.parts[l][part]
                    self.fns[key] = lambda fn=fn, x=x: wrap(lambda: fn(x))

    def _layer_parts(self, tokens: list[int]):
        if len(tokens) != len(self.blocks) + 1:
            raise ValueError(f"tokens per layer must list {len(self.blocks) + 1} counts, got {len(tokens)}")
        whole = [("block" in p) for p in self.parts]
        for l in range(len(self.blocks)):
            parts = part_counts(tokens[l:l + 2], whole[l])
            yield from ((l, p) for p in parts)

    def _keys(self, tokens: list[int]) -> list[str]:
        return [self.key(l, part, n) for l, (part, n) in self._layer_parts(tokens)]

    def key(self, layer: int, part: str, n: int) -> str:
        return f"ideal: {part}@{n} #{self.layer_kind[layer]}"


#: One attention call of a diffusion model: (attention module's index, batch, query tokens, key/value tokens).
AttnCall = tuple[int, int, int, int]


class _SDPARecorder(TorchFunctionMode):
    """Records each ``scaled_dot_product_attention`` call made while ``current[0]`` names an attention
    module (set by that module's forward hooks) as an :data:`AttnCall`."""

    def __init__(self, current: list):
        super().__init__()
        self.current, self.calls = current, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.current[0] is not None:
            q, k = (args[0] if args else kwargs["query"]), (args[1] if len(args) > 1 else kwargs["key"])
            self.calls.append((self.current[0], q.shape[0], q.shape[-2], k.shape[-2]))
        return func(*args, **kwargs)


def attention_modules(blocks) -> list[torch.nn.Module]:
    """The attention modules (diffusers' ``Attention``, ``FluxAttention``: anything with ``to_q``,
    ``to_k``, ``to_v`` and ``heads``) inside ``blocks``, in module order."""
    return [m for b in blocks for m in b.modules()
            if all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "heads"))]


def record_attention(call: Callable[[], object], attns: list[torch.nn.Module]) -> list[AttnCall]:
    """The attention calls of one ``call()`` of a (patched or unpatched) model whose attention modules,
    in order, are ``attns``: for each SDPA call inside one of them, the batch and the query and
    key/value token counts it attended with, i.e. the sizes the model feeds its attention."""
    current: list = [None]

    def enter(i):
        return lambda module, args, kwargs: current.__setitem__(0, i)
    hooks = [h for i, a in enumerate(attns) for h in (
        a.register_forward_pre_hook(enter(i), with_kwargs=True),
        a.register_forward_hook(lambda *_: current.__setitem__(0, None), always_call=True))]
    try:
        with torch.inference_mode(), _SDPARecorder(current) as rec:
            call()
    finally:
        for h in hooks:
            h.remove()
    return rec.calls


def attention_work(attn: torch.nn.Module, batch: int, n_q: int, n_kv: int, device, dtype=None
                   ) -> Callable[[], torch.Tensor]:
    """One unpatched attention at ``n_q`` query and ``n_kv`` key/value tokens: the q/k/v projections,
    SDPA and the output projection (where the module has one), on random inputs."""
    dtype = dtype or attn.to_q.weight.dtype
    xq = torch.randn(batch, n_q, attn.to_q.in_features, device=device, dtype=dtype)
    xkv = torch.randn(batch, n_kv, attn.to_k.in_features, device=device, dtype=dtype)
    out = getattr(attn, "to_out", None)

    def run():
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                   for t in (attn.to_q(xq), attn.to_k(xkv), attn.to_v(xkv)))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return o if out is None else out[0](o)
    return run


class AttentionIdeal(_PartsIdeal):
    """The token-count ideal of diffusion models (``bench sd``, ``bench dit``): each attention call a
    candidate makes (:func:`record_attention`, the sizes the patched model really attends over) is
    timed on the *unpatched* attention module at those sizes (:func:`attention_work`). ``calls``:
    candidate name -> its attention calls; ``attns``: the unpatched model's attention modules.
    :attr:`fns` are keyed ``"ideal: attn@<q>/<kv> x<batch> #<kind>"`` (modules of one shape share a kind).

    The rest of the blocks (norms, feed-forward, residuals) runs at full size in the patched model
    too, so it is the unpatched time less its attention calls; ToMe-SD's ``merge_mlp`` (off by
    default, and in the benchmarks) would need the feed-forward timed too."""

    def __init__(self, attns: list[torch.nn.Module], calls: dict[str, list[AttnCall]], device,
                 wrap: Callable[[Callable[[], object]], object] = lambda f: f()):
        sigs = [_signature(a) for a in attns]
        kinds = {s: k for k, s in enumerate(dict.fromkeys(sigs))}
        self.attn_kind = [kinds[s] for s in sigs]
        self.calls = calls
        self.fns = {}
        for sched in calls.values():
            for c in sched:
                key = self.key(c)
                if key not in self.fns:
                    work = attention_work(attns[c[0]], c[1], c[2], c[3], device)
                    self.fns[key] = lambda work=work: wrap(work)

    def key(self, call: AttnCall) -> str:
        i, batch, n_q, n_kv = call
        return f"ideal: attn@{n_q}/{n_kv} x{batch} #{self.attn_kind[i]}"

    def _keys(self, calls: list[AttnCall]) -> list[str]:
        return [self.key(c) for c in calls]

    def columns(self, measured: dict[str, float], base: str, medians: dict[str, float]) -> dict[str, dict]:
        """:func:`ideal_columns` of every candidate from its ``measured`` seconds (the unpatched one's is
        ``measured[base]``); "per merging block" divides by the attention calls whose sizes changed."""
        base_s, out = measured[base], {}
        for name, t in measured.items():
            ideal_s = self.ideal(base_s, self.calls[base], self.calls[name], medians)
            changed = sum(a != b for a, b in zip(self.calls[base], self.calls[name]))
            out[name] = ideal_columns(t, base_s, ideal_s, changed)
        return out


def ideal_columns(measured_s: float, base_s: float, ideal_s: float, merging_blocks: int) -> dict:
    """The columns of one candidate: ideal speedup, share of the ideal reached, overhead (seconds,
    share of the measured time, and per merging block)."""
    overhead = measured_s - ideal_s
    return {"ideal_s": ideal_s, "ideal_speedup": base_s / ideal_s, "share_of_ideal": ideal_s / measured_s,
            "overhead_s": overhead, "overhead_share": overhead / measured_s,
            "overhead_per_block_s": overhead / merging_blocks if merging_blocks else 0.0}
