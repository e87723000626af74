"""Reading inputs: a source file's bytes and their hash in one read, and the engine's header probes.

Every read of an input during a run goes through `open_regular` here (a FIFO or device never blocks a
reader; tests stand in a stalled or rewritten file at this one place).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Hashable
from pathlib import Path

from ..discovery import Item
from ..errors import InputError
from ..files import open_regular
from ..io import image_size
from ..latents import latent_shape
from .sizes import encoded_size

BYTES_PER_PIXEL_MAX = 16  # RGBA float32: the most bytes per pixel any image file we read stores uncompressed
_SLACK_BYTES = 64 << 20  # headers, metadata, thumbnails, trailing data


def read_source(path: Path, max_pixels: int) -> tuple[io.BytesIO, str]:
    """(the file's bytes in memory, their sha256): one read, so the bytes decoded are the bytes hashed, even
    when the file is rewritten meanwhile (hashing and decoding the file twice could pair a new image with
    the old hash, and a rerun would keep it as current). A file larger than any image within max_pixels
    can be (0: no limit) is refused before it is read."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        limit = max_pixels * BYTES_PER_PIXEL_MAX + _SLACK_BYTES if max_pixels > 0 else 0
        if limit and size > limit:
            raise InputError(
                f"the file is {size / 2**20:.0f} MiB, more than an image within the limit of {max_pixels / 1e6:.1f} MP "
                f"can take ({limit / 2**20:.0f} MiB); pass a larger --max-pixels to read it"
            )
        data = fh.read(limit + 1 if limit else -1)
    if limit and len(data) > limit:
        raise InputError("the file grew past the size limit while it was read")
    return io.BytesIO(data), hashlib.sha256(data).hexdigest()


def image_probe(factor: int, policy: str, multiple: int = 0, exif: bool = True) -> Callable[[Item], Hashable]:
    """The engine's probe: the size an image will be batched at, from its header (exif: as displayed)."""

    def probe(item: Item) -> Hashable:
        with open_regular(item.input) as fh:
            w, h = image_size(fh, exif)
        return encoded_size(h, w, factor, policy, multiple)

    return probe


def latent_probe(item: Item) -> Hashable:
    """The engine's probe of a latent file: its (C, h, w) shape, from its header."""
    with open_regular(item.input) as fh:
        return latent_shape(fh, item.input.suffix.lower())
