"""What flows through the shard pipeline: an input sample, an encoded sample, and the latent file bytes.

An encoded sample's latent is one vaecli safetensors file (the same bytes the folder layout writes,
record embedded), so tar members, parquet cells and folder files are read by one reader.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import safejson
from ..latents import RECORD_KEY


@dataclass
class Sample:
    """One input sample: its key (WebDataset's: the member name up to the first dot of its base name),
    its source (the image member's name, or the parquet key), the image bytes (None when the sample has no
    image), and side data passed through untouched (tar: suffix -> bytes; parquet: column -> value)."""

    key: str
    source: str
    data: bytes | None
    sides: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # known while reading: no image, duplicate key


@dataclass
class Encoded:
    """One finished sample, ready for a shard sink."""

    key: str
    latent: bytes  # a vaecli safetensors file
    record: dict[str, Any]
    sides: dict[str, Any]


class ShardSink(Protocol):
    """An output shard being written to a temporary file; `publish` renames it into place."""

    suffix: str  # member name suffix of the latent in the record ("safetensors")

    def add(self, sample: Encoded) -> None: ...

    def publish(self) -> tuple[int, str]: ...  # (bytes, sha256) of the published file

    def abort(self) -> None: ...


def latent_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str], record: dict[str, Any]) -> bytes:
    """A vaecli safetensors file in memory, embedding `record` as the folder layout does."""
    from safetensors.torch import save

    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(data, metadata={**meta, RECORD_KEY: json.dumps(record, sort_keys=True)})


def read_latent_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, embedded record) of a vaecli safetensors file held in memory."""
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, then the JSON header
    header = safejson.loads(data[8 : 8 + n])
    record = safejson.loads((header.get("__metadata__") or {}).get(RECORD_KEY, "{}"))
    return load(data), record
