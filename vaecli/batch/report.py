"""What a run returns: per-item results, counts for progress callbacks, and the Report of the whole run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..files import json_path


@dataclass
class ItemResult:
    """The outcome of one input file."""

    input: str
    output: str | None
    status: str = "pending"  # ok, failed or skipped
    error: str | None = None
    retries: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # roundtrip: psnr, ssim, max_abs_error
    notes: list[str] = field(default_factory=list)
    detail: str | None = None  # traceback of an unexpected error, shown with --debug

    def to_dict(self) -> dict[str, Any]:
        # absolute paths: the same document whatever the working folder (scripts join and compare them)
        d: dict[str, Any] = {"input": json_path(self.input), "output": json_path(self.output), "status": self.status}
        if self.error is not None:
            d["error"] = self.error
        d.update(self.metrics)
        if self.retries:
            d["retries"] = self.retries
        d["notes"] = list(self.notes)  # always present (empty when there are none), as docs/cli.md promises
        return d


@dataclass(frozen=True)
class Counts:
    """What a progress callback sees: items finished so far by status, of `total`, and the item whose
    completion this call reports (None at the start, and for counts that arrive in bulk)."""

    total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    item: ItemResult | None = None

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped


Progress = Callable[[Counts], None]  # called in the thread that finished the item (a writer's, often)


@dataclass
class Report:
    """Everything one command did: per-item results, events and timing."""

    command: str
    items: list[ItemResult]
    model: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)  # e.g. OOM batch splits
    elapsed_s: float = 0.0
    computed: int = 0  # images that went through the model
    tiles: int = 0  # model calls on tiles, when tiling ran
    temp_files_removed: int = 0
    notes: list[str] = field(default_factory=list)  # about the run, e.g. symlinked folders not followed
    device_busy_s: float | None = None  # time the device spent computing (model calls), None: not measured

    def count(self, status: str) -> int:
        return sum(1 for r in self.items if r.status == status)

    @property
    def retries(self) -> int:
        return sum(len(r.retries) for r in self.items)

    def means(self) -> dict[str, float | None]:
        scored = [r.metrics for r in self.items if "psnr" in r.metrics]
        if not scored:
            return {"mean_psnr": None, "mean_ssim": None}
        return {
            "mean_psnr": float(np.mean([m["psnr"] for m in scored])),
            "mean_ssim": float(np.mean([m["ssim"] for m in scored])),
        }

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "command": self.command,
            "ok": self.count("ok"),
            "failed": self.count("failed"),
            "skipped": self.count("skipped"),
            "items": [r.to_dict() for r in self.items],
        }
        if self.command == "roundtrip":
            d.update(self.means())
        d.update(
            model=self.model,
            retries=self.retries,
            events=self.events,
            tiles=self.tiles,
            elapsed_s=round(self.elapsed_s, 4),
            images_per_s=round(self.computed / self.elapsed_s, 3) if self.elapsed_s > 0 else None,
            temp_files_removed=self.temp_files_removed,
        )
        if self.device_busy_s is not None:
            d["device_busy_s"] = round(self.device_busy_s, 4)
            share = min(1.0, self.device_busy_s / self.elapsed_s) if self.elapsed_s > 0 else None
            d["device_busy_share"] = round(share, 3) if share is not None else None
        if self.notes:
            d["notes"] = self.notes
        return d
