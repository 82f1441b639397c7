"""ToMe for Hugging Face ``transformers`` vision towers: ``apply_tome(model, r=16)`` / ``remove_tome(model)``.

Supported (transformers 5.x): ``ViTModel``, ``ViTForImageClassification``, ``CLIPVisionModel``,
``CLIPVisionModelWithProjection``, the vision tower of ``CLIPModel``, ``Dinov2Model``,
``Dinov2WithRegistersModel``, ``SiglipVisionModel`` and the vision tower of ``SiglipModel``.
Anything else raises ``TypeError`` naming its class.

How it hooks in, without copying any model's forward:

- each encoder layer's class is swapped for a subclass whose ``forward`` runs the layer's own
  modules (norms, attention projections, MLP, layer scale) with a ToMe merge between attention and
  MLP, as in the paper. Attention itself goes through ``ALL_ATTENTION_FUNCTIONS`` with the
  implementation the user chose (``config._attn_implementation``: ``sdpa``, ``eager``, ...);
  proportional attention passes ``log(size)`` as its additive float mask;
- the vision tower's class is swapped for a subclass whose ``forward`` opens a per-call context
  (a ``ContextVar``: token sizes and counts of this call only, so threads never share it) and then
  runs the tower's own ``forward``;
- SigLIP's attention-pooling head keeps its forward; its ``nn.MultiheadAttention`` gets the same
  ``log(size)`` bias, so merged tokens count for the patches they hold.

The ``ContextVar`` (rather than a keyword argument) carries the call's state because the pooling
head is called without ``**kwargs``. Settings live on the tower as ``tower.tome_r``,
``tower.tome_prop_attn`` and ``tower.tome_method``; on a model that holds the tower
(``ViTForImageClassification``, ``CLIPModel``, ...) the same attributes read and write the tower's, so
``model.tome_r = 0`` takes effect there too. Nothing per call is stored on the model. Each
call's state is a :class:`visiontools.tome.engine.TokenState`, and every layer reduces tokens with its
one reduction step (shared with the timm adapter): every method of :mod:`visiontools.tome.methods`,
FLOP and speedup budgets, the class and register tokens protected.
"""
from __future__ import annotations

import inspect
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import transformers
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # transformers 4.x: refused in apply_tome with a clear message
    _CAN_RECORD_REGISTRY = None

from visiontools.tome import methods
from visiontools.tome.engine import ToMeInfo, TokenState, check_request, solve_budget_for
from visiontools.tome.merge import parse_r

__all__ = ["ToMeInfo", "apply_tome", "remove_tome", "tome_forward", "is_patched", "SUPPORTED"]

# transformers' attention implementations that add a float mask to the logits (proportional attention)
MASKABLE_ATTENTION = ("sdpa", "eager")


_CALL: ContextVar[TokenState | None] = ContextVar("visiontools_tome_call", default=None)
_RECORD: ContextVar[list | None] = ContextVar("visiontools_tome_record", default=None)


def _attention(attn: nn.Module, x: torch.Tensor, mask, out_proj: nn.Module, scaling: float, dropout: float):
    """The attention module's projections around transformers' attention function for
    ``attn.config._attn_implementation``, with ``mask`` as the additive mask. Also returns the keys
    averaged over heads (the ToMe similarity metric)."""
    B, N, _ = x.shape
    shape = (B, N, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    impl = attn.config._attn_implementation
    eager = sys.modules[type(attn).__module__].eager_attention_forward  # looked up per call, like the model does
    fn: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    if mask is not None:
        mask = mask.to(q.dtype)
    out, _ = fn(attn, q, k, v, mask, dropout=dropout if attn.training else 0.0, scaling=scaling)
    return out_proj(out.reshape(B, N, -1).contiguous()), k.mean(1), (q, k)


def _reduce(state: TokenState, x: torch.Tensor, metric: torch.Tensor, qk, scaling: float, bias) -> torch.Tensor:
    """The engine's reduction step, with the tokens' attention importance for ``prune``."""
    return state.reduce(x, metric, lambda: methods.class_attention(*qk, scaling, bias, state.num_prefix_tokens))


# --- one function per layer family: the layer's own modules, with a merge between attention and MLP --

def _vit_layer(layer, x, state: TokenState):
    a, bias = layer.attention, state.bias()
    y, metric, qk = _attention(a, layer.layernorm_before(x), bias, a.o_proj, a.scaling, a.attention_dropout)
    x = _reduce(state, x + layer.dropout(y), metric, qk, a.scaling, bias)
    return x + layer.dropout(layer.mlp(layer.layernorm_after(x)))


def _clip_layer(layer, x, state: TokenState):  # CLIP and SigLIP encoder layers
    a, bias = layer.self_attn, state.bias()
    y, metric, qk = _attention(a, layer.layer_norm1(x), bias, a.out_proj, a.scale, a.dropout)
    x = _reduce(state, x + y, metric, qk, a.scale, bias)
    return x + layer.mlp(layer.layer_norm2(x))


def _dinov2_layer(layer, x, state: TokenState):  # Dinov2 and Dinov2WithRegisters
    a, bias = layer.attention, state.bias()
    y, metric, qk = _attention(a, layer.norm1(x), bias, a.o_proj, a.scaling, a.attention_dropout)
    x = _reduce(state, x + layer.drop_path(layer.layer_scale1(y)), metric, qk, a.scaling, bias)
    return x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))


@dataclass(frozen=True)
class _Family:
    """How to patch one kind of vision tower."""

    layer_class: str  # exact class name of its encoder layers
    run_layer: Callable
    layers: Callable[[nn.Module], nn.ModuleList]
    num_protected: Callable[[object], int]  # from the config: class + register tokens


_ONE = lambda config: 1  # noqa: E731

# tower class name -> family. The tower is the module whose forward runs embeddings, encoder and pooling.
TOWERS = {
    "ViTModel": _Family("ViTLayer", _vit_layer, lambda t: t.layers, _ONE),
    "CLIPVisionModel": _Family("CLIPEncoderLayer", _clip_layer, lambda t: t.encoder.layers, _ONE),
    "Dinov2Model": _Family("Dinov2Layer", _dinov2_layer, lambda t: t.encoder.layer, _ONE),
    "Dinov2WithRegistersModel": _Family("Dinov2WithRegistersLayer", _dinov2_layer, lambda t: t.encoder.layer,
                                        lambda c: 1 + c.num_register_tokens),
    "SiglipVisionModel": _Family("SiglipEncoderLayer", _clip_layer, lambda t: t.encoder.layers, lambda c: 0),
}
# models that hold a tower and use only its class token or pooled output -> the tower's attribute
WRAPPERS = {
    "ViTForImageClassification": "vit",
    "CLIPVisionModelWithProjection": "vision_model",
    "CLIPModel": "vision_model",
    "SiglipModel": "vision_model",
}
SUPPORTED = tuple(TOWERS) + tuple(WRAPPERS)
# the ToMe settings the docs name; on a wrapper they are its vision tower's (see _ToMeWrapper)
SETTINGS = ("tome_r", "tome_prop_attn", "tome_method", "tome_budget")


class _ToMeLayer:
    """Mixin for a patched encoder layer; outside a patched tower's call it is the original layer."""

    _tome_run: Callable

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        state = _CALL.get()
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError("token merging changes the token count, so it cannot be combined with an "
                             "attention_mask (or flex attention's block mask); remove_tome(model) first")
        if not state.tokens_per_layer:
            state.start(hidden_states)
        return state.run(type(self)._tome_run, self, hidden_states)


class _ToMeTower:
    """Mixin for a patched vision tower: each forward opens its own per-call ToMe context."""

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled() and _checkpointing(self):
            raise ValueError("ToMe on transformers models does not support gradient (activation) checkpointing: "
                             "call model.activation_checkpointing_disable() or remove_tome(model)")
        impl = self.config._attn_implementation
        if self.tome_prop_attn and impl not in MASKABLE_ATTENTION:
            raise ValueError(f"proportional attention needs an attention implementation that takes a float mask "
                             f"({', '.join(MASKABLE_ATTENTION)}), not {impl!r}: use "
                             f"model.set_attn_implementation('sdpa') or apply_tome(model, prop_attn=False)")
        family = TOWERS[_base(type(self)).__name__]
        state = TokenState(schedule=parse_r(len(family.layers(self)), self.tome_r),
                           num_prefix_tokens=family.num_protected(self.config),
                           method=getattr(self, "tome_method", "tome"), prop_attn=self.tome_prop_attn)
        token = _CALL.set(state)
        try:
            out = super().forward(*args, **kwargs)
        finally:
            _CALL.reset(token)
        state.finish(out[0])
        record = _RECORD.get()
        if record is not None:
            record.append(state)
        return out


def _tower_setting(name: str) -> property:
    """A wrapper's ``name`` setting, read from and written to its vision tower."""
    def get(self):
        return getattr(getattr(self, WRAPPERS[_base(type(self)).__name__]), name)

    def put(self, value):
        setattr(getattr(self, WRAPPERS[_base(type(self)).__name__]), name, value)

    return property(get, put, doc=f"``{name}`` of the vision tower (the same attribute there)")


class _ToMeWrapper:
    """Mixin for a patched model that holds a vision tower (``ViTForImageClassification``, ``CLIPModel``,
    ...): its ToMe settings are the tower's, so ``model.tome_r = 0`` takes effect as on the tower."""

    tome_r = _tower_setting("tome_r")
    tome_prop_attn = _tower_setting("tome_prop_attn")
    tome_method = _tower_setting("tome_method")
    tome_budget = _tower_setting("tome_budget")


def _checkpointing(model) -> bool:
    """Whether transformers' gradient/activation checkpointing is on (the name changed in 5.x)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class _SizeBiasedMHA(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (SigLIP's pooling head) that adds ``log(size)`` of the current
    call's tokens to its logits, so attention pooling counts merged tokens by their size."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        state = _CALL.get()
        bias = state.bias() if state is not None else None
        if bias is not None and attn_mask is None and key.shape[1] == bias.shape[-1] and self.batch_first:
            # (B, 1, 1, N) -> (B * heads, L, N), batch-major as nn.MultiheadAttention expects
            attn_mask = bias[:, 0].to(query.dtype).repeat_interleave(self.num_heads, 0).expand(-1, query.shape[1], -1)
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)


_PATCHED: dict[tuple[type, type], type] = {}
_BASES: dict[type, type] = {_SizeBiasedMHA: nn.MultiheadAttention}


def _swap(module: nn.Module, mixin: type, **attrs) -> None:
    base = type(module)
    if (mixin, base) not in _PATCHED:
        # the base's own name: transformers reads it (save_pretrained's config "architectures", pipelines'
        # supported-model check), and a saved config must name a class plain transformers has
        cls = type(base.__name__, (mixin, base), {**attrs, "__qualname__": base.__qualname__})
        _PATCHED[(mixin, base)] = cls
        _BASES[cls] = base
    recordable = _CAN_RECORD_REGISTRY.get(module)  # transformers keys what a model can record by class
    module.__class__ = _PATCHED[(mixin, base)]
    if recordable:  # so output_hidden_states=True keeps working on the patched class
        _CAN_RECORD_REGISTRY[module] = recordable


def _base(cls: type) -> type:
    return _BASES.get(cls, cls)


def _towers(model: nn.Module) -> list[nn.Module]:
    """The vision tower(s) of ``model`` to patch, or ``TypeError`` naming the class."""
    name = _base(type(model)).__name__
    if name in TOWERS:
        towers = [model]
    elif name in WRAPPERS:
        towers = [getattr(model, WRAPPERS[name])]
    else:
        raise TypeError(f"ToMe cannot patch {name} (from {type(model).__module__}); supported transformers "
                        f"models: {', '.join(SUPPORTED)}")
    for tower in towers:
        tname = _base(type(tower)).__name__
        if tname not in TOWERS:
            raise TypeError(f"ToMe cannot patch {name}: its vision tower is a {tname}, not one of {', '.join(TOWERS)}")
        family = TOWERS[tname]
        for i, layer in enumerate(family.layers(tower)):
            lname = _base(type(layer)).__name__
            if lname != family.layer_class:
                raise TypeError(f"ToMe cannot patch layer {i} of {tname}: {lname} is not {family.layer_class}")
    return towers


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or its vision tower) is ToMe-patched."""
    return any(isinstance(m, _ToMeTower) for m in model.modules())


def apply_tome(model: nn.Module, r=None, prop_attn: bool = True, method: str | None = None,
               flops: float | None = None, speedup: float | None = None, calibrate: bool = False,
               input_size: tuple[int, int] | None = None, calibrate_batch: int = 32) -> nn.Module:
    """Patch a transformers vision model in place for token reduction and return it.

    ``r``: tokens removed per layer (int, default 16), ``(r, inflection)`` (the paper's schedule) or
    a per-layer list; change it later with ``apply_tome(model, r=...)`` or ``tower.tome_r``.
    ``method``: ``"tome"`` (default), ``"tofu"``, ``"pitome"`` or ``"prune"`` (see
    ``visiontools.tome.methods``); re-applying without ``method`` keeps the one chosen before.
    ``flops=0.6`` or ``speedup=1.5`` instead of ``r``: the lightest per-layer schedule whose counted
    FLOPs of the vision tower (one image of ``input_size``, default ``config.image_size``) are at
    most that fraction of the unpatched tower's; ``calibrate=True`` also times it (see
    ``visiontools.patches.timm.apply_tome``). The result is ``model.tome_budget``.
    ``prop_attn``: proportional attention (``log(size)`` added to the attention logits; needs
    ``sdpa`` or ``eager``).
    """
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"ToMe for transformers needs transformers>=5 (installed: {transformers.__version__}): "
                          "pip install -U 'transformers>=5'")
    towers = _towers(model)
    r, method = check_request(r, method, flops, speedup, calibrate, getattr(towers[0], "tome_method", "tome"))
    before = [{k: v for k, v in vars(t).items() if k.startswith("tome_")} for t in towers] if is_patched(model) \
        else None
    for tower in towers:
        _patch_tower(tower)
        tower.tome_r, tower.tome_prop_attn, tower.tome_method = r, prop_attn, method
    if model is not towers[0] and not isinstance(model, _ToMeWrapper):
        _swap(model, _ToMeWrapper)  # its tome_* attributes are the tower's
    if flops is None and speedup is None:
        for tower in towers:
            vars(tower).pop("tome_budget", None)  # a plain r replaces an earlier budget
    else:
        try:
            for tower in towers:
                tower.tome_budget = _solve_budget(tower, flops, speedup, calibrate, input_size, calibrate_batch)
                tower.tome_r = tower.tome_budget.schedule
        except BaseException:  # a budget that fails leaves the model as it was, not patched at a trial's r
            _restore(model, towers, before)
            raise
    return model


def _restore(model: nn.Module, towers: list, before: list | None) -> None:
    """Undo an :func:`apply_tome` call that failed: unpatch (``before`` None: it was not patched), else
    put each tower's ``tome_*`` settings back as they were (``before``: one dict per tower)."""
    if before is None:
        remove_tome(model)
        return
    for tower, settings in zip(towers, before):
        for name in [n for n in vars(tower) if n.startswith("tome_") and n != "tome_flop_cache"]:
            delattr(tower, name)
        for name, value in settings.items():
            setattr(tower, name, value)


def _patch_tower(tower: nn.Module) -> None:
    """Swap the classes of a vision tower, its encoder layers and its attention-pooling head."""
    if isinstance(tower, _ToMeTower):
        return
    family = TOWERS[type(tower).__name__]
    for layer in family.layers(tower):
        _swap(layer, _ToMeLayer, _tome_run=family.run_layer)
    for m in tower.modules():
        if type(m) is nn.MultiheadAttention:  # SigLIP's attention-pooling head
            m.__class__ = _SizeBiasedMHA
    _swap(tower, _ToMeTower)


def _solve_budget(tower: nn.Module, flops, speedup, calibrate: bool, input_size, batch: int):
    """The budget's :class:`~visiontools.tome.budget.BudgetResult` for one patched vision tower."""
    cfg = tower.config
    p = next(tower.parameters())
    size = tuple(input_size) if input_size is not None else (cfg.image_size, cfg.image_size)
    x = torch.zeros(1, getattr(cfg, "num_channels", 3), *size, device=p.device, dtype=p.dtype)
    # another size than the position embeddings': interpolate them, as a call at that size must (DINOv2 always does)
    other = size != (cfg.image_size, cfg.image_size) and "interpolate_pos_encoding" in inspect.signature(
        _base(type(tower)).forward).parameters
    extra = {"interpolate_pos_encoding": True} if other else {}

    def run(rs, inp):
        tower.tome_r = rs
        return tower(pixel_values=inp, **extra)

    was_training = tower.training
    tower.eval()
    try:
        num_tokens = (size[0] // cfg.patch_size) * (size[1] // cfg.patch_size)
        return solve_budget_for(run, x, len(TOWERS[_base(type(tower)).__name__].layers(tower)), num_tokens, flops,
                                speedup, calibrate, batch, cache=tower.__dict__.setdefault("tome_flop_cache", {}),
                                method=tower.tome_method)
    finally:
        tower.train(was_training)


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome`: original classes back, settings removed; weights were never touched."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not ToMe-patched")
    for m in model.modules():
        for name in [n for n in vars(m) if n.startswith("tome_")]:
            delattr(m, name)
        m.__class__ = _base(type(m))
    return model


def tome_forward(model: nn.Module, *args, **kwargs):
    """Call a patched ``model(*args, **kwargs)`` and also return the :class:`ToMeInfo` of its (last)
    vision-tower pass: token counts per layer and final token sizes."""
    if not is_patched(model):
        raise ValueError("tome_forward needs a model patched with apply_tome")
    infos: list[ToMeInfo] = []
    token = _RECORD.set(infos)
    try:
        out = model(*args, **kwargs)
    finally:
        _RECORD.reset(token)
    return out, infos[-1]
