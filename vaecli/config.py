"""Frozen configuration: the VAE's architecture (diffusers' AutoencoderKL fields) and latent normalization."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent normalization of an AutoencoderKL; field names and meanings are diffusers'."""

    in_channels: int = 3  # image channels read by the encoder
    out_channels: int = 3  # image channels written by the decoder
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)  # one per resolution level
    up_block_types: tuple[str, ...] = (UP_BLOCK,)  # one per resolution level
    block_out_channels: tuple[int, ...] = (64,)  # channels per level; len-1 stride-2 steps
    layers_per_block: int = 1  # resnets per encoder level (decoder levels have one more)
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    sample_size: int = 32  # nominal image side; diffusers' tile size
    scaling_factor: float = 0.18215  # diffusion latents = (raw - shift) * scaling_factor
    shift_factor: float | None = None  # SD3/Flux: subtracted before scaling
    latents_mean: tuple[float, ...] | None = None  # per-channel, replaces shift_factor when given
    latents_std: tuple[float, ...] | None = None  # per-channel divisor, used with latents_mean
    force_upcast: bool = True  # model overflows in fp16: pipelines run it in fp32
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on the latent before the decoder
    mid_block_add_attention: bool = True  # self-attention between the two mid resnets

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        problems = []
        if levels == 0:
            problems.append("block_out_channels is empty")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            problems.append(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) "
                f"and block_out_channels ({levels}) must have the same length"
            )
        for name in self.down_block_types:
            if name != DOWN_BLOCK:
                problems.append(f"unsupported down block {name!r} (only {DOWN_BLOCK})")
        for name in self.up_block_types:
            if name != UP_BLOCK:
                problems.append(f"unsupported up block {name!r} (only {UP_BLOCK})")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                problems.append(f"block_out_channels {ch} is not divisible by norm_num_groups {self.norm_num_groups}")
        if self.act_fn not in ACTIVATIONS:
            problems.append(f"unsupported act_fn {self.act_fn!r} (one of {', '.join(ACTIVATIONS)})")
        if self.layers_per_block < 1:
            problems.append("layers_per_block must be >= 1")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.latent_channels:
                problems.append(f"{name} has {len(value)} values for {self.latent_channels} latent channels")
        if problems:
            raise ConfigError("invalid VAE config: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_spec(self) -> "LatentSpec":
        """The normalization diffusion pipelines apply to this model's latents."""
        return LatentSpec(self.scaling_factor, self.shift_factor, self.latents_mean, self.latents_std)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VAEConfig":
        """Build from a diffusers config.json dict; keys diffusers adds for its own bookkeeping are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue  # e.g. _class_name, _diffusers_version, _name_or_path
            if isinstance(value, list):
                value = tuple(value)
            values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:  # a value of the wrong kind
            raise ConfigError(f"invalid VAE config: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        """Read a diffusers config.json."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} is not a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible config dict."""
        data: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def replace(self, **changes: Any) -> "VAEConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LatentSpec:
    """How raw VAE latents map to the latents a diffusion model sees, and back.

    SD/SDXL: z * scale.  SD3/Flux: (z - shift) * scale.  Per-channel mean/std: (z - mean) * scale / std.
    """

    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def identity(cls) -> "LatentSpec":
        return cls(1.0, None, None, None)

    @property
    def is_identity(self) -> bool:
        return self.scaling_factor == 1.0 and not self.shift_factor and self.latents_mean is None and self.latents_std is None

    def _stats(self, z: "Any") -> tuple[Any, Any]:
        """Per-channel (offset, divisor) broadcastable against a (N,C,h,w) or (C,h,w) tensor."""
        import torch

        channels = z.shape[-3]
        shape = (channels, 1, 1)
        if self.latents_mean is not None:
            mean = torch.tensor(self.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        else:
            mean = torch.full(shape, float(self.shift_factor or 0.0), dtype=z.dtype, device=z.device)
        if self.latents_std is not None:
            std = torch.tensor(self.latents_std, dtype=z.dtype, device=z.device).view(shape)
        else:
            std = torch.ones(shape, dtype=z.dtype, device=z.device)
        return mean, std

    def normalize(self, z: "Any") -> "Any":
        """Raw VAE latents -> diffusion latents."""
        if self.latents_mean is None and self.latents_std is None:
            shift = self.shift_factor or 0.0
            return (z - shift) * self.scaling_factor if shift else z * self.scaling_factor
        mean, std = self._stats(z)
        return (z - mean) * self.scaling_factor / std

    def denormalize(self, z: "Any") -> "Any":
        """Diffusion latents -> raw VAE latents."""
        if self.latents_mean is None and self.latents_std is None:
            shift = self.shift_factor or 0.0
            return z / self.scaling_factor + shift if shift else z / self.scaling_factor
        mean, std = self._stats(z)
        return z * std / self.scaling_factor + mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": list(self.latents_mean) if self.latents_mean is not None else None,
            "latents_std": list(self.latents_std) if self.latents_std is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatentSpec":
        mean = data.get("latents_mean")
        std = data.get("latents_std")
        shift = data.get("shift_factor")
        return cls(
            float(data.get("scaling_factor", 1.0)),
            float(shift) if shift is not None else None,
            tuple(float(v) for v in mean) if mean is not None else None,
            tuple(float(v) for v in std) if std is not None else None,
        )


# Latent normalization and precision policy of the released VAE families. Their weights cannot tell
# SD from SDXL (identical shapes), so a single file without config takes one of these by name.
FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    "sd": dict(scaling_factor=0.18215, shift_factor=None, force_upcast=False, sample_size=512),  # SD 1.x/2.x
    "sdxl": dict(scaling_factor=0.13025, shift_factor=None, force_upcast=True, sample_size=1024),  # fp16 overflow
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609, force_upcast=True, sample_size=1024),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True, sample_size=1024),
}
DEFAULT_FAMILY = "sd"


def apply_family(config: VAEConfig, family: str) -> VAEConfig:
    """Set a named family's latent normalization on an inferred config."""
    try:
        preset = FAMILY_PRESETS[family.lower()]
    except KeyError:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(FAMILY_PRESETS)}") from None
    return config.replace(**preset, latents_mean=None, latents_std=None)


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from and what identifies its weights."""

    name: str  # what the user named (path or repo id), or "vaecli-default"
    path: str  # the weights file actually read
    layout: str  # "diffusers" or "ldm" (original CompVis keys)
    weights_sha256: str  # sha256 over the VAE tensors (names, dtypes, shapes, bytes), independent of file format
    config_source: str  # "config.json", "given", or "inferred from shapes (+ family preset)"
    notes: tuple[str, ...] = field(default_factory=tuple)  # assumptions made while loading, for the user to see
