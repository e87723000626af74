"""Our latent container: a safetensors file {'latent': (C, h, w)} whose string metadata records what the
latent was made from and how it is normalized (format "vaecli.latent"). The same reader takes a bare
safetensors file of unknown origin holding one tensor (container "bare": its normalization is unknown)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..config import LatentSpec
from ..errors import InputError
from ..files import atomic_write
from .base import RECORD_KEY, LatentFile, ShapeCheck, as_chw, is_ours, record_json, spec_from_meta
from .comfyui import COMFYUI_MARKER, COMFYUI_TENSOR
from .safetensors_header import read_safetensors_header, read_tensor, record_of

if TYPE_CHECKING:
    import torch

LATENT_KEY = "latent"  # the tensor name in our latent files


def write_latent(path: Path, latent: torch.Tensor, meta: Mapping[str, str]) -> None:
    """Save a (C, h, w) latent as safetensors {'latent': tensor} with string metadata, atomically."""
    from safetensors.torch import save_file

    tensors = {LATENT_KEY: latent.detach().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(meta)))


def load_native(fh: BinaryIO, check: ShapeCheck | None) -> LatentFile:
    """Our file ('latent' + metadata), or a bare safetensors file with one tensor (or ComfyUI's name)."""
    entries, meta = read_safetensors_header(fh)
    ours = is_ours(meta)
    if ours and LATENT_KEY not in entries:
        raise InputError(f"vaecli latent file without its '{LATENT_KEY}' tensor (found: {sorted(entries)})")
    name = LATENT_KEY if ours else _bare_tensor_name(list(entries))
    tensor = read_tensor(fh, entries[name], name, check)
    return LatentFile(as_chw(tensor), dict(meta) if ours else None, "vaecli" if ours else "bare")


def _bare_tensor_name(keys: list[str]) -> str:
    if COMFYUI_TENSOR in keys:  # ComfyUI SaveLatent, under another suffix
        return COMFYUI_TENSOR
    if LATENT_KEY in keys:
        return LATENT_KEY
    tensors = [k for k in keys if k != COMFYUI_MARKER]
    if len(tensors) == 1:
        return tensors[0]
    if not tensors:
        raise InputError("the file holds no tensor")
    raise InputError(f"the file holds {len(tensors)} tensors ({', '.join(tensors[:5])}); expected 'latent' or a "
                     "single one")


def native_state(fh: BinaryIO) -> tuple[bool, dict[str, str]]:
    """(written by vaecli, its metadata) of a whole file; InputError when it is cut short or unreadable."""
    entries, meta = read_safetensors_header(fh)
    return is_ours(meta) and LATENT_KEY in entries, meta


def store_spec(spec: LatentSpec) -> LatentSpec | None:
    """Ours records any normalization: the model's own."""
    return spec


def stored_spec(lf: LatentFile, channels: int, model_spec: LatentSpec) -> LatentSpec | None:
    """What our metadata says; a bare tensor says nothing: InputError asking for --scaling-factor."""
    if lf.meta is not None:
        return spec_from_meta(lf.meta, channels)
    raise InputError(
        "bare latent without vaecli metadata: say how it is normalized with --scaling-factor "
        f"(and --shift-factor), e.g. --scaling-factor {model_spec.scaling_factor:g} for this model's "
        "diffusion latents or --scaling-factor 1 for raw VAE latents"
    )


def write_item(main: Path, flipped: Path | None, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any],
               file_meta: Mapping[str, str]) -> None:
    """A dataset item: every tensor (latent, flipped, moments) in one file, the manifest record in its metadata."""
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**file_meta, RECORD_KEY: record_json(record)}
    atomic_write(main, lambda tmp: save_file(data, str(tmp), metadata=meta))


def embedded_record(path: Path) -> str:
    """The manifest record a dataset file embeds, as text ("" when it has none)."""
    return record_of(path, RECORD_KEY)


def dataset_tensor(path: Path, name: str) -> torch.Tensor:
    """Tensor `name` (latent, latent_flipped, mean, ...) of a dataset file, as float32 (C, h, w)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).float()
