"""vaecli: image <-> latent conversion with the KL autoencoder of latent diffusion."""

from .config import FAMILY_PRESETS, LatentSpec, ModelInfo, VAEConfig
from .errors import ConfigError, InputError, NonFiniteError, VaecliError, WeightsError
from .model import AutoencoderKL, DiagonalGaussian
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
    "VAEConfig",
    "VaecliError",
    "WeightsError",
    "__version__",
    "load_vae",
    "save_vae",
]
