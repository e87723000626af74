"""Parquet shards: images in a bytes column (img2dataset's `jpg`, Hugging Face's `image` struct) in,
latents out as one row per sample. Needs pyarrow (the `shards` extra).

Output rows: `key`, `source`, `latent` (the vaecli safetensors file's bytes, as in tar shards), `record`
(the manifest record as JSON), `bucket_width`, `bucket_height`, then the side data: the input's other
columns unchanged (parquet input) or a `files` map of suffix -> bytes (tar input).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import InputError
from ..files import publish_temp, temp_path
from .locations import need
from .sample import Encoded, Sample

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")  # tried in order when --image-column is not given
ROW_GROUP = 256


def _pq() -> Any:
    return need("pyarrow.parquet", "shards", "parquet shards")


class ParquetSource:
    """Samples of a parquet shard, one row group at a time; `side_schema` describes the passed-through columns."""

    def __init__(self, stream: IO[bytes], image_column: str | None) -> None:
        try:
            self.file = _pq().ParquetFile(stream)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for a bad file
            raise InputError(f"not a readable parquet shard ({exc})") from None
        schema = self.file.schema_arrow
        names = schema.names
        column = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        if column is None or column not in names:
            what = f"no column {image_column!r}" if image_column else "no image column found"
            raise InputError(f"{what} (columns: {', '.join(names)}); name it with --image-column")
        self.column = column
        # img2dataset names the column by the image type (jpg): the source is then <key>.jpg, as the tar
        # member and the extracted file are called, so all three give the same records and random crops.
        self.suffix = f".{self.column}" if self.column.lower() in ("jpg", "jpeg", "png", "webp") else ""
        # The key travels as the sample's key (our `key` column), so it is not side data too.
        self.side_schema = schema.remove(names.index(self.column))
        if "key" in self.side_schema.names:
            self.side_schema = self.side_schema.remove(self.side_schema.names.index("key"))

    def samples(self) -> Iterator[Sample]:
        seen: set[str] = set()
        row = 0
        for batch in self.file.iter_batches(batch_size=ROW_GROUP):
            for values in batch.to_pylist():
                image = values.pop(self.column)
                if isinstance(image, dict):  # Hugging Face's Image feature: {bytes, path}
                    image = image.get("bytes")
                given = values.pop("key", None)
                key = str(given) if given is not None else f"{row:08d}"
                error = None
                if key in seen:
                    error = f"key {key!r} appears twice in the shard; only the first is kept"
                elif not image:
                    error = f"missing image: row {row} (key {key!r}) has no bytes in column {self.column!r}"
                seen.add(key)
                yield Sample(key, key + self.suffix, image or None, values, error)
                row += 1


class ParquetSink:
    """An output parquet shard, written a row group at a time to a temporary file, published atomically."""

    suffix = "safetensors"

    def __init__(self, path: Path, side_schema: Any | None) -> None:
        import pyarrow as pa

        self.pa = pa
        self.sides_as_files = side_schema is None
        self.renamed: dict[str, str] = {}
        fields = [
            ("key", pa.string()),
            ("source", pa.string()),
            ("latent", pa.binary()),
            ("record", pa.string()),
            ("bucket_width", pa.int32()),
            ("bucket_height", pa.int32()),
        ]
        if side_schema is None:
            sides = [pa.field("files", pa.map_(pa.string(), pa.binary()))]
        else:  # an input column named like one of ours is kept as input.<name>
            ours = {n for n, _ in fields}
            self.renamed = {f.name: f"input.{f.name}" for f in side_schema if f.name in ours}
            sides = [f.with_name(self.renamed.get(f.name, f.name)) for f in side_schema]
        self.schema = pa.schema([pa.field(n, t) for n, t in fields] + sides)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, temp_path(path)
        self._writer = _pq().ParquetWriter(str(self.tmp), self.schema)
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, sample: Encoded) -> None:
        rec = sample.record
        row = {
            "key": sample.key,
            "source": rec["source"],
            "latent": sample.latent,
            "record": json.dumps(rec, sort_keys=True),
            "bucket_width": rec["bucket"][0],
            "bucket_height": rec["bucket"][1],
        }
        if self.sides_as_files:
            row["files"] = list(sample.sides.items())
        else:
            row.update({self.renamed.get(k, k): v for k, v in sample.sides.items()})
        with self._lock:
            self._rows.append(row)
            if len(self._rows) >= ROW_GROUP:
                self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(self.pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def publish(self) -> tuple[int, str]:
        self._flush()
        self._writer.close()
        sha, size = hashlib.sha256(), 0
        with open(self.tmp, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
                size += len(chunk)
        publish_temp(self.tmp, self.path)
        return size, sha.hexdigest()

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)
