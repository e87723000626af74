"""WebDataset tar shards (what img2dataset writes): read samples from a stream, write latent shards.

A sample is a run of consecutive members sharing a key (the member path up to the first dot of its base
name): `000012.jpg`, `000012.json`, `000012.txt` form sample `000012`. Reading streams the tar once, in
order (an object-store download is never seeked); writing appends each finished sample's members
together (WebDataset readers need them adjacent) to a temporary file that `publish` renames into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import InputError
from ..files import publish_temp, temp_path
from ..io import IMAGE_SUFFIXES
from .sample import Encoded, Sample

_IMAGE_EXTS = tuple(s[1:] for s in IMAGE_SUFFIXES)


def split_key(name: str) -> tuple[str, str]:
    """'dir/000012.json' -> ('dir/000012', 'json')."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix


SIDE_MEMBER_MAX = 16 << 20  # a caption, a JSON record, a small array: bytes copied to the output shard
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def image_member_max(max_pixels: int) -> int:
    """The most bytes an image member may declare: 8 bytes per pixel within max_pixels (16-bit RGBA,
    uncompressed) plus 16 MiB of metadata; 1 GiB without a pixel limit."""
    return max_pixels * 8 + (16 << 20) if max_pixels > 0 else 1 << 30


class _Prefixed:
    """A stream whose first bytes were read ahead (to look for a compression signature)."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.stream.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data + (self.stream.read(n - len(data)) if len(data) < n else b"")
        return self.stream.read(n)


def read_tar(stream: IO[bytes], image_ext: str | None = None, max_pixels: int = 8192 * 8192) -> Iterator[Sample]:
    """Samples of a tar stream in order. image_ext: the suffix holding the image (e.g. jpg); None: the
    first member whose last suffix is an image type. Other members are side data, passed through.

    Bounded: a .tar shard must be a plain tar (gzip, bzip2, xz or zstd data under that name is refused: a
    small file could inflate to any size), and a member declaring more than image_member_max(max_pixels)
    bytes (images) or SIDE_MEMBER_MAX (side data) fails its sample unread (the tar reader skips its data
    in small blocks), so memory never follows a member's declared size."""
    head = stream.read(6)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise InputError(f"this .tar shard holds {kind}-compressed data, not a tar archive (a small compressed "
                             f"file can inflate to any size): decompress it to a .tar first")
    seen: set[str] = set()
    key: str | None = None
    members: list[tuple[str, str, bytes | None]] = []  # (suffix, member name, bytes) of the current sample
    too_big: dict[str, str] = {}  # key -> why one of its members was not read
    image_max = image_member_max(max_pixels)
    try:
        with tarfile.open(fileobj=_Prefixed(head, stream), mode="r|") as tar:  # type: ignore[call-overload]
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name[2:] if info.name.startswith("./") else info.name
                k, suffix = split_key(name)
                if k != key and members:
                    yield _sample(key, members, image_ext, seen, too_big.pop(key, None))  # type: ignore[arg-type]
                    members = []
                key = k
                limit = image_max if _is_image(suffix, image_ext) else SIDE_MEMBER_MAX
                if info.size > limit:
                    too_big.setdefault(k, f"member {name} declares {info.size:,} bytes, above the limit of "
                                          f"{limit:,} for {'an image' if limit == image_max else 'side data'}"
                                          f"{' (--max-pixels sets it)' if limit == image_max else ''}")
                    members.append((suffix, name, None))
                    continue
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                members.append((suffix, name, data))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"not a readable tar shard, or truncated ({exc})") from None
    if members:
        yield _sample(key, members, image_ext, seen, too_big.pop(key, None))  # type: ignore[arg-type]


def _sample(
    key: str, members: list[tuple[str, str, bytes | None]], image_ext: str | None, seen: set[str],
    too_big: str | None = None,
) -> Sample:
    image = next((m for m in members if _is_image(m[0], image_ext)), None)
    sides = {suffix: data for suffix, _, data in members if (image is None or suffix != image[0]) and data is not None}
    source = image[1] if image is not None else key
    error = None
    if too_big is not None:
        seen.add(key)
        return Sample(key, source, None, {}, too_big)
    if key in seen:
        error = f"key {key!r} appears twice in the shard (its members are not adjacent); only the first is kept"
    elif image is None:
        want = f".{image_ext}" if image_ext else "image"
        names = ", ".join(m[1] for m in members)
        error = f"missing image: sample {key!r} has no {want} member (found: {names}; --image-column names it)"
    seen.add(key)
    return Sample(key, source, image[2] if image is not None else None, sides, error)


def _is_image(suffix: str, image_ext: str | None) -> bool:
    if image_ext is not None:
        return suffix.lower() == image_ext.lower()
    return suffix.rsplit(".", 1)[-1].lower() in _IMAGE_EXTS


def side_bytes(value: Any) -> bytes:
    """Side data as a member's bytes: bytes as they are, text as UTF-8, anything else as JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, sort_keys=True, default=str).encode()


class _HashingFile:
    """A write-only file that hashes what passes through (tarfile's stream mode needs only write)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)


class TarSink:
    """An output tar shard: `<key>.safetensors` plus the sample's side files, published atomically."""

    suffix = "safetensors"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, temp_path(path)
        self._fh = open(self.tmp, "wb")
        self._hash = _HashingFile(self._fh)
        # Stream mode: tarfile only writes (through the hash), never seeks.
        self._tar = tarfile.open(  # type: ignore[call-overload]
            fileobj=self._hash, mode="w|", format=tarfile.PAX_FORMAT
        )
        self._lock = threading.Lock()
        self._mtime = int(time.time())

    def add(self, sample: Encoded) -> None:
        members = [(f"{sample.key}.{self.suffix}", sample.latent)]
        members += [(f"{sample.key}.{suffix}", side_bytes(v)) for suffix, v in sample.sides.items()]
        with self._lock:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), self._mtime, 0o644
                self._tar.addfile(info, io.BytesIO(data))

    def publish(self) -> tuple[int, str]:
        self._tar.close()
        self._fh.close()
        publish_temp(self.tmp, self.path)
        return self._hash.size, self._hash.sha.hexdigest()

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            self.tmp.unlink(missing_ok=True)
