"""DatasetReport: what a dataset run did, whatever its engine (folders, shards, torchrun ranks, Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..batch import Report
from ..files import json_path


@dataclass
class DatasetReport(Report):
    """A Report (ok = encoded now, skipped = reused, failed) plus what only dataset mode knows."""

    missing: list[dict[str, Any]] = field(default_factory=list)  # sources in the old manifest that are gone
    shard: tuple[int, int] = (0, 1)
    manifest: str | None = None  # manifest.jsonl when this process wrote it, else its shard manifest
    merged: bool = False  # manifest.jsonl is complete and current after this run
    notes: list[str] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)  # shard inputs: what became of each

    ranks: int = 1  # torchrun: how many ranks' results this report holds (rank 0's holds them all)

    def absorb(self, others: list[DatasetReport]) -> None:
        """Add the results of other torchrun ranks (their items, counts, events, missing sources, shards)."""
        for other in others:
            self.items.extend(other.items)
            self.events.extend(other.events)
            self.computed += other.computed
            self.tiles += other.tiles
            self.temp_files_removed += other.temp_files_removed
            self.missing.extend(other.missing)
            self.shards.extend(other.shards)
            self.notes.extend(n for n in other.notes if n not in self.notes)
            self.ranks += 1

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(
            ranks=self.ranks,
            missing=self.missing,
            shard=f"{self.shard[0]}/{self.shard[1]}",
            manifest=json_path(self.manifest),
            merged=self.merged,
            notes=self.notes,
        )
        if self.shards:
            d["shards"] = self.shards
            d["shards_ok"] = sum(s["status"] == "ok" for s in self.shards)
            d["shards_skipped"] = sum(s["status"] == "skipped" for s in self.shards)
            d["shards_failed"] = sum(s["status"] == "failed" for s in self.shards)
        return d
