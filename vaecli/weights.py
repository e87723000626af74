"""The front door of loading: `load_vae` finds which family a source holds and hands it to that family's
loader (kl_weights.py, tiny_weights.py, qwen_weights.py); `save_vae` writes a diffusers folder.

Reading files is weight_files.py, the key predicates family_keys.py, strict checks weight_checks.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import FAMILY_PRESETS, ModelInfo, VAEConfig
from .errors import ConfigError
from .family_keys import is_qwen_state, is_tiny_state
from .kl_weights import load_kl
from .models.kl import AutoencoderKL
from .models.qwenimage import AutoencoderKLQwenImage
from .models.qwenimage_config import CLASS_NAME as QWEN_CLASS
from .models.tiny import AutoencoderTiny
from .models.tiny_config import CLASS_NAME as TINY_CLASS
from .qwen_weights import load_qwen
from .tiny_weights import find_tiny_pair, load_tiny
from .weight_files import (
    DEFAULT_MODEL,
    FOLDER_WEIGHTS,
    config_class,
    default_model_dir,
    locate,
    regular_file,
    safetensors_keys,
)

__all__ = ["LoadedVAE", "load_vae", "save_vae"]

LoadedVAE = AutoencoderKL | AutoencoderTiny | AutoencoderKLQwenImage  # what load_vae returns, by family


def load_vae(
    source: str | Path | None = None,
    config: VAEConfig | Mapping[str, Any] | str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> LoadedVAE:
    """Load a VAE in eval mode: an AutoencoderKL (AutoencoderKLFlux2 for FLUX.2), an AutoencoderTiny or an
    AutoencoderKLQwenImage, by what the source holds.

    source: None for vaecli's embedded default model; a diffusers model folder (config.json + weights), a
        pipeline folder with a vae/ subfolder, a single .safetensors/.ckpt/.pt/.bin file in diffusers or
        original LDM layout (a `first_stage_model.` or `vae.` prefix is stripped, so a whole SD checkpoint
        works), or a Hub id when huggingface_hub is installed (extra `hub`) and the files are cached or
        reachable: `owner/name` (a VAE repo or a pipeline repo's vae/) or `owner/name/path/file.safetensors`.
    subfolder, variant, revision: as diffusers' from_pretrained (e.g. subfolder="vae", variant="fp16").
    config: a VAEConfig, a config dict, a config.json path or a diffusers folder. Without one (and without a
        config.json beside the weights) the architecture is inferred from tensor shapes and the latent
        normalization taken from `family` ("sd", "sdxl", "sd3", "flux"; SD when not given, with a note).
    The model's `.info` (ModelInfo) names the file, layout, weights sha256 and every assumption made. It is
    returned in eval mode with frozen weights (`requires_grad` false): call `.requires_grad_(True)` to train.
    """
    name = str(source) if source is not None else DEFAULT_MODEL
    if source is not None and subfolder is None:  # subfolder= names a folder of a KL pipeline (locate)
        path = Path(source).expanduser()
        tiny = _tiny_source(path)
        if tiny is not None:
            return _load_tiny(tiny, config, device, dtype, family)
        qwen = _qwen_source(path)
        if qwen is not None:
            if config is not None or family is not None:
                raise ConfigError(f"{qwen} is a Qwen-Image VAE: its config and normalization come from its folder "
                                  "or weights (drop config= / --family)")
            return load_qwen(qwen, dtype=dtype, device=device)
    weights_path, beside = locate(default_model_dir() if source is None else source, subfolder, variant, revision)
    return load_kl(weights_path, beside, name, config, device, dtype, family)


def _tiny_source(path: Path) -> Path | None:
    """`path` when it names a tiny autoencoder (AutoencoderTiny folder, TAESD pair or either half, a
    tiny-keyed weights file), else None; a half without its other half raises WeightsError."""
    if path.is_dir():
        if regular_file(path / "config.json"):
            return path if config_class(path) == TINY_CLASS else None
        return path if find_tiny_pair(path) is not None else None
    if not regular_file(path):
        return None
    if find_tiny_pair(path) is not None:
        return path
    keys = safetensors_keys(path)
    return path if keys and is_tiny_state(keys) else None


def _qwen_source(path: Path) -> Path | None:
    """`path` when it names a Qwen-Image (or other Wan-style) VAE: a folder whose config.json says
    AutoencoderKLQwenImage or AutoencoderKLWan (refused by the Qwen loader with its reason), or a weights
    file with Wan-style keys; else None."""
    if path.is_dir():
        return path if config_class(path) in (QWEN_CLASS, "AutoencoderKLWan") else None
    keys = safetensors_keys(path) if regular_file(path) else []
    return path if keys and is_qwen_state(keys) else None


def _load_tiny(path: Path, config: Any, device: str | torch.device, dtype: torch.dtype,
               family: str | None) -> AutoencoderTiny:
    """A tiny autoencoder, its info naming the latent space `family` says it decodes."""
    if config is not None:
        raise ConfigError(f"{path} is a tiny autoencoder (AutoencoderTiny): its config comes from its folder or "
                          "its weights, not from config=")
    space = None
    if family is not None:
        space = family.lower()
        if space not in (*FAMILY_PRESETS, "flux2"):
            choices = ", ".join((*FAMILY_PRESETS, "flux2"))
            raise ConfigError(f"unknown model family {family!r}; choose one of {choices}")
    model = load_tiny(path, dtype=dtype, device=device)
    info = model.info
    assert info is not None  # load_tiny always records where the weights came from
    notes = info.notes + ((f"decodes {space} latents (--family {space}): files of another family are refused",)
                          if space else ())
    model.info = ModelInfo(info.name, info.path, info.layout, info.weights_sha256, info.config_source, notes,
                           latent_space=space)
    return model


def save_vae(model: LoadedVAE, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers model folder (config.json + diffusion_pytorch_model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = folder / FOLDER_WEIGHTS[0]
    save_file(state, str(path))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return path
