"""A 2D Hyena operator ("Hyena Hierarchy", Poli et al., ICML 2023) for the patch grid of a ViT.

Hyena replaces attention with long implicit convolutions and element-wise gating, so a token mixer
costs O(N log N) time and O(N) memory in the number of tokens N instead of O(N^2).

Recursion (Definition 3.1 of the paper, order ``N``, default 2): an input projection to ``(N+1)*d``
channels, a short 3x3 depthwise convolution, a split into a value ``z`` and gates ``g_1..g_N``, then
for each order ``n``: ``z <- g_n * (h_n (*) z + D_n * z)``, where ``h_n (*)`` is a long 2D convolution
with an implicit filter covering the whole grid and ``D_n`` a learned per-channel skip; the last
gate is the output gate, followed by the output projection. (In the reference implementation,
``order`` N means N-1 long convolutions with an extra gate on the value before the first one; here
order N means N long convolutions, as in the paper's definition.)

Implicit filters (:class:`ImplicitFilter2d`): an MLP with sine activations over positional features
of the 2D offset ``(dy, dx)``, times an exponential decay window in the offset radius whose rate
differs per channel. Kernels are non-causal (centred) and span every offset of the current grid,
``(2H-1) x (2W-1)``; they are generated for the grid of each input, so one model runs at several
resolutions (offsets are measured in units of ``max(H, W)``, so a filter keeps its shape relative
to the image when the resolution changes).

The long convolution is computed with ``torch.fft.rfft2`` as a *linear* (zero-padded), not circular,
convolution, in float32 even under autocast: see :func:`fft_conv2d`. On small grids (at most
``DENSE_MAX_TOKENS`` tokens, e.g. CIFAR's 8x8 and 16x16, and at most ``DENSE_MAX_BYTES`` of matrices
per order) it is by default one batched matmul with the convolution's dense (H*W x H*W) matrix
instead (:func:`dense_conv2d`, ``long_conv``): the same linear map, where many tiny FFTs cost more
than the N^2 multiply-adds (2-3x faster inference of the CIFAR Hyena ViTs on a CPU).

On larger grids the recursion runs by FFT a chunk of channels at a time (``fft_chunks``, default 4;
the convolutions are depthwise, so a chunk goes through every order on its own), with the skip
``D_n`` folded into the kernel spectrum and the grid mean that prefix tokens read taken from the
transform's DC term. Inference reuses one zero-padded buffer per chunk and gates straight into it;
training checkpoints each chunk (``recompute``), so the backward pass recomputes its filters and
transforms instead of keeping them. Between the projections the grid stays in channels-last memory.
With them ``hyena_vit_small_224`` runs 1.37x faster than its attention twin at 2,304 tokens and 1.97x
at 4,096 on a 2-core CPU, and a width-192 block's training step needs 1.46x the attention block's
peak memory instead of 3.8x (``docs/hyena.md`` says what each change bought).

This module imports no timm; :class:`HyenaAttention` only matches the constructor and call signature
that ``timm.models.vision_transformer.Block`` uses for its ``attn_layer`` (adapter:
``patches/timm_hyena.py``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from visiontools.layers import bound_class
from visiontools.layers.grid import GridKey, GridLayout, GridTokens, set_call_grid  # noqa: F401 (re-exported)

__all__ = [
    "fft_conv2d",
    "kernel_spectrum",
    "conv_matrix",
    "dense_conv2d",
    "long_conv2d",
    "DENSE_MAX_TOKENS",
    "DENSE_MAX_BYTES",
    "direct_conv2d",
    "fft_size",
    "ImplicitFilter2d",
    "Hyena2d",
    "HyenaAttention",
]


def fft_size(n: int) -> int:
    """Smallest 2,3,5-smooth integer >= ``2n - 1``: the FFT length for a linear convolution of an
    ``n``-long signal with a centred ``2n-1``-long kernel (smooth sizes are fast in pocketfft/cuFFT)."""
    m = max(2 * n - 1, 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _check_conv_args(x: torch.Tensor, kernel: torch.Tensor) -> tuple[int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if kernel.dim() != 3 or kernel.shape != (C, 2 * H - 1, 2 * W - 1):
        raise ValueError(
            f"kernel must be (C, 2H-1, 2W-1) = ({C}, {2 * H - 1}, {2 * W - 1}) for x of shape "
            f"{tuple(x.shape)}, got {tuple(kernel.shape)}")
    return H, W


@torch.compiler.disable
def kernel_spectrum(kernel: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The rfft2 of centred kernels (C, 2H-1, 2W-1), laid out for :func:`fft_conv2d` on an H x W grid:
    complex (C, P, Q//2+1) with ``P, Q = fft_size(H), fft_size(W)``, in float32 (float64 stays)."""
    if kernel.dim() != 3 or kernel.shape[-2:] != (2 * H - 1, 2 * W - 1):
        raise ValueError(f"kernel must be (C, 2H-1, 2W-1) = (C, {2 * H - 1}, {2 * W - 1}) for an "
                         f"{H}x{W} grid, got {tuple(kernel.shape)}")
    P, Q = fft_size(H), fft_size(W)
    dt = torch.promote_types(kernel.dtype, torch.float32)
    with torch.autocast(device_type=kernel.device.type, enabled=False):
        k = F.pad(kernel.to(dt), (0, Q - (2 * W - 1), 0, P - (2 * H - 1)))
        k = torch.roll(k, shifts=(-(H - 1), -(W - 1)), dims=(-2, -1))
        return torch.fft.rfft2(k, s=(P, Q))


@torch.compiler.disable
def fft_conv2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' 2D convolution of ``x`` (B, C, H, W) with centred kernels ``kernel``
    (C, 2H-1, 2W-1) by FFT: ``y[c, i, j] = sum_{m, n} kernel[c, i-m+H-1, j-n+W-1] * x[c, m, n]``.
    ``kernel`` may also be its precomputed :func:`kernel_spectrum` (complex).

    Linear, not circular: both operands are zero-padded to ``P x Q = fft_size(H) x fft_size(W)``
    (>= 2H-1 x 2W-1), with the kernel rolled so that offset 0 sits at index 0 and negative offsets
    wrap to the end. Offsets between output and input positions lie in (-H, H), and with P >= 2H-1
    the negative ones land at indices >= P-H+1 >= H, never on a positive one, so nothing aliases and
    ``y`` is the top-left H x W block. (Padding only to H would be a circular convolution, which
    mixes the left and right borders of the image; the minimal linear size is chosen to keep the FFT
    small.) Computed in float32 (float64 stays float64) with autocast disabled (half-precision FFTs
    are unsupported on CPU and for non-power-of-two sizes on GPU); the result is returned in ``x``'s
    dtype. Kept out of ``torch.compile`` graphs (complex tensors), so a compiled model graph-breaks
    around it.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    P, Q = fft_size(H), fft_size(W)
    if kernel.is_complex():
        if kernel.shape != (C, P, Q // 2 + 1):
            raise ValueError(f"kernel spectrum must be (C, P, Q//2+1) = ({C}, {P}, {Q // 2 + 1}) for x "
                             f"of shape {tuple(x.shape)}, got {tuple(kernel.shape)}")
        kf = kernel
    else:
        _check_conv_args(x, kernel)
        kf = kernel_spectrum(kernel, H, W)
    dt = torch.promote_types(x.dtype, torch.float32)   # half/bf16 -> float32, float64 stays
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = torch.fft.rfft2(x.to(dt), s=(P, Q))
        y = torch.fft.irfft2(xf * kf, s=(P, Q))[..., :H, :W]
    return y.to(x.dtype)


LONG_CONV = ("auto", "fft", "dense")
DENSE_MAX_TOKENS = 256  # long_conv="auto": dense matrices up to 16x16 grids ...
DENSE_MAX_BYTES = 16 * 2**20  # ... and at most 16 MiB per order's matrices (C x (H*W)^2 float32)
FFT_CHUNKS = 4  # FFT long convolutions run a quarter of the channels at a time (bounds their scratch memory)


def conv_matrix(kernel: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The dense matrices (C, H*W, H*W) of the depthwise 'same' convolution of :func:`fft_conv2d` with
    centred kernels (C, 2H-1, 2W-1): ``y.flatten(-2)[c] = M[c] @ x.flatten(-2)[c]`` (row-major grid),
    ``M[c, (i, j), (m, n)] = kernel[c, i-m+H-1, j-n+W-1]``; float32 (float64 stays). A gather from the
    kernel, so gradients flow back to it."""
    if kernel.dim() != 3 or kernel.shape[-2:] != (2 * H - 1, 2 * W - 1):
        raise ValueError(f"kernel must be (C, 2H-1, 2W-1) = (C, {2 * H - 1}, {2 * W - 1}) for an "
                         f"{H}x{W} grid, got {tuple(kernel.shape)}")
    i, j = torch.arange(H, device=kernel.device), torch.arange(W, device=kernel.device)
    di = i[:, None] - i[None, :] + H - 1                                   # (out row, in row)
    dj = j[:, None] - j[None, :] + W - 1
    idx = (di[:, None, :, None] * (2 * W - 1) + dj[None, :, None, :]).reshape(-1)  # ((i, j), (m, n))
    dt = torch.promote_types(kernel.dtype, torch.float32)
    return kernel.to(dt).reshape(kernel.shape[0], -1)[:, idx].view(kernel.shape[0], H * W, H * W)


def dense_conv2d(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """:func:`fft_conv2d` through its dense matrices (:func:`conv_matrix`, (C, H*W, H*W)): one batched
    matmul over channels, in float32 (float64 stays) with autocast disabled, returned in ``x``'s dtype."""
    if x.dim() != 4 or matrix.shape != (x.shape[1], x.shape[2] * x.shape[3], x.shape[2] * x.shape[3]):
        raise ValueError(f"matrix must be (C, H*W, H*W) for x of shape {tuple(x.shape)}, got {tuple(matrix.shape)}")
    B, C, H, W = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = torch.bmm(x.to(dt).reshape(B, C, H * W).transpose(0, 1), matrix.to(dt).transpose(1, 2))  # (C, B, HW)
    return y.transpose(0, 1).reshape(B, C, H, W).to(x.dtype)


def long_conv2d(x: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """The long convolution of ``x`` (B, C, H, W) with ``op`` from :meth:`Hyena2d.filter_operators`: a
    kernel spectrum (complex, :func:`fft_conv2d`) or dense matrices (real (C, H*W, H*W), :func:`dense_conv2d`)."""
    return fft_conv2d(x, op) if op.is_complex() else dense_conv2d(x, op)


def direct_conv2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`fft_conv2d` without FFT: ``F.conv2d`` (a cross-correlation) with the
    flipped kernel and ``H-1, W-1`` zero padding. O(N^2) per channel; for tests only."""
    H, W = _check_conv_args(x, kernel)
    w = torch.flip(kernel, dims=(-2, -1)).unsqueeze(1).to(x.dtype)
    return F.conv2d(x, w, padding=(H - 1, W - 1), groups=x.shape[1])


class _Sin(nn.Module):
    """``sin(freq * x)`` with a learnable frequency per feature (the SIREN-style activation of Hyena)."""

    def __init__(self, dim: int, w: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.w = w
        self.freq = nn.Parameter(torch.full((dim,), float(w), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)

    def init_weights(self) -> None:
        nn.init.constant_(self.freq, self.w)


class ImplicitFilter2d(nn.Module):
    """Implicit long 2D filters: ``h_c(dy, dx) = MLP(pos(dy, dx))_c * exp(-a_c * r)``.

    ``pos`` are the offsets ``t = (dy, dx) / max(H, W)`` plus sines and cosines of ``pi * k * t`` for
    ``k = 1..bands``; the MLP has ``layers`` hidden layers of width ``hidden`` with sine activations;
    ``r = |t|`` and the decay rates ``a_c`` are spread over the channels so that the window falls to
    ``target`` at radius ``fast_decay`` for the first channel and ``slow_decay`` for the last
    (short- and long-range filters side by side). Returns centred kernels (channels, 2H-1, 2W-1).
    """

    def __init__(self, channels: int, hidden: int = 64, bands: int = 4, layers: int = 2,
                 w: float = 1.0, fast_decay: float = 0.3, slow_decay: float = 1.5,
                 target: float = 1e-2, device=None, dtype=None):
        super().__init__()
        if channels < 1 or hidden < 1 or bands < 0 or layers < 1:
            raise ValueError(f"invalid ImplicitFilter2d sizes: channels={channels}, hidden={hidden}, "
                             f"bands={bands}, layers={layers}")
        if not 0 < fast_decay <= slow_decay:
            raise ValueError(f"need 0 < fast_decay <= slow_decay, got {fast_decay}, {slow_decay}")
        dd = {"device": device, "dtype": dtype}
        self.channels, self.bands = channels, bands
        in_features = 2 + 4 * bands
        mods: list[nn.Module] = [nn.Linear(in_features, hidden, **dd), _Sin(hidden, w, **dd)]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden, **dd), _Sin(hidden, w, **dd)]
        mods.append(nn.Linear(hidden, channels, bias=False, **dd))
        self.mlp = nn.Sequential(*mods)
        rates = torch.linspace(math.log(1 / target) / fast_decay, math.log(1 / target) / slow_decay,
                               channels)
        self.register_buffer("decay_rates", rates.to(device=device), persistent=False)

    def init_weights(self) -> None:
        """PyTorch's default init for the MLP (called by timm's ViT init after its own Linear init,
        which would otherwise shrink the filter MLP to std 0.02)."""
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            elif isinstance(m, _Sin):
                m.init_weights()

    def positions(self, H: int, W: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positional features (2H-1, 2W-1, 2+4*bands) and radius (2H-1, 2W-1) of all offsets."""
        scale = float(max(H, W))
        ty = torch.arange(-(H - 1), H, device=device, dtype=torch.float32) / scale
        tx = torch.arange(-(W - 1), W, device=device, dtype=torch.float32) / scale
        ty, tx = torch.meshgrid(ty, tx, indexing="ij")
        feats = [ty, tx]
        for k in range(1, self.bands + 1):
            feats += [torch.sin(math.pi * k * ty), torch.cos(math.pi * k * ty),
                      torch.sin(math.pi * k * tx), torch.cos(math.pi * k * tx)]
        return torch.stack(feats, dim=-1), torch.sqrt(ty * ty + tx * tx)

    def features(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP's last hidden layer at every offset of an H x W grid, (offsets, hidden), and the
        offsets' radius (offsets,): what :meth:`kernels` turns into the filters of any channels."""
        if H < 1 or W < 1:
            raise ValueError(f"grid must be positive (H, W), got {(H, W)}")
        feats, r = self.positions(H, W, self.decay_rates.device)
        with torch.autocast(device_type=self.decay_rates.device.type, enabled=False):
            h = feats.reshape(-1, feats.shape[-1]).to(self.mlp[-1].weight.dtype)
            for layer in list(self.mlp)[:-1]:
                h = layer(h)
        return h, r.reshape(-1)

    def kernels(self, h: torch.Tensor, r: torch.Tensor, H: int, W: int,
                channels: Optional[slice] = None) -> torch.Tensor:
        """Centred kernels (channels, 2H-1, 2W-1) from :meth:`features`: the MLP's last layer and the
        decay window, for all channels or a ``slice`` of them (filters are independent per channel)."""
        sl = channels if channels is not None else slice(None)
        weight, rates = self.mlp[-1].weight[sl], self.decay_rates[sl]
        with torch.autocast(device_type=rates.device.type, enabled=False):
            # last layer and window channel-first: (C, offsets), no transpose of the big result
            k = torch.mm(weight, h.t()).float()
            window = torch.exp(-rates[:, None] * r[None, :])
            return (k * window).view(rates.shape[0], 2 * H - 1, 2 * W - 1)

    def forward(self, grid: Sequence[int]) -> torch.Tensor:
        H, W = int(grid[0]), int(grid[1])
        h, r = self.features(H, W)
        return self.kernels(h, r, H, W)


class Hyena2d(nn.Module):
    """The 2D Hyena operator on a channels-last grid: (B, H, W, dim) -> (B, H, W, dim).

    Optional ``prefix`` tokens (B, P, dim), e.g. a ViT's class/register tokens, are mixed as tokens
    outside the grid: they use the same projections and gates, only the centre tap of the short
    convolution, and in place of the long convolution the mean over the grid (a constant filter) plus
    their own skip term. So a class token reads the whole grid in every block, while grid tokens do
    not see prefix tokens (the long convolution is defined on the grid only).

    ``long_conv``: how the long convolutions run. ``"auto"`` (default): as dense matrices
    (:func:`dense_conv2d`) on grids of at most ``DENSE_MAX_TOKENS`` tokens whose matrices (dim x
    (H*W)^2 float32 per order, cached in inference and kept for backward in training) fit in
    ``DENSE_MAX_BYTES``, by FFT otherwise; ``"fft"`` or ``"dense"`` always. The results agree to
    float rounding.

    ``fft_chunks``: on FFT grids, how many chunks of channels run one after another (scratch memory is
    one chunk's). ``recompute`` (default): in training, the backward pass recomputes each chunk's
    filters and transforms instead of keeping them (less memory for one more pair of FFTs per order).

    The filters and their FFTs (or matrices) depend only on the weights and the grid size. With ``cache_filters``
    (default) and gradients disabled (``torch.no_grad``/``inference_mode``), they are kept per grid
    size and reused until a filter parameter changes (tracked by tensor versions), so inference at a
    fixed resolution does not regenerate them; training always regenerates them.
    """

    def __init__(self, dim: int, order: int = 2, filter_hidden: int = 64, filter_bands: int = 4,
                 filter_layers: int = 2, short_kernel: int = 3, bias: bool = True,
                 out_bias: bool = True, dropout: float = 0.0, out_dropout: float = 0.0,
                 cache_filters: bool = True, long_conv: str = "auto", fft_chunks: int = FFT_CHUNKS,
                 recompute: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        if long_conv not in LONG_CONV:
            raise ValueError(f"long_conv must be one of {LONG_CONV}, got {long_conv!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not isinstance(fft_chunks, int) or fft_chunks < 1:
            raise ValueError(f"fft_chunks must be an integer >= 1, got {fft_chunks!r}")
        if short_kernel < 1 or short_kernel % 2 == 0:
            raise ValueError(f"short_kernel must be odd and >= 1, got {short_kernel}")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.order = dim, order
        self.in_proj = nn.Linear(dim, (order + 1) * dim, bias=bias, **dd)
        self.short_conv = nn.Conv2d((order + 1) * dim, (order + 1) * dim, short_kernel,
                                    padding=short_kernel // 2, groups=(order + 1) * dim, bias=bias,
                                    **dd)
        self.filter = ImplicitFilter2d(order * dim, hidden=filter_hidden, bands=filter_bands,
                                       layers=filter_layers, **dd)
        self.skip = nn.Parameter(torch.randn(order, dim, **dd))   # D_n, as in the reference code
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(dim, dim, bias=out_bias, **dd)
        self.out_dropout = nn.Dropout(out_dropout)
        self.cache_filters = cache_filters
        self.long_conv = long_conv
        self.fft_chunks, self.recompute = fft_chunks, recompute
        self._filter_cache: dict = {}

    def _dense(self, H: int, W: int) -> bool:
        small = H * W <= DENSE_MAX_TOKENS and self.dim * (H * W) ** 2 * 4 <= DENSE_MAX_BYTES
        return self.long_conv == "dense" or (self.long_conv == "auto" and small)

    def _operators(self, H: int, W: int) -> list[torch.Tensor]:
        kernels = self.filter((H, W))
        ops = conv_matrix(kernels, H, W) if self._dense(H, W) else kernel_spectrum(kernels, H, W)
        return list(ops.split(self.dim, dim=0))

    @torch.compiler.disable
    def filter_operators(self, H: int, W: int) -> list[torch.Tensor]:
        """The ``order`` long-convolution operators for an H x W grid (for :func:`long_conv2d`): kernel
        spectra (each complex (dim, P, Q//2+1)), or dense matrices (each (dim, H*W, H*W)) on grids the
        ``long_conv`` setting runs densely; cached when gradients are disabled (see the class docstring)."""
        return self._cached((H, W), lambda: self._operators(H, W), [], (self._dense(H, W),))

    @torch.compiler.disable
    def skip_spectra(self, H: int, W: int) -> list[torch.Tensor]:
        """Per order, the kernel spectrum plus the skip ``D_n`` (the spectrum of ``h_n`` + ``D_n`` times a
        unit impulse): ``h_n (*) z + D_n z`` in one product. Built a chunk of channels at a time (as
        :meth:`chunk_spectrum`), cached like :meth:`filter_operators`."""
        def build():
            h, r = self.filter.features(H, W)
            return [torch.cat([self.chunk_spectrum(h, r, n, sl, H, W) for sl in self._chunks(self.dim)])
                    for n in range(self.order)]
        return self._cached((H, W, "skip"), build, [self.skip], ())

    def chunk_spectrum(self, h: torch.Tensor, r: torch.Tensor, n: int, sl: slice, H: int, W: int) -> torch.Tensor:
        """Order ``n``'s kernel spectrum plus skip for the channels ``sl``, from the filter MLP's hidden
        features ``h`` and radii ``r`` (:meth:`ImplicitFilter2d.features`): complex (channels, P, Q//2+1)."""
        C = self.dim
        kernel = self.filter.kernels(h, r, H, W, channels=slice(n * C + sl.start, n * C + sl.stop))
        return kernel_spectrum(kernel, H, W) + self.skip[n, sl, None, None]

    def _cached(self, key: tuple, build, extra: list, setting: tuple) -> list[torch.Tensor]:
        """``build()``, kept under ``key`` while gradients are disabled and neither a filter parameter,
        a tensor in ``extra`` nor ``setting`` changed; rebuilt on every call when gradients are enabled."""
        if not (self.cache_filters and not torch.is_grad_enabled()):
            return build()
        params = list(self.filter.parameters()) + extra
        state = tuple((p.data_ptr(), p._version, p.dtype) for p in params) + (self.filter.decay_rates.data_ptr(),
                                                                              *setting)
        hit = self._filter_cache.get(key)
        if hit is not None and hit[0] == state:
            return hit[1]
        ops = build()
        if len(self._filter_cache) >= 8:  # a handful of resolutions at most
            self._filter_cache.clear()
        self._filter_cache[key] = (state, ops)
        return ops

    def forward(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None):
        """Mix ``x`` (B, H, W, dim); returns the mixed grid, or ``(grid, prefix)`` when a prefix
        (B, P, dim) is given. Between the projections the grid is indexed (B, C, H, W) but stays in
        channels-last memory, so neither projection needs a layout copy."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, H, W, {self.dim}), got shape {tuple(x.shape)}")
        B, H, W, C = x.shape
        if prefix is not None and (prefix.dim() != 3 or prefix.shape[0] != B or prefix.shape[-1] != C):
            raise ValueError(f"prefix must be (B, P, {C}) with B={B}, got shape {tuple(prefix.shape)}")
        # (B, (N+1)C, H, W) in channels-last memory (where oneDNN's depthwise conv is fastest)
        v, *gates = self.short_conv(self.in_proj(x).permute(0, 3, 1, 2)).split(C, dim=1)
        v, means = self._recursion(v, gates, H, W, with_means=prefix is not None)
        y = self.out_dropout(self.out_proj(v.permute(0, 2, 3, 1)))
        if prefix is None:
            return y
        conv = self.short_conv
        up = self.in_proj(prefix) * conv.weight[:, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2]
        if conv.bias is not None:
            up = up + conv.bias
        vp, *gates_p = up.split(C, dim=-1)
        for n in range(self.order):  # prefix tokens read the grid mean of each order's input
            vp = self.dropout(gates_p[n] * (means[n].to(vp.dtype).unsqueeze(1) + vp * self.skip[n]))
        return y, self.out_dropout(self.out_proj(vp))

    def _recursion(self, v: torch.Tensor, gates: list, H: int, W: int, with_means: bool):
        """The order-N recursion ``v <- g_n * (h_n (*) v + D_n v)`` on the channels-first grid ``v``
        (B, C, H, W); returns ``v`` after the last gate and, with ``with_means``, each order's input
        averaged over the grid ((B, C) each, for prefix tokens)."""
        if self._dense(H, W):
            ops, means = self.filter_operators(H, W), []
            for n in range(self.order):
                if with_means:
                    means.append(v.mean(dim=(2, 3)))
                v = self.dropout(gates[n] * (dense_conv2d(v, ops[n]) + v * self.skip[n].view(1, -1, 1, 1)))
            return v, means
        if torch.is_grad_enabled() or (self.training and self.dropout.p > 0):
            return self._fft_recursion_autograd(v, gates, H, W, with_means)
        return self._fft_recursion_inference(v, gates, H, W, with_means)

    def _chunks(self, C: int) -> list[slice]:
        step = -(-C // self.fft_chunks)
        return [slice(c, min(C, c + step)) for c in range(0, C, step)]

    @torch.compiler.disable
    def _fft_recursion_inference(self, v, gates, H, W, with_means):
        """:meth:`_recursion` by FFT without autograd, a chunk of channels at a time (the convolutions
        are depthwise, so a chunk runs through every order on its own): one zero-padded buffer per
        chunk, transformed, multiplied in place by the spectrum with the skip folded in
        (:meth:`skip_spectra`), transformed back, and gated straight into the buffer for the next
        order. Scratch memory is that of one chunk; the grid mean is the transform's DC term."""
        B, C = v.shape[:2]
        P, Q = fft_size(H), fft_size(W)
        if self.cache_filters:
            spectra = self.skip_spectra(H, W)
            spectrum = lambda n, sl: spectra[n][sl]  # noqa: E731
        else:  # filters regenerated a chunk at a time: their memory is one chunk's too
            h, r = self.filter.features(H, W)
            spectrum = lambda n, sl: self.chunk_spectrum(h, r, n, sl, H, W)  # noqa: E731
        out = v.new_empty((B, H, W, C)).permute(0, 3, 1, 2)  # channels-last memory, for the output projection
        dt = torch.promote_types(v.dtype, torch.float32)  # FFTs in float32 (float64 stays)
        means = [v.new_empty((B, C), dtype=dt) for _ in range(self.order)] if with_means else []
        chunks = self._chunks(C)
        with torch.autocast(device_type=v.device.type, enabled=False):
            buf = v.new_zeros((B, chunks[0].stop, P, Q), dtype=dt)
            for sl in chunks:
                b = buf[:, : sl.stop - sl.start]
                b[..., :H, :W].copy_(v[:, sl])
                for n in range(self.order):
                    xf = torch.fft.rfft2(b)
                    if with_means:
                        means[n][:, sl] = xf[..., 0, 0].real / (H * W)
                    y = torch.fft.irfft2(xf.mul_(spectrum(n, sl)), s=(P, Q))[..., :H, :W]
                    torch.mul(y, gates[n][:, sl], out=b[..., :H, :W] if n < self.order - 1 else out[:, sl])
        return out, means

    @torch.compiler.disable
    def _fft_recursion_autograd(self, v, gates, H, W, with_means):
        """:meth:`_recursion` by FFT with autograd, a chunk of channels at a time, each chunk's filters
        generated from the filter MLP's shared hidden features (:meth:`ImplicitFilter2d.features`).
        With ``recompute`` (default) each chunk is checkpointed: the backward pass recomputes its
        spectra and transforms instead of keeping them, so memory holds one chunk's worth."""
        from torch.utils.checkpoint import checkpoint

        run = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if self.recompute else (lambda f, *a: f(*a))
        h, r = run(self.filter.features, H, W)
        parts = [run(self._fft_chunk, h, r, v[:, sl], *[g[:, sl] for g in gates], sl.start, H, W, with_means)
                 for sl in self._chunks(v.shape[1])]
        out = torch.cat([p[0] for p in parts], dim=1)
        return out, [torch.cat([p[1 + n] for p in parts], dim=1) for n in range(self.order)] if with_means else []

    def _fft_chunk(self, h, r, v, *rest):
        """The order-N recursion for the channels ``start:start+len`` of ``v``, filters included."""
        *gates, start, H, W, with_means = rest
        c, (P, Q) = v.shape[1], (fft_size(H), fft_size(W))
        means = []
        for n in range(self.order):
            spectrum = self.chunk_spectrum(h, r, n, slice(start, start + c), H, W)
            with torch.autocast(device_type=v.device.type, enabled=False):
                xf = torch.fft.rfft2(v.to(torch.promote_types(v.dtype, torch.float32)), s=(P, Q))
                if with_means:
                    means.append(xf[..., 0, 0].real / (H * W))
                z = torch.fft.irfft2(xf * spectrum, s=(P, Q))[..., :H, :W].to(v.dtype)
            v = self.dropout(gates[n] * z)
        return (v, *means)

    def forward_merged(self, t: torch.Tensor, layout: GridLayout, prefix: Optional[torch.Tensor] = None):
        """:meth:`forward` on merged grid tokens ``t`` (B, M, dim) laid out as ``layout`` (token
        merging): projections and gates per token; the short and the long convolutions spread the
        tokens over the grid, run there and average back into the merged groups
        (:meth:`visiontools.layers.grid.GridLayout.run`); prefix tokens read the grid mean (the size-weighted
        mean of the merged tokens). Returns (B, M, dim), or ``(tokens, prefix)`` with a prefix."""
        B, M, C = t.shape
        N, H, W = self.order, layout.H, layout.W
        conv = self.short_conv
        u = layout.run(lambda g: conv(g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), self.in_proj(t))
        v, *gates = u.split(C, dim=-1)
        ops = self.filter_operators(H, W)
        if prefix is not None:
            w = conv.weight[:, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2]
            up = self.in_proj(prefix) * w
            if conv.bias is not None:
                up = up + conv.bias
            vp, *gates_p = up.split(C, dim=-1)
            size = layout.size[:, layout.prefix:] if layout.size is not None else torch.ones_like(t[..., :1])
        for n in range(N):
            def long_conv(g, k=ops[n]):
                return long_conv2d(g.permute(0, 3, 1, 2), k).permute(0, 2, 3, 1)
            z = layout.run(long_conv, v) + v * self.skip[n]
            if prefix is not None:
                zp = ((v * size).sum(1) / size.sum(1)).unsqueeze(1) + vp * self.skip[n]
                vp = self.dropout(gates_p[n] * zp)
            v = self.dropout(gates[n] * z)
        y = self.out_dropout(self.out_proj(v))
        return y if prefix is None else (y, self.out_dropout(self.out_proj(vp)))


class HyenaAttention(GridTokens, nn.Module):
    """:class:`Hyena2d` behind the attention interface of a ViT block: (B, N, dim) -> (B, N, dim).

    The constructor takes the keyword arguments that timm's ``Block`` passes to ``attn_layer``;
    ``qkv_bias``/``proj_bias`` set the bias of the input/output projections, ``attn_drop``/``proj_drop``
    the dropout after each gate/after the output projection; ``num_heads``, ``qk_norm``,
    ``scale_norm`` and ``norm_layer`` have no meaning for Hyena and are ignored.

    Tokens are ``num_prefix_tokens`` prefix (class/register) tokens followed by a row-major grid. The
    grid shape is the per-call grid declared with :func:`set_call_grid` (the timm adapter does this
    for ``dynamic_img_size`` models), else ``grid_size`` when set and consistent with N, otherwise
    the grid must be square. With ``torch.compile`` on a model whose image size varies, pass
    ``dynamic=False`` (one graph per grid): torch 2.14's dynamic-shape path fails in the backward of
    timm's position-embedding resampling once the grid comes from the per-call context. With
    ``num_prefix_tokens=None`` the prefix count is inferred as the smallest P making N-P a perfect
    square. Prefix tokens are mixed as described in :class:`Hyena2d` (they read the grid mean).
    """

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = True, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, order: int = 2,
                 num_prefix_tokens: Optional[int] = None, grid_size: Optional[Sequence[int]] = None,
                 device=None, dtype=None, **hyena_kwargs):
        super().__init__()
        self.mixer = Hyena2d(dim, order=order, bias=qkv_bias, out_bias=proj_bias, dropout=attn_drop,
                             out_dropout=proj_drop, device=device, dtype=dtype, **hyena_kwargs)
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.grid_owner: Optional[GridKey] = None  # key of a per-call grid (see visiontools.layers.grid)

    @classmethod
    def bound(cls, **fixed):
        """``cls``, or a subclass of the same name that always passes ``fixed`` (e.g. ``order``) to the
        constructor (:func:`visiontools.layers.bound_class`)."""
        return bound_class(cls, **fixed)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("HyenaAttention supports neither attn_mask nor is_causal (its long "
                             "convolutions are non-causal and see the whole grid)")
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
        B, n, C = x.shape
        p, (H, W) = self.resolve_grid(n)
        grid = x[:, p:].reshape(B, H, W, C)
        if p == 0:
            return self.mixer(grid).reshape(B, H * W, C)
        y, yp = self.mixer(grid, prefix=x[:, :p])
        return torch.cat([yp, y.reshape(B, H * W, C)], dim=1)

    def forward_layout(self, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        """:meth:`forward` on tokens laid out as ``layout`` (merged by ToMe or not)."""
        if not layout.merged:
            return self.forward(x)
        p = layout.prefix
        if p == 0:
            return self.mixer.forward_merged(x, layout)
        y, yp = self.mixer.forward_merged(x[:, p:], layout, prefix=x[:, :p])
        return torch.cat([yp, y], dim=1)
