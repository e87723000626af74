"""The shard pipeline: input shards (WebDataset tar, parquet; local or fsspec URLs) -> one latent shard each.

Per input shard: stream its samples in chunks (the next chunk is read while this one is encoded), run
each chunk through the same reader/model/writer engine as folders, append finished samples to a
temporary output shard, publish it by rename, then write OUT/<name>.index.json (what the shard holds and
the identities it was made from). The index is the completion mark: a shard whose index names the same
input (URL, size and version tags), model and settings, and whose output file has the recorded size, is
skipped; anything else is redone whole. OUT/index.json summarizes all shards of the run.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import safejson
from ..batch import Counts, Engine, ItemResult, Progress
from ..discovery import Item
from ..errors import ConfigError, InputError
from .encoder import DatasetEncoder
from .jobs import SampleJob
from .locations import ShardInput, input_identity, open_input
from .manifest import write_text_durably
from .sample import Sample, ShardSink

INDEX_VERSION = 1
RUN_INDEX = "index.json"
CHUNK = 256  # samples held in memory per step; the engine drains its partial batches at chunk ends


def index_path(out: Path, src: ShardInput) -> Path:
    return out / f"{src.name}.index.json"


@dataclass
class ShardJob:
    """What every shard of a run shares."""

    enc: DatasetEncoder
    out: Path
    layout: str  # tar or parquet
    batch_size: int
    batch_for: Callable[[Hashable], int] | None = None


@dataclass
class ShardOutcome:
    """What became of one input shard: ok (written now), skipped (reused), failed; and of its samples."""

    shard: ShardInput
    status: str
    results: list[ItemResult]
    index: dict[str, Any] | None = None
    computed: int = 0
    events: list[str] = field(default_factory=list)
    error: str | None = None
    note: str | None = None
    detail: str | None = None  # traceback of an unexpected error
    started_at: float = 0.0  # wall clock (time.time()) of the worker that handled the shard
    finished_at: float = 0.0

    def summary(self) -> dict[str, Any]:
        idx = self.index or {}
        return {
            "input": self.shard.url,
            "output": idx.get("shard"),
            "status": self.status,
            "samples": len(idx.get("samples", [])),
            "failed": len(idx.get("failed", [])),
            "error": self.error,
            "note": self.note,
            "started_at": round(self.started_at, 3),
            "finished_at": round(self.finished_at, 3),
        }


class Tally:
    """Samples finished (by status) of samples seen, across shards and chunks, reported to a progress callback."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.total = progress, 0
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self._lock = threading.Lock()

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def add(self, total: int = 0, results: Sequence[ItemResult] = ()) -> None:
        """Count `total` more samples seen and the finished `results` (statuses ok, failed, skipped)."""
        with self._lock:
            self.total += total
            for r in results:
                if r.status in self.counts:
                    self.counts[r.status] += 1
            if self.progress is not None:
                c = self.counts
                self.progress(Counts(self.total, ok=c["ok"], failed=c["failed"], skipped=c["skipped"]))


def check_unique_names(shards: list[ShardInput], layout: str) -> None:
    """Two inputs that would write the same output shard are refused up front."""
    by_name: dict[str, list[str]] = {}
    for src in shards:
        by_name.setdefault(src.name, []).append(src.url)
    for name, urls in by_name.items():
        if len(urls) > 1:
            raise ConfigError(
                f"input shards {', '.join(urls)} would all write OUT/{name}.{layout}; "
                "give shards distinct file names (or encode them into different OUT folders)"
            )


def process_shard(job: ShardJob, src: ShardInput, tally: Tally) -> ShardOutcome:
    """Reuse the finished output of this shard, or encode it; never raises for a bad shard or sample."""
    started = time.time()
    settled, identity, note = check_shard(job, src)
    if settled is not None:
        tally.add(len(settled.results), settled.results)
        outcome = settled
    else:
        assert identity is not None
        outcome = _encode_shard(job, src, identity, tally)
        outcome.note = note
    outcome.started_at, outcome.finished_at = started, time.time()
    return outcome


def check_shard(job: ShardJob, src: ShardInput) -> tuple[ShardOutcome | None, dict[str, Any] | None, str | None]:
    """(outcome when nothing is left to do: reused, or unreadable; the input's identity; why it is redone)."""
    try:
        identity = input_identity(src.url)
    except InputError as exc:
        return ShardOutcome(src, "failed", [_failed(src.url, str(exc))], error=str(exc)), None, None
    found, note = finished_index(job, src, identity)
    return (_reused(job, src, found) if found is not None else None), identity, note


def finished_index(job: ShardJob, src: ShardInput, identity: dict[str, Any]) -> tuple[dict | None, str | None]:
    """(index of an up-to-date output shard, None) or (None, why it is redone; None when never written)."""
    idx = read_json(index_path(job.out, src))
    if idx is None:
        return None, None
    if job.enc.options.overwrite:
        return None, "re-encoded shard: --overwrite"
    want = {
        "version": INDEX_VERSION,
        "layout": job.layout,
        "input": src.url,
        "input_identity": identity,
        "model_sha256": job.enc.model_sha,
        "settings_sha256": job.enc.settings_sha,
    }
    changed = [k for k, v in want.items() if idx.get(k) != v]
    target = job.out / str(idx.get("shard", ""))
    if not target.is_file() or target.stat().st_size != idx.get("bytes"):
        changed.append("output shard missing or incomplete")
    if changed:
        return None, f"re-encoded shard: changed {', '.join(changed)}"
    return idx, None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = safejson.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _failed(where: str, error: str, note: str | None = None, detail: str | None = None) -> ItemResult:
    r = ItemResult(where, None, "failed", error, detail=detail)
    if note:
        r.notes.append(note)
    return r


def _reused(job: ShardJob, src: ShardInput, idx: dict[str, Any]) -> ShardOutcome:
    """A finished shard's samples as skipped, and the failures it recorded as failed (as a re-run of a
    folder fails a corrupt image again), with a note saying where they come from."""
    target = job.out / idx["shard"]
    results = [ItemResult(f"{src.url}#{r['source']}", f"{target}#{r['latent']}", "skipped") for r in idx["samples"]]
    note = "recorded when the shard was written (its input is unchanged; --overwrite retries it)"
    results += [_failed(f"{src.url}#{f['source']}", f["error"], note) for f in idx["failed"]]
    return ShardOutcome(src, "skipped", results, idx)


def _encode_shard(job: ShardJob, src: ShardInput, identity: dict[str, Any], tally: Tally) -> ShardOutcome:
    """Encode one shard into a temporary output shard, publish it, then write its index."""
    from .formats import open_sink, open_source

    target = job.out / f"{src.name}.{job.layout}"
    state = _ShardState()
    sink: ShardSink | None = None
    try:
        with open_input(src.url) as stream:
            samples, side_schema = open_source(src, stream, job.enc.options.image_column, job.enc.options.max_pixels)
            sink = open_sink(job.layout, target, side_schema if src.kind == "parquet" else None)
            for chunk in read_ahead(samples, CHUNK):
                _encode_chunk(job, src, target, chunk, sink, state, tally)
        size, sha = sink.publish()
    except Exception as exc:  # noqa: BLE001 - a shard that cannot be read or written fails alone
        if sink is not None:
            sink.abort()
        message = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        detail = None if isinstance(exc, InputError) else traceback.format_exc()
        return ShardOutcome(src, "failed", [_failed(src.url, message, detail=detail)], error=message, detail=detail)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    index = _shard_index(job, src, identity, target, size, sha, state)
    write_text_durably(index_path(job.out, src), json.dumps(index, sort_keys=True))
    return ShardOutcome(src, "ok", state.results, index, state.computed, state.events)


@dataclass
class _ShardState:
    results: list[ItemResult] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    computed: int = 0


def _encode_chunk(
    job: ShardJob, src: ShardInput, target: Path, chunk: list[Sample], sink: ShardSink, state: _ShardState, tally: Tally
) -> None:
    """Samples of one chunk through the engine: decode and place in reader threads, encode, add to the sink."""
    items = [Item(Path(s.source), s.source, None, s.error) for s in chunk]
    tally.add(total=len(chunk))
    engine = Engine(items, job.batch_size, job.enc.options.workers, _progress_delta(tally), job.batch_for)
    engine.run(SampleJob(job.enc, engine, chunk, src.url, sink, state.records))
    for s, r in zip(chunk, engine.results, strict=False):
        r.input = f"{src.url}#{s.source}"
        if r.status == "ok":
            r.output = f"{target}#{s.key}.{sink.suffix}"
        elif r.status == "failed":
            state.failed.append({"source": s.source, "error": r.error or ""})
    state.results.extend(engine.results)
    state.events.extend(engine.events)
    state.computed += engine.computed


def _progress_delta(tally: Tally) -> Progress:
    """An engine progress callback (counts of one chunk) that adds each finished sample to the tally."""

    def update(counts: Counts) -> None:
        if counts.item is not None:
            tally.add(results=[counts.item])

    return update


def _shard_index(
    job: ShardJob, src: ShardInput, identity: dict[str, Any], target: Path, size: int, sha: str, state: _ShardState
) -> dict[str, Any]:
    return {
        "version": INDEX_VERSION,
        "layout": job.layout,
        "shard": target.name,
        "input": src.url,
        "input_identity": identity,
        "model_sha256": job.enc.model_sha,
        "settings_sha256": job.enc.settings_sha,
        "bytes": size,
        "sha256": sha,
        "samples": sorted(state.records, key=lambda r: r["source"]),
        "failed": sorted(state.failed, key=lambda f: f["source"]),
    }


_END = object()


def read_ahead(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    """Chunks of `size` samples; the next chunk is read in a background thread while the caller works."""
    q: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            chunk: list[Sample] = []
            for s in samples:
                chunk.append(s)
                if len(chunk) == size:
                    if not put(chunk):
                        return
                    chunk = []
            if chunk and not put(chunk):
                return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    threading.Thread(target=produce, name="vaecli-shard-read", daemon=True).start()
    try:
        while True:
            got = q.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()


def write_run_index(job: ShardJob, shards: list[ShardInput]) -> tuple[Path, bool]:
    """OUT/index.json: per output shard its input, sample and failure counts, bytes, sha256 and buckets;
    `complete` when every input shard has an up-to-date output. Returns (path, complete)."""
    entries, complete = [], True
    for src in shards:
        idx = read_json(index_path(job.out, src))
        want = {"input": src.url, "model_sha256": job.enc.model_sha, "settings_sha256": job.enc.settings_sha}
        current = idx is not None and all(idx.get(k) == v for k, v in want.items())
        if not current:
            complete = False
            continue
        assert idx is not None
        buckets = Counter(f"{w}x{h}" for w, h in (r["bucket"] for r in idx["samples"]))
        entries.append(
            {
                "shard": idx["shard"],
                "index": index_path(job.out, src).name,
                "input": src.url,
                "samples": len(idx["samples"]),
                "failed": len(idx["failed"]),
                "bytes": idx["bytes"],
                "sha256": idx["sha256"],
                "buckets": dict(sorted(buckets.items())),
            }
        )
    doc = {
        "version": INDEX_VERSION,
        "layout": job.layout,
        "complete": complete,
        "model_sha256": job.enc.model_sha,
        "settings_sha256": job.enc.settings_sha,
        "samples": sum(e["samples"] for e in entries),
        "shards": entries,
    }
    path = job.out / RUN_INDEX
    write_text_durably(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path, complete
