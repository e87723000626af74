"""vaecli: image <-> latent conversion with the KL autoencoder of latent diffusion.

The public names below are imported on first use (PEP 562), so `vaecli --help` and argument errors answer
without loading torch.

Which plan runs: `Runner(vae, RunOptions())` runs what the CLI runs with its defaults, the device's plan
(plans.TABLE: the fastest plan measured whose results match diffusers' within the tested tolerances), and
never changes `vae`; `RunOptions(kernels="off")` (`--kernels off`) is the exact mode, diffusers' own
sequence of operations. The model's own methods (`vae.encode`, `vae.decode`) take a `plan` argument and
default to that exact sequence, the pure model with no device policy.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "FAMILY_PRESETS": "config",
    "LatentSpec": "config",
    "ModelInfo": "config",
    "VAEConfig": "config",
    "ConfigError": "errors",
    "InputError": "errors",
    "NonFiniteError": "errors",
    "VaecliError": "errors",
    "WeightsError": "errors",
    "Flux2Config": "config",
    "AutoencoderKL": "models.kl",
    "AutoencoderKLFlux2": "models.kl",
    "DiagonalGaussian": "models.kl",
    "AutoencoderTiny": "models.tiny",
    "TinyConfig": "models.tiny",
    "Plan": "plans",
    "REFERENCE": "plans",
    "apply_layout": "plans",
    "laid_out": "plans",
    "plan_for": "plans",
    "BatchResult": "pipeline",
    "RunOptions": "pipeline",
    "Runner": "pipeline",
    "load_vae": "weights",
    "save_vae": "weights",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule not imported yet (vaecli.weights, ...)
        try:
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'vaecli' has no attribute {name!r}") from None
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from .config import FAMILY_PRESETS, Flux2Config, LatentSpec, ModelInfo, VAEConfig
    from .errors import ConfigError, InputError, NonFiniteError, VaecliError, WeightsError
    from .models.kl import AutoencoderKL, AutoencoderKLFlux2, DiagonalGaussian
    from .models.tiny import AutoencoderTiny, TinyConfig
    from .pipeline import BatchResult, Runner, RunOptions
    from .plans import REFERENCE, Plan, apply_layout, laid_out, plan_for
    from .weights import load_vae, save_vae
