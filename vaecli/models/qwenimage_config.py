"""QwenImageConfig: the frozen, validated config of an AutoencoderKLQwenImage (diffusers' fields and defaults).

Kept apart from the model (models/qwenimage.py) so that the family table (families.py) and the plans can
name the config class without importing the model's layers.
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
    def from_dict(cls, data: Mapping[str, Any]) -> QwenImageConfig:
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
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers config dict (loadable by diffusers' AutoencoderKLQwenImage)."""
        data: dict[str, Any] = {"_class_name": CLASS_NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def replace(self, **changes: Any) -> QwenImageConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)




def _field_problems(cfg: QwenImageConfig) -> list[str]:
    """Type and range of every field, each on its own (JSON from a file can hold anything)."""
    problems = int_range_problems(cfg, _INT_RANGES)
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
