"""Shared test helpers: tiny diffusers reference models with identical random weights."""

from __future__ import annotations

import os

# Triton's interpreter runs our kernels on CPU tensors (tests/test_kernels.py). Triton decides between
# interpreting and compiling when a kernel is defined, i.e. when vaecli.kernels.* is first imported, so the
# switch must be set before anything imports those modules: here, before the tests are collected.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the network
# One thread: the test models are tiny, and on a shared 2-core machine two OpenMP threads spin against
# each other (measured ~50x slower for tiny convolutions). Subprocesses get OMP_NUM_THREADS=1 too.
torch.set_num_threads(1)


def make_reference(seed: int = 0, jitter: float = 0.02, **config):
    """A diffusers AutoencoderKL with seeded random weights; norm affines are perturbed so they matter."""
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


@pytest.fixture
def reference():
    return make_reference


@pytest.fixture(scope="module")
def vae():
    """A tiny 4-level model with seeded random weights (the pipeline and staging tests' model)."""
    from vaecli.config import VAEConfig
    from vaecli.models.kl import AutoencoderKL

    torch.manual_seed(0)
    cfg = VAEConfig(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
    )
    return AutoencoderKL(cfg).eval()
