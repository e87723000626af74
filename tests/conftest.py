"""Shared test helpers: the one factory of tiny models (ours, and diffusers' twin with identical weights)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# Triton's interpreter runs our kernels on CPU tensors (tests/test_kernels.py). Triton decides between
# interpreting and compiling when a kernel is defined, i.e. when vaecli.kernels.* is first imported, so the
# switch must be set before anything imports those modules: here, before the tests are collected.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:  # diffusers and vaecli are imported when a model is built, after the switch above
    import diffusers

    from vaecli import AutoencoderKL, VAEConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the network
# One thread: the test models are tiny, and on a shared 2-core machine two OpenMP threads spin against
# each other (measured ~50x slower for tiny convolutions). Subprocesses get OMP_NUM_THREADS=1 too.
torch.set_num_threads(1)

# The tiny KL model most tests share: four levels (f = 8, as every released VAE) of few channels. Every other
# field is VAEConfig's default; a test changes what it needs through tiny_config's keyword overrides.
TINY_CHANNELS = (8, 16, 16, 16)
TINY_GROUPS = 8


def tiny_config(**overrides: Any) -> VAEConfig:
    """A small AutoencoderKL config; the block types follow the number of levels unless given. Lists count as
    tuples, so the keyword dicts a test gives diffusers' reference serve here too; an unknown field raises."""
    from vaecli import VAEConfig

    given = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    fields: dict[str, Any] = {"block_out_channels": TINY_CHANNELS, "norm_num_groups": TINY_GROUPS, **given}
    levels = len(fields["block_out_channels"])
    fields.setdefault("down_block_types", ("DownEncoderBlock2D",) * levels)
    fields.setdefault("up_block_types", ("UpDecoderBlock2D",) * levels)
    return VAEConfig(**fields)


def make_tiny_model(seed: int = 0, **overrides: Any) -> AutoencoderKL:
    """Our AutoencoderKL of tiny_config(**overrides), in eval mode, its random weights fixed by the seed."""
    from vaecli import AutoencoderKL

    config = tiny_config(**overrides)  # built before seeding: the weights depend on the seed alone
    torch.manual_seed(seed)
    return AutoencoderKL(config).eval()


def make_reference(seed: int = 0, jitter: float = 0.02, **config: Any) -> diffusers.AutoencoderKL:
    """A diffusers AutoencoderKL with seeded random weights; norm affines are perturbed so they matter.
    Fields not given are diffusers' defaults (not tiny_config's): the tests name every value they rely on."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(config.get("block_out_channels", (64,)))
    config.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
    config.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    model = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model


def twin_of(ref: diffusers.AutoencoderKL) -> AutoencoderKL:
    """Our AutoencoderKL with the config and weights of a diffusers one, loaded strictly (the parity tests)."""
    from vaecli import AutoencoderKL, VAEConfig

    ours = AutoencoderKL(VAEConfig.from_dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., AutoencoderKL]:
    """make_tiny_model, for tests and fixtures of any scope: tiny_model(seed=0, **overrides)."""
    return make_tiny_model


@pytest.fixture
def reference() -> Callable[..., diffusers.AutoencoderKL]:
    return make_reference


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    """A tiny 4-level model with seeded random weights (the pipeline and staging tests' model)."""
    return make_tiny_model(norm_num_groups=4)
