"""AutoencoderTiny (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2) in plain PyTorch; attribute paths are diffusers' keys.

A tiny autoencoder is two plain stacks of 3x3 convolutions and ReLU residual blocks (madebyollin/taesd),
distilled from a full VAE: no normalization (except TAEF2's mid-level branch), no attention, no posterior
variance. `encoder.layers.N` and `decoder.layers.N` index the same nn.Sequential positions as diffusers'
EncoderTiny / DecoderTiny, parameterless layers (activations, upsampling) included, so the state dict keys
are diffusers' keys.

Value conventions, as diffusers' AutoencoderTiny.encode/decode: images are (N, C, H, W) in [-1, 1] (the
model rescales to TAESD's [0, 1] inside); latents are the model's own latents, which are already the
*diffusion* latents of the full VAE it imitates (see TinyConfig.latent_spec). No I/O, no device policy.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..config import ModelInfo
from ..errors import InputError
from ..plans import REFERENCE, Plan, activate
from .kl import check_image_range
from .tiny_config import TinyConfig

# The logvar half of `encode_moments`. A tiny encoder has no variance; -30.0 is the floor of our
# DiagonalGaussian's clamp (models/kl.py: logvar.clamp(-30, 20)), so moments read back by it stay exactly
# as written (std exp(-15) ~ 3e-7: a sample differs from the mean by ~1e-7, below bf16 resolution at any
# latent value above ~1e-5), while -inf would turn std * noise into 0 * inf = NaN for a zero noise draw
# and KL terms into inf. It is finite in fp16 and bf16, so the moments survive a half-precision file.
DETERMINISTIC_LOGVAR = -30.0


# ------------------------------------------------------------------------------------------------- layers


def _conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Activation(nn.Module):
    """A named activation; holds no weights, and occupies its diffusers index so later keys line up."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name.lower()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activate(self.name, x)  # in place on x when no gradient is recorded: x is a fresh conv output


class Upsample(nn.Module):
    """nn.Upsample's computation: F.interpolate by an integer factor; no weights, one diffusers index."""

    def __init__(self, factor: int, mode: str) -> None:
        super().__init__()
        self.factor = float(factor)  # as nn.Upsample stores it
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode=self.mode)

    @property
    def is_nearest_x2(self) -> bool:
        """Whether this layer and the 3x3 conv after it are the plan's upsample_conv (kernels/upsample_conv.py)."""
        return self.mode == "nearest" and self.factor == 2.0


class Block(nn.Module):
    """relu(conv-act-conv-act-conv(x) + x), diffusers' AutoencoderTinyBlock; with `pool` (TAEF2), x first
    gains a GroupNorm'd 1x1 branch (taesd.py's use_midblock_gn)."""

    def __init__(self, ch: int, act: str, pool: bool) -> None:
        super().__init__()
        # Every AutoencoderTiny block maps ch -> ch, so diffusers' `skip` is always an Identity (no weights).
        self.conv = nn.Sequential(
            _conv3x3(ch, ch), Activation(act), _conv3x3(ch, ch), Activation(act), _conv3x3(ch, ch)
        )
        self.pool = (
            nn.Sequential(nn.Conv2d(ch, 4 * ch, 1, bias=False), nn.GroupNorm(4, 4 * ch), Activation("relu"),
                          nn.Conv2d(4 * ch, ch, 1, bias=False))
            if pool else None
        )

    def forward(self, x: torch.Tensor, plan: Plan = REFERENCE) -> torch.Tensor:
        if self.pool is not None:
            widen, norm, _, narrow = self.pool
            x = x + narrow(plan.norm_act(cast(nn.GroupNorm, norm), widen(x), "relu"))  # pool.1: see __init__
        h = self.conv(x)
        if torch.is_grad_enabled():
            return F.relu(h + x)
        return F.relu(h.add_(x), inplace=True)  # h is this block's own tensor: reuse it for the sum


def _run_block(block: Block, x: torch.Tensor, checkpointing: bool, plan: Plan) -> torch.Tensor:
    """One block, its activations recomputed in backward when checkpointing (saves training memory)."""
    if checkpointing and torch.is_grad_enabled():
        return _checkpoint(block, x, plan, use_reentrant=False)
    return block(x, plan)


class EncoderTiny(nn.Module):
    """Image (N, in, H, W) in [-1, 1] -> latents (N, latent, H/f, W/f)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        chs, levels = cfg.encoder_block_out_channels, len(cfg.encoder_block_out_channels)
        layers: list[nn.Module] = []
        for i, (ch, blocks) in enumerate(zip(chs, cfg.num_encoder_blocks, strict=False)):
            # the first level keeps full resolution; each later one starts with a bias-free stride-2 conv
            layers.append(_conv3x3(cfg.in_channels, ch) if i == 0 else _conv3x3(ch, ch, stride=2, bias=False))
            layers += [Block(ch, cfg.act_fn, pool=cfg.midblock_gn and i == levels - 1) for _ in range(blocks)]
        layers.append(_conv3x3(chs[-1], cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        # [-1, 1] -> [0, 1], TAESD's image range. diffusers skips this when gradient checkpointing (its
        # checkpointed branch calls the layers on x as given); we rescale always: checkpointing only saves memory.
        x = x.add(1).div(2)
        for layer in self.layers:
            x = _run_block(layer, x, checkpointing, plan) if isinstance(layer, Block) else layer(x)
        return x


class DecoderTiny(nn.Module):
    """Latents (N, latent, h, w) -> image (N, out, h*f, w*f), nominally in [-1, 1] (not clamped)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        chs, levels = cfg.decoder_block_out_channels, len(cfg.decoder_block_out_channels)
        layers: list[nn.Module] = [_conv3x3(cfg.latent_channels, chs[0]), Activation(cfg.act_fn)]
        for i, (ch, blocks) in enumerate(zip(chs, cfg.num_decoder_blocks, strict=False)):
            last = i == levels - 1
            layers += [Block(ch, cfg.act_fn, pool=cfg.midblock_gn and i == 0) for _ in range(blocks)]
            if not last:
                layers.append(Upsample(cfg.upsampling_scaling_factor, cfg.upsample_fn))
            # between levels a bias-free conv after the upsampling; the last level's conv writes the image
            layers.append(_conv3x3(ch, cfg.out_channels if last else ch, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        x = torch.tanh(z / 3) * 3  # soft clamp to (-3, 3), TAESD's latent range
        layers = list(self.layers)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, Upsample) and layer.is_nearest_x2:
                conv = cast(nn.Conv2d, layers[i + 1])  # every Upsample is followed by a conv (__init__)
                x = plan.upsample_conv(conv, x)  # the upsampling and the conv after it, in the plan's form
                i += 2
                continue
            x = _run_block(layer, x, checkpointing, plan) if isinstance(layer, Block) else layer(x)
            i += 1
        return x.mul(2).sub(1)  # [0, 1] -> [-1, 1], diffusers' image range


# -------------------------------------------------------------------------------------------------- model


class TinyPosterior:
    """The encoder's output as a point mass: the interface of DiagonalGaussian, with sample() == mode()."""

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean  # (N, C, h, w)

    @property
    def moments(self) -> torch.Tensor:
        """(N, 2C, h, w): the mean, then DETERMINISTIC_LOGVAR (what encode_moments returns)."""
        return torch.cat([self.mean, torch.full_like(self.mean, DETERMINISTIC_LOGVAR)], dim=1)

    @property
    def logvar(self) -> torch.Tensor:
        """DETERMINISTIC_LOGVAR everywhere, as in the moments (std and var are exactly 0 here)."""
        return torch.full_like(self.mean, DETERMINISTIC_LOGVAR)

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    @property
    def var(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The mean itself; `generator` is accepted for DiagonalGaussian's signature and never drawn from."""
        return self.mean




class AutoencoderTiny(nn.Module):
    """A tiny distilled autoencoder; `state_dict()` keys are diffusers' keys.

    Shares AutoencoderKL's interface (encode_moments / encode / decode / forward, each taking
    `checkpointing` and `plan`). The plan decides the activations' memory layout (plan.layout), how the
    TAEF2 branch's GroupNorm runs (plan.norm_act) and the form of each nearest x2 upsampling + conv pair
    (plan.upsample_conv); the default, REFERENCE, is diffusers' own sequence of operations. Nothing here is
    global, so tiling needs no statistics plan (TAEF2's GroupNorm branch is the one non-local layer).
    """

    def __init__(self, config: TinyConfig, info: ModelInfo | None = None) -> None:
        super().__init__()
        self.config = config
        self.info = info  # set by the loader: where the weights came from
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self._first_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' precision (inputs are cast to it)."""
        return self._first_conv.weight.dtype

    @property
    def _first_conv(self) -> nn.Conv2d:
        """The decoder's first layer, a conv (DecoderTiny.__init__): where device and dtype are read."""
        return cast(nn.Conv2d, self.decoder.layers[0])

    def _prepare(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The input in the weights' dtype and the plan's memory layout."""
        if not x.is_floating_point():  # uint8 pixels, bool masks, ints, complex: never meaningful to convert
            raise InputError(f"expected a floating-point tensor, got {x.dtype} (images: float in [-1, 1])")
        return x.to(dtype=self.dtype).contiguous(memory_format=plan.layout)

    def encode(
        self, x: torch.Tensor, checkpointing: bool = False, check_range: bool = True, plan: Plan = REFERENCE
    ) -> TinyPosterior:
        """Image in [-1, 1] (N, in, H, W) -> latents (N, latent, H/f, W/f) as a point-mass posterior;
        `.mode()` is diffusers' `encode(x).latents`.

        H and W should be multiples of the downsample factor; other sizes are computed as diffusers does
        (the stride-2 convs round up). Raises InputError for non-float input, NaN/Inf or values far outside
        [-1, 1]; `check_range=False` skips the value check (one device sync per call).
        """
        if check_range and x.is_floating_point():
            check_image_range(x)
        return TinyPosterior(self.encoder(self._prepare(x, plan), checkpointing, plan))

    def encode_moments(self, x: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        """Image in [-1, 1] (N, in, H, W) -> (N, 2*latent, H/f, W/f): the latents, then DETERMINISTIC_LOGVAR
        (AutoencoderKL's moment layout, so callers of either model read mean and logvar alike)."""
        return TinyPosterior(self.encoder(self._prepare(x, plan), checkpointing, plan)).moments

    def decode(self, z: torch.Tensor, checkpointing: bool = False, plan: Plan = REFERENCE) -> torch.Tensor:
        """Latents (N, latent, h, w) -> image (N, out, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        return self.decoder(self._prepare(z, plan), checkpointing, plan)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> [0, 1] (clamped), TAESD's 8-bit latent image convention."""
        return z.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, u: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> latents (scale_latents' inverse inside the clamp)."""
        return u.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        checkpointing: bool = False,
        plan: Plan = REFERENCE,
        quantize_latents: bool = False,
    ) -> torch.Tensor:
        """Encode then decode (sample_posterior and generator change nothing: the posterior is a point).
        quantize_latents: round the latents through 8 bits on the way (scale_latents, x255, round,
        unscale_latents), which is what diffusers' AutoencoderTiny.forward does."""
        z = self.encode(x, checkpointing, plan=plan).mode()
        if quantize_latents:
            z = self.unscale_latents(self.scale_latents(z).mul(255).round().div(255.0))
        return self.decode(z, checkpointing, plan)
