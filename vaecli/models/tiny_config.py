"""TinyConfig: the frozen, validated config of an AutoencoderTiny (diffusers' fields and defaults).

Kept apart from the model (models/tiny.py) so that the family table (families.py) and the plans can name
the config class without importing the model's layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import LatentSpec, int_range_problems, latent_spec_problems
from ..config import is_int as _is_int
from ..config import is_number as _is_number
from ..errors import ConfigError

CLASS_NAME = "AutoencoderTiny"
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")  # diffusers' get_activation, which lower-cases the name
# nn.Upsample modes that take the decoder's 4-D tensors ("linear" and "trilinear" need 3-D and 5-D input).
UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
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
    def from_dict(cls, data: Mapping[str, Any]) -> TinyConfig:
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

    def replace(self, **changes: Any) -> TinyConfig:
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
    problems = int_range_problems(cfg, _INT_RANGES)
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
