"""What decode checks of a latent file beyond its container (whose normalization convention lives in
vaecli.latents): the format version and maker of our metadata, and whether a tiny autoencoder can preview it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..config import FAMILY_PRESETS, LatentSpec
from ..errors import InputError
from ..latents import LATENT_FORMAT_VERSION
from ..models.kl import AutoencoderKL


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
