"""vaecli: image <-> latent conversion with the KL autoencoder of latent diffusion."""

from .config import FAMILY_PRESETS, LatentSpec, ModelInfo, VAEConfig
from .errors import ConfigError, InputError, NonFiniteError, VaecliError, WeightsError
from .model import AutoencoderKL, DiagonalGaussian
from .plans import REFERENCE, Plan, apply_layout, plan_for
from .weights import load_vae, save_vae

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "ConfigError",
    "DiagonalGaussian",
    "FAMILY_PRESETS",
    "InputError",
    "LatentSpec",
    "ModelInfo",
    "NonFiniteError",
    "Plan",
    "REFERENCE",
    "VAEConfig",
    "VaecliError",
    "WeightsError",
    "__version__",
    "apply_layout",
    "load_vae",
    "plan_for",
    "save_vae",
]
