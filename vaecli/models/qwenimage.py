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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..config import LatentSpec, ModelInfo, is_int as _is_int, is_number as _is_number, latent_spec_problems
from ..errors import ConfigError, InputError
from .kl import DiagonalGaussian, check_image_range
from ..plans import REFERENCE, Plan

CLASS_NAME = "AutoencoderKLQwenImage"
# Qwen/Qwen-Image vae/config.json, equal to diffusers' defaults (and to Wan 2.1's AutoencoderKLWan).
QWEN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
QWEN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# Size bounds: far above the released model (96 channels x 4 at most, 4 levels, 16 latent channels), far
# below what would make building the model hang or exhaust memory.
MAX_LEVELS = 8
MAX_CHANNELS = 16384
_INT_RANGES: dict[str, tuple[int, int]] = {
    "base_dim": (2, 4096),  # 1 would give the decoder's upsamplers 1 // 2 = 0 output channels
    "z_dim": (1, 1024),
    "num_res_blocks": (1, 64),
    "input_channels": (1, 64),
}


@dataclass(frozen=True)
class QwenImageConfig:
    """Architecture and latent normalization of an AutoencoderKLQwenImage; names, meanings and defaults
    are diffusers' (which are the released Qwen-Image VAE's)."""

    base_dim: int = 96  # channels of the first level; level i has base_dim * dim_mult[i]
    z_dim: int = 16  # latent channels (the encoder writes 2 * z_dim: mean and logvar)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # one per resolution level; len-1 stride-2 steps
    num_res_blocks: int = 2  # resnets per encoder level (decoder levels have one more)
    # Encoder levels (scale 1, 1/2, 1/4, ...) with attention after each resnet. Encoder only, as diffusers'
    # (whose decoder ignores the field; the original Wan code adds decoder attention too). diffusers 0.42.1's
    # own encoder fails when a level is selected (it passes cache arguments its attention block does not take).
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # per downsample: also halve time (video only)
    dropout: float = 0.0  # inside the resnets, training only
    input_channels: int = 3  # image channels read by the encoder and written by the decoder
    latents_mean: tuple[float, ...] = QWEN_LATENTS_MEAN  # per latent channel, for latent_spec
    latents_std: tuple[float, ...] = QWEN_LATENTS_STD

    def __post_init__(self) -> None:
        problems = _field_problems(self)
        if not problems:  # the cross-field checks assume well-typed fields
            problems = _consistency_problems(self)
        if problems:
            raise ConfigError("invalid Qwen-Image VAE config: " + "; ".join(problems))

    class_name = CLASS_NAME  # diffusers' _class_name
    family = "qwenimage"
    # diffusers' config has no force_upcast and the Qwen-Image pipelines never upcast this VAE: they cast
    # latents to vae.dtype (bf16 in their examples); ComfyUI lists bf16, fp16 and fp32 as working dtypes
    # of this (Wan 2.1) VAE. fp16 therefore runs in fp16; the RMS norms normalize an fp32 copy of fp16 /
    # bf16 activations (as diffusers), the convolutions and attention run in fp16. Overflow to Inf/NaN is
    # left to the caller's non-finite retry (pipeline.precision_ladder), not assumed up front.
    force_upcast = False

    @property
    def in_channels(self) -> int:
        return self.input_channels

    @property
    def out_channels(self) -> int:
        return self.input_channels

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    channels_last = False  # its 5D checkpoint-shaped conv weights have no channels-last layout (plans.py)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """Widths per level (base_dim * dim_mult), for plans and memory estimates."""
        return tuple(self.base_dim * m for m in self.dim_mult)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.block_out_channels

    @property
    def size_multiple(self) -> int:
        return self.downsample_factor

    def architecture(self) -> str:
        """The shape of the network in one line (vaecli info)."""
        return (f"base_dim {self.base_dim} x dim_mult {list(self.dim_mult)}, num_res_blocks {self.num_res_blocks}, "
                f"attn_scales {list(self.attn_scales)}, z_dim {self.z_dim}, f={self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one side (diffusers' spatial_compression_ratio)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_spec(self) -> LatentSpec:
        """What Qwen-Image's pipelines do to these latents (pipelines/qwenimage/pipeline_qwenimage_img2img.py
        prepare_latents: (z - mean) * (1 / std); pipeline_qwenimage.py before decoding: z / (1 / std) + mean):
        per-channel (z - mean) / std, no scaling factor. (Ours divides by std; theirs multiplies by its
        reciprocal: the two differ by at most one rounding.)"""
        return LatentSpec(1.0, None, self.latents_mean, self.latents_std)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QwenImageConfig":
        """From a diffusers config.json dict. Diffusers' bookkeeping keys (a leading underscore) are ignored;
        another `_class_name` or an unknown field (e.g. AutoencoderKLWan's is_residual, patch_size) raises,
        since it would describe another architecture."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"invalid Qwen-Image VAE config: expected an object, not {type(data).__name__}")
        name = data.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ConfigError(f"invalid Qwen-Image VAE config: _class_name is {name!r}, not {CLASS_NAME!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if not str(k).startswith("_") and k not in known)
        if unknown:
            raise ConfigError(f"invalid Qwen-Image VAE config: unknown fields {', '.join(map(str, unknown))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers config dict (loadable by diffusers' AutoencoderKLQwenImage)."""
        data: dict[str, Any] = {"_class_name": CLASS_NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def replace(self, **changes: Any) -> "QwenImageConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)




def _field_problems(cfg: QwenImageConfig) -> list[str]:
    """Type and range of every field, each on its own (JSON from a file can hold anything)."""
    problems = []
    for name, (low, high) in _INT_RANGES.items():
        value = getattr(cfg, name)
        if not _is_int(value) or not low <= value <= high:
            problems.append(f"{name} must be an integer in [{low}, {high}], not {value!r}")
    mult = cfg.dim_mult
    if not isinstance(mult, tuple) or not 1 <= len(mult) <= MAX_LEVELS or not all(_is_int(m) and m >= 1 for m in mult):
        problems.append(f"dim_mult must be a list of 1 to {MAX_LEVELS} positive integers, not {mult!r}")
    scales = cfg.attn_scales
    if not isinstance(scales, tuple) or not all(_is_number(s) and 0 < s <= 1 for s in scales):
        problems.append(f"attn_scales must be a list of numbers in (0, 1] (1, 0.5, 0.25, ...), not {scales!r}")
    temporal = cfg.temperal_downsample
    if not isinstance(temporal, tuple) or not all(isinstance(t, bool) for t in temporal):
        problems.append(f"temperal_downsample must be a list of true/false, not {temporal!r}")
    if not _is_number(cfg.dropout) or not 0 <= cfg.dropout < 1:
        problems.append(f"dropout must be a number in [0, 1), not {cfg.dropout!r}")
    for name in ("latents_mean", "latents_std"):
        if getattr(cfg, name) is None:
            problems.append(f"{name} must be a list of {cfg.z_dim!r} numbers, not None")
    if not problems:
        problems += latent_spec_problems(1.0, None, cfg.latents_mean, cfg.latents_std)
    return problems


def _consistency_problems(cfg: QwenImageConfig) -> list[str]:
    problems = []
    widest = cfg.base_dim * max(cfg.dim_mult)
    if widest > MAX_CHANNELS:
        problems.append(f"base_dim * max(dim_mult) = {widest} channels exceeds {MAX_CHANNELS}")
    if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
        problems.append(
            f"temperal_downsample has {len(cfg.temperal_downsample)} entries; {len(cfg.dim_mult)} levels "
            f"need {len(cfg.dim_mult) - 1} (one per downsample)"
        )
    for name in ("latents_mean", "latents_std"):
        n = len(getattr(cfg, name))
        if n != cfg.z_dim:
            problems.append(f"{name} has {n} values for z_dim {cfg.z_dim}")
    return problems


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
