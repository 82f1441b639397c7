"""ToMe for timm Vision Transformers: ``apply_tome(model, r=16)`` and ``remove_tome(model)``.

The patch swaps the model's class for a subclass whose ``forward_features``/``forward`` run the
blocks with token merging between attention and MLP (as in the ToMe paper), with the merges of the
paper's reference implementation (see ``visiontools.tome.merge.bipartite_soft_matching``). Everything a
forward pass needs (token sizes, source map, rotary embeddings) lives in local variables of that
call, so the model can be called from several threads, with different batch or image sizes, or
through ``forward_features``. Settings live on the model as plain attributes: ``model.tome_r``
(int, ``(r, inflection)`` or a per-layer list), ``model.tome_prop_attn``, ``model.tome_method``
(``tome``, ``tofu``, ``pitome``, ``prune``: see ``visiontools.tome.methods``), ``model.tome_budget``
(when a FLOP or speedup budget chose the schedule) and, on EVA models, ``model.tome_rope_rule``;
``remove_tome`` deletes them all.

Supported:
- timm ``VisionTransformer`` (and subclasses that keep its forward, such as DeiT's distilled model)
  built from ``Block`` + ``Attention``: LayerScale, drop-path, attention dropout, qk-norm,
  scale-norm, gated attention, any number of prefix tokens (all protected);
- timm ``Eva`` (EVA, EVA-02) built from ``EvaBlock`` + ``EvaAttention``: rotary position
  embeddings (``RotaryEmbeddingCat``; merged tokens get the rule ``tome_rope_rule``), SwiGLU;
- ``global_pool`` ``token``, ``avg`` and ``avgmax`` (averages weighted by token size), ``max``
  (a max over tokens: sizes do not enter), ``map`` (attention pooling with the ``log(size)`` bias
  when ``prop_attn``), and ``''``.
Anything else raises ``TypeError`` naming the class it cannot handle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from visiontools.layers.conformer import ConformerBlock
from visiontools.layers.grid import GridTokens
from visiontools.layers.hyena import HyenaAttention
from visiontools.tome import methods as merge_methods
from visiontools.tome.engine import ToMeInfo, TokenState, check_request, solve_budget_for
from visiontools.tome.merge import ROPE_RULES, check_r, parse_r, size_bias

SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "map", "")
SIZED_POOLS = ("avg", "avgmax", "map")  # pools that need the token sizes
DEFAULT_ROPE_RULE = "circular"  # smallest logit change on the trained CIFAR-10 EVA (README)
DEFAULT_METHOD = "tome"


def attention_with_metric(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None):
    """timm ``Attention.forward`` with an additive float mask, also returning the keys averaged
    over heads (the ToMe similarity metric). Fused SDPA stays on where timm uses it."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = _sdpa(attn, q, k, v, bias)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(1), (q, k)


def _eva_attention(attn: EvaAttention, x: torch.Tensor, bias: torch.Tensor | None, rope: torch.Tensor | None):
    """timm ``EvaAttention.forward`` with an additive float mask and per-token rotary embeddings
    ``rope`` ``(B, 1, N - prefix, 2D)``, also returning the keys (before rotation) averaged over heads."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + qkv_bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    metric = k.mean(1)
    if rope is not None:
        P, half = attn.num_prefix_tokens, attn.rotate_half
        q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=half)], dim=2).type_as(v)
    out = _sdpa(attn, q, k, v, bias)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), metric, (q, k)


def _sdpa(attn, q, k, v, bias):
    """Softmax attention as timm's module computes it (fused SDPA or the eager path with
    ``attn.attn_drop``), plus the additive mask ``bias``."""
    dropout = attn.attn_drop.p if attn.training else 0.0
    if bias is not None:
        bias = bias.to(q.dtype)
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return attn.attn_drop(logits.softmax(dim=-1)) @ v


def _prune_importance(attn, qk, bias, state: TokenState):
    """The tokens' attention importance for ``prune`` (called by the engine only when it prunes)."""
    return lambda: merge_methods.class_attention(*qk, attn.scale, bias, state.num_prefix_tokens)


def _vit_block(blk: Block, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """One timm ``Block`` with the engine's reduction step between attention and MLP."""
    bias = state.bias()
    y, metric, qk = attention_with_metric(blk.attn, blk.norm1(x), bias)
    x = x + blk.drop_path1(blk.ls1(y))
    x = state.reduce(x, metric, _prune_importance(blk.attn, qk, bias, state))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _eva_block(blk: EvaBlock, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """One timm ``EvaBlock`` with the engine's reduction step between attention and MLP."""
    bias = state.bias()
    y, metric, qk = _eva_attention(blk.attn, blk.norm1(x), bias, state.rope)
    if blk.gamma_1 is not None:
        y = blk.gamma_1 * y
    x = x + blk.drop_path1(y)
    x = state.reduce(x, metric, _prune_importance(blk.attn, qk, bias, state))
    y = blk.mlp(blk.norm2(x))
    if blk.gamma_2 is not None:
        y = blk.gamma_2 * y
    return x + blk.drop_path2(y)


def _grid_block(blk, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """A block of a ViT with grid operations: a :class:`ConformerBlock`, or a timm ``Block`` whose
    mixer is attention or Hyena and whose MLP may be a ConvFFN. Grid operations see the merged
    tokens spread over the grid (``state.layout()``); Hyena's metric is the mixed tokens."""
    if isinstance(blk, ConformerBlock):
        def merge(x, metric, layout):
            x = state.reduce(x, metric)
            return x, state.layout()
        return blk.run(x, state.layout(), merge, state.prop_attn)[0]
    if isinstance(blk.attn, HyenaAttention):
        x = x + blk.drop_path1(blk.ls1(blk.attn.forward_layout(blk.norm1(x), state.layout())))
        metric = x  # Hyena has no keys: the mixed tokens are the similarity metric
    else:
        y, metric, _ = attention_with_metric(blk.attn, blk.norm1(x), state.bias())
        x = x + blk.drop_path1(blk.ls1(y))
    x = state.reduce(x, metric)
    h = blk.norm2(x)
    h = blk.mlp(h, state.layout()) if isinstance(blk.mlp, GridTokens) else blk.mlp(h)
    return x + blk.drop_path2(blk.ls2(h))


class ToMeVisionTransformer:
    """Methods of every patched class; ``apply_tome`` builds ``type(name, (this, original))``, so
    ``isinstance(model, ToMeVisionTransformer)`` tells a patched timm model (ViT or EVA)."""

    _tome_block = staticmethod(_vit_block)  # set per patched class: _vit_block, _eva_block or _grid_block

    def _tome_embed(self, x: torch.Tensor):
        """Patch and position embedding: tokens ``(B, N, C)``, rotary embeddings
        ``(B, 1, N - prefix, 2D)`` or ``None``, and the (H, W) patch grid when blocks need it."""
        x = self.patch_embed(x)
        if isinstance(self, Eva):
            x, rope = self._pos_embed(x)
            x = self.norm_pre(x)
            if rope is not None:
                rope = rope.expand(x.shape[0], 1, *rope.shape[-2:]) if rope.dim() < 4 else rope
            return x, rope, None
        if type(self)._tome_block is not _grid_block:
            return self.norm_pre(self.patch_drop(self._pos_embed(x))), None, None
        H, W = (x.shape[1], x.shape[2]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        if x.shape[1] != self.num_prefix_tokens + H * W:
            raise ValueError(f"{x.shape[1]} tokens after the embedding, expected {self.num_prefix_tokens} prefix + "
                             f"{H}x{W} grid tokens (patch dropout cannot be combined with token merging on grid layers)")
        return x, None, (H, W)

    def __setattr__(self, name, value):
        if name == "tome_r":  # `model.tome_r = -1` fails here, not at the next forward
            check_r(value)
        if name == "tome_method":
            merge_methods.check_method(value)
            if value != DEFAULT_METHOD and type(self)._tome_block is _grid_block:
                raise ValueError(_GRID_METHODS)
        super().__setattr__(name, value)

    def tome_forward_features(self, x: torch.Tensor, trace_source: bool = False):
        """Features and the call's :class:`~visiontools.tome.engine.ToMeInfo` for one forward pass with token reduction."""
        x, rope, grid = self._tome_embed(x)
        state = TokenState(schedule=parse_r(len(self.blocks), self.tome_r), num_prefix_tokens=self.num_prefix_tokens,
                           method=getattr(self, "tome_method", DEFAULT_METHOD), prop_attn=self.tome_prop_attn,
                           rope_rule=getattr(self, "tome_rope_rule", DEFAULT_ROPE_RULE), trace_source=trace_source,
                           grid=grid, rope=rope)
        state.start(x)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for blk in self.blocks:
            x = state.run(type(self)._tome_block, blk, x, ckpt)
        x = self.norm(x)
        state.finish(x)
        return x, state

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        """Merged output tokens (protected prefix tokens first). For ``global_pool`` ``avg``,
        ``avgmax`` or ``map`` pass ``size`` from :meth:`tome_forward_features` to ``forward_head``."""
        _no_masks(attn_mask, is_causal)
        return self.tome_forward_features(x)[0]

    def tome_pool(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """timm's pooling with token sizes: averages weighted by size (a merged token counts for the
        patches it holds), attention pooling with ``log(size)`` added to its logits when
        ``tome_prop_attn``, max unchanged (the max over merged tokens ignores sizes)."""
        skip = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        if self.attn_pool is not None:
            if isinstance(self, Eva):  # EVA's attention pool sees the prefix tokens too
                skip = 0
            x, size = x[:, skip:], size[:, skip:]
            return self.attn_pool(x, attn_mask=size_bias(size).to(x.dtype) if self.tome_prop_attn else None)
        x, w = x[:, skip:], size[:, skip:]
        if self.global_pool == "max":
            return x.amax(dim=1)
        avg = (x * w).sum(dim=1) / w.sum(dim=1)
        return 0.5 * (x.amax(dim=1) + avg) if self.global_pool == "avgmax" else avg

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None):
        """timm's head with :meth:`tome_pool` for the pools that reduce over tokens."""
        pool = "map" if self.attn_pool is not None else self.global_pool
        if pool in ("token", ""):
            return super().forward_head(x, pre_logits=pre_logits)
        if size is None:
            if pool in SIZED_POOLS and (x.shape[1] != self.patch_embed.num_patches + self.num_prefix_tokens
                                        or self.patch_embed.dynamic_img_size):
                raise ValueError(
                    f"forward_head of a ToMe-patched model with global_pool={pool!r} needs the token "
                    "sizes: use `x, info = model.tome_forward_features(img)` then "
                    "`model.forward_head(x, size=info.size)`, or call the model directly")
            size = torch.ones_like(x[..., :1])
        x = self.fc_norm(self.tome_pool(x, size))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        _no_masks(attn_mask, is_causal)
        x, info = self.tome_forward_features(x)
        return self.forward_head(x, size=info.size)


def _no_masks(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("token merging changes the token count, so it cannot be combined with "
                         "attn_mask or is_causal; remove_tome(model) first")


_GRID_METHODS = ("ViTs with grid operations (Conformer, Hyena, ConvFFN) merge with method='tome' only (with r= or a "
                 "flops=/speedup= budget): the other methods do not carry the source map grid operations need")


def _host_classes(model):
    """(host class, block class, attention class) of a supported timm model, else ``TypeError``."""
    name = type(model).__name__
    if isinstance(model, VisionTransformer):
        return VisionTransformer, Block, Attention
    if isinstance(model, Eva):
        return Eva, EvaBlock, EvaAttention
    raise TypeError(f"ToMe supports timm VisionTransformer and Eva models; got {name}")


def _check_blocks(model, block_cls, attn_cls, grid: bool) -> None:
    """``TypeError`` naming the first block the engine cannot run."""
    name = type(model).__name__
    if not isinstance(model.blocks, (torch.nn.Sequential, torch.nn.ModuleList)):
        raise TypeError(f"ToMe cannot patch {name}: its blocks are a {type(model.blocks).__name__}, not a sequence "
                        "of timm blocks (reversible ViTs recompute activations and cannot merge tokens)")
    for i, blk in enumerate(model.blocks):
        if grid and isinstance(blk, ConformerBlock):
            continue
        if type(blk) is not block_cls:
            raise TypeError(f"ToMe cannot patch block {i} of {name}: {type(blk).__name__} "
                            f"(supported: {block_cls.__module__}.{block_cls.__name__}"
                            + (", visiontools ConformerBlock)" if grid else ")"))
        ok = type(blk.attn) is attn_cls or (grid and isinstance(blk.attn, HyenaAttention))
        if not ok:
            raise TypeError(f"ToMe cannot patch block {i} of {name}: attention {type(blk.attn).__name__} "
                            f"is not {attn_cls.__module__}.{attn_cls.__name__}"
                            + (" or visiontools HyenaAttention" if grid else ""))


def _check_supported(model, grid: bool) -> None:
    """``TypeError`` naming what the engine cannot run in ``model`` (class, blocks, rope, pooling)."""
    name = type(model).__name__
    host, block_cls, attn_cls = _host_classes(model)
    for fn in ("forward_features", "forward"):
        if getattr(type(model), fn) is not getattr(host, fn):
            raise TypeError(f"ToMe cannot patch {name}: it overrides {fn}")
    _check_blocks(model, block_cls, attn_cls, grid)
    if host is Eva:
        if getattr(model, "rope_mixed", False) or not (model.rope is None or type(model.rope) is RotaryEmbeddingCat):
            raise TypeError(f"ToMe cannot patch {name}: rotary embedding {type(model.rope).__name__} "
                            f"(supported: RotaryEmbeddingCat, rope_type='cat')")
    pool = model.global_pool
    if model.attn_pool is not None:
        if type(model.attn_pool) is not AttentionPoolLatent or model.attn_pool.pos_embed is not None:
            raise TypeError(f"ToMe cannot patch {name}: attention pool {type(model.attn_pool).__name__} "
                            "(supported: AttentionPoolLatent without position embedding, global_pool='map')")
        pool = "map"
    supported = ("token", "avg", "") if grid else SUPPORTED_POOLS
    if pool not in supported:
        raise TypeError(f"ToMe does not support global_pool={pool!r} on {name} (supported: {supported})")


_PATCHED: dict[tuple[type, object], type] = {}


def _patch_class(model, grid: bool) -> None:
    """Swap ``model``'s class for its ToMe subclass, whose blocks run through the engine."""
    _check_supported(model, grid)
    block = _grid_block if grid else _eva_block if isinstance(model, Eva) else _vit_block
    base = type(model)
    if (base, block) not in _PATCHED:
        prefix = "ToMeGrid" if grid else "ToMe"
        _PATCHED[(base, block)] = type(f"{prefix}{base.__name__}", (ToMeVisionTransformer, base),
                                       {"_tome_block": staticmethod(block)})
    model.__class__ = _PATCHED[(base, block)]


def apply_tome(model, r=None, prop_attn: bool = True, rope_rule: str = DEFAULT_ROPE_RULE, method: str | None = None,
               flops: float | None = None, speedup: float | None = None, calibrate: bool = False,
               input_size: tuple[int, int] | None = None, calibrate_batch: int = 32):
    """Patch a timm ViT or EVA in place for token reduction and return it.

    ``r``: tokens removed per block (int, default 16), ``(r, inflection)`` for the paper's schedule
    (e.g. ``(16, -0.5)`` merges more early), or a per-layer list. Change it later via ``model.tome_r``.
    ``method``: ``"tome"`` (default), ``"tofu"``, ``"pitome"`` or ``"prune"``
    (see ``visiontools.tome.methods``); ``model.tome_method`` changes it later, and re-applying
    without ``method`` keeps the one chosen before.
    ``flops=0.5`` instead of ``r``: the lightest per-layer schedule whose FLOPs (counted with
    ``visiontools.timing.count_flops`` on one image of ``input_size``, default the model's
    ``patch_embed.img_size``) are at most that fraction of the unpatched model's. ``speedup=1.8``:
    the same for the FLOP fraction 1/1.8; with ``calibrate=True`` it also times the patched model
    against r=0 (interleaved, a batch of ``calibrate_batch`` random images on the model's device) and
    merges more while the measured speedup falls short (at most 3 measurements). The choice
    (schedule, FLOP fraction, measured speedup) is ``model.tome_budget``, a
    ``visiontools.tome.budget.BudgetResult``.
    ``prop_attn``: proportional attention (adds ``log(size)`` to the attention logits).
    ViTs with grid operations (Conformer, Hyena or ConvFFN blocks) merge through them: ``r`` or a
    budget, ``method="tome"`` only.
    ``rope_rule`` (models with rotary embeddings): the rotation of a merged token, one of
    ``visiontools.tome.merge.ROPE_RULES`` (see ``merge_rope``).
    """
    r, method = check_request(r, method, flops, speedup, calibrate, getattr(model, "tome_method", DEFAULT_METHOD))
    if rope_rule not in ROPE_RULES:
        raise ValueError(f"unknown rope_rule {rope_rule!r}; choose one of {ROPE_RULES}")
    grid = any(isinstance(m, GridTokens) for m in model.modules())  # Conformer / Hyena / ConvFFN blocks
    if grid and method != DEFAULT_METHOD:
        raise ValueError(f"method={method!r} is not available here: {_GRID_METHODS}")
    before = {k: v for k, v in vars(model).items() if k.startswith("tome_")}
    if not isinstance(model, ToMeVisionTransformer):
        _patch_class(model, grid)
        before = None
    model.tome_r, model.tome_prop_attn, model.tome_method = r, prop_attn, method
    if isinstance(model, Eva):
        model.tome_rope_rule = rope_rule
    if flops is None and speedup is None:
        vars(model).pop("tome_budget", None)  # a plain r replaces an earlier budget
    else:
        try:
            model.tome_budget = _solve_budget(model, flops, speedup, calibrate, input_size, calibrate_batch)
        except BaseException:  # a budget that fails leaves the model as it was, not patched at a trial's r
            if before is None:
                remove_tome(model)
            else:
                for k, v in before.items():
                    setattr(model, k, v)
            raise
        model.tome_r = model.tome_budget.schedule
    return model


def _solve_budget(model, flops, speedup, calibrate: bool, input_size, batch: int):
    """The :class:`visiontools.tome.budget.BudgetResult` for a patched model (see :func:`apply_tome`)."""
    p = next(model.parameters())
    size = tuple(input_size) if input_size is not None else tuple(model.patch_embed.img_size)
    if size != tuple(model.patch_embed.img_size) and getattr(model.patch_embed, "strict_img_size", False):
        raise ValueError(f"input_size={size} is not the {tuple(model.patch_embed.img_size)} this model "
                         "takes: build it with dynamic_img_size=True (timm.create_model(name, "
                         "dynamic_img_size=True)) to run it at other sizes, or leave input_size out")
    in_chans = next(m.in_channels for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.zeros(1, in_chans, *size, device=p.device, dtype=p.dtype)
    num_tokens = 1
    for s, ps in zip(size, model.patch_embed.patch_size):
        num_tokens *= s // ps

    def run(rs, inp):
        model.tome_r = rs
        return model(inp)

    was_training = model.training
    model.eval()
    try:
        return solve_budget_for(run, x, len(model.blocks), num_tokens, flops, speedup, calibrate, batch,
                                cache=model.__dict__.setdefault("tome_flop_cache", {}), method=model.tome_method)
    finally:
        model.train(was_training)


def remove_tome(model):
    """Undo :func:`apply_tome`: restore the original class and delete every ``tome_*`` setting;
    weights were never touched."""
    if not isinstance(model, ToMeVisionTransformer):
        raise ValueError(f"{type(model).__name__} is not ToMe-patched (apply_tome was never applied "
                         "or was already removed)")
    model.__class__ = next(c for c in type(model).__mro__[1:]
                           if c is not ToMeVisionTransformer and not issubclass(c, ToMeVisionTransformer))
    for name in [n for n in vars(model) if n.startswith("tome_")]:
        delattr(model, name)
    return model


def tome_forward(model, x: torch.Tensor, trace_source: bool = False):
    """Logits and a :class:`ToMeInfo` (token counts per layer, sizes, source map) for a patched model."""
    if not isinstance(model, ToMeVisionTransformer):
        raise ValueError("tome_forward needs a model patched with apply_tome")
    feats, info = model.tome_forward_features(x, trace_source=trace_source)
    return model.forward_head(feats, size=info.size), info
