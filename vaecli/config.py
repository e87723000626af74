"""Frozen configuration: the VAE's architecture (diffusers' AutoencoderKL fields) and latent normalization."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
    sample_size: int | tuple[int, ...] = 32  # nominal image side; diffusers' tile size
    scaling_factor: float = 0.18215  # diffusion latents = (raw - shift) * scaling_factor
    shift_factor: float | None = None  # SD3/Flux: subtracted before scaling
    latents_mean: tuple[float, ...] | None = None  # per-channel, replaces shift_factor when given
    latents_std: tuple[float, ...] | None = None  # per-channel divisor, used with latents_mean
    force_upcast: bool = True  # model overflows in fp16: pipelines run it in fp32
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on the latent before the decoder
    mid_block_add_attention: bool = True  # self-attention between the two mid resnets

    class_name: ClassVar[str] = "AutoencoderKL"  # diffusers' class, written as _class_name
    family: ClassVar[str] = "kl"  # vaecli/families.py: the row of this config's model

    def __post_init__(self) -> None:
        problems = _field_problems(self)
        if not problems:  # the cross-field checks below assume well-typed fields
            problems = _consistency_problems(self)
        if problems:
            raise ConfigError(f"invalid {self.class_name} config: " + "; ".join(problems))

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """Channels per encoder-order level of the decoder (the encoder's: AutoencoderKL is symmetric)."""
        return self.block_out_channels

    def architecture(self) -> str:
        """The shape of the network in one line (vaecli info)."""
        dec = "" if self.decoder_channels == self.block_out_channels else f", decoder {list(self.decoder_channels)}"
        return (f"block_out_channels {list(self.block_out_channels)}{dec}, layers_per_block {self.layers_per_block}, "
                f"groups {self.norm_num_groups}, latent channels {self.latent_channels}, f={self.downsample_factor}")

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the downsample factor times the latent patch size."""
        return self.downsample_factor * self.latent_spec.patch_size

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_spec(self) -> LatentSpec:
        """The normalization diffusion pipelines apply to this model's latents."""
        return LatentSpec(self.scaling_factor, self.shift_factor, self.latents_mean, self.latents_std)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VAEConfig:
        """Build from a diffusers config.json dict; keys diffusers adds for its own bookkeeping are ignored."""
        known = {f.name for f in dataclasses.fields(cls)} - set(_LOADER_FIELDS)
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
    def from_json(cls, path: str | Path) -> VAEConfig:
        """Read a diffusers config.json."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} is not a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible config dict (the loader's own fields, _LOADER_FIELDS, left out)."""
        data: dict[str, Any] = {"_class_name": self.class_name}
        for f in dataclasses.fields(self):
            if f.name in _LOADER_FIELDS:
                continue
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def replace(self, **changes: Any) -> VAEConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Flux2Config(VAEConfig):
    """diffusers' AutoencoderKLFlux2 (FLUX.2 [dev] and [klein]): AutoencoderKL's encoder and decoder (the
    decoder's channels may differ), plus batch-norm statistics of the 2x2-patchified latents that the
    FLUX.2 pipelines normalize with. Defaults are diffusers'."""

    class_name: ClassVar[str] = "AutoencoderKLFlux2"
    family: ClassVar[str] = "flux2"

    down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4
    up_block_types: tuple[str, ...] = (UP_BLOCK,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: the encoder's (a smaller decoder: faster)
    layers_per_block: int = 2
    latent_channels: int = 32
    sample_size: int | tuple[int, ...] = 1024
    scaling_factor: float = 1.0  # the pipelines use the batch-norm statistics only
    shift_factor: float | None = None
    force_upcast: bool = True  # diffusers' class has no such field; pipelines run it as loaded: fp32 is safe
    batch_norm_eps: float = 1e-4  # added to running_var before the square root
    batch_norm_momentum: float = 0.1  # training only: never used for inference
    patch_size: tuple[int, int] = (2, 2)  # latents are patchified before normalization
    # Filled by the loader from the weights' bn.running_mean / bn.running_var (float32, as the pipelines
    # compute them: std = sqrt(var + eps)); not config.json fields. None: a fresh BatchNorm (0 and sqrt(1+eps)).
    bn_mean: tuple[float, ...] | None = None
    bn_std: tuple[float, ...] | None = None

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def bn_channels(self) -> int:
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    @property
    def latent_spec(self) -> LatentSpec:
        """Flux2Pipeline's normalization: patchify 2x2, then (z - running_mean) / sqrt(running_var + eps)."""
        n = self.bn_channels
        mean = self.bn_mean if self.bn_mean is not None else (0.0,) * n
        std = self.bn_std if self.bn_std is not None else (math.sqrt(1.0 + self.batch_norm_eps),) * n
        return LatentSpec(self.scaling_factor, None, mean, std, patch_size=self.patch_size[0])


# Fields a loader fills from the weights, never read from or written to config.json.
_LOADER_FIELDS = ("bn_mean", "bn_std")


def _flux2_problems(cfg: Flux2Config) -> list[str]:
    problems = []
    patch = cfg.patch_size
    if not (isinstance(patch, tuple) and len(patch) == 2 and all(_is_int(p) and 1 <= p <= 8 for p in patch)):
        return [f"patch_size must be two integers in [1, 8], not {patch!r}"]
    if patch[0] != patch[1]:
        problems.append(f"patch_size {list(patch)}: only square patches are supported")
    dec = cfg.decoder_block_out_channels
    if dec is not None:
        if not isinstance(dec, tuple) or not all(_is_int(c) and 1 <= c <= MAX_CHANNELS for c in dec):
            problems.append(f"decoder_block_out_channels must hold integers in [1, {MAX_CHANNELS}], not {dec!r}")
        elif len(dec) != len(cfg.block_out_channels):
            problems.append(f"decoder_block_out_channels has {len(dec)} levels, block_out_channels "
                            f"{len(cfg.block_out_channels)}")
        elif any(c % cfg.norm_num_groups for c in dec):
            problems.append(f"decoder_block_out_channels {list(dec)} are not all divisible by norm_num_groups "
                            f"{cfg.norm_num_groups}")
    if not _is_number(cfg.batch_norm_eps) or not 0 < cfg.batch_norm_eps <= 1:
        problems.append(f"batch_norm_eps must be a number in (0, 1], not {cfg.batch_norm_eps!r}")
    if not _is_number(cfg.batch_norm_momentum) or not 0 <= cfg.batch_norm_momentum <= 1:
        problems.append(f"batch_norm_momentum must be a number in [0, 1], not {cfg.batch_norm_momentum!r}")
    for name in ("bn_mean", "bn_std"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, tuple) or len(value) != cfg.bn_channels
                                  or not all(_is_number(v) for v in value)):
            problems.append(f"{name} must list {cfg.bn_channels} finite numbers")
    if cfg.bn_std is not None and any(v <= 0 for v in cfg.bn_std if _is_number(v)):
        problems.append("bn_std must be positive")
    return problems


# Bounds on sizes: far above every released VAE (SD/SDXL/SD3/Flux: 2 layers, 512 channels, 4 levels,
# 16 latent channels), far below what would make building the model hang or exhaust memory.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "layers_per_block": (1, 64),
    "latent_channels": (1, 1024),
    "norm_num_groups": (1, 4096),
}
MAX_LEVELS = 8  # downsample factor 2**7 = 128
MAX_CHANNELS = 16384
_BOOL_FIELDS = ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def is_int(value: Any) -> bool:
    """An integer from JSON (true/false are not sizes); every family's config checks use it."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_range_problems(cfg: Any, ranges: Mapping[str, tuple[int, int]]) -> list[str]:
    """One problem per field of `ranges` that is not an integer within its [low, high]."""
    problems = []
    for name, (low, high) in ranges.items():
        value = getattr(cfg, name)
        if not is_int(value) or not low <= value <= high:
            problems.append(f"{name} must be an integer in [{low}, {high}], not {value!r}")
    return problems


def is_number(value: Any) -> bool:
    """A finite int or float from JSON (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_is_int, _is_number = is_int, is_number


def _field_problems(cfg: VAEConfig) -> list[str]:
    """Type and range of every field, each checked on its own (JSON from a file can hold anything)."""
    problems = int_range_problems(cfg, _INT_RANGES)
    chs = cfg.block_out_channels
    if not isinstance(chs, tuple) or not 1 <= len(chs) <= MAX_LEVELS:
        problems.append(f"block_out_channels must be a list of 1 to {MAX_LEVELS} integers, not {chs!r}")
    elif not all(_is_int(c) and 1 <= c <= MAX_CHANNELS for c in chs):
        problems.append(f"block_out_channels must hold integers in [1, {MAX_CHANNELS}], not {list(chs)!r}")
    for name in ("down_block_types", "up_block_types"):
        value = getattr(cfg, name)
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            problems.append(f"{name} must be a list of block names, not {value!r}")
    if not isinstance(cfg.act_fn, str):
        problems.append(f"act_fn must be a string, not {cfg.act_fn!r}")
    size = cfg.sample_size
    sizes = size if isinstance(size, tuple) else (size,)
    if not sizes or not all(_is_int(v) and v >= 1 for v in sizes):
        problems.append(f"sample_size must be a positive integer (or a list of them), not {size!r}")
    for name in _BOOL_FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            problems.append(f"{name} must be true or false, not {value!r}")
    problems += latent_spec_problems(cfg.scaling_factor, cfg.shift_factor, cfg.latents_mean, cfg.latents_std)
    return problems


def _consistency_problems(cfg: VAEConfig) -> list[str]:
    levels = len(cfg.block_out_channels)
    problems = []
    if len(cfg.down_block_types) != levels or len(cfg.up_block_types) != levels:
        problems.append(
            f"down_block_types ({len(cfg.down_block_types)}), up_block_types ({len(cfg.up_block_types)}) "
            f"and block_out_channels ({levels}) must have the same length"
        )
    for name in cfg.down_block_types:
        if name != DOWN_BLOCK:
            problems.append(f"unsupported down block {name!r} (only {DOWN_BLOCK})")
    for name in cfg.up_block_types:
        if name != UP_BLOCK:
            problems.append(f"unsupported up block {name!r} (only {UP_BLOCK})")
    for ch in cfg.block_out_channels:
        if ch % cfg.norm_num_groups:
            problems.append(f"block_out_channels {ch} is not divisible by norm_num_groups {cfg.norm_num_groups}")
    if cfg.act_fn not in ACTIVATIONS:
        problems.append(f"unsupported act_fn {cfg.act_fn!r} (one of {', '.join(ACTIVATIONS)})")
    for name in ("latents_mean", "latents_std"):
        value = getattr(cfg, name)
        if value is not None and len(value) != cfg.latent_channels:
            problems.append(f"{name} has {len(value)} values for {cfg.latent_channels} latent channels")
    if isinstance(cfg, Flux2Config):
        problems += _flux2_problems(cfg)
    return problems


def latent_spec_problems(
    scaling_factor: Any, shift_factor: Any, latents_mean: Any, latents_std: Any
) -> list[str]:
    """What makes a latent normalization unusable: a zero or non-finite scale (all-zero or NaN latents),
    non-numeric values, a zero standard deviation."""
    problems = []
    if not _is_number(scaling_factor) or scaling_factor == 0:
        problems.append(f"scaling_factor must be a finite non-zero number, not {scaling_factor!r}")
    if shift_factor is not None and not _is_number(shift_factor):
        problems.append(f"shift_factor must be a finite number or null, not {shift_factor!r}")
    for name, value in (("latents_mean", latents_mean), ("latents_std", latents_std)):
        if value is None:
            continue
        if not isinstance(value, tuple) or not value or not all(_is_number(v) for v in value):
            problems.append(f"{name} must be a list of finite numbers or null, not {value!r}")
        elif name == "latents_std" and any(v <= 0 for v in value):
            problems.append(f"latents_std must be positive, not {list(value)!r}")
    return problems


@dataclass(frozen=True)
class LatentSpec:
    """How raw VAE latents map to the latents a diffusion model sees, and back.

    SD/SDXL: z * scale.  SD3/Flux: (z - shift) * scale.  Per-channel mean/std: (z - mean) * scale / std.
    FLUX.2: patchify p x p first ((N, C, h, w) -> (N, C*p*p, h/p, w/p)), then per channel as above.
    """

    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    patch_size: int = 1  # 1: latents keep the VAE's shape

    def __post_init__(self) -> None:
        problems = latent_spec_problems(self.scaling_factor, self.shift_factor, self.latents_mean, self.latents_std)
        if not _is_int(self.patch_size) or not 1 <= self.patch_size <= 8:
            problems.append(f"patch_size must be an integer in [1, 8], not {self.patch_size!r}")
        if problems:
            raise ConfigError("invalid latent normalization: " + "; ".join(problems))

    def patchify(self, z: Any) -> Any:
        """(N, C, h, w) or (C, h, w) -> C*p*p channels at h/p x w/p; channel c*p*p + dy*p + dx holds the
        pixel (dy, dx) of each p x p cell, the order of diffusers' Flux2Pipeline._patchify_latents."""
        p = self.patch_size
        if p == 1:
            return z
        single = z.dim() == 3
        x = z[None] if single else z
        n, c, h, w = x.shape
        if h % p or w % p:
            raise ConfigError(f"latent of {h}x{w} cells cannot be patchified {p}x{p}: sides must be multiples of {p}")
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)  # (N, C, p, p, h/p, w/p)
        x = x.reshape(n, c * p * p, h // p, w // p)
        return x[0] if single else x

    def unpatchify(self, z: Any) -> Any:
        """The inverse of patchify."""
        p = self.patch_size
        if p == 1:
            return z
        single = z.dim() == 3
        x = z[None] if single else z
        n, cpp, h, w = x.shape
        if cpp % (p * p):
            raise ConfigError(f"{cpp} channels cannot be unpatchified {p}x{p}")
        x = x.reshape(n, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)  # (N, C, h, p, w, p)
        x = x.reshape(n, cpp // (p * p), h * p, w * p)
        return x[0] if single else x

    def stored_shape(self, raw: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, h, w) of normalized latents for raw latents of shape `raw`."""
        c, h, w = raw
        p = self.patch_size
        return c * p * p, h // p, w // p

    @classmethod
    def identity(cls) -> LatentSpec:
        return cls(1.0, None, None, None)

    @property
    def is_identity(self) -> bool:
        return (self.scaling_factor == 1.0 and not self.shift_factor and self.latents_mean is None
                and self.latents_std is None)

    def _stats(self, z: Any) -> tuple[Any, Any]:
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

    def normalize(self, z: Any) -> Any:
        """Raw VAE latents -> diffusion latents."""
        z = self.patchify(z)
        if self.latents_mean is None and self.latents_std is None:
            shift = self.shift_factor or 0.0
            return (z - shift) * self.scaling_factor if shift else z * self.scaling_factor
        mean, std = self._stats(z)
        return (z - mean) * self.scaling_factor / std

    def denormalize(self, z: Any) -> Any:
        """Diffusion latents -> raw VAE latents."""
        if self.latents_mean is None and self.latents_std is None:
            shift = self.shift_factor or 0.0
            return self.unpatchify(z / self.scaling_factor + shift if shift else z / self.scaling_factor)
        mean, std = self._stats(z)
        return self.unpatchify(z * std / self.scaling_factor + mean)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": list(self.latents_mean) if self.latents_mean is not None else None,
            "latents_std": list(self.latents_std) if self.latents_std is not None else None,
        }
        if self.patch_size != 1:  # files of unpatchified families keep their bytes (and settings hashes)
            data["patch_size"] = self.patch_size
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatentSpec:
        """From `to_dict`'s form (e.g. a latent file's metadata); values are checked, never coerced."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"invalid latent normalization: expected an object, not {data!r}")

        def seq(value: Any) -> Any:
            return tuple(value) if isinstance(value, list) else value

        return cls(data.get("scaling_factor", 1.0), data.get("shift_factor"), seq(data.get("latents_mean")),
                   seq(data.get("latents_std")), data.get("patch_size", 1))

    def describe(self) -> str:
        """The normalization in words (vaecli info)."""
        words = []
        if self.patch_size != 1:
            words.append(f"{self.patch_size}x{self.patch_size} patchify")
        if self.latents_mean is not None or self.latents_std is not None:
            n = len(self.latents_mean or self.latents_std or ())
            what = "batch-norm statistics" if self.patch_size != 1 else "mean and std"
            words.append(f"per-channel {what} ({n} channels): (z - mean) / std"
                         + (f" * {self.scaling_factor:g}" if self.scaling_factor != 1 else ""))
        elif self.shift_factor:
            words.append(f"(z - {self.shift_factor:g}) * {self.scaling_factor:g}")
        else:
            words.append(f"z * {self.scaling_factor:g}")
        return ", then ".join(words)


# Latent normalization and precision policy of the released VAE families. Their weights cannot tell
# SD from SDXL (identical shapes), so a single file without config takes one of these by name.
# force_upcast follows each family's diffusers config.json, so a single file and the same weights as a
# diffusers folder run alike: SD's configs predate the field and get diffusers' default, true.
FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    "sd": dict(scaling_factor=0.18215, shift_factor=None, force_upcast=True, sample_size=512),  # SD 1.x/2.x
    "sdxl": dict(scaling_factor=0.13025, shift_factor=None, force_upcast=True, sample_size=1024),  # fp16 overflow
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609, force_upcast=True, sample_size=1024),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True, sample_size=1024),
}
DEFAULT_FAMILY = "sd"


def apply_family(config: VAEConfig, family: str) -> VAEConfig:
    """Set a named family's latent normalization on an inferred config. FLUX.2's comes with its weights:
    "flux2" only confirms a Flux2Config, and no SD-style preset applies to one."""
    if isinstance(config, Flux2Config) or str(family).lower() == "flux2":
        if isinstance(config, Flux2Config) and str(family).lower() == "flux2":
            return config
        raise ConfigError(f"--family {family} does not fit this {config.class_name}: FLUX.2's normalization comes "
                          "from its weights (batch-norm statistics), the presets sd/sdxl/sd3/flux from AutoencoderKL "
                          "configs")
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
    layout: str  # "diffusers", "ldm" (original CompVis keys), "bfl" (FLUX.2 ae.safetensors), "taesd", "wan"
    weights_sha256: str  # sha256 over the VAE tensors (names, dtypes, shapes, bytes), independent of file format
    config_source: str  # "config.json", "given", or "inferred from shapes (+ family preset)"
    notes: tuple[str, ...] = field(default_factory=tuple)  # assumptions made while loading, for the user to see
    # The latent normalization was guessed (a bare weights file, no --family): SD and SDXL files have the
    # same shapes, so a latent cache built on the guess may be normalized for the wrong model.
    family_assumed: bool = False
    # A tiny autoencoder decodes the diffusion latents of one full VAE: which one, when the user named it
    # (--family sd, sdxl, sd3, flux, flux2); decode then refuses latent files of another family.
    latent_space: str | None = None
