"""The one table of VAE families: how each is recognised (diffusers class name, weight keys), which config
class it uses, how its latents are normalized, how its tiles must run and which memory layout its weights
can take. Loading (kl_weights.py), `vaecli info`, tiling (tiling.py) and the plans (plans.plan_for) consult
it, so a new family is one model module and one row here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Flux2Config, VAEConfig
from .errors import ConfigError
from .family_keys import is_flux2_state, is_kl_state, is_qwen_state, is_tiny_state
from .models.qwenimage_config import QwenImageConfig
from .models.tiny_config import TinyConfig

AnyConfig = VAEConfig | TinyConfig | QwenImageConfig  # Flux2Config is a VAEConfig


@dataclass(frozen=True)
class Family:
    name: str  # vaecli's name (config.family)
    class_name: str  # diffusers' class, config.json's _class_name
    title: str  # for people: info, docs
    config: type[VAEConfig] | type[TinyConfig] | type[QwenImageConfig]  # frozen dataclass; from_dict reads JSON
    owns_keys: Callable[[set[str]], bool]  # diffusers- or original-layout keys of a weights file are this family's
    normalization: str  # how its latents are normalized, in words (docs, info)
    # How tiles must run (tiling.py). whole_image_norms: GroupNorms normalize by the statistics of the whole
    # image, so tiles advance in lockstep and pool them; without it every norm is per position (RMS norm) or
    # absent, and a tile is the model on its crop. global_mid_blocks: the mid blocks' attention sees every
    # position, so they run untiled at latent resolution and only the convolutional paths are tiled.
    whole_image_norms: bool
    global_mid_blocks: bool
    # Whether the plans may give its conv weights the channels-last layout (plans.plan_for): Qwen-Image's
    # checkpoint-shaped 5D weights have none.
    channels_last: bool
    # Its VAE is a video VAE run on one frame: the tools built on it (ComfyUI's VAE Encode, musubi-tuner) keep
    # the frame axis in latents, (C, 1, h, w); containers that hold what those tools make store it so.
    frame_axis: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("kl", "AutoencoderKL", "KL autoencoder (SD 1.x/2.x, SDXL, SD3, FLUX.1)", VAEConfig, is_kl_state,
           "scaling_factor (and shift_factor or per-channel latents_mean/std) from the config",
           whole_image_norms=True, global_mid_blocks=True, channels_last=True),
    Family("flux2", "AutoencoderKLFlux2", "FLUX.2 VAE (FLUX.2 [dev], [klein])", Flux2Config,
           is_flux2_state, "2x2 patchify, then per-channel batch-norm running statistics from the weights",
           whole_image_norms=True, global_mid_blocks=True, channels_last=True),
    Family("tiny", "AutoencoderTiny", "tiny autoencoder (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2)", TinyConfig,
           is_tiny_state, "none: its latents are the diffusion latents of the full VAE it was "
           "distilled from (FLUX.2: normalized, unpatchified)",
           whole_image_norms=False, global_mid_blocks=False, channels_last=True),
    Family("qwenimage", "AutoencoderKLQwenImage", "Qwen-Image VAE (Qwen-Image, Qwen-Image-Edit; Wan 2.1's design, "
           "one frame)", QwenImageConfig, is_qwen_state,
           "per-channel latents_mean / latents_std from the config: (z - mean) / std",
           whole_image_norms=False, global_mid_blocks=True, channels_last=False, frame_axis=True),
)


# Classes people may point us at that we do not run (yet): named in the refusal, never guessed as another.
KNOWN_UNSUPPORTED = ("AutoencoderKLQwenImage21", "AutoencoderKLWan", "AsymmetricAutoencoderKL", "ConsistencyDecoderVAE",
                     "AutoencoderDC", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo", "AutoencoderKLCogVideoX",
                     "AutoencoderKLMochi", "AutoencoderKLAllegro", "AutoencoderKLTemporalDecoder", "AutoencoderOobleck")


def by_class(class_name: str | None) -> Family:
    """The row of a config.json's _class_name (none: AutoencoderKL, as diffusers' oldest configs)."""
    if class_name is None:
        return FAMILIES[0]
    for family in FAMILIES:
        if family.class_name == class_name:
            return family
    supported = ", ".join(f.class_name for f in FAMILIES)
    if not isinstance(class_name, str):
        raise ConfigError(f"config _class_name must be a string, not {class_name!r}")
    why = "not supported yet" if class_name in KNOWN_UNSUPPORTED else "not a VAE class vaecli knows"
    raise ConfigError(f"this is a {class_name} model: {why} (supported: {supported})")


def by_keys(keys: Iterable[str]) -> Family | None:
    """The row whose weights these keys are (diffusers or original layout), or None."""
    keys = set(keys)
    return next((f for f in reversed(FAMILIES) if f.owns_keys(keys)), None)


def config_from_dict(data: Mapping[str, Any]) -> AnyConfig:
    """A config of the family its _class_name names."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a VAE config must be a JSON object, not {type(data).__name__}")
    return by_class(data.get("_class_name")).config.from_dict(data)


def config_from_json(path: str | Path) -> AnyConfig:
    """The config a config.json describes, of the family its _class_name names."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # RecursionError: batch.open_model names a too-deep config
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} is not a JSON object")
    return config_from_dict(data)


def of_config(config: Any) -> Family:
    """The row of a config object: the row of its exact class, else of its class_name."""
    row = next((f for f in FAMILIES if type(config) is f.config), None)
    return row if row is not None else by_class(getattr(config, "class_name", None))
