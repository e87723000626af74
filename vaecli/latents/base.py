"""What every latent container shares: the LatentFile a reader returns, the shape check run before any
tensor data is read, and the conventions of our metadata (written into every container we write)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import safejson
from ..config import LatentSpec
from ..errors import ConfigError, InputError

if TYPE_CHECKING:  # torch is imported by the functions that make tensors: the table imports without it
    import torch

LATENT_FORMAT = "vaecli.latent"  # the "format" entry of our metadata
LATENT_FORMAT_VERSION = "1"
RECORD_KEY = "vaecli_record"  # dataset mode: the manifest record (safetensors metadata or a kohya .npz array)

ShapeCheck = Callable[[tuple[int, int, int]], None]  # called with (C, h, w) before tensor data is read


@dataclass
class LatentFile:
    """A latent read from disk: (C, h, w) float32 tensor, our metadata when the file has it, and what its
    container says about it (ComfyUI's version marker; kohya's original_size and crop_ltrb)."""

    tensor: torch.Tensor
    meta: dict[str, str] | None  # None: a latent without vaecli metadata
    container: str = "vaecli"  # a table name: vaecli (ours), bare (.safetensors/.npy of unknown origin), ...
    marker: bool = True  # comfyui: latent_format_version_0 present (raw values; absent: scaled by 0.18215)
    original_size: tuple[int, int] | None = None  # kohya [W, H]
    crop_ltrb: tuple[float, float, float, float] | None = None  # kohya


def check_shape(shape: tuple[int, ...], check: ShapeCheck | None) -> tuple[int, ...]:
    """A latent's stored shape, (C, h, w) or (1, C, h, w) and not empty, or those with a frame axis of one
    frame, (1, C, 1, h, w) (ComfyUI's Qwen-Image latents); `check` sees (C, h, w)."""
    one_frame = len(shape) == 5 and shape[0] == 1 and shape[2] == 1
    if not (len(shape) == 3 or (len(shape) == 4 and shape[0] == 1) or one_frame):
        raise InputError(f"latent has shape {shape}; expected (C, h, w), (1, C, h, w) or one frame (1, C, 1, h, w)")
    if min(shape) == 0:
        raise InputError(f"latent has an empty shape {shape}")
    if check is not None:
        c, h, w = (shape[1], shape[3], shape[4]) if one_frame else shape[-3:]
        check((c, h, w))
    return shape


def as_chw(t: torch.Tensor) -> torch.Tensor:
    """A stored latent as (C, h, w)."""
    if t.ndim == 5 and t.shape[0] == 1 and t.shape[2] == 1:
        t = t[:, :, 0]  # one frame: (1, C, 1, h, w) -> (1, C, h, w)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]  # (1, C, h, w) -> (C, h, w)
    return t


def stream_size(fh: BinaryIO) -> int:
    """Bytes in an open file or an in-memory copy of one (BytesIO has no descriptor); position kept."""
    pos = fh.tell()
    try:
        return fh.seek(0, 2)
    finally:
        fh.seek(pos)


def is_ours(meta: Mapping[str, str]) -> bool:
    """Metadata that vaecli wrote as a latent file's own (its format entry)."""
    return meta.get("format") == LATENT_FORMAT


def string_map(value: Any) -> bool:
    """A JSON object of strings: what safetensors metadata must be, and ours everywhere."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def record_json(record: Mapping[str, Any]) -> str:
    """A dataset record as the text every container embeds (sorted keys: the same record, the same bytes)."""
    return json.dumps(record, sort_keys=True)


def meta_name(name: str) -> str:
    """A file name as a metadata string: safetensors metadata must be valid UTF-8, file names need not be
    (bytes that are not UTF-8 are written as \\xNN)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def meta_json(meta: Mapping[str, str], key: str) -> Any:
    """One JSON-valued metadata entry, with a clear error when it is missing or garbled."""
    try:
        return safejson.loads(meta[key])
    except KeyError:
        raise InputError(f"latent metadata lacks '{key}'") from None
    except safejson.JSONTooDeep as exc:
        raise InputError(f"latent metadata '{key}' is {exc}") from None
    except ValueError:
        shown = repr(meta[key]) if len(meta[key]) <= 120 else repr(meta[key][:120]) + "..."
        raise InputError(f"latent metadata '{key}' is not valid JSON: {shown}") from None


def says_normalized(meta: Mapping[str, str] | None) -> bool:
    """Our metadata records a normalization (not raw latents)."""
    return meta is not None and meta.get("latent_spec", "none") != "none"


def spec_from_meta(meta: Mapping[str, str], channels: int | None = None) -> LatentSpec | None:
    """The normalization a latent file was stored with (None for raw latents). LatentSpec checks its values
    (finite, non-zero scale, positive stds); here: an explicit scaling_factor, per-channel lists of `channels`."""
    value = meta.get("latent_spec", "none")
    if value == "none":
        return None
    data = meta_json(meta, "latent_spec")
    if not isinstance(data, dict) or data.get("scaling_factor") is None:
        raise InputError(f"latent metadata 'latent_spec' is not an object with a scaling_factor: {value!r}")
    for key in ("latents_mean", "latents_std"):
        values = data.get(key)
        if values is not None and channels is not None and (not isinstance(values, list) or len(values) != channels):
            raise InputError(f"latent metadata 'latent_spec': {key} must list {channels} numbers, one per channel")
    try:
        return LatentSpec.from_dict(data)
    except ConfigError as exc:
        raise InputError(f"latent metadata 'latent_spec': {exc}") from None
