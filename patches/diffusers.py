"""Token merging (ToMe-SD) and token downsampling (ToDo) for diffusers Stable Diffusion UNets.

``apply_tome_sd(pipe_or_unet, ratio=0.5, mode="merge" | "downsample")`` patches a
``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` (anything with a ``.unet``) or a bare
``UNet2DConditionModel`` in place; ``remove_tome_sd(pipe_or_unet)`` undoes it exactly.

The transformer blocks themselves are not replaced: the patch wraps their attention *processors*
(``attn1``, and ``attn2`` when asked) around whatever processor was installed (SDPA by default),
plus forward hooks on ``ff`` for ``merge_mlp``. So positional embeddings, GLIGEN, ada-norms and
chunked feed-forward keep working and the state dict is unchanged. A forward pre-hook on the UNet
reads the latent ``h x w`` of the current call (any size, non-square, odd) into a per-call context
that a forward hook clears again; each level's grid is the latent size ceil-divided by its
downsampling factor, as the stride-2 convolutions produce it.

- ``mode="merge"`` (ToMe for SD, Bolya & Hoffman 2023): one destination per ``sy x sx`` window
  (pseudo-random, seeded per call from ``seed`` and the timestep, or fixed top-left); ``ratio`` of
  the tokens merge into their most similar destination before self-attention, and are copied back
  after it. As in tomesd, a forward pre-hook on each patched block plans the merge from the block's
  input (before ``norm1``); the processors apply that plan to the normed tokens, and the block's
  forward hook drops it again. With fixed destinations the UNet output equals tomesd's.
- ``mode="downsample"`` (ToDo, 2024): queries untouched; keys/values of self-attention come from
  the token grid resized so that ``ratio`` of the tokens go (0.75 = half the side). Nothing to
  unmerge, and the fused SDPA kernel stays in use.
- ``method`` (merge mode): ``"tome"``, or ``"tofu"`` / ``"pitome"`` on the same grid and token counts
  (:data:`METHODS`, :mod:`visiontools.tome.merge2d`), with each patched block's place among them as
  the methods' layer (ToFu prunes in the first half, PiToMe's margin falls from 0.75).
- ``flops=`` / ``speedup=`` instead of ``ratio``: the smallest ratio whose UNet call, at an image of
  ``size`` pixels (default: the UNet's native ``sample_size``), keeps at most that FLOP fraction
  (``speedup``: 1 / speedup), counted on a meta-device twin (:func:`solve_budget`).
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass

import torch

from visiontools.timing import cpu_has_bf16
from visiontools.tome import merge2d, methods
from visiontools.tome.budget import RatioBudget, check_fraction, solve_ratio

__all__ = ["ToMe2dConfig", "ToMeSDConfig", "apply_tome_sd", "remove_tome_sd", "is_patched", "patched_blocks",
           "transformer_blocks", "solve_budget", "budget_for", "unet_example_inputs", "method_rules"]

_ATTR = "_visiontools_tome_sd"
MODES = ("merge", "downsample")
#: Token reduction methods on a latent grid (merge mode); ``prune`` is not one: see :func:`check_common`.
METHODS = ("tome", "tofu", "pitome")


@dataclass(frozen=True, kw_only=True)
class ToMe2dConfig:
    """Settings both diffusion adapters share (UNets here, diffusion transformers in
    ``diffusers_dit``): how the tokens of a latent grid are merged or downsampled, and where."""

    ratio: float = 0.5
    mode: str = "merge"
    method: str = "tome"
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int = 0
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    downsample_method: str = "nearest-exact"
    similarity_dtype: str = "auto"
    plan_every: int = 1


@dataclass(frozen=True, kw_only=True)
class ToMeSDConfig(ToMe2dConfig):
    """Settings of one UNet patch (see :func:`apply_tome_sd`)."""

    max_downsample: int | None = None


SIMILARITY_DTYPES = {"auto": None, "input": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                     "float16": torch.float16}


def _cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16; Linux flags)."""
    return cpu_has_bf16(cpuinfo, flags=("amx_bf16", "avx512_bf16"))


_CPU_FAST_BF16 = _cpu_has_fast_bf16()


def _similarity_dtype(choice: str, x: torch.Tensor) -> torch.dtype | None:
    """dtype of the merge-matching matmul: ``auto`` = bf16 for fp32 tokens on a CPU with hardware
    bf16 (about 9x faster there; only the choice of partners can change), else the tokens' dtype."""
    if choice == "auto":
        fast = _CPU_FAST_BF16 and x.device.type == "cpu" and x.dtype == torch.float32
        return torch.bfloat16 if fast else None
    return SIMILARITY_DTYPES[choice]


class _CallContext:
    """What the current UNet call knows: latent grid and the per-call seed (None between calls)."""

    def __init__(self):
        self.hw: tuple[int, int] | None = None
        self.seed: torch.Tensor | None = None
        self.rejected = 0  # calls refused because another was running (their end hook must not clear)
        self.step = -1  # denoising step of the current call: distinct timesteps since the loop began
        self.last_t: float | None = None  # timestep of the previous call

    def advance(self, timestep) -> None:
        """Count the step of a call at ``timestep``: a new timestep is the next step, a larger one than the
        last starts a new denoising loop (step 0); the same timestep again (a separate CFG call) is the same step."""
        ts = None if timestep is None else torch.as_tensor(timestep)
        t = None if ts is None or ts.device.type == "meta" else float(ts.reshape(-1)[0])  # meta: a budget's count
        if t is None or self.last_t is None or t > self.last_t:
            self.step = 0
        elif t != self.last_t:
            self.step += 1
        self.last_t = t


class _BlockSlot:
    """One block's merge plan, from its forward pre-hook to ``attn1``/``attn2``/``ff``; set at the
    start of the block's call and emptied at its end."""

    def __init__(self):
        self.plan = None
        self.kept = None  # with plan_every > 1: the plan last computed, reused until the next planning step


class _State:
    """Everything needed to run and to remove the patch of one UNet."""

    def __init__(self, config: ToMeSDConfig):
        self.config = config
        self.ctx = _CallContext()
        self.hooks: list = []
        self.wrappers: list[tuple[torch.nn.Module, object]] = []  # (attention module, our processor around .inner)
        self.checkpointable: list[torch.nn.Module] = []  # UNet parts with a `gradient_checkpointing` flag
        self.warned_replaced = False
        self.blocks: list[tuple[str, int]] = []  # (name, downsampling factor) of patched blocks
        self.slots: list[_BlockSlot] = []  # merge plans handed within a block, emptied after each call


def _grid(ctx: _CallContext, downsample: int, num_tokens: int, name: str) -> tuple[int, int]:
    """Token grid of a block at ``downsample`` in the current call, checked against its token count."""
    if ctx.hw is None:
        raise RuntimeError(f"{name}: ToMe-SD attention called outside a forward of the patched UNet; "
                           "call the UNet (or pipeline), not its blocks directly")
    h, w = merge2d.grid_at(ctx.hw[0], ctx.hw[1], downsample)
    if h * w != num_tokens:
        raise ValueError(f"{name}: expected {h}x{w} = {h * w} tokens at downsampling x{downsample} of a "
                         f"{ctx.hw[0]}x{ctx.hw[1]} latent, got {num_tokens}; this UNet layout is not supported")
    return h, w


def method_rules(method: str, index: int, num_blocks: int) -> tuple[float | None, str]:
    """``(energy_margin, reduce)`` of ``method`` in patched block ``index`` of ``num_blocks``: PiToMe's
    margin (0.75 falling linearly), ToFu's pruning in the first half and MLERP after it."""
    margin = methods.pitome_margin(index, num_blocks) if method == "pitome" else None
    if method == "tofu":
        return margin, "keep" if methods.tofu_prunes(index, num_blocks) else "mlerp"
    return margin, "mean"


def _block_hooks(block: torch.nn.Module, state: _State, slot: _BlockSlot, downsample: int, index: int, name: str,
                 num_blocks: int):
    """Hooks on one transformer block (merge mode): before it runs, plan its merge from the block's
    input tokens (before ``norm1``, as tomesd does); after it (also on errors), forget the plan.
    ``index`` of ``num_blocks`` is the block's place among the patched ones (the methods' layer)."""
    margin, reduce = method_rules(state.config.method, index, num_blocks)

    def pre(module, args, kwargs):
        slot.plan = None
        x = args[0] if args else kwargs.get("hidden_states")
        cfg = state.config
        if cfg.ratio == 0 or x is None or x.ndim != 3 or not (cfg.merge_attn or cfg.merge_crossattn or cfg.merge_mlp):
            return None
        h, w = _grid(state.ctx, downsample, x.shape[1], name)
        r = merge2d.num_merged(h * w, cfg.ratio, cfg.sx, cfg.sy, h, w)
        if r == 0:  # grid smaller than one window, or too few tokens for this ratio
            return None
        kept = slot.kept
        if (kept is not None and state.ctx.step % cfg.plan_every and tuple(kept.index.shape) == tuple(x.shape[:2])
                and kept.index.device == x.device):
            slot.plan = kept  # plan_every > 1, between planning steps: the last plan's indices again
            return None
        seed = state.ctx.seed + 7919 * index if cfg.use_rand else None
        sim_dtype = _similarity_dtype(cfg.similarity_dtype, x)
        slot.plan = merge2d.plan_merge_2d(x, h, w, r, cfg.sx, cfg.sy, seed, sim_dtype,
                                          energy_margin=margin, reduce=reduce)
        if cfg.plan_every > 1:
            slot.kept = slot.plan
        return None

    def post(module, args, kwargs, output):
        slot.plan = None
        return None

    return [block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(post, with_kwargs=True, always_call=True)]


#: Why a ToMe processor cannot be built with no arguments, and the way out: diffusers rebuilds every attention
#: processor as ``type(processor)()`` when it loads an IP-Adapter (UNet, Flux) after the patch.
REBUILT = ("ToMe's attention processors cannot be re-created by diffusers (load_ip_adapter after apply_tome does "
           "this): call remove_tome(pipe), load the adapter, then apply_tome(pipe, ...) again")


def refuse_rebuild(inner) -> None:
    """``TypeError(REBUILT)`` when a ToMe processor is built without the processor it wraps."""
    if inner is None:
        raise TypeError(REBUILT)


class _SharedWeights(torch.nn.Module):
    """Base of a ToMe processor's ``nn.Module`` twin (:func:`module_twin`): ``inner``, the wrapped processor,
    is an attribute, not a child; its weights are shared by :func:`wrap_processor`."""

    def __setattr__(self, name, value):
        if name == "inner":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


def module_twin(cls: type) -> type:
    """An ``nn.Module`` subclass of the ToMe processor class ``cls`` (same name, ``__init__`` and ``__call__``),
    for wrapping a processor that is an ``nn.Module`` (:func:`wrap_processor`)."""
    return type(cls.__name__, (cls, _SharedWeights), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def wrap_processor(cls: type, inner, *args):
    """``cls(inner, *args)``; around a processor that is an ``nn.Module`` (an IP-Adapter's, which holds the
    adapter's weights), an instance of ``cls._twin`` sharing ``inner``'s parameters, buffers and submodules under
    their own names. diffusers keeps a module processor as the attention's submodule ``processor``, so
    ``state_dict()``, ``.to()`` and ``.half()`` of the model reach the adapter's weights while ToMe is applied, with
    the same keys as without it (a plain wrapper would drop them from the model)."""
    if not isinstance(inner, torch.nn.Module):
        return cls(inner, *args)
    twin = cls._twin
    proc = twin.__new__(twin)
    torch.nn.Module.__init__(proc)
    for table in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
        object.__setattr__(proc, table, getattr(inner, table))
    proc.__init__(inner, *args)
    return proc


class ToMeSDSelfAttnProcessor:
    """Around ``attn1``: merge (with the block's plan) -> original processor -> unmerge, or
    downsampled keys/values."""

    def __init__(self, inner=None, state: _State = None, slot: _BlockSlot = None, downsample: int = 1,
                 name: str = ""):
        refuse_rebuild(inner)
        self.inner = inner
        self.state = state
        self.slot = slot
        self.downsample = downsample
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cfg = self.state.config
        if temb is not None:
            kwargs["temb"] = temb
        plain = (cfg.ratio == 0 or hidden_states.ndim != 3 or encoder_hidden_states is not None
                 or attention_mask is not None)
        if plain:  # nothing to do (or a case ToMe does not handle): exactly the original attention
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)
        if cfg.mode == "downsample":
            h, w = _grid(self.state.ctx, self.downsample, hidden_states.shape[1], self.name)
            kv = merge2d.downsample_tokens(hidden_states, h, w, merge2d.kv_grid_size(h, w, cfg.ratio),
                                           cfg.downsample_method)
            return self.inner(attn, hidden_states, encoder_hidden_states=kv, attention_mask=None, **kwargs)
        plan = _plan_for(self.slot, hidden_states) if cfg.merge_attn else None
        if plan is None:
            return self.inner(attn, hidden_states, attention_mask=None, **kwargs)
        out = self.inner(attn, merge2d.merge_2d(plan, hidden_states), attention_mask=None, **kwargs)
        return merge2d.unmerge(out, plan.index)


class ToMeSDCrossAttnProcessor:
    """Around ``attn2`` (``merge_crossattn``): the block's plan merges the queries, then unmerges. A call
    with IP-Adapter masks (``cross_attention_kwargs={"ip_adapter_masks": ...}``) runs unmerged: the
    IP-Adapter's processor fits each mask to the query grid, which merged queries do not form."""

    def __init__(self, inner=None, slot: _BlockSlot = None):
        refuse_rebuild(inner)
        self.inner = inner
        self.slot = slot
        self.takes_masks = "ip_adapter_masks" in inspect.signature(inner.__call__).parameters

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_adapter_masks=None, **kwargs):
        if temb is not None:
            kwargs["temb"] = temb
        if ip_adapter_masks is not None and self.takes_masks:
            kwargs["ip_adapter_masks"] = ip_adapter_masks
        plan = None if "ip_adapter_masks" in kwargs else _plan_for(self.slot, hidden_states)
        if plan is None:
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)
        out = self.inner(attn, merge2d.merge_2d(plan, hidden_states), encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, **kwargs)
        return merge2d.unmerge(out, plan.index)


ToMeSDSelfAttnProcessor._twin = module_twin(ToMeSDSelfAttnProcessor)
ToMeSDCrossAttnProcessor._twin = module_twin(ToMeSDCrossAttnProcessor)


def _plan_for(slot: _BlockSlot, x: torch.Tensor):
    """The block's merge plan if it applies to tokens ``x`` (same batch and token count), else None."""
    plan = slot.plan
    if plan is None or x.ndim != 3 or tuple(x.shape[:2]) != tuple(plan.index.shape):
        return None
    return plan


def _ff_hooks(ff: torch.nn.Module, slot: _BlockSlot):
    """Forward hooks that run ``ff`` on merged tokens (skipped for feed-forward chunks)."""
    def pre(module, args):
        x, plan = args[0], _plan_for(slot, args[0])
        if plan is None:
            return None
        return (merge2d.merge_2d(plan, x),) + tuple(args[1:])

    def post(module, args, out):
        plan = slot.plan
        if plan is None or out.ndim != 3 or tuple(out.shape[:2]) != (plan.index.shape[0], plan.index.shape[1] - plan.r):
            return None
        return merge2d.unmerge(out, plan.index)

    return [ff.register_forward_pre_hook(pre), ff.register_forward_hook(post)]


def _find_unet(obj):
    """The ``UNet2DConditionModel`` of a pipeline, or the UNet itself; ``TypeError`` otherwise."""
    from diffusers import UNet2DConditionModel

    unet = obj if isinstance(obj, UNet2DConditionModel) else getattr(obj, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        what = type(obj).__name__ if unet is None else f"{type(obj).__name__} whose .unet is a {type(unet).__name__}"
        raise TypeError(f"ToMe-SD patches a StableDiffusionPipeline / StableDiffusionXLPipeline (anything with a "
                        f"UNet2DConditionModel as .unet) or a UNet2DConditionModel, got a {what}")
    return unet


def transformer_blocks(unet) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, BasicTransformerBlock, downsampling factor) of every transformer block in the UNet."""
    from diffusers.models.attention import BasicTransformerBlock

    out = []
    level = 0

    def collect(prefix: str, part: torch.nn.Module, lvl: int):
        for name, m in part.named_modules(prefix=prefix):
            if isinstance(m, BasicTransformerBlock):
                out.append((name, m, 2 ** lvl))

    for i, blk in enumerate(unet.down_blocks):
        collect(f"down_blocks.{i}", blk, level)
        if getattr(blk, "downsamplers", None) is not None:
            level += 1
    if unet.mid_block is not None:
        collect("mid_block", unet.mid_block, level)
    for i, blk in enumerate(unet.up_blocks):
        collect(f"up_blocks.{i}", blk, level)
        if getattr(blk, "upsamplers", None) is not None:
            level -= 1
    return out


def _check_int(v, what: str, lo: int = 1) -> int:
    """``v`` if it is an int >= ``lo``, else ``ValueError``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


def check_common(cfg: ToMe2dConfig) -> None:
    """Raise ``ValueError`` naming the first bad setting among those both diffusion adapters share."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.method == "prune":
        raise ValueError("method='prune' is not offered for diffusion models: every token must come back to the "
                         "latent grid after attention, so a pruned token would take its destination's output, which "
                         f"is ToFu's rule in its early blocks (method='tofu'); choose one of {METHODS}")
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} for diffusion models, got {cfg.method!r}")
    if cfg.method != "tome" and cfg.mode != "merge":
        raise ValueError(f"method={cfg.method!r} applies to mode='merge' only; downsample mode resizes keys/values "
                         "and has no merge to choose a method for")
    _check_int(cfg.sx, "sx")
    _check_int(cfg.sy, "sy")
    _check_int(cfg.plan_every, "plan_every")
    if cfg.plan_every > 1 and cfg.mode != "merge":
        raise ValueError("plan_every applies to mode='merge' only (downsample mode has no merge plan)")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    if cfg.similarity_dtype not in SIMILARITY_DTYPES:
        raise ValueError(f"similarity_dtype must be one of {tuple(SIMILARITY_DTYPES)}, got {cfg.similarity_dtype!r}")
    if cfg.mode == "merge":
        if cfg.sx * cfg.sy < 2:
            raise ValueError("sx * sy must be >= 2 in merge mode (one destination per window)")
        merge2d.check_ratio(cfg.ratio, merge2d.max_merge_ratio(cfg.sx, cfg.sy),
                            what=f"ratio (merge mode, sx={cfg.sx}, sy={cfg.sy})")
    else:
        merge2d.check_ratio(cfg.ratio, 1.0, inclusive=False, what="ratio (downsample mode)")
        if cfg.merge_crossattn or cfg.merge_mlp or not cfg.merge_attn:
            raise ValueError("merge_attn/merge_crossattn/merge_mlp apply to mode='merge' only; downsample mode "
                             "always acts on the keys/values of self-attention")
        if cfg.downsample_method not in merge2d.DOWNSAMPLE_METHODS:
            raise ValueError(f"downsample_method must be one of {merge2d.DOWNSAMPLE_METHODS}, "
                             f"got {cfg.downsample_method!r}")


def _check_config(cfg: ToMeSDConfig) -> None:
    """Raise ``ValueError`` naming the first bad setting of ``cfg``."""
    check_common(cfg)
    if cfg.max_downsample is not None:
        md = _check_int(cfg.max_downsample, "max_downsample")
        if md & (md - 1):
            raise ValueError(f"max_downsample must be a power of two (1, 2, 4, 8), got {md}")


def _timestep_seed(seed: int, timestep) -> torch.Tensor:
    """Per-call seed: ``seed`` mixed with the (first) timestep, as a 0-d int64 tensor. The timestep
    enters as the bit pattern of its float32 value, so any two different timesteps (however close:
    fractional schedules crowd near 0) seed different draws, and an int seeds like the same float."""
    if timestep is None:
        return torch.tensor(seed, dtype=torch.int64)
    t = torch.as_tensor(timestep).reshape(-1)[0].to(torch.float32) + 0.0  # (+ 0.0: -0.0 -> 0.0)
    return t.view(torch.int32).to(torch.int64) * 1000003 + seed


def _chosen_blocks(unet, cfg: ToMeSDConfig):
    """The transformer blocks to patch: ``(all blocks, cfg with max_downsample resolved, chosen blocks)``;
    refuses a UNet without blocks, and downsample mode on fused q/k/v projections."""
    blocks = transformer_blocks(unet)
    if not blocks:
        raise TypeError(f"{type(unet).__name__} has no transformer blocks (BasicTransformerBlock) to patch")
    if cfg.max_downsample is None:
        cfg = dataclasses.replace(cfg, max_downsample=min(ds for _, _, ds in blocks))
    chosen = [(n, b, ds) for n, b, ds in blocks if ds <= cfg.max_downsample]
    fused = [n for n, b, _ in chosen if getattr(b.attn1, "fused_projections", False)]
    if cfg.mode == "downsample" and fused:
        more = f" (and {len(fused) - 1} more blocks)" if len(fused) > 1 else ""
        raise ValueError(f"mode='downsample' needs separate key/value projections, but {fused[0]}{more} has "
                         "fused q/k/v projections; call unfuse_qkv_projections() on the UNet or pipeline first "
                         "(merge mode works with fused projections)")
    return blocks, cfg, chosen


def _patch_blocks(state: _State, chosen) -> None:
    """Wrap the attention processors of every chosen block and add its hooks (merge plan, ``ff``)."""
    cfg = state.config

    def wrap(attn, processor):
        state.wrappers.append((attn, processor))
        attn.set_processor(processor)

    for index, (name, block, ds) in enumerate(chosen):
        slot = _BlockSlot()
        state.slots.append(slot)
        wrap(block.attn1, wrap_processor(ToMeSDSelfAttnProcessor, block.attn1.processor, state, slot, ds, name))
        if cfg.mode == "merge":
            state.hooks += _block_hooks(block, state, slot, ds, index, name, len(chosen))
        if cfg.mode == "merge" and cfg.merge_crossattn and block.attn2 is not None:
            wrap(block.attn2, wrap_processor(ToMeSDCrossAttnProcessor, block.attn2.processor, slot))
        if cfg.mode == "merge" and cfg.merge_mlp:
            state.hooks += _ff_hooks(block.ff, slot)
        state.blocks.append((name, ds))


def _unet_hooks(unet, state: _State) -> list:
    """Hooks on the UNet that open each call's context (latent size, per-call seed; refusing a second
    concurrent call and gradient checkpointing) and clear it, and every plan, when the call ends."""
    cfg = state.config

    def pre(module, args, kwargs):  # start of a UNet call: its latent size and seed
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if sample is None or sample.ndim != 4:
            raise ValueError("ToMe-SD: the UNet's first input `sample` must be a (B, C, H, W) tensor")
        if state.ctx.hw is not None:
            state.ctx.rejected += 1
            raise RuntimeError("ToMe-SD: this patched UNet is already running a forward call (from another "
                               "thread, or re-entrantly); a patched UNet serves one call at a time")
        if torch.is_grad_enabled() and any(m.gradient_checkpointing for m in state.checkpointable):
            raise RuntimeError("ToMe-SD cannot run under gradient checkpointing with gradients on: the "
                               "checkpointed blocks are recomputed in backward, after this UNet call has ended; "
                               "call unet.disable_gradient_checkpointing(), run under torch.no_grad(), or "
                               "remove_tome_sd() before training")
        if not state.warned_replaced and any(a.processor is not p for a, p in state.wrappers):
            state.warned_replaced = True
            lost = sum(a.processor is not p for a, p in state.wrappers)
            warnings.warn(f"ToMe-SD: {lost} of {len(state.wrappers)} patched attention processors were replaced "
                          "after apply_tome_sd (set_attn_processor, fuse_qkv_projections, ...); those attentions "
                          "now run without ToMe-SD. Call apply_tome_sd again to patch the new processors.",
                          UserWarning, stacklevel=2)
        state.ctx.hw = (sample.shape[-2], sample.shape[-1])
        state.ctx.seed = _timestep_seed(cfg.seed, timestep).to(sample.device)
        if cfg.plan_every > 1:  # step counting reads the timestep's value: only where plans are reused
            state.ctx.advance(timestep)
        return None

    def post(module, args, kwargs, output):  # end of the call (also on errors): forget it
        if state.ctx.rejected:  # the end of a refused call, not of the one running
            state.ctx.rejected -= 1
            return None
        state.ctx.hw = None
        state.ctx.seed = None
        for slot in state.slots:
            slot.plan = None
        return None

    return [unet.register_forward_pre_hook(pre, with_kwargs=True),
            unet.register_forward_hook(post, with_kwargs=True, always_call=True)]


TEXT_TOKENS = 77  # CLIP's context length: the text tokens SD 1.x/2.x and SDXL UNets attend to
VAE_SCALE = 8  # pixels per latent position in Stable Diffusion's VAEs
DOWNSAMPLE_MAX_RATIO = 63 / 64  # the largest ratio a downsample-mode budget tries (1/8 of each grid side left)


def unet_example_inputs(config, height: int, width: int, device=None, dtype=None) -> tuple:
    """``(sample, timestep, encoder_hidden_states, added_cond_kwargs)`` of one call on a ``height x width``
    latent, from a UNet's config (77 text tokens; SDXL's ``text_time`` conditioning), seeded."""
    g = torch.Generator().manual_seed(0)
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    x = torch.randn(1, config.get("in_channels", 4), height, width, generator=g).to(device, dtype)
    e = torch.randn(1, TEXT_TOKENS, cross, generator=g).to(device, dtype)
    added = None
    if config.get("addition_embed_type") == "text_time":
        n_text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        px = [VAE_SCALE * height, VAE_SCALE * width, 0, 0, VAE_SCALE * height, VAE_SCALE * width]
        added = {"text_embeds": torch.randn(1, n_text, generator=g).to(device, dtype),
                 "time_ids": torch.tensor([px], dtype=dtype or torch.float32, device=device)}
    return x, torch.tensor(500, device=device), e, added


def image_size(size, pipe_or_model, native) -> tuple[tuple[int, int], int]:
    """``((height, width) in pixels, pixels per latent position)`` a budget is counted at: ``size`` (an
    int or a pair), else the model's ``native`` latent ``sample_size`` (int or pair) times the VAE scale."""
    scale = int(getattr(pipe_or_model, "vae_scale_factor", VAE_SCALE))
    if size is None:
        native = (native, native) if isinstance(native, int) else tuple(native)
        return (native[0] * scale, native[1] * scale), scale
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size) \
        if isinstance(size, (list, tuple)) else ()
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= scale for v in hw):
        raise ValueError(f"size is the image size in pixels a budget is counted at, an int or (height, width) of "
                         f"at least {scale}; got {size!r}")
    return hw, scale


def check_budget_request(ratio, flops, speedup, size, **counted_with) -> bool:
    """Whether an ``apply_tome_*`` call asks for a budget; ``ValueError`` for ``ratio`` with a budget, or
    ``size`` (or another of ``counted_with``, such as ``text_tokens``) without one."""
    budgeted = flops is not None or speedup is not None
    if budgeted and ratio is not None:
        raise ValueError("give ratio or a budget (flops= / speedup=), not both")
    extra = [k for k, v in {"size": size, **counted_with}.items() if v is not None]
    if extra and not budgeted:
        raise ValueError(f"{extra[0]}= is what a budget is counted at: use it with flops= or speedup=")
    return budgeted


def budget_for(apply, twin: torch.nn.Module, call, cfg: ToMe2dConfig, flops: float | None, speedup: float | None,
               size: tuple[int, int], where: str) -> RatioBudget:
    """The budget solve both diffusion adapters share: the smallest ratio (mode, method and the other
    settings from ``cfg``) at which ``call()``, one forward of ``twin`` (a meta-device copy of the model,
    patched by ``apply``), keeps at most ``flops`` of the unpatched FLOPs (``speedup``: 1 / speedup).
    ``where`` completes the message when no ratio reaches it (the size, and how to patch more)."""
    import inspect

    from visiontools.timing import count_flops

    if (flops is None) == (speedup is None):
        raise ValueError("give exactly one of flops= (a FLOP fraction such as 0.8) or speedup= (such as 1.25)")
    target = check_fraction(flops, "flops") if flops is not None else 1.0 / check_fraction(speedup, "speedup")
    params = inspect.signature(apply).parameters
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in params}

    def counted(ratio: float) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real patch warns, not each trial
            apply(twin, **{**settings, "ratio": ratio})
        try:
            return count_flops(call, warmup=False)
        except Exception as err:  # an unusual conditioning: say so instead of a deep traceback
            raise ValueError(f"cannot count the FLOPs of this {type(twin).__name__} for a budget "
                             f"({type(err).__name__}: {err}); pass ratio= instead") from err

    base = counted(0.0)
    upper = merge2d.max_merge_ratio(cfg.sx, cfg.sy) if cfg.mode == "merge" else DOWNSAMPLE_MAX_RATIO
    try:
        ratio, frac = solve_ratio(lambda r: counted(r) / base, target, upper)
    except ValueError as err:
        raise ValueError(f"{err} {where} or ask for less") from None
    return RatioBudget(ratio, frac, target, speedup, size)


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a diffusers model built from its config on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        return type(model).from_config(model.config).eval()


def solve_budget(pipe_or_unet, cfg: ToMeSDConfig, flops: float | None, speedup: float | None,
                 size=None) -> RatioBudget:
    """The smallest ratio (mode and method from ``cfg``) whose UNet call at an image of ``size`` pixels
    keeps at most ``flops`` of the unpatched FLOPs (``speedup``: 1 / speedup), counted on a meta-device
    twin of the UNet; ``ValueError`` when no ratio reaches it."""
    unet = _find_unet(pipe_or_unet)
    (height, width), scale = image_size(size, pipe_or_unet, unet.config.sample_size)
    twin = meta_twin(unet)
    x, t, e, added = unet_example_inputs(unet.config, -(-height // scale), -(-width // scale), "meta")
    return budget_for(apply_tome_sd, twin, lambda: twin(x, t, e, added_cond_kwargs=added), cfg, flops, speedup,
                      (height, width), f"of this UNet at {height}x{width} pixels with max_downsample="
                      f"{cfg.max_downsample}; patch more levels (max_downsample=2 or 4)")


def apply_tome_sd(
    pipe_or_unet,
    ratio: float | None = None,
    mode: str = "merge",
    max_downsample: int | None = None,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    seed: int = 0,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    downsample_method: str = "nearest-exact",
    similarity_dtype: str = "auto",
    method: str = "tome",
    flops: float | None = None,
    speedup: float | None = None,
    size=None,
    plan_every: int = 1,
):
    """Patch a Stable Diffusion pipeline or UNet in place with ToMe-SD (``mode="merge"``) or token
    downsampling (``mode="downsample"``); returns ``pipe_or_unet``. An existing patch is replaced.

    - ``ratio``: fraction of tokens removed (merge: from self-attention, at most ``1 - 1/(sx*sy)``;
      downsample: from its keys/values, < 1; 0.75 halves the grid side); default 0.5.
    - ``flops`` / ``speedup`` instead of ``ratio``: a budget, solved by :func:`solve_budget` at an image of
      ``size`` pixels (int or ``(height, width)``; default the UNet's native size); the result is
      ``unet.tome_budget`` (ratio, FLOP fraction, size).
    - ``method``: merge mode's token reduction, ``"tome"``, ``"tofu"`` or ``"pitome"`` (:data:`METHODS`);
      ``"prune"`` is refused (a pruned token must still come back to the grid: that is ``"tofu"``).
    - ``max_downsample``: patch only levels downsampled at most this much (1, 2, 4, 8); ``None``
      = the highest-resolution level that has attention (x1 on SD 1.x/2.x, x2 on SDXL).
    - ``sx, sy``: destination window; ``use_rand``: pseudo-random destination per window, seeded per
      UNet call from ``seed`` and the timestep (deterministic), else top-left.
    - ``merge_attn / merge_crossattn / merge_mlp``: where merged tokens are used (merge mode).
    - ``downsample_method``: ``F.interpolate`` mode or ``"avg"`` for the key/value grid.
    - ``similarity_dtype``: dtype of the matching matmul (merge mode): ``"auto"`` (bf16 for fp32 on
      CPUs with AMX/AVX512-BF16, else the tokens' dtype), ``"input"``, ``"float32"``, ``"bfloat16"``,
      ``"float16"``.
    - ``plan_every``: merge mode, compute each block's merge plan (similarities, matching, indices) once
      every ``plan_every`` denoising steps and reuse its indices in between (1: every step, as without it).
      A step is a new timestep; a larger timestep than the last starts a new loop, and a plan is reused
      only for tokens of the same batch and count.
    """
    unet = _find_unet(pipe_or_unet)
    budgeted = check_budget_request(ratio, flops, speedup, size)
    cfg = ToMeSDConfig(ratio=0.5 if ratio is None else ratio, mode=mode, method=method, max_downsample=max_downsample,
                       sx=sx, sy=sy, use_rand=use_rand, seed=seed, merge_attn=merge_attn,
                       merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, downsample_method=downsample_method,
                       similarity_dtype=similarity_dtype, plan_every=plan_every)
    _check_config(cfg)
    budget = solve_budget(pipe_or_unet, cfg, flops, speedup, size) if budgeted else None
    if budget is not None:
        cfg = dataclasses.replace(cfg, ratio=budget.ratio)
    blocks, cfg, chosen = _chosen_blocks(unet, cfg)
    if is_patched(unet):  # re-applying replaces the patch
        remove_tome_sd(unet)

    state = _State(cfg)
    state.checkpointable = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
    _patch_blocks(state, chosen)
    state.hooks += _unet_hooks(unet, state)
    setattr(unet, _ATTR, state)
    if budget is not None:
        unet.tome_budget = budget

    if not chosen:
        levels = sorted({ds for _, _, ds in blocks})
        warnings.warn(f"ToMe-SD patched 0 of {len(blocks)} transformer blocks: max_downsample={cfg.max_downsample}"
                      f" but this UNet has attention only at downsampling {levels}; use max_downsample>={levels[0]}"
                      " (or None for the default)", UserWarning, stacklevel=2)
    return pipe_or_unet


def remove_tome_sd(pipe_or_unet):
    """Undo :func:`apply_tome_sd` exactly (original processors back, hooks gone) and return
    ``pipe_or_unet``. Like ``remove_tome`` for timm ViTs, raises ``ValueError`` when the model is not
    patched (check with :func:`is_patched`)."""
    unpatch(_find_unet(pipe_or_unet), _ATTR, f"{type(pipe_or_unet).__name__} is not ToMe-patched (apply_tome_sd "
                                            "was never applied or was already removed)")
    return pipe_or_unet


def unpatch(model, attr: str, not_patched: str) -> None:
    """Undo the patch whose state ``model`` holds as ``attr`` (the UNet and DiT adapters): hooks removed,
    each wrapped attention's original processor back, a budget's ``tome_budget`` gone;
    ``ValueError(not_patched)`` when there is none."""
    state = getattr(model, attr, None)
    if state is None:
        raise ValueError(not_patched)
    for h in state.hooks:
        h.remove()
    for attn, wrapper in reversed(state.wrappers):
        if attn.processor is wrapper:  # a processor set after patching is the user's: keep it
            attn.set_processor(wrapper.inner)
    delattr(model, attr)
    if "tome_budget" in vars(model):
        del model.tome_budget


def is_patched(pipe_or_unet) -> bool:
    """Whether :func:`apply_tome_sd` is in effect on this pipeline/UNet."""
    return getattr(_find_unet(pipe_or_unet), _ATTR, None) is not None


def patched_blocks(pipe_or_unet) -> list[tuple[str, int]]:
    """Names and downsampling factors of the transformer blocks the current patch acts on."""
    state = getattr(_find_unet(pipe_or_unet), _ATTR, None)
    return [] if state is None else list(state.blocks)
