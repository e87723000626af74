"""Qwen-Image's VAE (diffusers' AutoencoderKLQwenImage) for single images, in plain PyTorch.

The model is a Wan 2.1 video VAE fine-tuned by the Qwen team: causal 3D convolutions, RMS norms over
channels, single-head attention in the mid blocks. For one frame (an image, T=1) diffusers' computation
reduces exactly to 2D operations, which is what this module runs:

- A causal 3D conv pads time with 2*p zero frames in front and none behind, and diffusers' first chunk
  has no cached frames (every `feat_cache` entry is still None), so the only output frame is
  sum_k w[:, :, k] * x[t=k-2p]: only the last temporal kernel slice meets the frame. Each conv here is
  the 2D conv of `weight[:, :, -1]` with the same spatial zero padding (kernels 3x3x3 and 1x1x1).
- `time_conv` of a temporal downsample ("downsample3d") only runs when a cached chunk exists; on the
  first chunk diffusers stores the features and skips it. `time_conv` of a temporal upsample
  ("upsample3d") is skipped on the first frame too (its cache entry becomes "Rep") and the frame is not
  doubled in time. So for an image both are their 2D counterparts, and `time_conv` weights are kept
  (checkpoint keys) but never used.
- RMS norm, attention and the spatial resamplers already work frame by frame in diffusers.

Weights keep their checkpoint shapes (5D for the causal convs, (C, 1, 1, 1) / (C, 1, 1) for the norm
gains), so `state_dict()` is diffusers' state dict key for key and shape for shape; the forward passes
slice the 2D kernel out (a view: no copy is stored).

Value conventions, as diffusers' encode/decode with the time axis squeezed: images are (N, C, H, W) in
[-1, 1]; latents are raw (unnormalized) latents (N, z_dim, H/8, W/8); `latent_spec` maps them to the
latents Qwen-Image's transformer sees. No I/O, no device policy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..config import ModelInfo
from ..errors import InputError
from ..plans import REFERENCE, Plan
from .kl import DiagonalGaussian, check_image_range
from .qwenimage_config import QwenImageConfig

# ------------------------------------------------------------------------------------------------ layers


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place on x (a fresh norm output) when no gradient is recorded: one allocation fewer."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class CausalConv3d(nn.Module):
    """A causal 3D convolution's checkpoint-shaped weights, (out, in, kt, kh, kw), applied to one frame:
    with causal (front-only) zero padding in time and no cached frames, only the last temporal kernel
    slice meets the frame, so the result is that slice's 2D convolution with the same spatial padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, *kernel))
        self.bias = nn.Parameter(torch.empty(out_ch))
        self.padding = kernel[1] // 2  # diffusers' spatial padding: 1 for 3x3x3 kernels, 0 for 1x1x1
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv3d's initialization (only seen by a model that is not loaded from weights)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.padding)  # weight view (out, in, kh, kw)


class RMSNorm(nn.Module):
    """x / ||x||_2 over channels at each position, times sqrt(C) and a per-channel gain (diffusers'
    QwenImageRMS_norm without bias, which the model never uses). fp16/bf16 inputs are normalized in fp32."""

    def __init__(self, dim: int, gain_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *gain_shape))  # (C, 1, 1, 1) or (C, 1, 1): the checkpoint's shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upcast = x.dtype in (torch.float16, torch.bfloat16) or "float8_" in str(x.dtype) or "float4_" in str(x.dtype)
        normalized = F.normalize(x.float() if upcast else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma.view(-1, 1, 1)  # gain (C, 1, 1) against (N, C, H, W)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv twice (dropout before the second conv) plus a (1x1-projected when channels change)
    shortcut."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_ch, (1, 1, 1))
        self.conv1 = CausalConv3d(in_ch, out_ch, (3, 3, 3))
        self.norm2 = RMSNorm(out_ch, (1, 1, 1))
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_ch, out_ch, (3, 3, 3))
        self.conv_shortcut = CausalConv3d(in_ch, out_ch, (1, 1, 1)) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, plan: Plan = REFERENCE) -> torch.Tensor:
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(self.dropout(_silu(self.norm2(h))))
        if torch.is_grad_enabled():
            return h + shortcut
        return h.add_(shortcut)  # h is this block's own tensor: reuse it for the sum


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of the frame, with a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, (1, 1))
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, plan: Plan = REFERENCE) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w)  # (N, 1, 3C, h*w): one head
        qkv = qkv.permute(0, 1, 3, 2).contiguous()  # (N, 1, h*w, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # each (N, 1, h*w, C)
        a = plan.attend(q, k, v).squeeze(1)  # (N, h*w, C)
        a = a.permute(0, 2, 1).reshape(n, c, h, w)  # (N, C, h, w)
        return self.proj(a) + x


class Resample(nn.Module):
    """Spatial x2 down- or upsampling. `resample` is diffusers' nn.Sequential (its index 1 is the conv);
    `time_conv` exists in temporal ("3d") modes only and is never used for a single frame."""

    def __init__(self, dim: int, up: bool, temporal: bool) -> None:
        super().__init__()
        if up:  # nearest x2 then a 3x3 conv that halves the channels
            # diffusers upsamples an fp32 copy (QwenImageUpsample); nearest copies values, so the native
            # dtype gives the same result. For a factor of 2 "nearest-exact" and "nearest" pick the same pixels.
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # pad right and bottom by one, then a stride-2 3x3 conv
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, 2 * dim if up else dim, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, plan: Plan = REFERENCE) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor, plan: Plan = REFERENCE) -> torch.Tensor:
        x = self.resnets[0](x, plan)
        x = self.attentions[0](x, plan)
        return self.resnets[1](x, plan)


class UpBlock(nn.Module):
    """num_res_blocks + 1 resnets, then an optional upsampler."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, dropout: float, upsample: bool, temporal: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Resample(out_ch, up=True, temporal=temporal)]) if upsample else None

    def forward(self, x: torch.Tensor, plan: Plan = REFERENCE) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, plan)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, plan)
        return x


def _run(module: nn.Module, x: torch.Tensor, checkpointing: bool, plan: Plan) -> torch.Tensor:
    """Run one block, recomputing its activations in backward when checkpointing (saves training memory)."""
    if checkpointing and torch.is_grad_enabled():
        return _checkpoint(module, x, plan, use_reentrant=False)
    return module(x, plan)


class Encoder(nn.Module):
    """Image (N, C, H, W) -> moments (N, 2*z_dim, H/f, W/f). `down_blocks` is one flat list, as diffusers':
    per level num_res_blocks resnets (each followed by attention at the levels in attn_scales), then a
    downsampler except after the last level."""

    def __init__(self, cfg: QwenImageConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.input_channels, dims[0], (3, 3, 3))
        blocks: list[nn.Module] = []
        scale = 1.0
        levels = len(cfg.dim_mult)
        for i in range(levels):
            ch_in, ch_out = dims[i], dims[i + 1]
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(ch_in, ch_out, cfg.dropout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(ch_out))
                ch_in = ch_out
            if i < levels - 1:
                blocks.append(Resample(ch_out, up=False, temporal=cfg.temperal_downsample[i]))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1], (1, 1, 1))
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, (3, 3, 3))

    def features(self, x: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        """The local part (convolutions and per-position RMS norms, attention only at attn_scales levels):
        image -> features at 1/f resolution; tiling runs it tile by tile."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = _run(block, x, checkpointing, plan)
        return x

    def head(self, x: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        """The global part at 1/f resolution (mid-block attention sees every position) -> moments."""
        x = _run(self.mid_block, x, checkpointing, plan)
        return self.conv_out(_silu(self.norm_out(x)))

    def forward(self, x: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        return self.head(self.features(x, checkpointing, plan), checkpointing, plan)


class Decoder(nn.Module):
    """Latent (N, z_dim, h, w) -> image (N, C, h*f, w*f). Each upsampler halves the channels, so every
    level after the first starts from half the previous level's width."""

    def __init__(self, cfg: QwenImageConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *reversed(mult))]
        temporal = tuple(reversed(cfg.temperal_downsample))  # diffusers' temperal_upsample
        levels = len(mult)
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3))
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(dims[i] // 2 if i > 0 else dims[i], dims[i + 1], cfg.num_res_blocks + 1, cfg.dropout,
                        upsample=i < levels - 1, temporal=i < levels - 1 and temporal[i])
                for i in range(levels)
            ]
        )
        self.norm_out = RMSNorm(dims[-1], (1, 1, 1))
        self.conv_out = CausalConv3d(dims[-1], cfg.input_channels, (3, 3, 3))

    def trunk(self, z: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        """The global part at latent resolution (mid-block attention sees every position)."""
        return _run(self.mid_block, self.conv_in(z), checkpointing, plan)

    def upsample(self, x: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        """The local part (convolutions and per-position RMS norms): trunk features -> image; tiled."""
        for block in self.up_blocks:
            x = _run(block, x, checkpointing, plan)
        return self.conv_out(_silu(self.norm_out(x)))

    def forward(self, z: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        return self.upsample(self.trunk(z, checkpointing, plan), checkpointing, plan)


class AutoencoderKLQwenImage(nn.Module):
    """Qwen-Image's VAE for single images; `state_dict()` keys and shapes are diffusers' AutoencoderKLQwenImage's.

    Same interface as vaecli's AutoencoderKL. `plan` is accepted for uniformity and decides one thing here:
    the attention call (`plan.attend`, SDPA on every device, diffusers' call). Layout, GroupNorm and
    upsampling choices of a plan do not apply (no GroupNorm; 5D weights cannot be channels-last), so
    every plan gives diffusers' sequence of operations.
    """

    def __init__(self, config: QwenImageConfig, info: ModelInfo | None = None) -> None:
        super().__init__()
        self.config = config
        self.info = info  # set by the loader: where the weights came from
        z = config.z_dim
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, (1, 1, 1))
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1))
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' precision (inputs are cast to it)."""
        return self.encoder.conv_in.weight.dtype

    def _prepare(self, x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
        """x as a float (N, channels, H, W) tensor in the weights' dtype, or an InputError saying why not."""
        if not x.is_floating_point():  # uint8 pixels, bool masks, ints, complex: never meaningful to convert
            raise InputError(f"expected a floating-point tensor, got {x.dtype} (images: float in [-1, 1])")
        if x.ndim != 4 or x.shape[1] != channels:
            hint = " (a video-shaped (N, C, 1, H, W) tensor: take [:, :, 0])" if x.ndim == 5 else ""
            raise InputError(f"expected {what} of shape (N, {channels}, H, W), got {tuple(x.shape)}{hint}")
        return x.to(dtype=self.dtype).contiguous()

    def encode_moments(self, x: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        """Image in [-1, 1] (N, C, H, W) -> posterior moments (N, 2*z_dim, H/8, W/8): mean then logvar."""
        x = self._prepare(x, self.config.input_channels, "images")
        return self.quant_conv(self.encoder(x, checkpointing, plan))

    def encode(
        self, x: torch.Tensor, checkpointing: bool = False, check_range: bool = True, plan: Plan = REFERENCE
    ) -> DiagonalGaussian:
        """Image in [-1, 1] (N, C, H, W) -> posterior over raw latents (N, z_dim, H/8, W/8).

        H and W should be multiples of 8; other sizes are computed as diffusers does (the stride-2 convs
        floor). Raises InputError for non-float input, a wrong shape, NaN/Inf, or values far outside
        [-1, 1] (e.g. [0, 255] pixels); `check_range=False` skips the value check (one device sync).
        checkpointing: recompute each block's activations in backward (training memory); values unchanged.
        plan: only its attention call applies (see the class docstring).
        """
        if check_range and x.is_floating_point():
            check_image_range(x)
        return DiagonalGaussian(self.encode_moments(x, checkpointing, plan))

    def decode(self, z: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        """Raw latents (N, z_dim, h, w) -> image (N, C, 8h, 8w), clamped to [-1, 1] as diffusers' decode does."""
        z = self._prepare(z, self.config.z_dim, "latents")
        x = self.decoder(self.post_quant_conv(z), checkpointing, plan)
        return x.clamp_(-1.0, 1.0) if not torch.is_grad_enabled() else x.clamp(-1.0, 1.0)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        checkpointing: bool = False,
        plan: Plan = REFERENCE,
    ) -> torch.Tensor:
        """Encode, take the posterior mode (or a sample), decode."""
        posterior = self.encode(x, checkpointing, plan=plan)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, checkpointing, plan)
