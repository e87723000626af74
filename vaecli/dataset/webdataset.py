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
from pathlib import Path
from typing import IO, Any, Iterator

from ..errors import InputError
from ..files import publish_temp
from ..io import IMAGE_SUFFIXES, temp_path
from .sample import Encoded, Sample

_IMAGE_EXTS = tuple(s[1:] for s in IMAGE_SUFFIXES)


def split_key(name: str) -> tuple[str, str]:
    """'dir/000012.json' -> ('dir/000012', 'json')."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix


def read_tar(stream: IO[bytes], image_ext: str | None = None) -> Iterator[Sample]:
    """Samples of a tar stream in order. image_ext: the suffix holding the image (e.g. jpg); None: the
    first member whose last suffix is an image type. Other members are side data, passed through."""
    seen: set[str] = set()
    key: str | None = None
    members: list[tuple[str, str, bytes]] = []  # (suffix, member name, bytes) of the current sample
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name[2:] if info.name.startswith("./") else info.name
                k, suffix = split_key(name)
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if k != key and members:
                    yield _sample(key, members, image_ext, seen)  # type: ignore[arg-type]
                    members = []
                key = k
                members.append((suffix, name, data))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"not a readable tar shard, or truncated ({exc})") from None
    if members:
        yield _sample(key, members, image_ext, seen)  # type: ignore[arg-type]


def _sample(key: str, members: list[tuple[str, str, bytes]], image_ext: str | None, seen: set[str]) -> Sample:
    image = next((m for m in members if _is_image(m[0], image_ext)), None)
    sides = {suffix: data for suffix, _, data in members if image is None or suffix != image[0]}
    source = image[1] if image is not None else key
    error = None
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
        self._tar = tarfile.open(fileobj=self._hash, mode="w|", format=tarfile.PAX_FORMAT)  # type: ignore[call-overload]
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
