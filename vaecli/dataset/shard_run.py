"""One process's share of a shard run (all shards, `--shard i/n`, or a torchrun rank), and the run index."""

from __future__ import annotations

from pathlib import Path

from ..batch import Progress, batch_sizer
from ..errors import VaecliError
from ..files import clean_temp_files
from ..models.kl import AutoencoderKL
from ..pipeline import RunOptions
from .distributed import deal
from .encoder import DatasetEncoder
from .locations import ShardInput
from .manifest import merge_lock
from .options import DatasetOptions
from .report import DatasetReport
from .shards import ShardJob, ShardOutcome, Tally, check_unique_names, process_shard, write_run_index


class ShardShare:
    """The shards of one run: encode a share of them, then (re)write OUT/index.json."""

    def __init__(
        self, vae: AutoencoderKL, shards: list[ShardInput], out: Path, options: DatasetOptions, run: RunOptions
    ) -> None:
        layout = options.layout or "tar"
        check_unique_names(shards, layout)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VaecliError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
        size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
        self.job = ShardJob(DatasetEncoder(vae, options, run), out, layout, size, batch_for)
        self.shards = shards

    def run(self, share: tuple[int, int], progress: Progress | None) -> DatasetReport:
        """Encode shard i, i+n, ... of the sorted inputs; unsharded, also write the run index."""
        index, count = share
        # As for folders: temp files of dead runs are removed only when no other process can be writing.
        removed = len(clean_temp_files(self.job.out)) if count == 1 else 0
        tally = Tally(progress)
        mine = deal(self.shards, index, count, key=lambda s: s.url)
        report = self.report([process_shard(self.job, src, tally) for src in mine], share, removed)
        if count == 1:
            self.merge(report, clean=False)
        return report

    def report(self, outcomes: list[ShardOutcome], share: tuple[int, int], removed: int) -> DatasetReport:
        return DatasetReport(
            "encode",
            [r for o in outcomes for r in o.results],
            model=self.job.enc.info,
            events=[e for o in outcomes for e in o.events],
            computed=sum(o.computed for o in outcomes),
            temp_files_removed=removed,
            shard=share,
            shards=[o.summary() for o in outcomes],
            notes=list(self.job.enc.runner.notes),
        )

    def merge(self, report: DatasetReport, clean: bool) -> None:
        """Rewrite OUT/index.json from the shard indexes present (under the merge lock); `clean`: no other
        process writes any more, so temp files of dead ones can go."""
        if clean:
            report.temp_files_removed += len(clean_temp_files(self.job.out))
        with merge_lock(self.job.out):
            path, complete = write_run_index(self.job, self.shards)
        report.manifest, report.merged = str(path), complete
        if not complete:
            report.notes.append(
                f"{path.name} lists the shards finished so far; it is complete once every input shard is "
                "(the last process to finish rewrites it)"
            )
