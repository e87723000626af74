"""The dataset pipelines as Jobs on the batch engine (vaecli.batch.Engine), beside encode/decode/roundtrip:

  FolderJob  one image file -> its bucket-sized latent file(s) under OUT, reused when current
  SampleJob  one sample of a chunk of an input shard -> an entry of the output shard

Both place each image in its bucket while reading (reader threads) and share one compute step: a model
call per batch of equal-sized crops, retries and events noted per item.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..batch import Engine, Loaded, Skip, read_source
from ..discovery import Item
from ..errors import InputError
from ..io import read_image
from ..latents import latent_output_state, read_record
from ..pipeline import BatchResult
from .encoder import DatasetEncoder, Placement
from .folder import output_paths
from .sample import Encoded, Sample, ShardSink, latent_bytes


def encode_batch(enc: DatasetEncoder, engine: Engine, batch: list[Loaded[Any]]) -> list[Any]:
    """The compute step of both Jobs: one model call per batch of crops, retries and events noted per item."""
    outs, result = enc.encode([b.x for b in batch], [b.item.rel for b in batch])  # type: ignore[misc]
    note_retries(engine, [b.index for b in batch], result)
    return outs


def note_retries(engine: Engine, indices: list[int], result: BatchResult) -> None:
    """Record retries and events; rows of flipped copies (row >= len(indices)) count for their original."""
    n = len(indices)
    for retry in result.retries:
        engine.results[indices[retry.index % n]].retries.append(
            {"stage": "encode", "from_dtype": retry.from_dtype, "to_dtype": retry.to_dtype}
        )
    engine.events.extend(f"encode: {e}" for e in result.events)


@dataclass(frozen=True)
class Placed:
    """One image placed in its bucket, waiting for its batch: what its record needs."""

    source_sha256: str
    placement: Placement


class FolderJob:
    """Images of a folder run: reuse up-to-date files, encode the rest; `records` by item index (reused and
    written ones) once the engine has run."""

    probe: Callable[[Item], Hashable | None] | None = None  # batches form in the prefetch window

    def __init__(self, enc: DatasetEncoder, engine: Engine, out: Path) -> None:
        self.enc, self.engine, self.out = enc, engine, out
        self.records: dict[int, dict[str, Any]] = {}

    def load(self, index: int, item: Item) -> Loaded[Placed] | Skip:
        o = self.enc.options
        data, source_sha = read_source(item.input, o.max_pixels)  # the bytes hashed are the bytes decoded
        reused = reusable(self.enc, item, self.out, source_sha)
        if isinstance(reused, dict):
            self.records[index] = reused
            return Skip()
        if reused is not None:
            self.engine.results[index].notes.append(reused)
        pixels = read_image(data, o.alpha_policy(), o.max_pixels, o.pixel_convention())
        crop, placement = self.enc.place(pixels, item.rel)
        return Loaded(index, item, crop, Placed(source_sha, placement))

    def key(self, loaded: Loaded[Placed]) -> Hashable:
        return loaded.x.shape

    def compute(self, batch: list[Loaded[Placed]]) -> list[Any]:
        return encode_batch(self.enc, self.engine, batch)

    def save(self, loaded: Loaded[Placed], tensors: dict[str, torch.Tensor]) -> None:
        """Write one image's file(s) under OUT; keep its manifest record."""
        enc, out = self.enc, self.out
        main, flipped = output_paths(loaded.item, out, enc.options)

        def rel(path: Path) -> str:
            return Path(os.path.relpath(path, out)).as_posix()

        e = loaded.state
        record = enc.record(
            loaded.item.rel,
            str(loaded.item.input.resolve()),
            e.source_sha256,
            e.placement,
            tensors,
            rel(main),
            rel(flipped) if flipped is not None else None,
        )
        write_item = enc.container.write_item
        assert write_item is not None  # every container --format names writes dataset items
        if enc.frames:
            tensors = {k: v.unsqueeze(1) for k, v in tensors.items()}  # (C, h, w) -> (C, 1, h, w), as ComfyUI's
        write_item(main, flipped, tensors, record, enc.file_meta(record))  # each file embeds the record
        self.records[loaded.index] = record


def reusable(enc: DatasetEncoder, item: Item, out: Path, source_sha: str) -> dict[str, Any] | str | None:
    """The record of an up-to-date output to reuse, or a note saying why it is re-encoded, or None."""
    o = enc.options
    main, flipped = output_paths(item, out, o)
    for path in (main, flipped) if flipped is not None else (main,):
        check_replaceable(path, o.overwrite)
    if o.overwrite or not main.exists():
        return None
    rec = read_record(main, enc.container.name)
    if rec is None:
        return "re-encoded: the existing file is incomplete or unreadable"
    want = {
        "source": item.rel,
        "source_sha256": source_sha,
        "model_sha256": enc.model_sha,
        "settings_sha256": enc.settings_sha,
    }
    changed = [k for k, v in want.items() if rec.get(k) != v]
    if not changed and (flipped is None or flipped.exists()):
        return {**rec, "source_path": str(item.input.resolve())}  # the folder may have moved
    return f"re-encoded: changed {', '.join(changed) or 'flipped file missing'}"


def check_replaceable(path: Path, overwrite: bool) -> None:
    """A file at an output path that vaecli did not write (a kohya cache beside an image, a user's own file)
    is never replaced without --overwrite; a folder or FIFO there never."""
    state = latent_output_state(path)
    if state.status == "blocked":
        raise InputError(f"cannot replace the output {path}: {state.detail}")
    if state.status == "foreign" and not overwrite:
        raise InputError(f"the output {path} already exists and {state.detail}; pass --overwrite to replace it, "
                         "or choose another output folder")


@dataclass(frozen=True)
class PlacedSample:
    """One sample's image placed in its bucket: its bytes' sha256 and where it went."""

    sha256: str
    placement: Placement


class SampleJob:
    """The samples of one chunk of an input shard (item i is chunk[i]): decode and place, encode, add each
    to the output shard's sink and its record to `records` (the shard's, over all its chunks)."""

    probe: Callable[[Item], Hashable | None] | None = None  # samples are in memory: no headers to read ahead

    def __init__(
        self, enc: DatasetEncoder, engine: Engine, chunk: list[Sample], url: str, sink: ShardSink,
        records: list[dict[str, Any]],
    ) -> None:
        self.enc, self.engine, self.chunk, self.url, self.sink = enc, engine, chunk, url, sink
        self.records = records

    def load(self, index: int, item: Item) -> Loaded[PlacedSample]:
        o = self.enc.options
        data = self.chunk[index].data or b""
        pixels = read_image(io.BytesIO(data), o.alpha_policy(), o.max_pixels)
        crop, placement = self.enc.place(pixels, item.rel)
        return Loaded(index, item, crop, PlacedSample(hashlib.sha256(data).hexdigest(), placement))

    def key(self, loaded: Loaded[PlacedSample]) -> Hashable:
        return loaded.x.shape

    def compute(self, batch: list[Loaded[PlacedSample]]) -> list[Any]:
        return encode_batch(self.enc, self.engine, batch)

    def save(self, loaded: Loaded[PlacedSample], tensors: dict[str, Any]) -> None:
        enc, s, e = self.enc, self.chunk[loaded.index], loaded.state
        where = f"{s.key}.{self.sink.suffix}"
        rec = enc.record(s.source, f"{self.url}#{s.source}", e.sha256, e.placement, tensors, where)
        self.sink.add(Encoded(s.key, latent_bytes(tensors, enc.file_meta(rec), rec), rec, s.sides))
        self.records.append(rec)
