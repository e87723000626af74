"""The one table of VAE families: how each is recognised (diffusers class name, weight keys), which config
and model classes it uses, and how its latents are normalized. Loading (weights.py), `vaecli info` and the
plans consult it, so a new family is one model module and one row here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .config import Flux2Config, VAEConfig
from .errors import ConfigError
from .models.qwenimage import QwenImageConfig
from .models.tiny import TinyConfig


@dataclass(frozen=True)
class Family:
    name: str  # vaecli's name (config.family)
    class_name: str  # diffusers' class, config.json's _class_name
    title: str  # for people: info, docs
    config: type  # the frozen config dataclass; its from_dict reads config.json
    owns_keys: Callable[[set[str]], bool]  # diffusers- or original-layout keys of a weights file are this family's
    normalization: str  # how its latents are normalized, in words (docs, info)


def _flux2_keys(keys: set[str]) -> bool:
    # The batch-norm statistics exist only in FLUX.2's VAE (same key in diffusers and BFL's ae.safetensors).
    return "bn.running_mean" in keys or "bn.running_var" in keys


def _kl_keys(keys: set[str]) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "encoder.down.", "decoder.up_blocks.", "decoder.up."))
               for k in keys) and not _flux2_keys(keys)


FAMILIES: tuple[Family, ...] = (
    Family("kl", "AutoencoderKL", "KL autoencoder (SD 1.x/2.x, SDXL, SD3, FLUX.1)", VAEConfig, _kl_keys,
           "scaling_factor (and shift_factor or per-channel latents_mean/std) from the config"),
    Family("flux2", "AutoencoderKLFlux2", "FLUX.2 VAE (FLUX.2 [dev], [klein])", Flux2Config,
           _flux2_keys, "2x2 patchify, then per-channel batch-norm running statistics from the weights"),
    Family("tiny", "AutoencoderTiny", "tiny autoencoder (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2)", TinyConfig,
           lambda keys: _tiny_keys(keys), "none: its latents are the diffusion latents of the full VAE it was "
           "distilled from (FLUX.2: normalized, unpatchified)"),
    Family("qwenimage", "AutoencoderKLQwenImage", "Qwen-Image VAE (Qwen-Image, Qwen-Image-Edit; Wan 2.1's design, "
           "one frame)", QwenImageConfig, lambda keys: _qwen_keys(keys),
           "per-channel latents_mean / latents_std from the config: (z - mean) / std"),
)


def _qwen_keys(keys: set[str]) -> bool:
    from .qwen_weights import is_qwen_state

    return is_qwen_state(keys)


def _tiny_keys(keys: set[str]) -> bool:
    from .tiny_weights import is_tiny_state  # tiny_weights reads files through weights.py, which imports us

    return is_tiny_state(keys)
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


def config_from_dict(data: Mapping[str, Any]) -> VAEConfig:
    """A config of the family its _class_name names."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a VAE config must be a JSON object, not {type(data).__name__}")
    return by_class(data.get("_class_name")).config.from_dict(data)


def config_from_json(path: str | Path) -> VAEConfig:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # RecursionError: batch.open_model names a too-deep config
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} is not a JSON object")
    return config_from_dict(data)


def of_config(config: Any) -> Family:
    """The row of a config object."""
    return next((f for f in FAMILIES if type(config) is f.config), by_class(getattr(config, "class_name", None)))
