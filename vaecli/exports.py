"""Transitional shim: latent containers live in vaecli.latents. vaecli/cli.py still imports CONTAINER_SUFFIX
from here; delete this module once it imports vaecli.latents."""

from __future__ import annotations

from .latents import CONTAINER_SUFFIX

__all__ = ["CONTAINER_SUFFIX"]
