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

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..config import LatentSpec, ModelInfo, is_int as _is_int, is_number as _is_number, latent_spec_problems
from ..errors import ConfigError, InputError
from ..plans import REFERENCE, Plan, activate
from .kl import check_image_range

CLASS_NAME = "AutoencoderTiny"
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")  # diffusers' get_activation, which lower-cases the name
# nn.Upsample modes that take the decoder's 4-D tensors ("linear" and "trilinear" need 3-D and 5-D input).
UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
# The logvar half of `encode_moments`. A tiny encoder has no variance; -30.0 is the floor of our
# DiagonalGaussian's clamp (models/kl.py: logvar.clamp(-30, 20)), so moments read back by it stay exactly
# as written (std exp(-15) ~ 3e-7: a sample differs from the mean by ~1e-7, below bf16 resolution at any
# latent value above ~1e-5), while -inf would turn std * noise into 0 * inf = NaN for a zero noise draw
# and KL terms into inf. It is finite in fp16 and bf16, so the moments survive a half-precision file.
DETERMINISTIC_LOGVAR = -30.0
# Size bounds: far above every released tiny VAE (64 channels, 4 levels, 32 latent channels), far below
# what would make building the model hang or exhaust memory.
MAX_LEVELS = 8
MAX_CHANNELS = 16384
MAX_BLOCKS = 64
_INT_RANGES: dict[str, tuple[int, int]] = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "latent_channels": (1, 1024),
    "upsampling_scaling_factor": (1, 8),
}


@dataclass(frozen=True)
class TinyConfig:
    """Architecture and latent conventions of an AutoencoderTiny; names, meanings and defaults are diffusers'."""

    in_channels: int = 3  # image channels read by the encoder
    out_channels: int = 3  # image channels written by the decoder
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)  # one per encoder level (all equal: see below)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)  # one per decoder level (all equal)
    act_fn: str = "relu"  # inside the blocks and after the decoder's first conv (the blocks' fuse is always ReLU)
    upsample_fn: str = "nearest"  # nn.Upsample mode between decoder levels
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2  # per decoder level
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # residual blocks per encoder level
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # residual blocks per decoder level
    latent_magnitude: float = 3  # scale_latents: latents in [-m, m] map to [0, 1] (8-bit latent images)
    latent_shift: float = 0.5  # scale_latents: where latent 0 lands in [0, 1]
    force_upcast: bool = False  # diffusers records False whatever it is given (fp16 is safe for these models)
    scaling_factor: float = 1.0  # latent_spec: the latents are already diffusion latents (see latent_spec)
    shift_factor: float | None = 0.0
    # Not a diffusers field: TAEF2 (madebyollin/taesd 5cccb12, `use_midblock_gn`) adds, to every block of the
    # lowest-resolution level (the encoder's last, the decoder's first), a branch x + conv1x1(relu(GroupNorm(4,
    # conv1x1(x)))) of width 4x; diffusers' AutoencoderTiny cannot express it. Omitted from to_dict when false.
    midblock_gn: bool = False

    def __post_init__(self) -> None:
        problems = _field_problems(self)
        if not problems:  # the cross-field checks assume well-typed fields
            problems = _consistency_problems(self)
        if problems:
            raise ConfigError("invalid tiny VAE config: " + "; ".join(problems))

    class_name = CLASS_NAME  # diffusers' _class_name
    family = "tiny"
    deterministic = True  # the encoder has no posterior variance: sample() is mode()

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one side (validated equal to the decoder's upsampling)."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """The decoder's widths: the copy diffusers registers in an AutoencoderTiny's config, which pipelines
        (and plans.plan_for) read as the model's widths."""
        return self.decoder_block_out_channels

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels

    @property
    def size_multiple(self) -> int:
        return self.downsample_factor

    def architecture(self) -> str:
        """The shape of the network in one line (vaecli info)."""
        gn = ", TAEF2 GroupNorm branch" if self.midblock_gn else ""
        return (f"encoder {list(self.encoder_block_out_channels)} x blocks {list(self.num_encoder_blocks)}, decoder "
                f"{list(self.decoder_block_out_channels)} x blocks {list(self.num_decoder_blocks)}, latent channels "
                f"{self.latent_channels}, f={self.downsample_factor}{gn}")

    @property
    def latent_spec(self) -> LatentSpec:
        """The normalization diffusion pipelines apply to this model's latents: diffusers' scaling/shift
        fields, 1.0 and 0.0 for every released tiny VAE, i.e. the identity. A tiny VAE was distilled to
        output the *diffusion* latents of its full VAE, the ones the denoiser sees: TAESD/TAESDXL
        z_full * 0.18215 / 0.13025; TAESD3/TAEF1 (z_full - 0.0609) * 1.5305 / (z_full - 0.1159) * 0.3611
        (ComfyUI's VAELoader gives its TAESD wrapper exactly these vae_scale/vae_shift values to accept raw
        latents); TAEF2 the batch-norm-normalized FLUX.2 latents, unpatchified to 32 channels at 1/8
        resolution (madebyollin/taesd#35: its diffusers wrapper uses an identity BatchNorm). So the
        identity spec turns these latents into diffusion latents, and feeding a full VAE's decoder takes
        the full VAE's spec.denormalize."""
        return LatentSpec(self.scaling_factor, self.shift_factor, None, None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TinyConfig":
        """From a diffusers config.json dict; diffusers' bookkeeping keys (_class_name, _diffusers_version,
        _use_default_values, and the block_out_channels copy it registers) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            values[key] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**values)
        except TypeError as exc:  # a value of the wrong kind
            raise ConfigError(f"invalid tiny VAE config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible config dict (loadable by diffusers' AutoencoderTiny unless midblock_gn)."""
        data: dict[str, Any] = {"_class_name": CLASS_NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "midblock_gn" and not value:
                continue  # diffusers would warn about an unknown field
            data[f.name] = list(value) if isinstance(value, tuple) else value
        data["block_out_channels"] = list(self.block_out_channels)  # diffusers writes this copy too
        return data

    def replace(self, **changes: Any) -> "TinyConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)




def _int_list_problem(name: str, value: Any, low: int, high: int) -> str | None:
    if not isinstance(value, tuple) or not 1 <= len(value) <= MAX_LEVELS:
        return f"{name} must be a list of 1 to {MAX_LEVELS} integers, not {value!r}"
    if not all(_is_int(v) and low <= v <= high for v in value):
        return f"{name} must hold integers in [{low}, {high}], not {list(value)!r}"
    return None


def _field_problems(cfg: TinyConfig) -> list[str]:
    """Type and range of every field, each checked on its own (JSON from a file can hold anything)."""
    problems = []
    for name, (low, high) in _INT_RANGES.items():
        value = getattr(cfg, name)
        if not _is_int(value) or not low <= value <= high:
            problems.append(f"{name} must be an integer in [{low}, {high}], not {value!r}")
    for name in ("encoder_block_out_channels", "decoder_block_out_channels"):
        problem = _int_list_problem(name, getattr(cfg, name), 1, MAX_CHANNELS)
        if problem:
            problems.append(problem)
    for name in ("num_encoder_blocks", "num_decoder_blocks"):
        problem = _int_list_problem(name, getattr(cfg, name), 0, MAX_BLOCKS)
        if problem:
            problems.append(problem)
    if not isinstance(cfg.act_fn, str):
        problems.append(f"act_fn must be a string, not {cfg.act_fn!r}")
    if not isinstance(cfg.upsample_fn, str):
        problems.append(f"upsample_fn must be a string, not {cfg.upsample_fn!r}")
    if not _is_number(cfg.latent_magnitude) or cfg.latent_magnitude <= 0:
        problems.append(f"latent_magnitude must be a finite positive number, not {cfg.latent_magnitude!r}")
    if not _is_number(cfg.latent_shift):
        problems.append(f"latent_shift must be a finite number, not {cfg.latent_shift!r}")
    for name in ("force_upcast", "midblock_gn"):
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            problems.append(f"{name} must be true or false, not {value!r}")
    problems += latent_spec_problems(cfg.scaling_factor, cfg.shift_factor, None, None)
    return problems


def _consistency_problems(cfg: TinyConfig) -> list[str]:
    problems = []
    for side in ("encoder", "decoder"):
        chs, blocks = getattr(cfg, f"{side}_block_out_channels"), getattr(cfg, f"num_{side}_blocks")
        if len(chs) != len(blocks):
            problems.append(f"{side}_block_out_channels ({len(chs)}) and num_{side}_blocks ({len(blocks)}) "
                            "must have the same length")
        if len(set(chs)) > 1:
            # diffusers builds each level's convs and blocks with that level's own width as their input
            # width, so a list that changes width builds a model whose forward fails at the first change
            problems.append(f"{side}_block_out_channels must all be equal (diffusers' tiny {side} cannot change "
                            f"width between levels), not {list(chs)!r}")
    if cfg.act_fn.lower() not in ACTIVATIONS:
        problems.append(f"unsupported act_fn {cfg.act_fn!r} (one of {', '.join(ACTIVATIONS)})")
    if cfg.upsample_fn not in UPSAMPLE_MODES:
        problems.append(f"unsupported upsample_fn {cfg.upsample_fn!r} (one of {', '.join(UPSAMPLE_MODES)})")
    down = 2 ** (len(cfg.encoder_block_out_channels) - 1)
    up = cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1)
    if down != up:
        # decode(encode(x)) would change the image size, and no latent grid fits both halves
        problems.append(f"the decoder's upsampling (upsampling_scaling_factor ** (levels - 1) = {up}) must undo "
                        f"the encoder's downsampling (2 ** (levels - 1) = {down})")
    return problems


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
            x = x + narrow(plan.norm_act(norm, widen(x), "relu"))
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
        for i, (ch, blocks) in enumerate(zip(chs, cfg.num_encoder_blocks)):
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
        for i, (ch, blocks) in enumerate(zip(chs, cfg.num_decoder_blocks)):
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
                x = plan.upsample_conv(layers[i + 1], x)  # the upsampling and the conv after it, in the plan's form
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
        return self.decoder.layers[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' precision (inputs are cast to it)."""
        return self.decoder.layers[0].weight.dtype

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
