"""Dataset preparation: aspect-ratio buckets, resize and crop, latent caches with a manifest, sharding.

`prepare_dataset` encodes a folder of images into bucket-sized latents under OUT and writes
OUT/manifest.jsonl (one JSON object per image). Every latent file embeds its own manifest record, so a
re-run (or a run resumed after a kill) reuses exactly the files whose source bytes, model and settings are
unchanged, and the manifest is rebuilt from the files: there is no journal that could disagree with them.

Sharding: the items, sorted by relative path, are dealt round-robin to `n` shards; shard `i` writes
OUT/manifest.shard-<i>-of-<n>.jsonl and the shard manifests are merged into manifest.jsonl (by rank 0
under torchrun, by the last shard to finish with `--shard i/n`, or by `merge_manifests`).

Bucketing follows kohya-ss sd-scripts (library/model_util.py make_bucket_resolutions and
library/train_util.py BucketManager.select_bucket), so a kohya export lands in the bucket kohya computes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import random
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .batch import (
    Item,
    Loaded,
    Progress,
    Report,
    Skip,
    _Engine,
    _noise,
    _sha256_file,
    batch_sizer,
    check_output_root,
    discover,
    model_summary,
    resample,
)
from .errors import ConfigError, InputError, VaecliError
from .files import check_regular
from .io import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, atomic_write, clean_temp_files, read_image
from .model import AutoencoderKL
from .pipeline import DTYPE_NAMES, DTYPES, BatchResult, RunOptions, Runner

FORMATS = ("vaecli", "kohya", "comfyui")
FORMAT_SUFFIX = {"vaecli": ".safetensors", "kohya": ".npz", "comfyui": ".latent"}
MANIFEST = "manifest.jsonl"
DATASET_VERSION = 1  # bump when the meaning of a manifest field or of a setting changes
RECORD_KEY = "vaecli_record"  # the manifest record embedded in every latent file
RESAMPLE = "bicubic-antialias"
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class DatasetOptions:
    """What `prepare_dataset` writes; every field has a CLI flag of the same name (dashes for underscores)."""

    bucket_resolution: int = 512  # side of the square whose area every bucket shares (SD 1.x; SDXL: 1024)
    bucket_step: int = 64  # bucket sides are multiples of this (a multiple of the VAE's factor, 8)
    min_bucket_size: int | None = None  # shortest bucket side; None: bucket_resolution // 2
    max_bucket_size: int | None = None  # longest bucket side; None: bucket_resolution * 2
    no_upscale: bool = False  # never enlarge: a small image gets a bucket that fits inside it (kohya's)
    random_crop: bool = False  # crop at a random offset (from crop_seed and the path) instead of the centre
    crop_seed: int = 0
    flip: bool = False  # also store the latent of the horizontally flipped crop
    moments: bool = False  # also store the posterior mean and logvar (raw), for sampling at training time
    format: str = "vaecli"  # vaecli (safetensors + metadata), kohya (.npz), comfyui (.latent)
    kohya_next_to_images: bool = False  # kohya format: write <image stem>.npz beside each image, not under OUT
    raw: bool = False  # vaecli format: store raw latents instead of normalized ones (kohya/comfyui: always raw)
    sample: bool = False  # store a posterior sample (noise from seed and path) instead of the mode
    seed: int = 0
    latent_dtype: str = "fp32"  # vaecli format only; kohya and comfyui files are float32
    alpha: str = "white"  # transparent pixels: composite over white or black, or drop alpha
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 4  # images of one bucket per model call; 0: sized from free memory
    workers: int = 0  # reader threads; 0 = min(4, CPUs)
    overwrite: bool = False  # re-encode even when an up-to-date latent exists

    def bucket_bounds(self) -> tuple[int, int]:
        """(min, max) bucket side after defaults (half and twice the resolution, kept on the step grid)."""
        step = max(1, self.bucket_step)
        lo, hi = self.min_bucket_size, self.max_bucket_size
        if lo is None:
            lo = -(-self.bucket_resolution // 2 // step) * step  # rounded up to the step
        if hi is None:
            hi = self.bucket_resolution * 2 // step * step
        return lo, hi


def check_options(options: DatasetOptions, factor: int) -> None:
    """Raise one ConfigError listing every inconsistent option."""
    o = options
    lo, hi = o.bucket_bounds()
    problems = []
    if o.format not in FORMATS:
        problems.append(f"unknown --format {o.format!r}; choose one of {', '.join(FORMATS)}")
    if o.bucket_step < 1 or o.bucket_step % factor:
        problems.append(f"--bucket-step {o.bucket_step} must be a positive multiple of the VAE's factor {factor}")
    if o.bucket_resolution < o.bucket_step:
        problems.append(f"--bucket-resolution {o.bucket_resolution} is smaller than --bucket-step {o.bucket_step}")
    if not (o.bucket_step <= lo <= o.bucket_resolution <= hi):
        problems.append(f"bucket sizes must satisfy bucket-step <= min ({lo}) <= resolution <= max ({hi})")
    if o.bucket_step >= 1 and (lo % o.bucket_step or hi % o.bucket_step):
        problems.append(
            f"--min-bucket-size {lo} and --max-bucket-size {hi} must be multiples of --bucket-step {o.bucket_step}"
        )
    if o.latent_dtype not in DTYPES:
        problems.append(f"unknown latent dtype {o.latent_dtype!r}; choose one of {', '.join(DTYPES)}")
    elif o.format != "vaecli" and o.latent_dtype != "fp32":
        problems.append(f"--format {o.format} stores float32 latents (what its reader expects); drop --latent-dtype")
    if o.format == "comfyui" and o.moments:
        problems.append("--moments needs --format vaecli or kohya (a ComfyUI .latent holds one tensor)")
    if o.kohya_next_to_images and o.format != "kohya":
        problems.append("--kohya-next-to-images needs --format kohya")
    if o.batch_size < 0:
        problems.append("--batch-size must be at least 1 (or 0 / auto: sized from free memory)")
    if problems:
        raise ConfigError("; ".join(problems))


# ------------------------------------------------------------------------------------------------ buckets


def make_buckets(
    resolution: int, step: int = 64, min_size: int | None = None, max_size: int | None = None
) -> list[tuple[int, int]]:
    """Bucket sizes (width, height), sorted: sides multiples of `step` within [min, max], area <= resolution^2.

    The square bucket plus, for every width from min to max in steps, the tallest height that keeps the
    area (kohya's make_bucket_resolutions, so both tools produce the same list).
    """
    lo = min_size if min_size is not None else resolution // 2
    hi = max_size if max_size is not None else resolution * 2
    area = resolution * resolution
    side = int(math.sqrt(area) // step) * step
    buckets = {(side, side)}
    for width in range(lo, hi + 1, step):
        height = min(hi, (area // width) // step * step)
        if height >= lo:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket and the size it is resized to before the crop (both width, height)."""

    bucket: tuple[int, int]
    resized: tuple[int, int]


def _round_to_step(x: float, step: int) -> int:
    n = int(x + 0.5)
    return n - n % step


def select_bucket(
    width: int, height: int, buckets: Sequence[tuple[int, int]], step: int, no_upscale: bool, max_area: int
) -> BucketChoice:
    """The bucket for an image of width x height, and the size that covers it (kohya's select_bucket).

    Resizing: the bucket with the nearest aspect ratio (an exact size match wins), then the smallest scale
    that covers it. no_upscale: images above max_area shrink to about max_area; the bucket is the image
    size rounded down to `step`, so small images are never enlarged.
    """
    aspect = width / height
    if not no_upscale:
        if (width, height) in buckets:
            bucket = (width, height)
        else:
            errors = [abs(bw / bh - aspect) for bw, bh in buckets]
            bucket = buckets[int(np.argmin(errors))]  # first of equal errors, as numpy's argmin
        bw, bh = bucket
        scale = bh / height if aspect > bw / bh else bw / width  # cover: the relatively shorter side fits
        return BucketChoice(bucket, (int(width * scale + 0.5), int(height * scale + 0.5)))
    if width * height > max_area:
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        # Round one side to the step and derive the other; keep whichever keeps the aspect ratio better.
        w1 = _round_to_step(rw, step)
        h1 = _round_to_step(w1 / aspect, step)
        h2 = _round_to_step(rh, step)
        w2 = _round_to_step(h2 * aspect, step)
        if h1 and w2 and abs(w1 / h1 - aspect) < abs(w2 / h2 - aspect):
            resized = (w1, int(w1 / aspect + 0.5))
        else:
            resized = (int(h2 * aspect + 0.5), h2)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if bucket[0] == 0 or bucket[1] == 0:
        raise InputError(
            f"image is {width}x{height}: with --no-upscale a side below --bucket-step {step} leaves no bucket"
        )
    return BucketChoice(bucket, resized)


def crop_box(resized: tuple[int, int], bucket: tuple[int, int], random_crop: bool, seed: int, key: str) -> list[int]:
    """[left, top, right, bottom] of the bucket-sized window in the resized image (centre, or seeded random)."""
    (rw, rh), (bw, bh) = resized, bucket
    if random_crop:
        digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return [left, top, left + bw, top + bh]


def kohya_crop_ltrb(bucket: tuple[int, int], original: tuple[int, int]) -> tuple[float, ...]:
    """kohya's `crop_ltrb` value: where the whole image, fitted *inside* the bucket, would lie in bucket pixels.

    This is what kohya's own cache stores (BucketManager.get_crop_ltrb; its SDXL crop conditioning), not
    the crop window; it can hold floats. Same arithmetic as kohya, so its trainer sees identical values.
    """
    (bw, bh), (w, h) = bucket, original
    image_ar = w / h
    if bw / bh > image_ar:
        rw, rh = bh * image_ar, bh
    else:
        rw, rh = bw, bw / image_ar
    left, top = (bw - rw) // 2, (bh - rh) // 2
    return (left, top, left + rw, top + rh)


# ------------------------------------------------------------------------------------------------ sharding


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), checked: 0 <= i < n."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4 (shard i of n, counted from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int, bool]:
    """(index, count, distributed): torchrun's RANK/WORLD_SIZE when set, else `shard`, else (0, 1)."""
    env = torchrun_env()
    if env is not None:
        rank, world, _ = env
        if shard is not None and tuple(shard) != (rank, world):
            raise ConfigError(
                f"--shard {shard[0]}/{shard[1]} contradicts torchrun's RANK={rank} WORLD_SIZE={world}; drop --shard"
            )
        return rank, world, True
    if shard is None:
        return 0, 1, False
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: need 0 <= i < n")
    return i, n, False


def bind_local_device() -> None:
    """Under torchrun with CUDA, make cuda:LOCAL_RANK this process's current device (one GPU per process).

    Call it before loading the model, so that loading on "cuda" lands on this process's own GPU.
    """
    env = torchrun_env()
    if env is not None and torch.cuda.is_available():
        torch.cuda.set_device(env[2])


def shard_items(items: list[Item], index: int, count: int) -> list[Item]:
    """Items sorted by relative path, every count-th from `index`: deterministic, balanced to within one."""
    ordered = sorted(items, key=lambda it: (it.rel, str(it.input)))
    return ordered[index::count]


def shard_manifest_name(index: int, count: int) -> str:
    return f"manifest.shard-{index}-of-{count}.jsonl"


def _owner_shard(source: str, count: int) -> int:
    """Which shard reports a vanished source: stable per path, so exactly one shard lists it."""
    return zlib.crc32(source.encode()) % count


# ------------------------------------------------------------------------------------------------ manifests


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Records of a manifest (JSON lines); unparsable lines are ignored (a torn write is never the only copy)."""
    records = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "source" in rec:
            records.append(rec)
    return records


def write_manifest(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Records sorted by source, one JSON object a line, fsynced and renamed into place."""
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["source"]))

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def _shard_manifests(out: Path) -> dict[tuple[int, int], Path]:
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
    found = _shard_manifests(out)
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
def _merge_lock(out: Path) -> Iterator[None]:
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


# ------------------------------------------------------------------------------------------------ writers


def settings_sha256(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def output_paths(item: Item, out: Path, options: DatasetOptions) -> tuple[Path, Path | None]:
    """(file holding the latent, separate file of the flipped latent or None)."""
    if options.kohya_next_to_images:
        main = item.input.with_suffix(".npz")
    else:
        assert item.output is not None
        main = item.output
    flipped = flipped_path(main) if options.flip and options.format == "comfyui" else None
    return main, flipped


def flipped_path(main: Path) -> Path:
    """The ComfyUI file of a flipped latent, beside its main file."""
    return main.with_name(main.name[: -len(".latent")] + ".flipped.latent")


def read_record(path: Path, fmt: str) -> dict[str, Any] | None:
    """The manifest record embedded in a latent file; None when missing, partial, or not ours."""
    try:
        check_regular(path)  # a FIFO or device there would block the readers below
        if fmt == "kohya":
            with np.load(path, allow_pickle=False) as npz:
                if RECORD_KEY not in npz.files or "latents" not in npz.files:
                    return None
                text = str(npz[RECORD_KEY])
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(RECORD_KEY, "")
        rec = json.loads(text)
        return rec if isinstance(rec, dict) else None
    except Exception:  # noqa: BLE001 - any failure means "not a usable output": it is re-encoded
        return None


def write_outputs(
    record: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    main: Path,
    flipped: Path | None,
    fmt: str,
    file_meta: dict[str, str],
) -> None:
    """Write one item's file(s) atomically, each embedding `record`; the main file last (it marks completion)."""
    from safetensors.torch import save_file

    text = json.dumps(record, sort_keys=True)
    if fmt == "vaecli":
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {**file_meta, RECORD_KEY: text}
        atomic_write(main, lambda tmp: save_file(data, str(tmp), metadata=meta))
    elif fmt == "kohya":
        from .exports import kohya_arrays

        arrays = kohya_arrays(tensors, record)
        arrays[RECORD_KEY] = np.array(text)  # a 0-d unicode array: np.load reads it without pickle

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a temp name
                np.savez(fh, **arrays)

        atomic_write(main, write)
    else:
        from .exports import comfyui_tensors

        if flipped is not None:
            flip_data = comfyui_tensors(tensors["latent_flipped"])
            atomic_write(flipped, lambda tmp: save_file(flip_data, str(tmp), metadata={RECORD_KEY: text}))
        data = comfyui_tensors(tensors["latent"])
        atomic_write(main, lambda tmp: save_file(data, str(tmp), metadata={RECORD_KEY: text}))


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class DatasetReport(Report):
    """A Report (ok = encoded now, skipped = reused, failed) plus what only dataset mode knows."""

    missing: list[dict[str, Any]] = field(default_factory=list)  # sources in the old manifest that are gone
    shard: tuple[int, int] = (0, 1)
    manifest: str | None = None  # manifest.jsonl when this process wrote it, else its shard manifest
    merged: bool = False  # manifest.jsonl is complete and current after this run
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(
            missing=self.missing,
            shard=f"{self.shard[0]}/{self.shard[1]}",
            manifest=self.manifest,
            merged=self.merged,
            notes=self.notes,
        )
        return d


def prepare_dataset(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: str | Path,
    options: DatasetOptions = DatasetOptions(),
    run: RunOptions = RunOptions(),
    shard: tuple[int, int] | None = None,
    progress: Progress | None = None,
) -> DatasetReport:
    """Encode images into a bucketed latent dataset under `out` with OUT/manifest.jsonl.

    inputs: image files and folders (searched recursively). shard: (i, n) for this process's share;
    under torchrun (WORLD_SIZE > 1) RANK/WORLD_SIZE decide it, and rank 0 merges after a barrier.
    An item whose latent file embeds the same source sha256, model sha256 and settings sha256 is reused
    (skipped); everything else is encoded (ok) or fails with a message (failed); the run never stops for
    one bad image. Sources listed in the previous manifest but no longer found are returned in `missing`
    and dropped from the new manifest (their latent files are left on disk).
    """
    start = time.perf_counter()
    out = Path(out)
    factor = vae.config.downsample_factor
    check_options(options, factor)
    index, count, distributed = resolve_shard(shard)
    created_group = _init_distributed() if distributed else False
    if distributed:
        vae = _to_local_device(vae)

    fmt = options.format
    siblings = (lambda main: (flipped_path(main),)) if options.flip and fmt == "comfyui" else None
    all_items = discover(inputs, IMAGE_SUFFIXES, out, FORMAT_SUFFIX[fmt], siblings)  # every output claimed once
    check_output_root(all_items, out)
    items = shard_items(all_items, index, count)
    # Temp files of killed runs are removed only when no other process can be writing (one shard, or after
    # a merge): a process id seen from another node says nothing about that node's live writers.
    removed = len(clean_temp_files(out)) if count == 1 else 0
    prior = _prior_records(out)

    runner = Runner(vae, run)
    info = model_summary(vae)
    normalized = fmt == "vaecli" and not options.raw
    spec = vae.config.latent_spec if normalized else None
    store_dtype = DTYPES[options.latent_dtype]
    lo, hi = options.bucket_bounds()
    buckets = make_buckets(options.bucket_resolution, options.bucket_step, lo, hi)
    max_area = options.bucket_resolution**2
    settings = {
        "dataset_version": DATASET_VERSION,
        "bucket_resolution": options.bucket_resolution,
        "bucket_step": options.bucket_step,
        "min_bucket_size": lo,
        "max_bucket_size": hi,
        "no_upscale": options.no_upscale,
        "resample": RESAMPLE,
        "random_crop": options.random_crop,
        "crop_seed": options.crop_seed if options.random_crop else None,
        "flip": options.flip,
        "moments": options.moments,
        "format": fmt,
        "latent_spec": spec.to_dict() if spec is not None else None,
        "posterior": "sample" if options.sample else "mode",
        "seed": options.seed if options.sample else None,
        "latent_dtype": options.latent_dtype,
        "alpha": options.alpha,
        "compute_dtype": DTYPE_NAMES[runner.dtype],
    }
    settings_sha = settings_sha256(settings)
    model_sha = info["weights_sha256"]
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
    engine = _Engine(items, size, options.workers, progress, batch_for)
    records: dict[int, dict[str, Any]] = {}

    def load(i: int, item: Item) -> Loaded | Skip:
        main, flipped = output_paths(item, out, options)
        source_sha = _sha256_file(item.input) if item.input.is_file() else ""
        if not options.overwrite and main.exists():
            rec = read_record(main, fmt)
            want = {
                "source": item.rel,
                "source_sha256": source_sha,
                "model_sha256": model_sha,
                "settings_sha256": settings_sha,
            }
            if rec is not None:
                changed = [k for k, v in want.items() if rec.get(k) != v]
                if not changed and (flipped is None or flipped.exists()):
                    records[i] = {**rec, "source_path": str(item.input.resolve())}  # the folder may have moved
                    return Skip()
                engine.results[i].notes.append(f"re-encoded: changed {', '.join(changed) or 'flipped file missing'}")
        pixels = read_image(item.input, options.alpha, options.max_pixels)
        h, w = pixels.shape[:2]
        choice = select_bucket(w, h, buckets, options.bucket_step, options.no_upscale, max_area)
        rw, rh = choice.resized
        resized = resample(pixels, rh, rw) if (rw, rh) != (w, h) else pixels
        box = crop_box(choice.resized, choice.bucket, options.random_crop, options.crop_seed, item.rel)
        left, top, right, bottom = box
        crop = np.ascontiguousarray(resized[top:bottom, left:right])  # (bh, bw, 3)
        extra = {"source_sha256": source_sha, "original": (w, h), "choice": choice, "crop": box}
        return Loaded(i, item, crop, extra)

    def compute(batch: list[Loaded]) -> list[Any]:
        n = len(batch)
        x = torch.from_numpy(np.stack([b.x for b in batch])).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
        if options.flip:
            x = torch.cat([x, x.flip(-1)])  # (2N, 3, H, W): originals, then their mirror images
        result = runner.encode_moments(x)
        failed = _note(engine, batch, result)
        mean, logvar = result.tensor.chunk(2, dim=1)  # (M, 2c, h, w) -> 2 x (M, c, h, w)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        z = mean
        if options.sample:
            shape = tuple(mean.shape[1:])
            keys = [b.item.rel for b in batch] + ([b.item.rel + "\0flip" for b in batch] if options.flip else [])
            noise = torch.stack([_noise(options.seed, k, shape) for k in keys])
            z = mean + torch.exp(0.5 * logvar) * noise
        if spec is not None:
            z = spec.normalize(z)
        outs: list[Any] = []
        for j in range(n):
            if j in failed:
                outs.append(failed[j])
                continue
            t = {"latent": z[j]}
            if options.flip:
                t["latent_flipped"] = z[n + j]
            if options.moments:
                t["mean"], t["logvar"] = mean[j], logvar[j]
                if options.flip:
                    t["mean_flipped"], t["logvar_flipped"] = mean[n + j], logvar[n + j]
            t = {k: v.to(store_dtype) for k, v in t.items()}
            if not all(torch.isfinite(v).all() for v in t.values()):
                outs.append(InputError(f"latent overflows {options.latent_dtype}; use --latent-dtype fp32 or bf16"))
            else:
                outs.append(t)
        return outs

    def save(loaded: Loaded, tensors: dict[str, torch.Tensor]) -> None:
        e = loaded.extra
        main, flipped = output_paths(loaded.item, out, options)
        choice: BucketChoice = e["choice"]
        rel_main = Path(os.path.relpath(main, out)).as_posix()
        rel_flipped = Path(os.path.relpath(flipped, out)).as_posix() if flipped is not None else rel_main
        record: dict[str, Any] = {
            "source": loaded.item.rel,
            "source_path": str(loaded.item.input.resolve()),
            "source_sha256": e["source_sha256"],
            "original_size": list(e["original"]),
            "resized_size": list(choice.resized),
            "bucket": list(choice.bucket),
            "crop": e["crop"],
            "format": fmt,
            "latent": rel_main,
            "latent_shape": list(tensors["latent"].shape),
            "latent_flipped": rel_flipped if options.flip else None,
            "moments": rel_main if options.moments else None,
            "latent_dtype": options.latent_dtype,
            "normalized": normalized,
            "latent_spec": settings["latent_spec"],
            "posterior": settings["posterior"],
            "model_sha256": model_sha,
            "model_name": info["name"],
            "settings_sha256": settings_sha,
            "encoded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if fmt == "kohya":
            record["kohya_crop_ltrb"] = list(kohya_crop_ltrb(choice.bucket, e["original"]))
        file_meta = _vaecli_file_meta(record, settings, info, factor, runner)
        write_outputs(record, tensors, main, flipped, fmt, file_meta)
        records[loaded.index] = record

    try:
        engine.run(load, lambda b: b.x.shape, compute, save)
        for i, r in enumerate(engine.results):
            if i in records:
                r.output = str(out / records[i]["latent"])
        kept = [records[i] for i, r in enumerate(engine.results) if r.status in ("ok", "skipped") and i in records]
        seen = {it.rel for it in all_items}
        missing = [
            {"source": s, "latent": rec.get("latent")}
            for s, rec in sorted(prior.items())
            if s not in seen and (count == 1 or _owner_shard(s, count) == index)
        ]
        report = DatasetReport(
            "encode",
            engine.results,
            model=info,
            events=engine.events,
            computed=engine.computed,
            temp_files_removed=removed,
            missing=missing,
            shard=(index, count),
        )
        if count == 1:
            write_manifest(out / MANIFEST, kept)
            for path in _shard_manifests(out).values():
                path.unlink(missing_ok=True)  # superseded by the complete manifest just written
            report.manifest, report.merged = str(out / MANIFEST), True
        else:
            shard_path = out / shard_manifest_name(index, count)
            write_manifest(shard_path, kept)
            report.manifest = str(shard_path)
    except BaseException:
        if distributed:  # meet the other ranks anyway, so they merge what exists instead of waiting
            try:
                _barrier()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
        raise
    if distributed:
        _barrier()  # every shard manifest is written
        if index == 0:
            _await_shard_manifests(out, count)
            _merge_into(report, out, count, clean=True)
        _barrier()  # every rank returns after manifest.jsonl exists
        if created_group:
            torch.distributed.destroy_process_group()
    elif count > 1:
        with _merge_lock(out):
            if all((i, count) in _shard_manifests(out) for i in range(count)):
                _merge_into(report, out, count, clean=False)
            else:
                report.notes.append(
                    f"manifest.jsonl not merged yet: waiting for the other shards of {count} "
                    "(the last shard to finish merges; or call merge_manifests)"
                )
    report.elapsed_s = time.perf_counter() - start
    return report


def _await_shard_manifests(out: Path, count: int, timeout_s: float = 120.0) -> None:
    """Wait until all shard manifests are visible: on network file systems another node's file can show up
    in a directory listing seconds after its writer has passed the barrier."""
    deadline = time.monotonic() + timeout_s
    while len([k for k in _shard_manifests(out) if k[1] == count]) < count and time.monotonic() < deadline:
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


def _prior_records(out: Path) -> dict[str, dict[str, Any]]:
    """Records of the previous manifest and of unmerged shard manifests, by source (to report what vanished)."""
    prior: dict[str, dict[str, Any]] = {}
    for rec in read_manifest(out / MANIFEST):
        prior[rec["source"]] = rec
    for path in _shard_manifests(out).values():
        for rec in read_manifest(path):
            prior[rec["source"]] = rec
    return prior


def _vaecli_file_meta(
    record: dict[str, Any], settings: dict[str, Any], info: dict[str, Any], factor: int, runner: Runner
) -> dict[str, str]:
    """Metadata of a vaecli-format file, in the conventions of `vaecli encode` (so `vaecli decode` reads it)."""
    from .io import LATENT_FORMAT, LATENT_FORMAT_VERSION

    bw, bh = record["bucket"]
    ow, oh = record["original_size"]
    return {
        "format": LATENT_FORMAT,
        "format_version": LATENT_FORMAT_VERSION,
        "vaecli_version": __version__,
        "model_name": info["name"],
        "model_sha256": info["weights_sha256"],
        "latent_spec": json.dumps(settings["latent_spec"]) if settings["latent_spec"] is not None else "none",
        "posterior": settings["posterior"],
        "seed": str(settings["seed"]) if settings["seed"] is not None else "",
        "seed_key": record["source"] if settings["seed"] is not None else "",
        "size_policy": "crop",  # decode keeps the encoded (bucket) size: the cut-away pixels are gone
        "latent_dtype": settings["latent_dtype"],
        "alpha": settings["alpha"],
        "compute_dtype": DTYPE_NAMES[runner.dtype],
        "downsample_factor": str(factor),
        "original_width": str(ow),
        "original_height": str(oh),
        "encoded_width": str(bw),
        "encoded_height": str(bh),
        "size_params": json.dumps({"resized_size": record["resized_size"], "crop_ltrb": record["crop"]}),
        "source": record["source"],
        "source_sha256": record["source_sha256"],
        "settings_sha256": record["settings_sha256"],
    }


def _note(engine: _Engine, batch: list[Loaded], result: BatchResult) -> dict[int, Exception]:
    """Record retries and events; rows of flipped copies (index >= len(batch)) count for their original."""
    n = len(batch)
    for retry in result.retries:
        engine.results[batch[retry.index % n].index].retries.append(
            {"stage": "encode", "from_dtype": retry.from_dtype, "to_dtype": retry.to_dtype}
        )
    engine.events.extend(f"encode: {e}" for e in result.events)
    return {i % n: InputError(msg) for i, msg in result.failed.items()}


# ------------------------------------------------------------------------------------------------ torchrun


def _init_distributed() -> bool:
    """Join torchrun's process group (gloo: only barriers are needed); True when this call created it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    # Ranks finish their shards at different times; the default 30-minute timeout would fail a long run.
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return True


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _to_local_device(vae: AutoencoderKL) -> AutoencoderKL:
    """Under torchrun with CUDA, one GPU per process: cuda:LOCAL_RANK."""
    env = torchrun_env()
    device = next(vae.parameters()).device
    if env is None or device.type != "cuda":
        return vae
    torch.cuda.set_device(env[2])
    return vae.to(f"cuda:{env[2]}")


# ------------------------------------------------------------------------------------------------ entry
