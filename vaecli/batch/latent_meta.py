"""What a latent container records, checked: which normalization its values carry (each container's own
convention, or our metadata), who made it, and whether a tiny autoencoder can preview it."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..config import FAMILY_PRESETS, LatentSpec
from ..errors import ConfigError, InputError
from ..exports import COMFYUI_LEGACY_SCALE
from ..io import LATENT_FORMAT_VERSION, LatentFile, meta_json
from ..models.kl import AutoencoderKL


def check_container(config: Any, fmt: str) -> None:
    """Refuse a container that no tool reads for this family: sd-scripts (kohya's .npz) trains no FLUX.2,
    Qwen-Image or tiny-VAE model, so such a cache would be silently unusable."""
    if fmt == "kohya" and getattr(config, "family", "kl") != "kl":
        raise ConfigError(f"--format kohya: sd-scripts does not train {config.class_name} models (its .npz caches "
                          "are SD/SDXL/SD3/FLUX.1 latents); use --format vaecli (self-describing) or comfyui")


def container_spec(spec: LatentSpec, fmt: str) -> LatentSpec | None:
    """The normalization a container stores latents in: ours records any; kohya caches hold raw VAE
    latents; ComfyUI's .latent holds what its VAE node outputs: raw for the unpatchified families, the
    normalized patchified form for FLUX.2 (comfy/latent_formats.py Flux2: 128 channels, 16x downscale,
    no process_in scaling)."""
    if fmt == "vaecli":
        return spec
    if fmt == "comfyui" and spec.patch_size > 1:
        return spec
    return None


def latent_spec_from_meta(meta: Mapping[str, str], channels: int | None = None) -> LatentSpec | None:
    """The normalization a latent file was stored with (None for raw latents). LatentSpec checks its values
    (finite, non-zero scale, positive stds); here: an explicit scaling_factor, per-channel lists of `channels`."""
    value = meta.get("latent_spec", "none")
    if value == "none":
        return None
    data = meta_json(meta, "latent_spec")
    if not isinstance(data, dict) or data.get("scaling_factor") is None:
        raise InputError(f"latent metadata 'latent_spec' is not an object with a scaling_factor: {value!r}")
    for key in ("latents_mean", "latents_std"):
        values = data.get(key)
        if values is not None and channels is not None and (not isinstance(values, list) or len(values) != channels):
            raise InputError(f"latent metadata 'latent_spec': {key} must list {channels} numbers, one per channel")
    try:
        return LatentSpec.from_dict(data)
    except ConfigError as exc:
        raise InputError(f"latent metadata 'latent_spec': {exc}") from None


def stored_spec(lf: LatentFile, channels: int, model_spec: LatentSpec) -> LatentSpec | None:
    """The normalization a latent file's values carry, from its container's own convention: ComfyUI's
    marker (present: raw; absent: SD-scaled, as LoadLatent reads it; FLUX.2: normalized and patchified),
    kohya's raw caches, our metadata. A bare tensor carries none: InputError asking for --scaling-factor.
    `channels`: the file's; `model_spec`: the decoding model's normalization."""
    model_scale = model_spec.scaling_factor
    if lf.container in ("comfyui", "kohya"):
        patched = lf.container == "comfyui" and model_spec.patch_size > 1
        if lf.meta is not None and lf.meta.get("latent_spec", "none") != "none":
            if patched:
                return latent_spec_from_meta(lf.meta, channels)
            raise InputError(f"inconsistent file: its metadata says normalized latents, but a {lf.container} file "
                             "holds raw ones")
        if patched and channels == len(model_spec.latents_mean or ()):
            return model_spec  # ComfyUI's own FLUX.2 latents: normalized by the VAE's statistics
        if lf.container == "comfyui" and not lf.marker:
            return LatentSpec(COMFYUI_LEGACY_SCALE)  # LoadLatent multiplies such files by 1/0.18215
        return None
    if lf.meta is not None:
        return latent_spec_from_meta(lf.meta, channels)
    raise InputError(
        "bare latent without vaecli metadata: say how it is normalized with --scaling-factor "
        f"(and --shift-factor), e.g. --scaling-factor {model_scale:g} for this model's "
        "diffusion latents or --scaling-factor 1 for raw VAE latents"
    )


def preview_latents(stored: torch.Tensor, spec: LatentSpec | None, tiny: AutoencoderKL) -> torch.Tensor:
    """A full VAE's diffusion latents as its tiny autoencoder takes them (unpatchified), or InputError when
    the file holds raw latents or latents of another latent space than the tiny model's."""
    if spec is None:
        raise InputError("raw latents: a tiny autoencoder decodes a full VAE's normalized (diffusion) latents, "
                         "and this file does not record how to normalize them; decode it with its full VAE, "
                         "or encode without --raw")
    space = tiny.info.latent_space if tiny.info else None
    if space is not None:
        if space == "flux2":
            fits = spec.patch_size == 2
        else:
            preset = FAMILY_PRESETS[space]
            fits = (spec.patch_size == 1 and spec.latents_mean is None
                    and math.isclose(spec.scaling_factor, preset["scaling_factor"], rel_tol=1e-4)
                    and math.isclose(spec.shift_factor or 0.0, preset["shift_factor"] or 0.0, abs_tol=1e-6))
        if not fits:
            raise InputError(f"latent space mismatch: this file's latents are normalized as {spec.describe()}, "
                             f"not as {space} latents, which this tiny autoencoder decodes (--family {space})")
    z = spec.unpatchify(stored)  # FLUX.2: (4C, h/2, w/2) -> (C, h, w), what TAEF2 takes
    if z.shape[-3] != tiny.config.latent_channels:
        raise InputError(f"latent space mismatch: the file's latents have {z.shape[-3]} channels, this tiny "
                         f"autoencoder decodes {tiny.config.latent_channels}: use the one of its family (TAESD/"
                         "TAESDXL: 4, TAESD3/TAEF1: 16, TAEF2: 32)")
    return z


def check_meta_header(meta: Mapping[str, str], info: Mapping[str, Any], force: bool) -> None:
    """Format version and maker of one of our latent files."""
    version = meta.get("format_version", "0")
    if not (version.isascii() and version.isdigit()):
        raise InputError(f"latent metadata has an invalid format_version {version!r}")
    if int(version) > int(LATENT_FORMAT_VERSION):
        raise InputError(f"written by a newer vaecli (latent format {version}); upgrade vaecli")
    made_by = meta.get("model_sha256", "")
    if made_by != info["weights_sha256"] and not force:
        name = meta.get("model_name", "?")
        raise InputError(
            f"made by another model ({name}, weights sha256 {made_by[:12]}) than the one in use "
            f"({info['name']}, {info['weights_sha256'][:12]}); pass --model {name if name != '?' else '<that model>'}, "
            "or --force to decode anyway"
        )
