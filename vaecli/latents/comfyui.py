"""ComfyUI's .latent files (nodes.py SaveLatent / LoadLatent, read at commit
e60e19b175f93f2c8fac037063de9f13259be9d4): safetensors {`latent_tensor`: (B, C, h, w),
`latent_format_version_0`: empty tensor}. Without the marker LoadLatent multiplies by 1/0.18215 (files of the
first format held SD-scaled latents). ComfyUI ignores safetensors metadata; ours carries our latent metadata
there. Latents are what ComfyUI's VAE node outputs: raw, except FLUX.2's normalized patchified form
(comfy/latent_formats.py Flux2: 128 channels, 16x downscale, no process_in scaling); Qwen-Image's keep the
frame axis of its video VAE, (1, 16, 1, h, w) as ComfyUI's VAE Encode outputs (ComfyUI issue #9218), which
its Qwen-Image model reads (comfy/ldm/qwen_image/model.py works on (B, C, T, H, W)).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..config import LatentSpec
from ..errors import InputError
from ..files import atomic_write
from .base import RECORD_KEY, LatentFile, ShapeCheck, as_chw, is_ours, record_json, says_normalized, spec_from_meta
from .safetensors_header import read_safetensors_header, read_tensor, record_of

if TYPE_CHECKING:
    import torch

COMFYUI_TENSOR = "latent_tensor"
COMFYUI_MARKER = "latent_format_version_0"
COMFYUI_LEGACY_SCALE = 0.18215  # LoadLatent: a file without the marker holds latents * 0.18215
FLIPPED_SUFFIX = ".flipped.latent"  # a dataset item's flipped latent: ComfyUI's files hold one tensor


def comfyui_tensors(latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ComfyUI .latent file's tensors for one latent (C, h, w), or (C, 1, h, w) for a frame-axis family."""
    import torch

    return {
        COMFYUI_TENSOR: latent.float().cpu().unsqueeze(0).contiguous(),  # (C, [1,] h, w) -> (1, C, [1,] h, w)
        COMFYUI_MARKER: torch.tensor([]),  # present: LoadLatent takes the values as they are
    }


def write_comfyui(path: Path, latent: torch.Tensor, meta: Mapping[str, str]) -> None:
    """A ComfyUI .latent file of one raw (C, h, w) latent, atomically, with our metadata (ComfyUI ignores it)."""
    from safetensors.torch import save_file

    data = comfyui_tensors(latent)
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=dict(meta)))


def read_comfyui(fh: BinaryIO, check: ShapeCheck | None) -> LatentFile:
    """A ComfyUI .latent file: `latent_tensor` of one latent (1, C, h, w), the version marker, our metadata."""
    entries, meta = read_safetensors_header(fh)
    if COMFYUI_TENSOR not in entries:
        raise InputError(f"not a ComfyUI latent file: no '{COMFYUI_TENSOR}' tensor (found: {sorted(entries)[:5]})")
    shape = entries[COMFYUI_TENSOR].shape
    if len(shape) in (4, 5) and shape[0] > 1:
        raise InputError(f"holds a batch of {shape[0]} latents; vaecli decodes files of one latent (1, C, h, w)")
    tensor = read_tensor(fh, entries[COMFYUI_TENSOR], COMFYUI_TENSOR, check)
    ours = dict(meta) if is_ours(meta) else None
    return LatentFile(as_chw(tensor), ours, "comfyui", marker=COMFYUI_MARKER in entries)


def comfyui_state(fh: BinaryIO) -> tuple[bool, dict[str, str]]:
    """(written by vaecli, its metadata) of a whole .latent file: ours by our metadata or a dataset record."""
    entries, meta = read_safetensors_header(fh)
    return COMFYUI_TENSOR in entries and (is_ours(meta) or RECORD_KEY in meta), meta


def store_spec(spec: LatentSpec) -> LatentSpec | None:
    """What ComfyUI's VAE node outputs: raw, or the normalized patchified form for FLUX.2."""
    return spec if spec.patch_size > 1 else None


def stored_spec(lf: LatentFile, channels: int, model_spec: LatentSpec) -> LatentSpec | None:
    """ComfyUI's convention: raw with the marker, SD-scaled without it (as LoadLatent reads it), and for
    FLUX.2 normalized by the VAE's own statistics."""
    patched = model_spec.patch_size > 1
    if says_normalized(lf.meta):
        if patched:
            return spec_from_meta(lf.meta or {}, channels)
        raise InputError(f"inconsistent file: its metadata says normalized latents, but a {lf.container} file "
                         "holds raw ones")
    if patched and channels == len(model_spec.latents_mean or ()):
        return model_spec  # ComfyUI's own FLUX.2 latents: normalized by the VAE's statistics
    if not lf.marker:
        return LatentSpec(COMFYUI_LEGACY_SCALE)  # LoadLatent multiplies such files by 1/0.18215
    return None


def flipped_path(main: Path) -> Path:
    """The ComfyUI file of a flipped latent, beside its main file."""
    return main.with_name(main.name[: -len(".latent")] + FLIPPED_SUFFIX)


def write_item(main: Path, flipped: Path | None, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any],
               file_meta: Mapping[str, str]) -> None:
    """A dataset item: the flipped latent in its own file first, the main file last (it marks completion)."""
    meta = {**file_meta, RECORD_KEY: record_json(record)}
    if flipped is not None:
        write_comfyui(flipped, tensors["latent_flipped"], meta)
    write_comfyui(main, tensors["latent"], meta)


def embedded_record(path: Path) -> str:
    """The manifest record a dataset file embeds, as text ("" when it has none)."""
    return record_of(path, RECORD_KEY)


def dataset_tensor(path: Path, name: str) -> torch.Tensor:
    """The latent of a dataset .latent file (flipped ones have their own file), as float32 (C, h, w)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return as_chw(f.get_tensor(COMFYUI_TENSOR)).float()  # (1, C, [1,] h, w) -> (C, h, w)
