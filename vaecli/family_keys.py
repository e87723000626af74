"""Which family a set of weight names belongs to, from the names alone (no tensors, no files).

The family table (families.py) and the loaders (kl_weights.py, tiny_weights.py, qwen_weights.py) both
ask these questions; they live here, below both, so that neither imports the other to ask them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Prefixes under which whole-pipeline checkpoints keep their VAE.
VAE_PREFIXES = ("first_stage_model.", "vae.")

# --------------------------------------------------------------------------------------------- KL, FLUX.2

# Keys of an AutoencoderKL's resolution levels, in diffusers' and the original LDM layout.
KL_LEVEL_PREFIXES = ("encoder.down_blocks.", "encoder.down.", "decoder.up_blocks.", "decoder.up.")


def is_flux2_state(keys: set[str]) -> bool:
    """The batch-norm statistics exist only in FLUX.2's VAE (same key in diffusers and BFL's ae.safetensors)."""
    return "bn.running_mean" in keys or "bn.running_var" in keys


def is_kl_state(keys: set[str]) -> bool:
    """AutoencoderKL level keys in either layout, without FLUX.2's statistics."""
    return any(k.startswith(KL_LEVEL_PREFIXES) for k in keys) and not is_flux2_state(keys)


# ----------------------------------------------------------------------------------------------- tiny

# Original taesd.py files: `N.<name>`, one nn.Sequential per file.
TINY_ORIGINAL_KEY = re.compile(r"^(\d+)\.(.+)$")
# diffusers' AutoencoderTiny: `encoder.layers.N.<name>` / `decoder.layers.N.<name>`.
TINY_DIFFUSERS_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
TINY_COMBINED_PREFIXES = {"encoder": "taesd_encoder.", "decoder": "taesd_decoder."}  # ComfyUI combined checkpoints
TINY_COMBINED_EXTRAS = ("vae_scale", "vae_shift")  # ComfyUI's raw-latent adapters in combined checkpoints


def tiny_original_half(keys: Iterable[str]) -> str | None:
    """Which taesd.py Sequential an original file holds: the encoder's layer 0 is a conv, the decoder's a
    weightless Clamp (its first weights are layer 1's)."""
    names = set(keys)
    if "0.weight" in names:
        return "encoder"
    if "1.weight" in names:
        return "decoder"
    return None


def is_tiny_state(keys: Iterable[str]) -> bool:
    """Whether tensor names are a tiny autoencoder's, in either layout (or one original half, or a ComfyUI
    combined checkpoint)."""
    names = list(keys)
    if not names:
        return False
    if all(TINY_DIFFUSERS_KEY.match(k) for k in names):
        return True
    combined = tuple(TINY_COMBINED_PREFIXES.values())
    if any(k.startswith(combined) for k in names):
        return all(k.startswith(combined) or k in TINY_COMBINED_EXTRAS for k in names)
    return all(TINY_ORIGINAL_KEY.match(k) for k in names) and tiny_original_half(names) is not None


# ------------------------------------------------------------------------------------------ Qwen-Image

# RMS-norm gains of the mid blocks, in diffusers' and the original Wan 2.1 layout.
QWEN_DIFFUSERS_MARKERS = ("decoder.mid_block.resnets.0.norm1.gamma", "encoder.mid_block.resnets.0.norm1.gamma")
QWEN_ORIGINAL_MARKERS = ("decoder.middle.0.residual.0.gamma", "encoder.middle.0.residual.0.gamma")


def strip_vae_prefix(keys: Iterable[str]) -> list[str]:
    """The names under the first VAE prefix that any name carries; all names when none does."""
    names = list(keys)
    for prefix in VAE_PREFIXES:
        inner = [k[len(prefix):] for k in names if k.startswith(prefix)]
        if inner:
            return inner
    return names


def is_qwen_state(keys: Iterable[str]) -> bool:
    """Whether tensor names are a Wan-family VAE's (RMS-norm `gamma`s), in the diffusers or the original layout,
    optionally under a `vae.`/`first_stage_model.` prefix. True for the Wan 2.2 VAE too, so that load_qwen,
    not a generic 'unknown weights', tells the user it cannot be loaded."""
    inner = set(strip_vae_prefix(keys))
    return any(m in inner for m in QWEN_DIFFUSERS_MARKERS + QWEN_ORIGINAL_MARKERS)


def compile_key_pattern(pattern: str, fields: dict[str, str]) -> re.Pattern[str]:
    """A rename-table key pattern as an anchored regex: each {field} placeholder becomes its group."""
    regex = re.escape(pattern)
    for name, group in fields.items():
        regex = regex.replace(re.escape(name), group)
    return re.compile("^" + regex)
