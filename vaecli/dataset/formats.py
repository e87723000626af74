"""Which reader and writer a shard kind and an output layout take."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .locations import ShardInput
from .sample import Sample, ShardSink


def open_source(
    src: ShardInput, stream: IO[bytes], image_column: str | None, max_pixels: int = 8192 * 8192
) -> tuple[Iterator[Sample], Any]:
    """(samples of the shard, arrow schema of its passed-through columns: parquet only, else None);
    tar members are bounded by max_pixels (read_tar)."""
    if src.kind == "parquet":
        from .parquet import ParquetSource

        source = ParquetSource(stream, image_column)
        return source.samples(), source.side_schema
    from .webdataset import read_tar

    return read_tar(stream, image_column, max_pixels), None


def open_sink(layout: str, target: Path, side_schema: Any) -> ShardSink:
    """A temporary output shard for `target`; parquet keeps parquet inputs' side columns as they are."""
    if layout == "parquet":
        from .parquet import ParquetSink

        return ParquetSink(target, side_schema)
    from .webdataset import TarSink

    return TarSink(target)
