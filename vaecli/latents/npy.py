"""Bare .npy arrays: a latent of unknown origin (container "bare", read only), and the small arrays inside a
kohya .npz. Headers are checked before data is read; pickled object arrays are never loaded."""

from __future__ import annotations

import math
import struct
from typing import IO, BinaryIO

import numpy as np

from ..errors import InputError
from ..sniff import first_line
from .base import LatentFile, ShapeCheck, as_chw, check_shape

NPY_MAGIC = b"\x93NUMPY"


def is_npy(prefix: bytes) -> bool:
    """A file's first bytes are a .npy array's."""
    return prefix.startswith(NPY_MAGIC)


def read_npy(fh: IO[bytes], check: ShapeCheck | None = None, kind: str = "f", limit: int | None = None) -> np.ndarray:
    """A .npy array, its header checked before its data is read (no pickles, ever).

    kind "f": a latent of floats, shape (C, h, w) or (1, C, h, w) (seen by `check`), returned as float32.
    Other kinds ("iu", "iuf", "U": numpy dtype kinds allowed): a small array of at most `limit` bytes.
    """
    shape, fortran, dtype = _header(fh)
    if kind == "f":
        if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
            raise InputError(f".npy array has dtype {dtype}; a latent must be fp16, fp32 or fp64")
        shape = check_shape(tuple(shape), check)
    elif dtype.kind not in kind or dtype.hasobject:
        raise InputError(f".npy array has dtype {dtype}, not the kind expected here")
    count = math.prod(shape) * dtype.itemsize
    if limit is not None and count > limit:
        raise InputError(f".npy array of {count} bytes is far larger than expected here")
    data = fh.read(count)
    if len(data) < count:
        raise InputError(f".npy array is cut short ({len(data)} of {count} bytes)")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    if kind == "f":
        return np.array(array, dtype=np.float32, order="C")  # a writable copy
    return np.array(array)


def _header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of a .npy header, versions 1.0 and 2.0."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fh)
        if version == (2, 0):
            return fmt.read_array_header_2_0(fh)
    except (ValueError, OSError, struct.error) as exc:
        raise InputError(f"not a readable .npy array ({first_line(exc)})") from None
    raise InputError(f"unsupported .npy version {version[0]}.{version[1]}")


def load_npy(fh: BinaryIO, check: ShapeCheck | None) -> LatentFile:
    """A bare .npy latent: no metadata, so its normalization is unknown."""
    import torch

    return LatentFile(as_chw(torch.from_numpy(read_npy(fh, check))), None, "bare")
