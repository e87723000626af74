"""Manifests: OUT/manifest.jsonl (one JSON record per image), per-shard manifests, and their merge.

Shard i of n writes OUT/manifest.shard-<i>-of-<n>.jsonl; the merge writes manifest.jsonl (records sorted
by source, fsynced, renamed into place) and deletes the shard manifests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import safejson
from ..errors import VaecliError
from ..files import atomic_write
from .options import MANIFEST


def read_manifest(path: Path, bad: list[int] | None = None) -> list[dict[str, Any]]:
    """Records of a manifest (JSON lines); unparsable lines are ignored (a torn write is never the only copy:
    every latent file embeds its record), their numbers (1-based) added to `bad`."""
    records = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rec = safejson.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("source"), str):
            records.append(rec)
        elif line.strip() and bad is not None:
            bad.append(number)
    return records


def write_manifest(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Records sorted by source, one JSON object a line, fsynced and renamed into place."""
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["source"]))
    write_text_durably(path, lines)


def write_text_durably(path: Path, text: str) -> None:
    """Write `text` to a temporary file, fsync it, and rename it to `path`."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def shard_manifest_name(index: int, count: int) -> str:
    return f"manifest.shard-{index}-of-{count}.jsonl"


def shard_manifests(out: Path) -> dict[tuple[int, int], Path]:
    """The shard manifests present under OUT, by (index, count)."""
    found = {}
    for path in out.glob("manifest.shard-*-of-*.jsonl"):
        parts = path.name[len("manifest.shard-") : -len(".jsonl")].split("-of-")
        try:
            found[(int(parts[0]), int(parts[1]))] = path
        except (ValueError, IndexError):
            continue
    return found


@dataclass
class MergeResult:
    """A merged manifest: where it is, its records, and how many shards went into it."""

    path: Path
    records: list[dict[str, Any]]
    shards: int


def merge_manifests(out: str | Path, count: int | None = None) -> MergeResult:
    """Merge OUT/manifest.shard-<i>-of-<n>.jsonl (all n present) into OUT/manifest.jsonl, atomically.

    count: n; None takes the n of the shard manifests present (there must be one). The shard manifests
    are deleted after the merge, as are those of other shard counts (left by earlier runs, superseded).
    Raises VaecliError naming the shards that have not finished.
    """
    out = Path(out)
    found = shard_manifests(out)
    counts = sorted({n for _, n in found})
    if count is None:
        if len(counts) != 1:
            what = "no shard manifests" if not counts else f"shard manifests of several shard counts ({counts})"
            raise VaecliError(f"{out}: {what}; pass the shard count to merge")
        count = counts[0]
    absent = [i for i in range(count) if (i, count) not in found]
    if absent:
        raise VaecliError(
            f"{out}: cannot merge: shard(s) {', '.join(f'{i}/{count}' for i in absent)} have not finished "
            "(their manifest.shard-<i>-of-<n>.jsonl is missing); run them, then merge again"
        )
    records: dict[str, dict[str, Any]] = {}
    for i in range(count):
        for rec in read_manifest(found[(i, count)]):
            records[rec["source"]] = rec
    merged = sorted(records.values(), key=lambda r: r["source"])
    target = out / MANIFEST
    write_manifest(target, merged)
    for path in found.values():
        path.unlink(missing_ok=True)
    return MergeResult(target, merged, count)


@contextmanager
def merge_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on OUT/.vaecli/merge.lock (fcntl.lockf: POSIX locks also work on most NFS mounts)."""
    import fcntl

    folder = out / ".vaecli"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "merge.lock", "a+") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)


def prior_records(out: Path, notes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Records of the previous manifest and of unmerged shard manifests, by source (to report what vanished);
    a note in `notes` for each manifest with unreadable lines."""
    prior: dict[str, dict[str, Any]] = {}
    for path in (out / MANIFEST, *shard_manifests(out).values()):
        bad: list[int] = []
        for rec in read_manifest(path, bad):
            prior[rec["source"]] = rec
        if bad and notes is not None:
            shown = ", ".join(map(str, bad[:5])) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
            notes.append(f"{path.name}: line(s) {shown} unreadable, ignored; the manifest is rebuilt from the "
                         "latent files (each embeds its record; a missing or damaged file is encoded again)")
    return prior
