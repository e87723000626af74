"""safetensors files as latent containers read them: the header parsed and checked before any tensor data
is read, then one float tensor. Shared by our format (native.py) and ComfyUI's .latent (comfyui.py)."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .. import safejson
from ..errors import InputError
from .base import ShapeCheck, check_shape, stream_size, string_map

if TYPE_CHECKING:
    import torch

# safetensors dtypes a latent may have (little-endian in the file), as numpy reads them.
FLOAT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<i2"}
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
MAX_HEADER = 16 << 20  # our headers are a few KB; safetensors itself allows 100 MB


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name, shape and byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def is_safetensors(prefix: bytes) -> bool:
    """A file's first bytes look like a safetensors header (u64 length, then a JSON object)."""
    return len(prefix) >= 9 and prefix[8:9] == b"{" and 0 < struct.unpack("<Q", prefix[:8])[0] < MAX_HEADER


def read_safetensors_header(fh: BinaryIO) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check a safetensors header (tensor entries, metadata) without reading tensor data.

    Every entry must have a known dtype, a shape whose byte size matches its range, and lie inside the file:
    a file cut short fails here.
    """
    size = stream_size(fh)
    if size == 0:
        raise InputError("empty file")
    head = fh.read(8)
    if len(head) < 8:
        raise InputError("not a readable safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8):
        raise InputError("not a readable safetensors file (header length beyond the file: cut short?)")
    try:
        header = safejson.loads(fh.read(n))
    except safejson.JSONTooDeep as exc:
        raise InputError(f"not a readable safetensors file (its header is {exc})") from None
    except (ValueError, UnicodeDecodeError):
        raise InputError("not a readable safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError("not a readable safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not string_map(meta):
        raise InputError("safetensors metadata must map strings to strings")
    entries = {name: _entry(name, info, 8 + n, size) for name, info in header.items()}
    return entries, meta


def _entry(name: str, info: Any, base: int, size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and begin <= end
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"safetensors entry {name!r} is malformed")
    if dtype not in _DTYPE_SIZES:
        raise InputError(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
        raise InputError(f"tensor {name!r}: its byte range does not match its shape {list(shape)} and dtype {dtype}")
    if base + end > size:
        raise InputError(f"not a whole safetensors file: tensor {name!r} ends at byte {base + end} of {size} "
                         "(cut short?)")
    return TensorEntry(dtype, shape, base + begin, base + end)


def read_tensor(fh: BinaryIO, entry: TensorEntry, name: str, check: ShapeCheck | None) -> torch.Tensor:
    """One latent tensor of a safetensors file: float dtype and shape checked before its data is read."""
    import torch

    if entry.dtype not in FLOAT_DTYPES:
        raise InputError(f"tensor {name!r} has dtype {entry.dtype}; a latent must be fp16, bf16, fp32 or fp64")
    shape = check_shape(entry.shape, check)
    fh.seek(entry.begin)
    data = fh.read(entry.end - entry.begin)
    if len(data) < entry.end - entry.begin:
        raise InputError("cut short while reading (the file changed?)")
    array = np.frombuffer(data, dtype=FLOAT_DTYPES[entry.dtype]).reshape(shape)
    if entry.dtype == "BF16":
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(array.astype(np.float32))


def record_of(path: Any, key: str) -> str:
    """One metadata entry of a safetensors file on disk ("" when absent): safetensors' own reader."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(key, "")
