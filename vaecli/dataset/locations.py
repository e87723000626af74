"""Where shards live: brace-expanded shard lists, local paths and fsspec URLs (s3://, gs://, hf://, file://).

Local shards need nothing beyond the base package; URLs need fsspec and the file system's own package
(the `shards` extra brings fsspec and s3fs; gs:// needs gcsfs, hf:// huggingface_hub).
"""

from __future__ import annotations

import glob
import importlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, InputError
from ..files import is_url  # noqa: F401 - also this module's public name

SHARD_SUFFIXES = {".tar": "tar", ".parquet": "parquet"}
_BRACE = re.compile(r"\{([^{}]*)\}")
_FS_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}


def need(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or raise one line naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs {module}: pip install 'vaecli[{extra}]'") from None


def expand_braces(text: str) -> list[str]:
    """'a/{00..02}.tar' -> a/00.tar, a/01.tar, a/02.tar (zero padding kept); '{x,y}' lists; groups combine."""
    m = _BRACE.search(text)
    if m is None:
        return [text]
    body, head, tail = m.group(1), text[: m.start()], text[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ConfigError(f"{text}: cannot expand {{{body}}}; use {{first..last}} or {{a,b,c}}")
    return [done for option in options for done in expand_braces(head + option + tail)]


def shard_kind(text: str) -> str | None:
    """'tar' or 'parquet' for a shard path or URL (by suffix), else None."""
    name = text.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix, kind in SHARD_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


@dataclass(frozen=True)
class ShardInput:
    """One input shard: its URL or path as given, its kind, and the name its output shard takes."""

    url: str
    kind: str  # tar or parquet
    name: str  # file name without the shard suffix: OUT/<name>.tar, OUT/<name>.parquet


def expand_shards(inputs: Sequence[str]) -> list[ShardInput]:
    """Inputs -> shards, sorted by URL: braces expanded, globs (*, ?, [) matched, local or through fsspec."""
    urls: list[str] = []
    for raw in inputs:
        for text in expand_braces(str(raw)):
            urls.extend(_glob(text) if any(c in text for c in "*?[") else [text])
    missing = [u for u in urls if not is_url(u) and not os.path.lexists(os.path.expanduser(u))]
    if missing:  # a typo in a local path is a usage error, as for image inputs
        raise ConfigError(f"no such file or folder: {', '.join(sorted(missing)[:5])}" + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    shards = []
    for url in sorted(set(urls)):
        kind = shard_kind(url)
        if kind is None:
            raise ConfigError(f"{url}: not a shard (expected a .tar or .parquet file)")
        base = url.rstrip("/").rsplit("/", 1)[-1]
        shards.append(ShardInput(url, kind, base[: -len("." + kind)]))
    return shards


def shard_inputs(inputs: Sequence[str | Path]) -> list[ShardInput] | None:
    """The shards that `inputs` name, or None when they name images and folders (the folder pipeline)."""
    texts = [str(i) for i in inputs]
    shardy = [is_url(t) or shard_kind(t) is not None for t in texts]
    if not any(shardy):
        return None
    if not all(shardy):
        images = ", ".join(t for t, s in zip(texts, shardy, strict=True) if not s)
        raise ConfigError(f"give either shards (.tar, .parquet, URLs) or images and folders, not both ({images})")
    shards = expand_shards(texts)
    if not shards:
        raise ConfigError(f"no shard matches {', '.join(texts)}")
    return shards


def _glob(pattern: str) -> list[str]:
    if not is_url(pattern):
        return sorted(glob.glob(os.path.expanduser(pattern)))
    fs, path = url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0]
    return [f"{protocol}://{p}" for p in sorted(fs.glob(path))]


def url_to_fs(url: str) -> tuple[Any, str]:
    """fsspec's (file system, path) for a URL, with a one-line message when its package is missing."""
    fsspec = need("fsspec", "shards", f"reading {url}")
    protocol = url.split("://", 1)[0].lower()
    if protocol in _FS_PACKAGES:
        need(_FS_PACKAGES[protocol], "shards", f"reading {protocol}:// URLs")
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{url}: {exc}") from None


def open_input(url: str) -> IO[bytes]:
    """A binary stream of a local shard or of a URL; InputError when it cannot be opened."""
    try:
        if not is_url(url):
            return open(os.path.expanduser(url), "rb")
        fs, path = url_to_fs(url)
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{url}: no such shard") from None
    except OSError as exc:
        raise InputError(f"{url}: cannot open: {exc.strerror or exc}") from None


def input_identity(url: str) -> dict[str, Any]:
    """What tells a changed input shard from the one a finished output was made from: size and mtime
    (local) or size and the store's version tags (ETag, generation, ...), without reading the data."""
    try:
        if not is_url(url):
            st = os.stat(os.path.expanduser(url))
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        fs, path = url_to_fs(url)
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"{url}: no such shard") from None
    except OSError as exc:
        raise InputError(f"{url}: cannot stat: {exc.strerror or exc}") from None
    tags = ("size", "ETag", "etag", "LastModified", "last_modified", "mtime", "generation", "md5Hash", "crc32c")
    return {k: str(info[k]) for k in tags if info.get(k) is not None}
