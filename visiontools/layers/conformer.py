"""Convolution-augmented ViT blocks: a Conformer block on the patch grid, a ConvFFN and a
convolutional tokenizer (pure PyTorch; the registered timm models are in ``visiontools.models``).

- :class:`ConformerBlock` ("Conformer", Gulati et al., Interspeech 2020), macaron layout:
  ``x + 1/2 FFN(x)``, ``+ MHSA``, ``+ ConvModule`` (grid tokens only), ``+ 1/2 FFN``, final LayerNorm.
- :class:`ConvModule`: LayerNorm, pointwise to 2C, GLU (gated linear unit, as in ConvS2S), depthwise
  k x k convolution on the H x W grid, normalisation, SiLU, pointwise, dropout.
  **Normalisation** (``conv_norm``): ``"batch"`` (default) is the Conformer's BatchNorm. After a
  depthwise convolution the statistics that drift are per channel over space, which is what
  BatchNorm normalises; at inference it is a per-channel affine map, so it costs nothing (it can be
  folded into the depthwise weights), does not depend on the other images of a batch, and commutes
  with the group averaging of token merging. A CPU batch of 64 images on an 8x8 grid gives 4,096
  positions per channel, plenty for stable statistics. ``"layer"`` (LayerNorm over the channels of
  each position, as in ConvNeXt) keeps training per-sample: use it for tiny batches, DDP without
  SyncBatchNorm, or when the statistics of the training batches would differ from the test ones.
- **Prefix tokens** (class, register) skip the convolutions: the convolution module adds nothing to
  them (their residual passes unchanged) and in the ConvFFN they bypass the depthwise convolution;
  they see the grid through attention only, and the grid does not see them through a convolution.
- :class:`ConvMlp`: the MLP with a depthwise 3x3 convolution between ``fc1`` and the activation
  (ConvFFN, as in PVTv2/LocalViT), usable as timm's ``mlp_layer``.
- :func:`conv_stem`: a CCT-style convolutional tokenizer (Hassani et al. 2021): ``log2(patch)``
  stages of conv 3x3 -> BatchNorm -> ReLU -> max-pool 3x3/2 instead of a linear patch embedding
  (the BatchNorm follows "Early convolutions help transformers see better", Xiao et al. 2021).

Every grid layer resolves the (H, W) grid per call (:class:`visiontools.layers.grid.GridTokens`) and runs
its convolutions through a :class:`visiontools.layers.grid.GridLayout`, so the same code runs merged tokens
(token merging: unmerge -> convolution -> group mean) and any image size.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from visiontools.layers.grid import GridKey, GridLayout, GridTokens
from visiontools.tome.merge import size_bias

__all__ = ["ConvModule", "ConvMlp", "MultiHeadAttention", "ConformerBlock", "conv_stem", "CONV_NORMS"]

CONV_NORMS = ("batch", "layer")


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_norm(kind: str, dim: int, dd: dict) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(dim, **dd)
    if kind == "layer":
        return _ChannelLayerNorm(dim, **dd)
    raise ValueError(f"conv_norm must be one of {CONV_NORMS}, got {kind!r}")


def _odd_kernel(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {k!r}")
    return k


class ConvModule(nn.Module):
    """Conformer convolution module on a channels-last grid (B, H, W, C) -> (B, H, W, C):
    LayerNorm, pointwise C->2C, GLU, depthwise ``kernel_size`` x ``kernel_size``, ``conv_norm``,
    SiLU, pointwise C->C, dropout."""

    def __init__(self, dim: int, kernel_size: int = 3, conv_norm: str = "batch", bias: bool = True,
                 drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        k = _odd_kernel(kernel_size)
        self.norm_in = nn.LayerNorm(dim, **dd)
        self.pw1 = nn.Linear(dim, 2 * dim, bias=bias, **dd)
        self.dw = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=bias, **dd)
        self.norm = _conv_norm(conv_norm, dim, dd)
        self.act = nn.SiLU()
        self.pw2 = nn.Linear(dim, dim, bias=bias, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        u = F.glu(self.pw1(self.norm_in(grid)), dim=-1)          # (B, H, W, C)
        u = self.act(self.norm(self.dw(u.permute(0, 3, 1, 2))))  # NCHW view of channels-last memory
        return self.drop(self.pw2(u.permute(0, 2, 3, 1)))


class ConvMlp(GridTokens, nn.Module):
    """MLP ``fc1 -> [depthwise 3x3 on the grid] -> act -> drop -> fc2 -> drop`` on (B, N, C) tokens.
    With ``dw_kernel=0`` it is a plain MLP. Prefix tokens bypass the depthwise convolution. Takes the
    keyword arguments timm's ``Block`` passes to ``mlp_layer`` (``norm_layer`` must be None)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Callable[..., nn.Module] = nn.GELU, norm_layer=None, bias: bool = True,
                 drop: float = 0.0, dw_kernel: int = 3, device=None, dtype=None, **_ignored):
        super().__init__()
        if norm_layer is not None:
            raise ValueError("ConvMlp has no norm inside the MLP (scale_mlp_norm is not supported)")
        dd = {"device": device, "dtype": dtype}
        hidden = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden, bias=bias, **dd)
        self.dw = (nn.Conv2d(hidden, hidden, _odd_kernel(dw_kernel), padding=dw_kernel // 2, groups=hidden,
                             bias=bias, **dd) if dw_kernel else None)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, out_features or in_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)

    def _dw(self, grid: torch.Tensor) -> torch.Tensor:
        return self.dw(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, layout: Optional[GridLayout] = None) -> torch.Tensor:
        h = self.fc1(x)
        if self.dw is not None:
            layout = layout or self.layout(x.shape[1])
            p = layout.prefix
            h = torch.cat([h[:, :p], layout.run(self._dw, h[:, p:])], dim=1) if p else layout.run(self._dw, h)
        return self.drop2(self.fc2(self.drop1(self.act(h))))


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (fused SDPA) with an optional additive bias (B, 1, 1, N), e.g. the
    ``log(size)`` of ToMe's proportional attention; returns the output and the keys averaged over
    heads (B, N, head_dim), ToMe's similarity metric."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C))), k.mean(1)


class _DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


# A merge step inside a block: (tokens, attention keys, layout) -> (tokens, layout). Supplied per
# call by a token-merging adapter (visiontools.patches.timm_grid); None = no merging.
MergeFn = Callable[[torch.Tensor, torch.Tensor, GridLayout], tuple[torch.Tensor, GridLayout]]


class ConformerBlock(GridTokens, nn.Module):
    """Conformer block for ViT tokens (B, N, C): ``num_prefix_tokens`` prefix tokens, then the grid.

    ``x += 1/2 FFN1(x)``; ``x += MHSA(x)``; grid tokens ``+= ConvModule(grid)``; ``x += 1/2 FFN2(x)``;
    ``x = LayerNorm(x)`` (every sub-layer pre-normed, drop-path on each residual). ``conv_ffn`` puts
    a depthwise 3x3 convolution inside both FFNs. Takes the keyword arguments timm's
    ``VisionTransformer`` passes to ``block_fn`` (bind ``kernel_size``, ``conv_norm``, ``conv_ffn``
    with :meth:`bound`); ``init_values`` (LayerScale) and ``qk_norm`` are not supported.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0,
                 act_layer: Callable[..., nn.Module] = nn.GELU, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 kernel_size: int = 3, conv_norm: str = "batch", conv_ffn: bool = False,
                 num_prefix_tokens: Optional[int] = None, device=None, dtype=None, **_ignored):
        super().__init__()
        if init_values or qk_norm:
            raise ValueError("ConformerBlock supports neither LayerScale (init_values) nor qk_norm")
        dd = {"device": device, "dtype": dtype}
        hidden = int(dim * mlp_ratio)
        mlp = dict(act_layer=act_layer, bias=proj_bias, drop=proj_drop, dw_kernel=3 if conv_ffn else 0, **dd)
        self.norm_ff1 = norm_layer(dim, **dd)
        self.ff1 = ConvMlp(dim, hidden, **mlp)
        self.norm_attn = norm_layer(dim, **dd)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias, proj_bias, attn_drop, proj_drop, **dd)
        self.conv = ConvModule(dim, kernel_size, conv_norm, proj_bias, proj_drop, **dd)
        self.norm_ff2 = norm_layer(dim, **dd)
        self.ff2 = ConvMlp(dim, hidden, **mlp)
        self.norm_out = norm_layer(dim, **dd)
        self.drop_path = _DropPath(drop_path)
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size: Optional[tuple[int, int]] = None
        self.grid_owner: Optional[GridKey] = None

    @classmethod
    def bound(cls, **fixed):
        """A subclass that always passes ``fixed`` (e.g. ``kernel_size=5``) to the constructor, for
        timm's ``block_fn``, which calls the block with a fixed argument set."""
        if not fixed:
            return cls

        class Bound(cls):
            def __init__(self, dim, **kw):
                super().__init__(dim, **{**kw, **fixed})

        Bound.__name__ = Bound.__qualname__ = cls.__name__
        return Bound

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ConformerBlock supports neither attn_mask nor is_causal (its convolutions "
                             "see both sides of every patch)")
        return self.run(x, self.layout(x.shape[1]))[0]

    def run(self, x: torch.Tensor, layout: GridLayout, merge: Optional[MergeFn] = None,
            prop_attn: bool = False) -> tuple[torch.Tensor, GridLayout]:
        """The block on tokens laid out as ``layout`` (merged or not). ``merge``, when given, runs
        after attention (the ToMe position) and returns the merged tokens and their new layout;
        ``prop_attn`` adds ``log(size)`` to the attention logits of merged tokens."""
        p = layout.prefix
        x = x + 0.5 * self.drop_path(self.ff1(self.norm_ff1(x), layout))
        bias = size_bias(layout.size) if prop_attn and layout.size is not None else None
        y, keys = self.attn(self.norm_attn(x), bias)
        x = x + self.drop_path(y)
        if merge is not None:
            x, layout = merge(x, keys, layout)
        conv = layout.run(self.conv, x[:, p:])
        x = torch.cat([x[:, :p], x[:, p:] + self.drop_path(conv)], dim=1) if p else x + self.drop_path(conv)
        x = x + 0.5 * self.drop_path(self.ff2(self.norm_ff2(x), layout))
        return self.norm_out(x), layout


def conv_stem(in_chans: int, embed_dim: int, patch_size: int, hidden: Optional[int] = None, bias: bool = False,
              device=None, dtype=None) -> nn.Sequential:
    """CCT-style convolutional tokenizer with total stride ``patch_size`` (a power of 2): ``log2(patch)``
    stages of conv 3x3 (stride 1) -> BatchNorm -> ReLU -> max-pool 3x3 stride 2 (padding 1). Channels:
    ``hidden`` (default ``embed_dim // 2``) in every stage but the last, which outputs ``embed_dim``.
    (B, in_chans, H, W) -> (B, embed_dim, ceil(H/patch), ceil(W/patch))."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"the convolutional tokenizer needs a power-of-2 patch size >= 2, got {patch_size}")
    dd = {"device": device, "dtype": dtype}
    stages = int(math.log2(patch_size))
    hidden = hidden or max(embed_dim // 2, 16)
    layers: list[nn.Module] = []
    c = in_chans
    for i in range(stages):
        out = embed_dim if i == stages - 1 else hidden
        layers += [nn.Conv2d(c, out, 3, padding=1, bias=bias, **dd), nn.BatchNorm2d(out, **dd),
                   nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        c = out
    return nn.Sequential(*layers)
