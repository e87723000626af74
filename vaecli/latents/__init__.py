"""Latent files: one module per container behind one table (table.py).

    native.py   ours: safetensors {'latent'} + metadata (and bare safetensors of unknown origin)
    npy.py      bare .npy arrays (read only)
    kohya.py    kohya-ss sd-scripts .npz caches
    comfyui.py  ComfyUI .latent files
    table.py    CONTAINERS, lookups by name and suffix, reading, output checks
    base.py     LatentFile, the shape check, our metadata's conventions
    safetensors_header.py   safetensors headers and tensors, checked before data is read

Importing this package does not import torch (the readers and writers import it when they run), so the
CLI can build its --format choices from FORMATS.
"""

from __future__ import annotations

from .base import (
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    RECORD_KEY,
    LatentFile,
    ShapeCheck,
    meta_json,
    meta_name,
    spec_from_meta,
)
from .comfyui import COMFYUI_LEGACY_SCALE, COMFYUI_MARKER, COMFYUI_TENSOR, comfyui_tensors, read_comfyui, write_comfyui
from .kohya import (
    META_KEY,
    kohya_arrays,
    kohya_crop_ltrb,
    kohya_plain_arrays,
    npz_state,
    read_kohya,
    text_array,
    write_kohya,
)
from .native import LATENT_KEY, write_latent
from .npy import read_npy
from .safetensors_header import TensorEntry, read_safetensors_header, read_tensor
from .table import (
    CONTAINER_SUFFIX,
    CONTAINERS,
    FORMATS,
    LATENT_SUFFIXES,
    Container,
    alpha_for,
    by_format,
    by_name,
    by_suffix,
    find_format,
    latent_is_complete,
    latent_kind,
    latent_output_state,
    latent_shape,
    load_latent,
    read_latent,
    read_record,
    stored_spec,
)

__all__ = [
    "COMFYUI_LEGACY_SCALE", "COMFYUI_MARKER", "COMFYUI_TENSOR", "CONTAINERS", "CONTAINER_SUFFIX", "Container",
    "FORMATS", "LATENT_FORMAT", "LATENT_FORMAT_VERSION", "LATENT_KEY", "LATENT_SUFFIXES", "LatentFile", "META_KEY",
    "RECORD_KEY", "ShapeCheck", "TensorEntry", "alpha_for", "by_format", "by_name", "by_suffix", "comfyui_tensors",
    "find_format", "kohya_arrays", "kohya_crop_ltrb", "kohya_plain_arrays", "latent_is_complete", "latent_kind",
    "latent_output_state", "latent_shape", "load_latent", "meta_json", "meta_name", "npz_state", "read_comfyui",
    "read_kohya", "read_latent", "read_npy", "read_record", "read_safetensors_header", "read_tensor",
    "spec_from_meta", "stored_spec", "text_array", "write_comfyui", "write_kohya", "write_latent",
]
