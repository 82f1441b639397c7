"""Token merging and token downsampling for diffusers diffusion transformers (SD3/3.5, PixArt, Flux).

``apply_tome_dit(pipe_or_transformer, ratio=0.5, mode="merge" | "downsample")`` patches a
``SD3Transformer2DModel``, ``PixArtTransformer2DModel`` or ``FluxTransformer2DModel`` (or a pipeline
holding one as ``.transformer``) in place; ``remove_tome_dit`` undoes it exactly.

As for UNets (:mod:`visiontools.patches.diffusers`), nothing but attention *processors* and hooks
change: the state dict and every module class stay as they were. Only image tokens are reduced;
text tokens (SD3 / Flux double-stream context stream, the text prefix of Flux single-stream blocks,
PixArt's cross-attention context) are never touched.

- ``mode="merge"``: a forward pre-hook on each patched block plans a ToMe-SD merge (one destination
  per ``sy x sx`` window of the patch grid, seeded per call from the timestep) from the block input;
  the attention processor merges the normed image tokens before the q/k/v projections, attends, runs
  the output projection on the merged tokens and copies them back to the full grid (unmerge).
  Flux's rotary positions of merged tokens follow ``rope`` (see :data:`ROPE_RULES`).
- ``mode="downsample"``: queries stay full; image keys/values come from the patch grid resized so
  that ``ratio`` of the tokens go. With RoPE (Flux), keys are rotated at full resolution first and
  the rotated keys are pooled; values are pooled before their (linear) projection.
- ``method`` (merge mode): ``"tome"``, ``"tofu"`` or ``"pitome"``, as for UNets. A token ToFu prunes
  (its destination keeps its own value) keeps its destination's rotary position.
- ``flops=`` / ``speedup=`` instead of ``ratio``: as for UNets (:func:`solve_budget`), counted at an image
  of ``size`` pixels with ``text_tokens`` text tokens (the pipelines' defaults: :data:`TEXT_TOKENS`).
- An IP-Adapter loaded before the patch (SD3, Flux) is wrapped: :class:`ToMeDiTIPAdapterAttnProcessor` runs
  its image-prompt attention (Flux: for every image token; SD3: on the tokens its joint attention uses).
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visiontools.patches import diffusers as sd
from visiontools.tome import merge2d

__all__ = ["ToMeDiTConfig", "apply_tome_dit", "remove_tome_dit", "is_patched", "patched_blocks", "dit_blocks",
           "find_transformer", "is_dit", "ROPE_RULES", "TEXT_TOKENS", "dit_example_inputs", "solve_budget"]

_ATTR = "_visiontools_tome_dit"
MODES = ("merge", "downsample")
#: Rotary position of a merged Flux token: ``"mean"`` = mean of its members' rotations (mean cos/sin),
#: ``"angle"`` = rotation by the mean angle (mean cos/sin renormalised), ``"dst"`` = the destination
#: token's position, ``"rotate"`` = project and rotate q/k at full resolution, then merge rotated q/k/v.
ROPE_RULES = ("mean", "angle", "dst", "rotate")
DIT_CLASSES = ("SD3Transformer2DModel", "PixArtTransformer2DModel", "FluxTransformer2DModel")
#: Text tokens a budget counts with by default: the pipelines' defaults (SD3: 77 CLIP + 256 T5 tokens;
#: PixArt-Sigma: 300; Flux: 512).
TEXT_TOKENS = {"SD3Transformer2DModel": 333, "PixArtTransformer2DModel": 300, "FluxTransformer2DModel": 512}
FLUX_NATIVE_LATENT = 128  # Flux has no sample_size: budgets count at 1024 px unless given a size


@dataclass(frozen=True, kw_only=True)
class ToMeDiTConfig(sd.ToMe2dConfig):
    """Settings of one DiT patch (see :func:`apply_tome_dit`): the UNet adapter's shared settings, which
    its block hooks and self-attention processor read unchanged, plus the blocks and the RoPE rule."""

    blocks: tuple | None = None
    rope: str = "angle"


def _dit_classes():
    """The three diffusers transformer classes this adapter patches."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    return SD3Transformer2DModel, PixArtTransformer2DModel, FluxTransformer2DModel


def is_dit(obj) -> bool:
    """Whether ``obj`` is (or is a pipeline whose ``.transformer`` is) a supported diffusion transformer."""
    try:
        classes = _dit_classes()
    except ImportError:
        return False
    return isinstance(obj, classes) or isinstance(getattr(obj, "transformer", None), classes)


def find_transformer(obj):
    """The SD3 / PixArt / Flux transformer of a pipeline, or the transformer itself; ``TypeError`` otherwise."""
    classes = _dit_classes()
    model = obj if isinstance(obj, classes) else getattr(obj, "transformer", None)
    if not isinstance(model, classes):
        what = type(obj).__name__ if model is None else f"{type(obj).__name__} whose .transformer is a " \
                                                       f"{type(model).__name__}"
        raise TypeError(f"ToMe for diffusion transformers patches a {', '.join(DIT_CLASSES)} or a pipeline holding "
                        f"one as .transformer (StableDiffusion3Pipeline, PixArtAlpha/SigmaPipeline, FluxPipeline), "
                        f"got a {what}; UNet pipelines go through apply_tome_sd")
    return model


# ----------------------------------------------------------------------------------------- attention


_PROJ = {("q", False): ("to_q", "norm_q"), ("k", False): ("to_k", "norm_k"), ("v", False): ("to_v", None),
         ("q", True): ("add_q_proj", "norm_added_q"), ("k", True): ("add_k_proj", "norm_added_k"),
         ("v", True): ("add_v_proj", None)}


def _project(attn, x: torch.Tensor, which: str, added: bool = False, raw: dict | None = None) -> torch.Tensor:
    """One of q/k/v of tokens ``x`` ``(B, S, C)`` as ``(B, S, heads, head_dim)``, with the module's
    q/k norm applied (``added``: the context-stream projections of a joint attention). ``raw``, if given,
    records the projection before the norm as ``raw[which]`` and after it as ``raw[which + "n"]`` (what an
    IP-Adapter's image-prompt attention reads)."""
    lin, norm = _PROJ[which, added]
    y = getattr(attn, lin)(x).unflatten(-1, (attn.heads, -1))
    norm = getattr(attn, norm, None) if norm else None
    if raw is not None:
        raw[which] = y
    y = y if norm is None else norm(y)
    if raw is not None:
        raw[which + "n"] = y
    return y


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux-style RoPE (interleaved pairs) on ``x`` ``(B, S, H, D)`` with tables ``(S, D)`` or ``(B, S, D)``."""
    cos, sin = cos.to(x.device), sin.to(x.device)
    cos = cos[None, :, None] if cos.ndim == 2 else cos[:, :, None]
    sin = sin[None, :, None] if sin.ndim == 2 else sin[:, :, None]
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def _merged_rope(plan: merge2d.Merge2d, cos: torch.Tensor, sin: torch.Tensor, rule: str):
    """Rotary tables ``(B, N - r, D)`` of the merged image tokens under ``rule`` (see ``ROPE_RULES``)."""
    B = plan.index.shape[0]
    if rule == "dst" or plan.reduce == "keep":  # pruned sources: the destination is its own token
        pos = torch.cat([plan.unm_pos, plan.dst_pos.expand(B, -1)], dim=1)
        return cos[pos], sin[pos]
    c = merge2d.merge_2d(plan, cos.float().expand(B, -1, -1), "mean")
    s = merge2d.merge_2d(plan, sin.float().expand(B, -1, -1), "mean")
    if rule == "angle":
        norm = torch.sqrt(c * c + s * s).clamp_min(1e-12)
        c, s = c / norm, s / norm
    return c.to(cos.dtype), s.to(sin.dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, S, H, D)`` -> ``(B, S, H*D)``."""
    return x.flatten(2)


def _image_qkv(attn, x, rope, grid, plan, cfg, raw=None):
    """q, k, v ``(B, S, H, D)`` of the image tokens ``x`` after merging or key/value downsampling; RoPE
    (``rope`` = image part of Flux's (cos, sin), or None) applied as the mode and ``cfg.rope`` say.
    ``raw``: see :func:`_project` (the projections before RoPE: of the merged tokens, or, where q/k are
    projected at full resolution first, of all tokens)."""
    h, w = grid
    if cfg.mode == "downsample":
        size = merge2d.kv_grid_size(h, w, cfg.ratio)
        pool = lambda t: merge2d.downsample_tokens(t, h, w, size, cfg.downsample_method)  # noqa: E731
        q = _project(attn, x, "q", raw=raw)
        small = pool(x)
        v = _project(attn, small, "v", raw=raw)
        if rope is None:
            return q, _project(attn, small, "k", raw=raw), v
        k = _rotate(_project(attn, x, "k", raw=raw), *rope)
        k = pool(_flat(k)).unflatten(-1, (attn.heads, -1))
        return _rotate(q, *rope), k, v
    if rope is not None and cfg.rope == "rotate":
        q, k = (_rotate(_project(attn, x, n, raw=raw), *rope) for n in "qk")
        v = _project(attn, x, "v", raw=raw)
        return tuple(merge2d.merge_2d(plan, _flat(t)).unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    xm = merge2d.merge_2d(plan, x)
    q, k, v = (_project(attn, xm, n, raw=raw) for n in "qkv")
    if rope is not None:
        table = _merged_rope(plan, rope[0], rope[1], cfg.rope)
        q, k = _rotate(q, *table), _rotate(k, *table)
    return q, k, v


def _attend(parts_q, parts_k, parts_v) -> list[torch.Tensor]:
    """SDPA over the concatenated streams; returns the output ``(B, S_i, H*D)`` of each query stream."""
    q, k, v = (torch.cat(p, dim=1).transpose(1, 2) for p in (parts_q, parts_k, parts_v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).to(q.dtype)
    return list(out.split([p.shape[1] for p in parts_q], dim=1))


class ToMeDiTAttnProcessor:
    """Around an SD3 / Flux attention (``layout``: ``"img_first"`` SD3 joint, ``"txt_first"`` Flux
    double-stream, ``"single"`` Flux single-stream with the text prefix, ``"self"`` SD3.5's image-only
    ``attn2``): image tokens merged or their keys/values downsampled, text tokens as they were."""

    def __init__(self, inner=None, state=None, slot=None, layout: str = "", name: str = ""):
        sd.refuse_rebuild(inner)
        self.inner = inner
        self.state = state
        self.slot = slot
        self.layout = layout
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        """Attention of one call: the original processor when there is nothing to reduce (ratio 0, a mask,
        fused projections, no plan), else image q/k/v reduced, text q/k/v as they are, one SDPA."""
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        return self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs, {})

    def _attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, kwargs, ip):
        """:meth:`__call__` with ``ip``, the IP-Adapter inputs the inner processor takes (empty: none)."""
        cfg, ctx = self.state.config, self.state.ctx
        joint = self.layout in ("img_first", "txt_first")
        plain = (cfg.ratio == 0 or attention_mask is not None or hidden_states.ndim != 3
                 or set(kwargs) - {"image_rotary_emb"} or getattr(attn, "fused_projections", False)
                 or joint != (encoder_hidden_states is not None))
        if plain:  # nothing to do, or a call this adapter does not handle: exactly the original attention
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs, **ip)
        n_img = hidden_states.shape[1] if ctx.hw is None or self.layout != "single" else ctx.hw[0] * ctx.hw[1]
        img, txt = hidden_states[:, hidden_states.shape[1] - n_img:], hidden_states[:, :hidden_states.shape[1] - n_img]
        grid = sd._grid(ctx, 1, img.shape[1], self.name)
        plan = sd._plan_for(self.slot, img) if cfg.mode == "merge" else None
        if cfg.mode == "merge" and plan is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs, **ip)
        rope_img = rope_txt = None
        if kwargs.get("image_rotary_emb") is not None:
            cos, sin = kwargs["image_rotary_emb"]
            rope_img, rope_txt = (cos[-n_img:], sin[-n_img:]), (cos[:-n_img], sin[:-n_img])
        raw = {} if ip.get("ip_hidden_states") is not None else None
        qi, ki, vi = _image_qkv(attn, img, rope_img, grid, plan, cfg, raw)
        streams = [(qi, ki, vi)]
        if self.layout != "self":
            added = self.layout != "single"
            ctx_tokens = encoder_hidden_states if added else txt
            qt, kt, vt = (_project(attn, ctx_tokens, n, added) for n in "qkv")
            if rope_txt is not None:
                qt, kt = _rotate(qt, *rope_txt), _rotate(kt, *rope_txt)
            streams.insert(0 if self.layout in ("txt_first", "single") else 1, (qt, kt, vt))
        outs = _attend(*zip(*streams))
        i_img = 1 if self.layout in ("txt_first", "single") else 0
        pre, post = (None, None) if raw is None else self._image_prompt(attn, img, raw, ip)
        return self._finish(attn, outs[i_img], outs[1 - i_img] if len(outs) == 2 else None, plan, pre, post)

    def _image_prompt(self, attn, img, raw, ip):
        """An IP-Adapter's image-prompt attention (:class:`ToMeDiTIPAdapterAttnProcessor`); none here."""
        return None, None

    def _finish(self, attn, img_out, txt_out, plan, pre=None, post=None):
        """Output projections (image on the merged tokens), unmerge, and the processor's return layout;
        ``pre`` is added to the image attention output before its projection, ``post`` (with the image
        queries' token count) is returned third, unmerged (IP-Adapter outputs, SD3 and Flux)."""
        if pre is not None:
            img_out = img_out + pre
        if not getattr(attn, "pre_only", False):
            img_out = attn.to_out[1](attn.to_out[0](img_out))
        if plan is not None:
            img_out = merge2d.unmerge(img_out, plan.index)
            if post is not None and post.shape[1] != img_out.shape[1]:
                post = merge2d.unmerge(post, plan.index)
        if self.layout == "self":
            return img_out
        if self.layout == "single":
            return torch.cat([txt_out, img_out], dim=1)
        if not getattr(attn, "context_pre_only", False) and getattr(attn, "to_add_out", None) is not None:
            txt_out = attn.to_add_out(txt_out)
        return (img_out, txt_out) if post is None else (img_out, txt_out, post)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of ``(B, S, H, D)`` tensors, output ``(B, S_q, H*D)`` in q's dtype."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2).to(q.dtype)


class ToMeDiTIPAdapterAttnProcessor(ToMeDiTAttnProcessor):
    """Around diffusers' IP-Adapter processors for SD3 (``SD3IPAdapterJointAttnProcessor2_0``) and Flux
    (``FluxIPAdapterAttnProcessor``): ToMe's attention as :class:`ToMeDiTAttnProcessor`, plus the adapter's
    image-prompt attention computed as theirs does, with the adapter's own weights. Flux's adapter is a
    cross-attention from the image queries to the image prompt, run for every image token as theirs (as a UNet's
    cross-attention without ``merge_crossattn``: in merge mode that costs one query projection of all tokens).
    SD3's attends to the image tokens and the image prompt inside the joint attention, so it runs on the tokens
    that attention uses: merged (and unmerged with the rest) in merge mode, all queries and downsampled
    keys/values in downsample mode. Ratio 0, or a call with no image prompt, runs their processor as it is."""

    def __init__(self, inner=None, state=None, slot=None, layout: str = "", name: str = ""):
        super().__init__(inner, state, slot, layout, name)
        self.takes = frozenset(inspect.signature(inner.__call__).parameters)  # the inner processor's inputs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, ip_hidden_states=None, ip_adapter_masks=None, temb=None):
        """As :meth:`ToMeDiTAttnProcessor.__call__`; the IP-Adapter inputs diffusers hands the processor
        (``ip_hidden_states``; Flux: ``ip_adapter_masks``, which theirs ignores; SD3: ``temb``) pass on."""
        kwargs = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        given = dict(ip_hidden_states=ip_hidden_states, ip_adapter_masks=ip_adapter_masks, temb=temb)
        ip = {k: v for k, v in given.items() if v is not None and k in self.takes}
        return self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs, ip)

    def _image_prompt(self, attn, img, raw, ip):
        """``(pre, post)`` of :meth:`ToMeDiTAttnProcessor._finish`: SD3's image-prompt attention (added
        before the output projection, times the adapter's scale), or Flux's for all of the image tokens ``img``
        (returned third)."""
        inner, states = self.inner, ip["ip_hidden_states"]
        if hasattr(inner, "norm_ip"):  # SD3: queries attend to the image tokens and the image prompt
            if inner.scale == 0:
                return None, None
            prompt = inner.norm_ip(states, temb=ip.get("temb"))
            k_ip, v_ip = (lin(prompt).unflatten(-1, (attn.heads, -1)) for lin in (inner.to_k_ip, inner.to_v_ip))
            k = torch.cat([inner.norm_k(raw["k"]), inner.norm_ip_k(k_ip)], dim=1)
            return _sdpa(inner.norm_q(raw["q"]), k, torch.cat([raw["v"], v_ip], dim=1)) * inner.scale, None
        if self.layout != "txt_first":  # Flux's adapter acts in double-stream blocks only, as theirs
            return None, None
        q, out = raw["qn"], None
        if q.shape[1] != img.shape[1]:  # merged queries: the adapter's queries are those of all tokens
            q = _project(attn, img, "q")
        for prompt, scale, to_k, to_v in zip(states, inner.scale, inner.to_k_ip, inner.to_v_ip):
            k, v = (lin(prompt).view(q.shape[0], -1, attn.heads, attn.head_dim) for lin in (to_k, to_v))
            out = scale * _sdpa(q, k, v) if out is None else out + scale * _sdpa(q, k, v)
        return None, out


ToMeDiTAttnProcessor._twin = sd.module_twin(ToMeDiTAttnProcessor)
ToMeDiTIPAdapterAttnProcessor._twin = sd.module_twin(ToMeDiTIPAdapterAttnProcessor)


# ----------------------------------------------------------------------------------------- patching

_KNOWN_PROCESSORS = ("JointAttnProcessor2_0", "FluxAttnProcessor", "AttnProcessor2_0")
#: diffusers' IP-Adapter processors of SD3 and Flux, wrapped by :class:`ToMeDiTIPAdapterAttnProcessor`.
_IP_ADAPTER_PROCESSORS = ("SD3IPAdapterJointAttnProcessor2_0", "FluxIPAdapterAttnProcessor")


def dit_blocks(model) -> list[tuple[str, torch.nn.Module, dict[str, str]]]:
    """(name, block, {attention attribute: layout}) of every transformer block, in execution order;
    layout ``"pixart"`` = PixArt self-attention (wrapped like a UNet's ``attn1``)."""
    SD3, PixArt, Flux = _dit_classes()
    out = []
    if isinstance(model, SD3):
        for i, b in enumerate(model.transformer_blocks):
            attns = {"attn": "img_first"}
            if getattr(b, "attn2", None) is not None:
                attns["attn2"] = "self"
            out.append((f"transformer_blocks.{i}", b, attns))
    elif isinstance(model, Flux):
        out += [(f"transformer_blocks.{i}", b, {"attn": "txt_first"}) for i, b in enumerate(model.transformer_blocks)]
        out += [(f"single_transformer_blocks.{i}", b, {"attn": "single"})
                for i, b in enumerate(model.single_transformer_blocks)]
    else:
        out += [(f"transformer_blocks.{i}", b, {"attn1": "pixart"}) for i, b in enumerate(model.transformer_blocks)]
    return out


def _choose(all_blocks, blocks) -> list:
    """The blocks selected by ``blocks`` (None = all; ints index :func:`dit_blocks`, strings name blocks)."""
    if blocks is None:
        return list(all_blocks)
    names = [n for n, _, _ in all_blocks]
    chosen = set()
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, (int, str)):
            raise TypeError(f"blocks must hold block indices (int) or names (str), got {b!r}")
        if isinstance(b, int) and not -len(names) <= b < len(names):
            raise ValueError(f"block index {b} out of range: this transformer has {len(names)} blocks "
                             f"(0..{len(names) - 1})")
        if isinstance(b, str) and b not in names:
            raise ValueError(f"no block named {b!r}; names look like {names[0]!r} (see dit_blocks(model))")
        chosen.add(b % len(names) if isinstance(b, int) else names.index(b))
    return [all_blocks[i] for i in sorted(chosen)]


def _check_config(cfg: ToMeDiTConfig) -> None:
    """Raise ``ValueError`` naming the first bad setting of ``cfg``."""
    if cfg.rope not in ROPE_RULES:
        raise ValueError(f"rope must be one of {ROPE_RULES}, got {cfg.rope!r}")
    if cfg.merge_mlp and cfg.mode == "downsample":
        raise ValueError("merge_mlp applies to mode='merge' only; downsample mode acts on attention keys/values")
    sd.check_common(cfg)


def _check_processors(chosen) -> None:
    """Refuse attentions this adapter cannot drive: fused q/k/v projections, unknown processors."""
    for name, block, attns in chosen:
        for attr, layout in attns.items():
            attn = getattr(block, attr)
            if getattr(attn, "fused_projections", False):
                raise ValueError(f"{name}.{attr} has fused q/k/v projections; call unfuse_qkv_projections() on the "
                                 "transformer or pipeline before apply_tome")
            kind = type(attn.processor).__name__
            if layout != "pixart" and kind not in _KNOWN_PROCESSORS + _IP_ADAPTER_PROCESSORS:
                raise TypeError(f"{name}.{attr} runs a {kind}; ToMe for diffusion transformers drives the default "
                                f"processors {_KNOWN_PROCESSORS} and the IP-Adapter ones {_IP_ADAPTER_PROCESSORS}: "
                                "call set_default_attn_processor() or remove the adapter that installed it")


class _State(sd._State):
    """Everything needed to run and to remove the patch of one transformer."""


def _grid_reader(model):
    """A function ``(args, kwargs) -> (h, w)``: the patch grid of the current call (from the latent
    ``(B, C, H, W)`` and ``patch_size`` for SD3/PixArt, from ``img_ids`` for Flux's packed tokens)."""
    params = list(inspect.signature(model.forward).parameters)

    def arg(args, kwargs, key):
        i = params.index(key)
        return args[i] if len(args) > i else kwargs.get(key)

    if "img_ids" in params:  # Flux: tokens already packed; rows/columns of the grid are in img_ids
        def flux(args, kwargs):
            ids = arg(args, kwargs, "img_ids")
            if ids is None:
                raise ValueError("ToMe for Flux needs img_ids (the latent grid positions) in the transformer call")
            h, w = (int(v) for v in (ids.reshape(-1, ids.shape[-1])[:, 1:3].amax(0) + 1).tolist())
            x = arg(args, kwargs, "hidden_states")
            if x is not None and x.ndim == 3 and x.shape[1] != h * w:
                raise ValueError(f"ToMe for Flux: {x.shape[1]} image tokens, but img_ids place them on a {h}x{w} grid "
                                 f"({h * w} tokens); image tokens beyond the grid (Flux Kontext's reference images) "
                                 "are not supported: remove_tome(transformer) for such calls")
            return h, w
        return flux, lambda args, kwargs: arg(args, kwargs, "timestep")
    p = model.config.patch_size

    def latent(args, kwargs):
        x = arg(args, kwargs, "hidden_states")
        if x is None or x.ndim != 4:
            raise ValueError(f"ToMe for {type(model).__name__}: hidden_states must be a (B, C, H, W) latent")
        return -(-x.shape[-2] // p), -(-x.shape[-1] // p)
    return latent, lambda args, kwargs: arg(args, kwargs, "timestep")


def _model_hooks(model, state: _State) -> list:
    """Hooks on the transformer that open each call's context (patch grid, per-call seed; refusing a
    second concurrent call and gradient checkpointing with gradients) and clear it when the call ends."""
    grid_of, timestep_of = _grid_reader(model)

    def pre(module, args, kwargs):
        if state.ctx.hw is not None:
            state.ctx.rejected += 1
            raise RuntimeError("ToMe: this patched transformer is already running a forward call (from another "
                               "thread, or re-entrantly); a patched transformer serves one call at a time")
        if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False):
            raise RuntimeError("ToMe cannot run under gradient checkpointing with gradients on; call "
                               "disable_gradient_checkpointing(), run under torch.no_grad(), or remove_tome() first")
        lost = sum(a.processor is not p for a, p in state.wrappers)
        if lost and not state.warned_replaced:
            state.warned_replaced = True
            warnings.warn(f"ToMe: {lost} of {len(state.wrappers)} patched attention processors were replaced after "
                          "apply_tome; those attentions now run without ToMe. Call apply_tome again.",
                          UserWarning, stacklevel=2)
        hw = grid_of(args, kwargs)
        state.ctx.seed = sd._timestep_seed(state.config.seed, timestep_of(args, kwargs))
        if state.config.plan_every > 1:  # step counting reads the timestep's value (a graph break under compile)
            state.ctx.advance(timestep_of(args, kwargs))
        state.ctx.hw = hw
        return None

    def post(module, args, kwargs, output):
        if state.ctx.rejected:  # the end of a refused call, not of the one running
            state.ctx.rejected -= 1
            return None
        state.ctx.hw = state.ctx.seed = None
        for slot in state.slots:
            slot.plan = None
        return None

    return [model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True, always_call=True)]


def _patch_blocks(state: _State, chosen) -> None:
    """Wrap the attention processors of every chosen block, plus its merge-plan (and ``ff``) hooks."""
    cfg = state.config
    for index, (name, block, attns) in enumerate(chosen):
        slot = sd._BlockSlot()
        state.slots.append(slot)
        for attr, layout in attns.items():
            attn = getattr(block, attr)
            if layout == "pixart":
                proc = sd.wrap_processor(sd.ToMeSDSelfAttnProcessor, attn.processor, state, slot, 1, f"{name}.{attr}")
            else:
                ip = type(attn.processor).__name__ in _IP_ADAPTER_PROCESSORS
                cls = ToMeDiTIPAdapterAttnProcessor if ip else ToMeDiTAttnProcessor
                proc = sd.wrap_processor(cls, attn.processor, state, slot, layout, f"{name}.{attr}")
            state.wrappers.append((attn, proc))
            attn.set_processor(proc)
        if cfg.mode == "merge":
            state.hooks += sd._block_hooks(block, state, slot, 1, index, name, len(chosen))
            if cfg.merge_mlp and getattr(block, "ff", None) is not None:
                state.hooks += sd._ff_hooks(block.ff, slot)
        state.blocks.append(name)


def dit_example_inputs(model, height: int, width: int, text_tokens: int, device="meta",
                       scale: int = sd.VAE_SCALE) -> dict:
    """Keyword inputs of one call of ``model`` (SD3, PixArt or Flux) on an image of ``height x width``
    pixels (latent: /``scale``, the VAE's; Flux packs 2x2 latent positions into one token) with
    ``text_tokens`` text tokens, zeros on ``device``; Flux's position ids stay on the CPU, where the
    patch reads the grid."""
    cfg, name = model.config, type(model).__name__
    lat_h, lat_w = -(-height // scale), -(-width // scale)
    zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
    if name == "FluxTransformer2DModel":
        h, w = -(-lat_h // 2), -(-lat_w // 2)
        ids = torch.zeros(h, w, 3)
        ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
        kw = dict(hidden_states=zeros(1, h * w, cfg.in_channels), img_ids=ids.reshape(-1, 3),
                  encoder_hidden_states=zeros(1, text_tokens, cfg.joint_attention_dim),
                  txt_ids=torch.zeros(text_tokens, 3), pooled_projections=zeros(1, cfg.pooled_projection_dim),
                  timestep=torch.full((1,), 0.5, device=device))
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((1,), 3.5, device=device)
        return kw
    kw = dict(hidden_states=zeros(1, cfg.in_channels, lat_h, lat_w), timestep=torch.full((1,), 500, device=device))
    if name == "PixArtTransformer2DModel":
        size = torch.tensor([[float(height), float(width)]], device=device)
        return dict(kw, encoder_hidden_states=zeros(1, text_tokens, cfg.caption_channels),
                    added_cond_kwargs={"resolution": size, "aspect_ratio": size[:, :1] / size[:, 1:]})
    return dict(kw, encoder_hidden_states=zeros(1, text_tokens, cfg.joint_attention_dim),
                pooled_projections=zeros(1, cfg.pooled_projection_dim))


def solve_budget(pipe_or_transformer, cfg: ToMeDiTConfig, flops: float | None, speedup: float | None, size=None,
                 text_tokens: int | None = None) -> sd.RatioBudget:
    """The smallest ratio (settings from ``cfg``) whose transformer call at an image of ``size`` pixels
    with ``text_tokens`` text tokens keeps at most ``flops`` of the unpatched FLOPs (``speedup``:
    1 / speedup), counted on a meta-device twin; ``ValueError`` when no ratio reaches it."""
    model = find_transformer(pipe_or_transformer)
    native = getattr(model.config, "sample_size", None) or FLUX_NATIVE_LATENT
    (height, width), scale = sd.image_size(size, pipe_or_transformer, native)
    n_text = TEXT_TOKENS[type(model).__name__] if text_tokens is None else text_tokens
    if isinstance(n_text, bool) or not isinstance(n_text, int) or n_text < 1:
        raise ValueError(f"text_tokens must be a positive integer, got {text_tokens!r}")
    twin = sd.meta_twin(model)
    kw = dit_example_inputs(model, height, width, n_text, scale=scale)
    return sd.budget_for(apply_tome_dit, twin, lambda: twin(**kw), cfg, flops, speedup, (height, width),
                         f"of this transformer at {height}x{width} pixels; patch more blocks (blocks=None)")


def apply_tome_dit(pipe_or_transformer, ratio: float | None = None, mode: str = "merge", blocks=None, sx: int = 2,
                   sy: int = 2, use_rand: bool = True, seed: int = 0, merge_mlp: bool = False, rope: str = "angle",
                   downsample_method: str = "nearest-exact", similarity_dtype: str = "auto", method: str = "tome",
                   flops: float | None = None, speedup: float | None = None, size=None,
                   text_tokens: int | None = None, plan_every: int = 1):
    """Patch an SD3 / PixArt / Flux transformer (or its pipeline) in place with token merging
    (``mode="merge"``) or key/value downsampling (``mode="downsample"``); returns the argument.

    - ``ratio``: fraction of image tokens removed (merge: at most ``1 - 1/(sx*sy)``; downsample: < 1 from
      keys/values, 0.75 halves the grid side; default 0.5). ``blocks``: indices/names from :func:`dit_blocks`
      (None = all).
    - ``flops`` / ``speedup`` instead of ``ratio``: a budget (:func:`solve_budget`) at an image of ``size``
      pixels (default: the model's native size, 1024 px for Flux) with ``text_tokens`` text tokens
      (default :data:`TEXT_TOKENS`); the result is ``transformer.tome_budget``.
    - ``method``: merge mode's token reduction, ``"tome"``, ``"tofu"`` or ``"pitome"`` (as for UNets).
    - ``sx, sy, use_rand, seed, similarity_dtype``: as for UNets (``apply_tome_sd``); ``merge_mlp`` also
      runs the image feed-forward on merged tokens (SD3, Flux double-stream, PixArt).
    - ``rope``: Flux merge mode, rotary position of merged tokens (:data:`ROPE_RULES`).
    - ``downsample_method``: ``F.interpolate`` mode or ``"avg"`` for the key/value grid.
    - ``plan_every``: merge mode, a block's merge plan computed once every ``plan_every`` denoising steps and
      reused in between (as for UNets; 1: every step).
    """
    model = find_transformer(pipe_or_transformer)
    budgeted = sd.check_budget_request(ratio, flops, speedup, size, text_tokens=text_tokens)
    cfg = ToMeDiTConfig(ratio=0.5 if ratio is None else ratio, mode=mode, method=method,
                        blocks=None if blocks is None else tuple(blocks), sx=sx, sy=sy, use_rand=use_rand, seed=seed,
                        merge_mlp=merge_mlp, rope=rope, downsample_method=downsample_method,
                        similarity_dtype=similarity_dtype, plan_every=plan_every)
    _check_config(cfg)
    chosen = _choose(dit_blocks(model), cfg.blocks)
    budget = solve_budget(pipe_or_transformer, cfg, flops, speedup, size, text_tokens) if budgeted else None
    if budget is not None:
        cfg = dataclasses.replace(cfg, ratio=budget.ratio)
    if is_patched(model):  # re-applying replaces the patch
        remove_tome_dit(model)
    _check_processors(chosen)
    state = _State(cfg)
    _patch_blocks(state, chosen)
    state.hooks += _model_hooks(model, state)
    setattr(model, _ATTR, state)
    if budget is not None:
        model.tome_budget = budget
    return pipe_or_transformer


def remove_tome_dit(pipe_or_transformer):
    """Undo :func:`apply_tome_dit` exactly (original processors back, hooks gone); ``ValueError`` when
    the transformer is not patched."""
    sd.unpatch(find_transformer(pipe_or_transformer), _ATTR, f"{type(pipe_or_transformer).__name__} is not "
               "ToMe-patched (apply_tome was never applied or was already removed)")
    return pipe_or_transformer


def is_patched(pipe_or_transformer) -> bool:
    """Whether :func:`apply_tome_dit` is in effect on this pipeline/transformer."""
    return getattr(find_transformer(pipe_or_transformer), _ATTR, None) is not None


def patched_blocks(pipe_or_transformer) -> list[str]:
    """Names of the transformer blocks the current patch acts on."""
    state = getattr(find_transformer(pipe_or_transformer), _ATTR, None)
    return [] if state is None else list(state.blocks)
