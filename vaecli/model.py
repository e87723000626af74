"""AutoencoderKL in plain PyTorch. Attribute paths are diffusers' checkpoint keys; no I/O, no device policy.

Value conventions: images are (N, in_channels, H, W) in [-1, 1]; latents are raw (unnormalized) VAE latents.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .config import ModelInfo, VAEConfig
from .errors import InputError

_ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "gelu": F.gelu,
    "relu": F.relu,
}
_IN_PLACE = {"silu", "swish", "mish", "relu"}  # activations torch can apply in place


def _activate(name: str, x: torch.Tensor) -> torch.Tensor:
    """act(x), in place on x (a fresh GroupNorm output) when no gradient is recorded: one allocation
    fewer per layer, which on CPUs also saves the page faults of touching new memory."""
    if name in _IN_PLACE and not torch.is_grad_enabled():
        return _ACTIVATIONS[name](x, inplace=True)
    return _ACTIVATIONS[name](x)
_REDUCED = (torch.float16, torch.bfloat16)


class NormStats(Protocol):
    """Supplies GroupNorm statistics from outside a tensor (tiling: statistics of the whole image)."""

    def normalize(self, norm: "GroupNorm", x: torch.Tensor) -> torch.Tensor: ...


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are always computed in fp32 (fp16 sums overflow on large activations).

    With `stats`, the statistics come from that object instead of from `x` (see tiling.py).
    """

    def forward(self, x: torch.Tensor, stats: NormStats | None = None) -> torch.Tensor:
        if stats is not None:
            return stats.normalize(self, x)
        if x.dtype in _REDUCED:
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ResnetBlock(nn.Module):
    """norm-act-conv twice plus a (1x1-projected when channels change) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, act: str) -> None:
        super().__init__()
        self.act = act
        self.norm1 = GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, stats: NormStats | None = None) -> torch.Tensor:
        h = self.conv1(_activate(self.act, self.norm1(x, stats)))
        h = self.conv2(_activate(self.act, self.norm2(h, stats)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        if torch.is_grad_enabled():
            return x + h
        return h.add_(x)  # h is this block's own tensor: reuse it for the sum


class Attention(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.group_norm = GroupNorm(groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, h*w, C)
        q = self.to_q(t).unsqueeze(1)  # (N, 1, h*w, C): one head
        k = self.to_k(t).unsqueeze(1)
        v = self.to_v(t).unsqueeze(1)
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, h*w, C)
        a = self.to_out[0](a).transpose(1, 2).reshape(n, c, h, w)  # (N, C, h, w), an NHWC-strided view
        # Sum in this order so the result keeps the view's NHWC strides, as diffusers' does: GroupNorm's
        # reduction order depends on the layout, and we want bit-identical outputs.
        return a + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (the LDM convention)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Layers at least this wide take the faster formulations (sub-pixel upsampling here, NHWC layout on CPUs
# in the loader), whose sums round differently from diffusers' by about 1e-6 relative. Narrower models,
# where the gain is small, keep diffusers' exact sequence of operations and match it bit for bit.
WIDE_CHANNELS = 256


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv; wide layers compute it without the upsampled tensor.

    After nearest x2, each output phase (row parity a, column parity b) sees only a 2x2 neighbourhood of
    the input, with the 3x3 weights summed over the taps that land on the same input pixel. One 2x2 conv
    producing the four phases therefore gives the same result with 4/9 of the multiply-adds and without
    the 4x larger intermediate tensor; only the rounding of the sums differs (about 1e-6 relative).
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.subpixel = ch >= WIDE_CHANNELS  # architecture-derived, not a runtime switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.subpixel:
            if x.numel() * 4 > 2**31:
                x = x.contiguous()  # the channels_last nearest kernel fails past 2**31 output elements
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        n, _, h, w = x.shape
        weight, bias = _phase_weights(self.conv.weight), self.conv.bias
        cout = self.conv.out_channels
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias.repeat(4) if bias is not None else None)  # (N, 4*Co, h+1, w+1)
        y = y.view(n, 2, 2, cout, h + 1, w + 1)  # (N, a, b, Co, h+1, w+1)
        out = torch.empty((n, cout, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=layout_of(x))
        grid = out.view(n, cout, h, 2, w, 2)  # (N, Co, i, a, j, b): out[.., 2i+a, 2j+b]
        for a in (0, 1):
            for b in (0, 1):
                grid[:, :, :, a, :, b] = y[:, a, b, :, a : a + h, b : b + w]
        return out


def _phase_weights(w: torch.Tensor) -> torch.Tensor:
    """(Co, Ci, 3, 3) conv weights -> (4*Co, Ci, 2, 2): one 2x2 kernel per output phase (a, b).

    Along one axis, phase 0 reads input offsets (-1, 0) with taps (w0, w1 + w2); phase 1 reads (0, +1) with
    taps (w0 + w1, w2). On the 1-padded input these are windows starting at a and b.
    """
    rows = torch.stack([torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
                        torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)])  # (a, Co, Ci, 2, 3)
    k = torch.stack([torch.stack([rows[..., 0], rows[..., 1] + rows[..., 2]], -1),
                     torch.stack([rows[..., 0] + rows[..., 1], rows[..., 2]], -1)], 1)  # (a, b, Co, Ci, 2, 2)
    return k.reshape(4 * w.shape[0], w.shape[1], 2, 2).contiguous(memory_format=layout_of(w))


def layout_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last when t is stored NHWC (and not also NCHW-contiguous), else contiguous_format."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, act: str, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor, stats: NormStats | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, stats)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, act: str, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor, stats: NormStats | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, stats)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet, optional self-attention, resnet at the lowest resolution."""

    def __init__(self, ch: int, groups: int, act: str, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups, act), ResnetBlock(ch, ch, groups, act)])
        self.attentions = nn.ModuleList([Attention(ch, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _run(module: nn.Module, x: torch.Tensor, checkpointing: bool, *args: object) -> torch.Tensor:
    """Run one stage, recomputing its activations in backward when checkpointing (saves training memory)."""
    if checkpointing and torch.is_grad_enabled():
        return _checkpoint(module, x, *args, use_reentrant=False)
    return module(x, *args)


class Encoder(nn.Module):
    """Image (N, in, H, W) -> moments (N, 2*latent, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs, g, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g, act, downsample=i < len(chs) - 1)
                for i in range(len(chs))
            ]
        )
        self.mid_block = MidBlock(chs[-1], g, act, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def features(
        self, x: torch.Tensor, checkpointing: bool = False, stats: NormStats | None = None
    ) -> torch.Tensor:
        """The local part (convolutions only, tileable): image -> (N, C_last, H/f, W/f) features."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = _run(block, x, checkpointing, stats)
        return x

    def head(self, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        """The global part (mid-block attention sees every position): features -> moments."""
        x = _run(self.mid_block, x, checkpointing)
        return self.conv_out(_activate("silu", self.conv_norm_out(x)))  # SiLU whatever act_fn says, as diffusers

    def forward(self, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        return self.head(self.features(x, checkpointing), checkpointing)


class Decoder(nn.Module):
    """Latent (N, latent, h, w) -> image (N, out, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs, g, act = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.act_fn
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g, act, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block + 1, g, act, upsample=i < len(chs) - 1)
                for i in range(len(chs))
            ]
        )
        self.conv_norm_out = GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def trunk(self, z: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        """The global part at latent resolution (mid-block attention sees every position)."""
        return _run(self.mid_block, self.conv_in(z), checkpointing)

    def upsample(
        self, x: torch.Tensor, checkpointing: bool = False, stats: NormStats | None = None
    ) -> torch.Tensor:
        """The local part (convolutions only, tileable): trunk features -> image."""
        for block in self.up_blocks:
            x = _run(block, x, checkpointing, stats)
        x = self.conv_norm_out(x, stats)
        return self.conv_out(_activate("silu", x))  # SiLU whatever act_fn says, as diffusers

    def forward(self, z: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        return self.upsample(self.trunk(z, checkpointing), checkpointing)


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.moments = moments  # (N, 2C, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)  # each (N, C, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; noise is drawn on the generator's device, as diffusers does, for reproducibility."""
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL divergence to N(0, 1) (or to `other`), summed over (C, h, w): shape (N,)."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims)
        )


# Inputs beyond this are not [-1, 1] images (resampling overshoot stays far below it): [0, 255] pixels,
# or unnormalized data, which the model would turn into plausible-looking garbage without an error.
IMAGE_RANGE_LIMIT = 1.5


def _check_image_range(x: torch.Tensor) -> None:
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputError("the image tensor holds NaN or Inf values")
    if low < -IMAGE_RANGE_LIMIT or high > IMAGE_RANGE_LIMIT:
        hint = " ([0, 255] pixels: use x / 127.5 - 1)" if high > 2.0 else ""
        raise InputError(f"images must be in [-1, 1], these range over [{low:g}, {high:g}]{hint}")


class AutoencoderKL(nn.Module):
    """The KL autoencoder of latent diffusion; `state_dict()` keys are diffusers' keys."""

    def __init__(self, config: VAEConfig, info: ModelInfo | None = None) -> None:
        super().__init__()
        self.config = config
        self.info = info  # set by the loader: where the weights came from
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' precision (inputs are cast to it)."""
        return self.encoder.conv_in.weight.dtype

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Match the input's dtype and memory layout to the weights (channels_last weights want NHWC input)."""
        if not x.is_floating_point():  # uint8 pixels, bool masks, ints, complex: never meaningful to convert
            raise InputError(f"expected a floating-point tensor, got {x.dtype} (images: float in [-1, 1])")
        w = self.encoder.conv_in.weight
        x = x.to(dtype=w.dtype)
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode_moments(self, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        """Image in [-1, 1] (N, in, H, W) -> posterior moments (N, 2*latent, H/f, W/f)."""
        m = self.encoder(self._prepare(x), checkpointing)
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        return m

    def encode(self, x: torch.Tensor, checkpointing: bool = False, check_range: bool = True) -> DiagonalGaussian:
        """Image in [-1, 1] (N, in, H, W) -> posterior over raw latents (N, latent, H/f, W/f).

        H and W should be multiples of the downsample factor (8 for every released VAE); other sizes are
        computed like diffusers does (the stride-2 convs floor), which loses the last rows and columns.
        Raises InputError for non-float input, NaN/Inf, or values far outside [-1, 1] (e.g. [0, 255]
        pixels); `check_range=False` skips the value check (it costs one device sync per call).
        """
        if check_range and x.is_floating_point():
            _check_image_range(x)
        return DiagonalGaussian(self.encode_moments(x, checkpointing))

    def decode(self, z: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        """Raw latents (N, latent, h, w) -> image (N, out, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        z = self._prepare(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, checkpointing)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        checkpointing: bool = False,
    ) -> torch.Tensor:
        """Encode, take the posterior mode (or a sample), decode."""
        posterior = self.encode(x, checkpointing)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, checkpointing)
