"""Transitional shim: kohya .npz and ComfyUI .latent files now live in vaecli.latents (kohya.py, comfyui.py,
behind the container table); this module goes once batch and dataset import vaecli.latents."""

from __future__ import annotations

# transitional: re-exported for batch/dataset until they import vaecli.latents
from .latents import (  # noqa: F401
    COMFYUI_LEGACY_SCALE,
    COMFYUI_MARKER,
    COMFYUI_TENSOR,
    CONTAINER_SUFFIX,
    META_KEY,
    RECORD_KEY,
    alpha_for,
    comfyui_tensors,
    kohya_arrays,
    kohya_crop_ltrb,
    kohya_plain_arrays,
    npz_state,
    read_comfyui,
    read_kohya,
    text_array,
    write_comfyui,
    write_kohya,
)
