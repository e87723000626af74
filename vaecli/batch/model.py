"""The model a run uses: opened from a path or the Hub, and what a report and the outputs record of it."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from ..devices import resolve_device
from ..errors import ConfigError
from ..models.kl import AutoencoderKL


def open_model(
    source: str | None, family: str | None, device: str, subfolder: str | None = None, revision: str | None = None,
    variant: str | None = None,
) -> AutoencoderKL:
    """Load the model (fp32 weights; the Runner makes lower-precision copies) on the resolved device;
    subfolder, revision and variant as load_vae takes them."""
    from ..weights import load_vae

    if source is not None and os.path.exists(source):
        import stat

        from ..files import file_kind

        mode = os.stat(source).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # reading a FIFO would wait forever
            raise ConfigError(f"{source} is {file_kind(mode)}, not a model file or folder")

    try:
        return load_vae(
            source, device=resolve_device(device), dtype=torch.float32, family=family, subfolder=subfolder,
            revision=revision, variant=variant,
        )
    except RecursionError:  # json.loads of a hostile config.json (config.py catches only ValueError)
        raise ConfigError(f"{source}: its config.json is nested too deeply to be a model config (a damaged or "
                          "hostile file)") from None
    except OverflowError as exc:  # a config value too large for a float, e.g. a 401-digit scaling_factor
        raise ConfigError(f"{source}: its config.json holds a number too large to use ({exc})") from None


def model_notes(vae: AutoencoderKL) -> list[str]:
    """What was assumed while loading the model, for the run's notes (a guessed normalization, groups)."""
    info = getattr(vae, "info", None)
    return [f"model: {n}" for n in info.notes] if info else []


def model_summary(vae: AutoencoderKL) -> dict[str, Any]:
    info = getattr(vae, "info", None)
    return {
        "name": info.name if info else "unnamed",
        "weights_sha256": info.weights_sha256 if info else "",
        "identity_sha256": model_identity(vae),
        "device": str(next(vae.parameters()).device),
    }


# Config fields that change no computed value: diffusers' nominal tile size (our tiling has its own flags).
_NOMINAL_CONFIG = ("sample_size",)


def model_identity(vae: AutoencoderKL) -> str:
    """sha256 of everything that defines the model's computation: its weights (their sha256) and its
    effective config, architecture and latent normalization included (VAEConfig.to_dict: what was loaded,
    inferred or assumed, e.g. norm_num_groups of a bare weights file), as canonical JSON.

    Two loads of the same weights with different configs (groups inferred 32 vs given 16) compute different
    latents: outputs record this beside model_sha256 (the weights alone, what decode compares to name
    "another model") and are remade when it changes."""
    info = getattr(vae, "info", None)
    config = {k: v for k, v in vae.config.to_dict().items() if k not in _NOMINAL_CONFIG}
    doc = {"config": config, "weights_sha256": info.weights_sha256 if info else ""}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
