"""`prepare_dataset`: a folder of images -> bucketed latents under OUT with OUT/manifest.jsonl.

Every latent file embeds its own manifest record, so a re-run (or a run resumed after a kill) reuses
exactly the files whose source bytes, model and settings are unchanged, and the manifest is rebuilt from
the files: there is no journal that could disagree with them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..batch import Engine, Progress, batch_sizer, model_notes
from ..choices import ENGINES
from ..discovery import Item, Siblings, check_output_root, discover
from ..errors import ConfigError, VaecliError
from ..files import clean_temp_files
from ..io import IMAGE_SUFFIXES
from ..latents import Container, find_format
from ..models.kl import AutoencoderKL
from ..pipeline import RunOptions
from .distributed import (
    barrier_after_error,
    finish_distributed,
    init_distributed,
    owner_shard,
    resolve_shard,
    shard_items,
    to_local_device,
)
from .encoder import DatasetEncoder
from .jobs import FolderJob
from .locations import ShardInput, shard_inputs
from .manifest import (
    merge_lock,
    merge_manifests,
    prior_records,
    shard_manifest_name,
    shard_manifests,
    write_manifest,
)
from .options import MANIFEST, DatasetOptions, EngineOptions, check_options
from .report import DatasetReport


def prepare_dataset(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: str | Path,
    options: DatasetOptions = DatasetOptions(),
    run: RunOptions = RunOptions(),
    shard: tuple[int, int] | None = None,
    progress: Progress | None = None,
    engine: EngineOptions = EngineOptions(),
) -> DatasetReport:
    """Encode images into a bucketed latent dataset under `out` with OUT/manifest.jsonl.

    inputs: image files and folders (searched recursively), or shards: WebDataset .tar or .parquet files,
    local or fsspec URLs, brace lists and globs (one output shard each, see shards.py; OUT/index.json
    instead of the manifest). shard: (i, n) for this process's share; under torchrun (WORLD_SIZE > 1)
    RANK/WORLD_SIZE decide it, and rank 0 merges after a barrier. engine: local, or a Ray cluster.
    An item whose latent file embeds the same source sha256, model sha256 and settings sha256 is reused
    (skipped); everything else is encoded (ok) or fails with a message (failed); the run never stops for
    one bad image. Sources listed in the previous manifest but no longer found are returned in `missing`
    and dropped from the new manifest (their latent files are left on disk).
    """
    start = time.perf_counter()
    out = Path(out)
    info = getattr(vae, "info", None)
    if info is not None and info.family_assumed:
        # SD and SDXL weights have the same shapes: a cache normalized on a guess trains the wrong scale.
        raise ConfigError(
            f"{info.name} has no config: its latent normalization would be a guess (SD's), and a latent cache "
            "must be normalized for its model; name the family (--family sd, sdxl, sd3 or flux; family=... in "
            "Python) or give the model's config.json"
        )
    container = find_format(options.format)  # None: unknown, which check_options reports
    if container is not None:
        container.check_model(vae.config)
    check_options(options, vae.config.size_multiple)  # FLUX.2: buckets on a 16-pixel grid
    shards = shard_inputs(inputs)
    _check_layout(options, engine, shards is not None)
    if engine.engine == "ray":
        from .ray_engine import prepare_with_ray

        report = prepare_with_ray(vae, shards or [], out, options, run, shard, progress, engine)
    else:
        report = _prepare_here(vae, inputs, shards, out, options, run, shard, progress)
    report.notes[:0] = [n for n in model_notes(vae) if n not in report.notes]
    report.elapsed_s = time.perf_counter() - start
    return report


def _prepare_here(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    shards: list[ShardInput] | None,
    out: Path,
    options: DatasetOptions,
    run: RunOptions,
    shard: tuple[int, int] | None,
    progress: Progress | None,
) -> DatasetReport:
    """This process's share (all, --shard i/n, or its torchrun rank's), then the merge of all shares."""
    index, count, distributed = resolve_shard(shard)
    created_group = init_distributed() if distributed else False
    if distributed:
        vae = to_local_device(vae)
    try:
        if shards is None:
            report = _prepare_share(vae, inputs, out, options, run, (index, count), progress)

            def merge(r: DatasetReport, done: bool) -> None:
                _merge_folder(r, out, count, done)
        else:
            from .shard_run import ShardShare

            share = ShardShare(vae, shards, out, options, run)
            report, merge = share.run((index, count), progress), share.merge
    except BaseException:
        if distributed:
            barrier_after_error()
        raise
    if distributed:
        everyone = finish_distributed(lambda: merge(report, True) if index == 0 else None, created_group, report)
        if everyone is not None:
            report.absorb(everyone[1:])  # rank 0 reports the whole run (one JSON document under torchrun)
    elif count > 1:
        merge(report, False)
    return report


def _check_layout(options: DatasetOptions, engine: EngineOptions, shards: bool) -> None:
    """Layouts and engines the inputs allow: images write folders; shards write tar or parquet shards."""
    if engine.engine not in ENGINES:
        raise ConfigError(f"unknown --engine {engine.engine!r}; choose one of {', '.join(ENGINES)}")
    if shards and options.layout == "folder":
        raise ConfigError("shard inputs write shards: --layout tar or parquet (one output shard per input shard)")
    if not shards and options.layout in ("tar", "parquet"):
        raise ConfigError(f"--layout {options.layout} needs shard inputs (.tar or .parquet files or URLs)")
    if not shards and engine.engine == "ray":
        raise ConfigError("--engine ray runs over shards (.tar or .parquet inputs); folders: --shard or torchrun")


def _prepare_share(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: Path,
    options: DatasetOptions,
    run: RunOptions,
    shard: tuple[int, int],
    progress: Progress | None,
) -> DatasetReport:
    """Encode this process's share of the images and write its manifest (the whole one when unsharded)."""
    index, count = shard
    container = options.container()
    notes: list[str] = []  # about the run: symlinked folders not followed
    all_items = discover(inputs, IMAGE_SUFFIXES, out, container.suffix, _siblings(container, options.flip), notes,
                         flat=options.flat)  # every output claimed once, over all shards
    check_output_root(all_items, out)
    if options.kohya_next_to_images:
        _claim_beside(all_items, container.suffix)
    items = shard_items(all_items, index, count)
    # Temp files of killed runs are removed only when no other process can be writing (one shard, or after
    # a merge): a process id seen from another node says nothing about that node's live writers.
    removed = len(clean_temp_files(out)) if count == 1 else 0
    prior = prior_records(out, notes)
    enc = DatasetEncoder(vae, options, run)
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
    engine = Engine(items, size, options.workers, progress, batch_for)
    records = _encode_items(enc, engine, out)
    seen = {it.rel for it in all_items}
    missing = [
        {"source": s, "latent": rec.get("latent")}
        for s, rec in sorted(prior.items())
        if s not in seen and (count == 1 or owner_shard(s, count) == index)
    ]
    report = DatasetReport(
        "encode",
        engine.results,
        model=enc.info,
        events=engine.events,
        computed=engine.computed,
        temp_files_removed=removed,
        missing=missing,
        shard=(index, count),
        notes=enc.runner.notes + notes,
    )
    kept = [records[i] for i, r in enumerate(engine.results) if r.status in ("ok", "skipped") and i in records]
    _write_share_manifest(report, out, kept, count)
    return report


def _siblings(container: Container, flip: bool) -> Siblings | None:
    """The files written beside each main file (a flipped latent in its own file), claimed by discovery."""
    flipped_path = container.flipped_path if flip else None
    if flipped_path is None:
        return None
    return lambda main: (flipped_path(main),)


def _claim_beside(items: list[Item], suffix: str) -> None:
    """--kohya-next-to-images: `x.png` and `x.jpg` side by side both want `x.npz`; the second fails."""
    owner: dict[str, Item] = {}
    for item in items:
        target = str(item.input.with_suffix(suffix))
        if item.error is None and target in owner:
            item.error = f"its output {target} is also the output of {owner[target].input}; rename one of them"
        owner.setdefault(target, item)


def _encode_items(enc: DatasetEncoder, engine: Engine, out: Path) -> dict[int, dict[str, Any]]:
    """Run the engine over its items: reuse up-to-date files, encode the rest; records by item index."""
    job = FolderJob(enc, engine, out)
    engine.run(job)
    for i, r in enumerate(engine.results):
        if i in job.records:
            r.output = str(out / job.records[i]["latent"])
    return job.records


def _write_share_manifest(report: DatasetReport, out: Path, kept: list[dict[str, Any]], count: int) -> None:
    """The complete manifest when unsharded (superseding shard manifests), else this shard's manifest."""
    if count == 1:
        write_manifest(out / MANIFEST, kept)
        for path in shard_manifests(out).values():
            path.unlink(missing_ok=True)  # superseded by the complete manifest just written
        report.manifest, report.merged = str(out / MANIFEST), True
    else:
        shard_path = out / shard_manifest_name(report.shard[0], count)
        write_manifest(shard_path, kept)
        report.manifest = str(shard_path)


def _merge_folder(report: DatasetReport, out: Path, count: int, after_barrier: bool) -> None:
    """Merge the shard manifests: torchrun's rank 0 after every rank passed the barrier; with --shard i/n the
    shard that finds all n shard manifests (under a file lock)."""
    if after_barrier:
        _await_shard_manifests(out, count)
        _merge_into(report, out, count, clean=True)
        return
    with merge_lock(out):
        if all((i, count) in shard_manifests(out) for i in range(count)):
            _merge_into(report, out, count, clean=False)
        else:
            report.notes.append(
                f"manifest.jsonl not merged yet: waiting for the other shards of {count} "
                "(the last shard to finish merges; or call merge_manifests)"
            )


def _await_shard_manifests(out: Path, count: int, timeout_s: float = 120.0) -> None:
    """Wait until all shard manifests are visible: on network file systems another node's file can show up
    in a directory listing seconds after its writer has passed the barrier."""
    deadline = time.monotonic() + timeout_s
    while len([k for k in shard_manifests(out) if k[1] == count]) < count and time.monotonic() < deadline:
        time.sleep(2.0)


def _merge_into(report: DatasetReport, out: Path, count: int, clean: bool) -> None:
    try:
        merged = merge_manifests(out, count)
    except VaecliError as exc:
        report.notes.append(str(exc))
        return
    report.manifest, report.merged = str(merged.path), True
    if clean:  # every writer has finished (after torchrun's barrier)
        report.temp_files_removed += len(clean_temp_files(out))
