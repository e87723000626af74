"""Folder walking, batching by size, I/O overlapped with compute, resume, per-item results.

One core function per command (`encode_paths`, `decode_paths`, `roundtrip_paths`); each returns a Report
and never raises for a bad item: per-item failures are values. Reading runs in a thread pool ahead of the
model (a bounded prefetch window), writing in another pool behind it, so the model stays busy.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import queue
import threading
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch

from . import __version__
from .config import LatentSpec
from .discovery import Item, OutputNames, check_layout, check_output_root, discover, output_is_file
from .errors import ConfigError, InputError, Interrupted, VaecliError
from .exports import CONTAINER_SUFFIX, COMFYUI_LEGACY_SCALE, alpha_for, kohya_plain_arrays, write_comfyui, write_kohya
from .files import folder_syncs_deferred, json_path, open_regular, sha256_of
from .io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_OUTPUT_SUFFIXES,
    IMAGE_SUFFIXES,
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    LATENT_OUTPUT_SUFFIXES,
    LATENT_SUFFIXES,
    LatentFile,
    OutputState,
    clean_temp_files,
    decode_image,
    image_output_state,
    image_size,
    latent_output_state,
    latent_shape,
    load_latent,
    meta_json,
    meta_name,
    read_image,
    to_uint8,
    write_image,
    write_latent,
)
from .metrics import diff_map, max_abs_error, psnr, ssim
from .models.kl import AutoencoderKL
from .pipeline import (
    AUTO_BATCH_MAX,
    DTYPE_NAMES,
    DTYPES,
    BatchResult,
    RunOptions,
    Runner,
    auto_batch_size,
    compute_dtype,
    resolve_device,
)

__all__ = ["Item", "OutputNames", "check_layout", "check_output_root", "discover"]  # re-exported: dataset.py imports them here

SIZE_POLICIES = ("pad", "crop", "resize")


# ------------------------------------------------------------------------------------------ options, results


@dataclass(frozen=True)
class EncodeOptions:
    """What `encode_paths` writes; every field has a CLI flag of the same name."""

    batch_size: int = 4  # images of one size per model call
    raw: bool = False  # store raw VAE latents instead of the model's normalized diffusion latents
    sample: bool = False  # sample the posterior (mean + std * noise) instead of taking its mode
    seed: int = 0  # with sample: noise per image from a generator seeded by (seed, relative path)
    size_policy: str = "pad"  # sides not divisible by the downsample factor: pad, crop or resize
    latent_dtype: str = "fp32"  # precision of the stored tensor
    alpha: str | None = None  # transparent pixels: white or black background, or drop; None: white (kohya: its own)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused
    overwrite: bool = False  # recompute outputs that exist
    workers: int = 0  # reader threads; 0: as io_threads says for the device
    format: str = "vaecli"  # vaecli (.safetensors), kohya (.npz, kohya's pixel conventions) or comfyui (.latent)
    flat: bool = False  # every output at the top of the output folder, named by the input's file name


@dataclass(frozen=True)
class DecodeOptions:
    """What `decode_paths` writes."""

    batch_size: int = 4
    format: str = "png"  # png, jpg or webp
    quality: int = 95  # jpg/webp quality (webp 100 = lossless)
    force: bool = False  # decode latents made by another model
    scaling_factor: float | None = None  # for latents without our metadata (overrides it when given)
    shift_factor: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    workers: int = 0


@dataclass(frozen=True)
class RoundtripOptions:
    """What `roundtrip_paths` measures and writes."""

    batch_size: int = 4
    sample: bool = False
    seed: int = 0
    size_policy: str = "pad"
    alpha: str = "white"
    max_pixels: int = DEFAULT_MAX_PIXELS
    diff: bool = False  # also write an amplified error map OUT/<rel>.diff.png
    diff_gain: float = 8.0  # error map = |original - reconstruction| * gain, in 8-bit levels
    overwrite: bool = False
    workers: int = 0
    # With size_policy pad: pad sides up to a multiple of this (0: of the downsample factor only), so that
    # images of nearby sizes share a batch; cropped back exactly, values near the padded edges change a
    # little. No CLI flag: scripts/pipeline_throughput.py --pad-to measures whether it pays.
    pad_to: int = 0


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
            d["device_busy_share"] = round(min(1.0, self.device_busy_s / self.elapsed_s), 3) if self.elapsed_s > 0 else None
        if self.notes:
            d["notes"] = self.notes
        return d


# ------------------------------------------------------------------------------------------------- model


def open_model(
    source: str | None, family: str | None, device: str, subfolder: str | None = None, revision: str | None = None,
    variant: str | None = None,
) -> AutoencoderKL:
    """Load the model (fp32 weights; the Runner makes lower-precision copies) on the resolved device;
    subfolder, revision and variant as load_vae takes them."""
    from .weights import load_vae

    if source is not None and os.path.exists(source):
        import stat

        from .files import file_kind

        mode = os.stat(source).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # reading a FIFO would wait forever
            raise ConfigError(f"{source} is {file_kind(mode)}, not a model file or folder")

    try:
        return load_vae(
            source, device=resolve_device(device), dtype=torch.float32, family=family, subfolder=subfolder,
            revision=revision, variant=variant,
        )
    except RecursionError:  # json.loads of a hostile config.json (config.py catches only ValueError)
        raise ConfigError(f"{source}: its config.json is nested too deeply to be a model config (a damaged or "
                          "hostile file)") from None
    except OverflowError as exc:  # a config value too large for a float, e.g. a 401-digit scaling_factor
        raise ConfigError(f"{source}: its config.json holds a number too large to use ({exc})") from None


def model_notes(vae: AutoencoderKL) -> list[str]:
    """What was assumed while loading the model, for the run's notes (a guessed normalization, groups)."""
    info = getattr(vae, "info", None)
    return [f"model: {n}" for n in info.notes] if info else []


def model_summary(vae: AutoencoderKL) -> dict[str, Any]:
    info = getattr(vae, "info", None)
    return {
        "name": info.name if info else "unnamed",
        "weights_sha256": info.weights_sha256 if info else "",
        "identity_sha256": model_identity(vae),
        "device": str(next(vae.parameters()).device),
    }


# Config fields that change no computed value: diffusers' nominal tile size (our tiling has its own flags).
_NOMINAL_CONFIG = ("sample_size",)


def model_identity(vae: AutoencoderKL) -> str:
    """sha256 of everything that defines the model's computation: its weights (their sha256) and its
    effective config, architecture and latent normalization included (VAEConfig.to_dict: what was loaded,
    inferred or assumed, e.g. norm_num_groups of a bare weights file), as canonical JSON.

    Two loads of the same weights with different configs (groups inferred 32 vs given 16) compute different
    latents: outputs record this beside model_sha256 (the weights alone, what decode compares to name
    "another model") and are remade when it changes."""
    info = getattr(vae, "info", None)
    config = {k: v for k, v in vae.config.to_dict().items() if k not in _NOMINAL_CONFIG}
    doc = {"config": config, "weights_sha256": info.weights_sha256 if info else ""}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- the engine


class Skip:
    """Returned by a loader: the output is already complete (optionally with metrics read from it)."""

    def __init__(self, metrics: dict[str, float] | None = None, note: str | None = None) -> None:
        self.metrics = metrics or {}
        self.note = note


@dataclass
class Loaded:
    """An item read and prepared, waiting for its batch."""

    index: int
    item: Item
    x: np.ndarray | torch.Tensor  # model input of this item
    extra: dict[str, Any] = field(default_factory=dict)


def batch_sizer(
    batch_size: int, vae: AutoencoderKL, run: RunOptions, latent_keys: bool
) -> tuple[int, Callable[[Hashable], int] | None]:
    """(engine batch size, per-key sizer): batch_size 0 means auto, sized from free memory per image size.

    Keys are item shapes: (H, W, C) pixels, or (C, h, w) latents when latent_keys.
    """
    if batch_size > 0:
        return batch_size, None
    device = next(vae.parameters()).device
    dtype = compute_dtype(run.dtype, vae.config.force_upcast, run.upcast)
    f = vae.config.downsample_factor
    patch = vae.config.latent_spec.patch_size
    patched = vae.config.latent_channels * patch * patch if patch > 1 else None  # channels of patchified latents
    cache: dict[Hashable, int] = {}

    def size(key: Hashable) -> int:
        if key not in cache:
            shape = tuple(key)  # type: ignore[arg-type]
            cell = f * patch if shape[0] == patched else f
            h, w = (shape[-2] * cell, shape[-1] * cell) if latent_keys else (shape[0], shape[1])
            cache[key] = auto_batch_size(vae.config, h, w, dtype, device)
        return cache[key]

    return AUTO_BATCH_MAX.get(device.type, 8), size


def _message(exc: BaseException) -> str:
    """One line for a failed item: our own messages as they are, anything else described, not dumped."""
    if isinstance(exc, VaecliError):
        return str(exc)
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "out of memory for this item; try --tiling on, a smaller --batch-size, or a lower --max-pixels"
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"file system error{where}: {exc.strerror or text}"
    # What hostile file contents raise in parsers we do not own (each site we own gives its own reason):
    if isinstance(exc, RecursionError):
        return "the file holds a structure nested too deeply to read (a damaged or hostile file)"
    if isinstance(exc, OverflowError):
        return f"the file holds a number too large to use ({text[:120]})"
    return f"unexpected error ({type(exc).__name__}: {text[:200]}); --debug shows the traceback"


class _DaemonPool:
    """A minimal thread pool of daemon threads: a worker blocked on a stalled file system never keeps the
    process from exiting after Ctrl-C (ThreadPoolExecutor joins its workers at exit)."""

    def __init__(self, workers: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self, cancel: bool, wait: bool = False) -> None:
        """Stop the workers after their current job; with cancel, jobs not started are dropped; with wait,
        join them (only when no job can be blocked: after a run that finished)."""
        if cancel:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


WRITE_GRACE_S = 5.0  # on Ctrl-C, how long writes already running may take to finish
PROBE_PATIENCE_S = 0.5  # reading headers up front stops waiting once none has answered for this long


class Deferred:
    """A compute step's outputs still on their way back from the device (`get()` waits for them): the
    engine launches the next batch before taking these, so the device computes while the host works."""

    def __init__(self, get: Callable[[], list[Any]]) -> None:
        self.get = get


def io_threads(device: torch.device | None, readers: int = 0) -> tuple[int, int]:
    """(reader threads, writer threads). On the CPU the model takes every core: min(4, CPUs) readers and
    2 writers (measured: scripts/pipeline_throughput.py). On a GPU the host decodes, hashes, encodes and
    compresses every file while the device computes: a thread per core, up to 16 readers and 8 writers
    (Pillow releases the GIL while decoding and compressing; not yet measured on a GPU)."""
    cpus = os.cpu_count() or 1
    if device is None or device.type == "cpu":
        return readers or min(4, cpus), 2
    return readers or max(2, min(16, cpus)), max(2, min(8, cpus // 2))


class _Engine:
    """Order items so equal sizes meet, prefetch in reader threads, batch equal keys, launch batches on the
    device one ahead of taking their outputs, save in writer threads; count items as they finish."""

    def __init__(
        self,
        items: list[Item],
        batch_size: int,
        workers: int,
        progress: Progress | None,
        batch_for: Callable[[Hashable], int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        """batch_for: the batch size for one key (image size), for --batch-size auto; batch_size is then
        the largest it may return, which bounds read-ahead and queued writes. device: where the model
        runs (sets the number of I/O threads, io_threads)."""
        if batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        self.batch_for = batch_for
        self.items = items
        self.results = [
            ItemResult(str(it.input), str(it.output) if it.output else None, notes=list(it.notes)) for it in items
        ]
        self.batch_size = batch_size
        self.workers, self.writers = io_threads(device, workers)
        self.progress = progress
        self.events: list[str] = []
        self.computed = 0
        self.tiles = 0
        self._tally = {"ok": 0, "failed": 0, "skipped": 0}
        self._lock = threading.Lock()
        self._closed = False  # after Ctrl-C: writes finishing later are no longer recorded
        self._progress_error: BaseException | None = None  # raised by the callback in a writer thread
        self._in_flight: tuple[list[Loaded], Any] | None = None
        self._writes: deque[Future[None]] = deque()
        self._stalled = False  # a header read never answered: a reader thread may be stuck for good

    def finish(self, index: int, status: str, exc: BaseException | None = None) -> None:
        """Record item `index` as ok, failed or skipped, and tell the progress callback at once."""
        r = self.results[index]
        with self._lock:
            if self._closed or r.status != "pending":
                return
            if exc is not None:
                r.error = _message(exc)
                if not isinstance(exc, VaecliError):
                    r.detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            r.status = status
            self._tally[status] += 1
            self._notify(r)

    def _notify(self, item: ItemResult | None) -> None:
        if self.progress is None or self._progress_error is not None:
            return
        try:
            self.progress(Counts(len(self.items), **self._tally, item=item))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread (_check)
            self._progress_error = exc

    def _check(self) -> None:
        """Raise, in the main thread, what the progress callback raised (it may run in a writer thread)."""
        if self._progress_error is not None:
            raise self._progress_error

    def run(
        self,
        load: Callable[[int, Item], Loaded | Skip],
        key: Callable[[Loaded], Hashable],
        compute: Callable[[list[Loaded]], list[Any] | Deferred],
        save: Callable[[Loaded, Any], None],
        probe: Callable[[Item], Hashable | None] | None = None,
    ) -> None:
        """compute returns one value per Loaded (an output for `save`, or an exception for a failed item),
        or a Deferred of them. probe: the key of an item from its header alone (None when unknown), read
        for every item before the run so that equal keys are processed together.

        Ctrl-C: reading stops at once, the batch in flight and the outputs already computed get
        WRITE_GRACE_S to be written (each write is atomic either way), and Interrupted carries the results.
        """
        with self._lock:
            self._notify(None)
        self._check()
        with folder_syncs_deferred():  # each output folder fsynced once, at the end
            self._run(load, key, compute, save, probe)

    def _run(
        self,
        load: Callable[[int, Item], Loaded | Skip],
        key: Callable[[Loaded], Hashable],
        compute: Callable[[list[Loaded]], list[Any] | Deferred],
        save: Callable[[Loaded, Any], None],
        probe: Callable[[Item], Hashable | None] | None,
    ) -> None:
        readers = _DaemonPool(self.workers, "vaecli-read")
        writer = _DaemonPool(self.writers, "vaecli-write")
        try:
            grouping = probe is not None and (self.batch_size > 1 or self.batch_for is not None)
            order = self._order(readers, probe) if grouping else list(range(len(self.items)))
            self._loop(readers, writer, order, load, key, compute, save)
        except KeyboardInterrupt:
            readers.shutdown(cancel=True)
            self._settle(writer, save)  # computed outputs are still written, for at most WRITE_GRACE_S
            writer.shutdown(cancel=True)
            raise Interrupted(self.results) from None
        except BaseException:
            readers.shutdown(cancel=True)
            writer.shutdown(cancel=False)
            raise
        readers.shutdown(cancel=True, wait=not self._stalled)  # every read and write has been collected
        writer.shutdown(cancel=False, wait=True)
        self._check()

    def _order(self, pool: _DaemonPool, probe: Callable[[Item], Hashable | None]) -> list[int]:
        """Item indices with equal keys next to each other (across the whole input, not only the prefetch
        window), from headers read in the reader threads. Items that fail to probe, or whose probe has not
        answered (a stalled file system), come last in their original order; known failures first."""

        def task(item: Item) -> Hashable | None:
            try:
                return probe(item) if item.error is None else None
            except Exception:  # noqa: BLE001 - the real read reports what is wrong with the item
                return None

        futures = {pool.submit(task, item): i for i, item in enumerate(self.items) if item.error is None}
        keys: dict[int, Hashable] = {}
        waiting = set(futures)
        while waiting:
            done, waiting = wait_futures(waiting, timeout=PROBE_PATIENCE_S, return_when=FIRST_COMPLETED)
            if not done:
                break
            for future in done:
                if future.result() is not None:
                    keys[futures[future]] = future.result()
        for future in waiting:
            self._stalled |= not future.cancel()  # still running: its reader thread is not waited for
        labels = {k: n for n, k in enumerate(dict.fromkeys(keys[i] for i in sorted(keys)))}  # first-seen order
        known = sorted(keys, key=lambda i: (labels[keys[i]], i))
        failing = [i for i, item in enumerate(self.items) if item.error is not None]
        rest = [i for i in range(len(self.items)) if i not in keys and self.items[i].error is None]
        return failing + known + rest

    def _loop(
        self,
        readers: _DaemonPool,
        writer: _DaemonPool,
        order: list[int],
        load: Callable[[int, Item], Loaded | Skip],
        key: Callable[[Loaded], Hashable],
        compute: Callable[[list[Loaded]], list[Any] | Deferred],
        save: Callable[[Loaded, Any], None],
    ) -> None:
        pending: dict[Hashable, list[Loaded]] = {}  # key (e.g. image size) -> items waiting for a full batch

        def launch(batch: list[Loaded]) -> None:
            try:
                handle: list[Any] | Deferred = compute(batch)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for one image: the batch fails
                handle = [exc] * len(batch)
            self.computed += len(batch)
            previous, self._in_flight = self._in_flight, (batch, handle)
            if previous is not None:  # taken only now: the device already has the next batch
                self._take(writer, save, *previous)
            self._check()

        for index, got in self._prefetch(readers, load, order):
            if isinstance(got, BaseException):
                self.finish(index, "failed", got)
            elif isinstance(got, Skip):
                self.results[index].metrics.update(got.metrics)
                if got.note:
                    self.results[index].notes.append(got.note)
                self.finish(index, "skipped")
            else:
                k = key(got)
                pending.setdefault(k, []).append(got)
                if len(pending[k]) >= (self.batch_for(k) if self.batch_for else self.batch_size):
                    launch(pending.pop(k))
                elif sum(len(b) for b in pending.values()) > 4 * self.batch_size:
                    launch(pending.pop(max(pending, key=lambda b: len(pending[b]))))
            self._check()
        for k in list(pending):
            launch(pending.pop(k))
        if self._in_flight is not None:
            self._take(writer, save, *self._in_flight)
            self._in_flight = None
        wait_futures(list(self._writes))
        self._check()

    def _take(
        self, writer: _DaemonPool, save: Callable[[Loaded, Any], None], batch: list[Loaded], handle: Any,
        bound: bool = True,
    ) -> None:
        """Outputs of a launched batch: failures recorded, the rest queued for writing (with `bound`, the
        queue is kept short by waiting for the oldest writes)."""
        try:
            outputs = handle.get() if isinstance(handle, Deferred) else handle
        except Exception as exc:  # noqa: BLE001 - the batch fails, the run goes on
            outputs = [exc] * len(batch)
        for loaded, out in zip(batch, outputs):
            if isinstance(out, BaseException):
                self.finish(loaded.index, "failed", out)
            else:
                future = writer.submit(save, loaded, out)
                future.add_done_callback(lambda f, i=loaded.index: self._written(i, f))
                self._writes.append(future)
        while self._writes and self._writes[0].done():
            self._writes.popleft()
        while bound and len(self._writes) > 2 * self.batch_size + 2:  # bound the memory held by queued writes
            wait_futures([self._writes.popleft()])

    def _written(self, index: int, future: Future[None]) -> None:
        """A write finished (in a writer thread): the item is done, now."""
        if future.cancelled():
            return
        exc = future.exception()
        self.finish(index, "failed" if exc is not None else "ok", exc)

    def _settle(self, writer: _DaemonPool, save: Callable[[Loaded, Any], None]) -> None:
        """After Ctrl-C: the batch in flight is taken and written with the rest, within the grace period
        (a second Ctrl-C stops waiting); writes that finish later are not recorded."""
        deadline = time.monotonic() + WRITE_GRACE_S
        try:
            if self._in_flight is not None:
                batch, handle = self._in_flight
                self._in_flight = None
                self._take(writer, save, batch, handle, bound=False)
            wait_futures(list(self._writes), timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            pass
        with self._lock:
            self._closed = True

    def _prefetch(
        self, pool: _DaemonPool, load: Callable[[int, Item], Loaded | Skip], order: list[int]
    ) -> Iterator[tuple[int, Loaded | Skip | BaseException]]:
        """Items loaded in `order`, at most `depth` ahead of the consumer."""

        def task(index: int, item: Item) -> Loaded | Skip | BaseException:
            if item.error is not None:
                return InputError(item.error)
            try:
                return load(index, item)
            except Exception as exc:  # noqa: BLE001 - returned as the item's failure
                return exc

        depth = 2 * self.batch_size + self.workers
        window: deque[tuple[int, Future[Any]]] = deque()
        todo = iter(order)
        for index in todo:
            window.append((index, pool.submit(task, index, self.items[index])))
            if len(window) >= depth:
                break
        while window:
            index, future = window.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                window.append((nxt, pool.submit(task, nxt, self.items[nxt])))
            yield index, future.result()


def _report(
    command: str, engine: _Engine, vae: AutoencoderKL, start: float, removed: int, notes: list[str], runner: Runner
) -> Report:
    return Report(
        command,
        engine.results,
        model=model_summary(vae),
        events=engine.events,
        elapsed_s=time.perf_counter() - start,
        computed=engine.computed,
        tiles=engine.tiles,
        temp_files_removed=removed,
        notes=model_notes(vae) + runner.notes + notes,
        device_busy_s=runner.busy_s,
    )


def _note_batch(engine: _Engine, batch: list[Loaded], result: BatchResult, stage: str) -> list[Any]:
    """Record retries and events of one model call; failed rows become exceptions."""
    for retry in result.retries:
        engine.results[batch[retry.index].index].retries.append(
            {"stage": stage, "from_dtype": retry.from_dtype, "to_dtype": retry.to_dtype}
        )
    engine.events.extend(f"{stage}: {e}" for e in result.events)
    engine.tiles += getattr(result, "tiles", 0)
    return [InputError(result.failed[i]) if i in result.failed else None for i in range(len(batch))]


def _prepare_run(inputs: Sequence[str | Path], suffixes: Sequence[str], out: Path | None, names: OutputNames,
                 siblings: Callable[[Path], Sequence[Path]] | None = None,
                 flat: bool = False) -> tuple[list[Item], list[str], int]:
    """(items, run notes, temp files removed): discovery, the output folder checked, dead temp files cleaned.

    `out` is the output folder, or the output file of a single input when it ends in one of `names`' suffixes;
    flat: every output at the top of the folder (see discover)."""
    notes: list[str] = []
    items = discover(inputs, suffixes, out, names, siblings, notes, flat=flat)
    if out is None or not items:  # nothing to do: nothing is created (the CLI says "no inputs found")
        return items, notes, 0
    single = output_is_file(inputs, out, names)
    root = out.parent if single else out
    check_output_root(items, root)
    return items, notes, len(clean_temp_files(root, recursive=not single))


def latent_names(suffix: str) -> OutputNames:
    """Latent outputs: `-o x<suffix>` with one input names that file; another latent suffix is refused."""
    return OutputNames(suffix, LATENT_OUTPUT_SUFFIXES)


def image_names(fmt: str) -> OutputNames:
    """Image outputs of format png, jpg or webp: `-o x.png` with one input names that file."""
    return OutputNames("." + fmt, IMAGE_OUTPUT_SUFFIXES)


# ------------------------------------------------------------------------------------- existing outputs

_LABELS = {"source_sha256": "source file", "model_sha256": "model", "model_identity_sha256": "model config or weights"}


def reuse_output(state: OutputState, want: Mapping[str, str], overwrite: bool, path: Path) -> tuple[bool, str | None]:
    """(skip, note) for an existing output: skip when it is ours, whole, and made from exactly `want`.

    A stale or incomplete output is remade (with a note saying why). A file that is not ours is never
    replaced without `overwrite`: InputError, as for a path that cannot be replaced at all.
    """
    if state.status == "missing":
        return False, None
    if state.status == "blocked":
        raise InputError(f"cannot replace the output {path}: {state.detail}")
    if state.status == "foreign":
        if overwrite:
            return False, f"replaced {path.name}, which was not written by vaecli"
        raise InputError(
            f"the output {path} already exists and {state.detail}; pass --overwrite to replace it, "
            "or choose another output folder"
        )
    if overwrite:
        return False, None
    if state.status == "incomplete":
        return False, f"replaced an incomplete output ({state.detail})"
    changed = [_LABELS.get(k, k) for k, v in want.items() if state.record.get(k, "") != v]
    if not changed:
        return True, None
    return False, f"replaced a stale output (changed: {', '.join(changed)})"


# ------------------------------------------------------------------------------------------ size policy


def apply_size_policy(pixels: np.ndarray, factor: int, policy: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Make both sides of (H, W, 3) multiples of `factor`; return the result and how to undo it."""
    h, w = pixels.shape[:2]
    if policy == "pad":
        ph, pw = -h % factor, -w % factor
        # Replicating the edge adds no new structure for the encoder to spend latent capacity on.
        out = np.pad(pixels, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else pixels
        return out, {"pad_right": pw, "pad_bottom": ph, "mode": "replicate"}
    if policy == "crop":
        nh, nw = h // factor * factor, w // factor * factor
        if nh == 0 or nw == 0:
            raise InputError(f"image is {w}x{h}, smaller than {factor} pixels: --size-policy crop leaves nothing")
        top, left = (h - nh) // 2, (w - nw) // 2
        return pixels[top : top + nh, left : left + nw], {"crop_ltrb": [left, top, left + nw, top + nh]}
    if policy == "resize":
        nh, nw = encoded_side(h, factor, policy), encoded_side(w, factor, policy)
        return resample(pixels, nh, nw), {"resample": "bicubic-antialias"}
    raise ConfigError(f"unknown size policy {policy!r}; choose one of {', '.join(SIZE_POLICIES)}")


def encoded_side(side: int, factor: int, policy: str) -> int:
    """The side the model sees for an original side under a size policy (what apply_size_policy makes)."""
    if policy == "pad":
        return side + -side % factor
    if policy == "crop":
        return side // factor * factor
    return max(factor, round(side / factor) * factor)  # resize


def _meta_int(meta: Mapping[str, str], key: str) -> int:
    value = meta.get(key, "")
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9 and int(value) > 0):
        raise InputError(f"latent metadata '{key}' must be a positive whole number, not {value!r}")
    return int(value)


def decoded_size(meta: Mapping[str, str], h: int, w: int, factor: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) of the image a (C, h, w) latent with our metadata decodes to, after its size policy.

    Every size in the metadata is checked against the latent's shape and the policy (an encoder could have
    written it), and the result against max_pixels (0: no limit), before anything is decoded.
    """
    policy = meta.get("size_policy", "pad")
    if policy not in SIZE_POLICIES:
        raise InputError(f"latent metadata names an unknown size policy {policy!r}")
    eh, ew = h * factor, w * factor
    # the multiple the size policy used: FLUX.2 pads to 16 pixels even where its raw latents have 8-pixel cells
    multiple = _meta_int(meta, "size_multiple") if "size_multiple" in meta else factor
    for key, side in (("encoded_height", eh), ("encoded_width", ew)):
        if key in meta and _meta_int(meta, key) != side:
            raise InputError(
                f"latent metadata '{key}' is {meta[key]} but the latent's shape {h}x{w} decodes to {side}: "
                "the file is inconsistent (or made for a VAE with another downsample factor)"
            )
    oh, ow = _meta_int(meta, "original_height"), _meta_int(meta, "original_width")
    if policy == "crop":
        _check_crop_box(meta, eh, ew, oh, ow)
        size = (eh, ew)
    else:
        if encoded_side(oh, multiple, policy) != eh or encoded_side(ow, multiple, policy) != ew:
            raise InputError(
                f"latent metadata says the original was {ow}x{oh} ({policy}), which does not give the latent's "
                f"{ew}x{eh} pixels: the file is inconsistent"
            )
        size = (oh, ow)
    if max_pixels > 0 and size[0] * size[1] > max_pixels:
        raise InputError(
            f"decodes to {size[1]}x{size[0]} pixels, above the limit of {max_pixels / 1e6:.1f} MP; "
            f"pass --max-pixels {size[0] * size[1]} to decode it"
        )
    return size


def _check_crop_box(meta: Mapping[str, str], eh: int, ew: int, oh: int, ow: int) -> None:
    """crop_ltrb, when recorded, spans exactly the encoded size inside the (resized) original."""
    if "size_params" not in meta:
        return
    params = meta_json(meta, "size_params")
    box = params.get("crop_ltrb") if isinstance(params, dict) else None
    if box is None:
        return
    bound = params.get("resized_size", [ow, oh])
    ok = (
        isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
        and isinstance(bound, list) and len(bound) == 2 and all(isinstance(v, int) for v in bound)
    )
    if not ok or box[2] - box[0] != ew or box[3] - box[1] != eh or min(box) < 0 or box[2] > bound[0] or box[3] > bound[1]:
        raise InputError(f"latent metadata 'size_params' crop_ltrb {box} does not match the latent's {ew}x{eh} pixels")


def undo_size_policy(pixels: np.ndarray, meta: Mapping[str, str]) -> np.ndarray:
    """A decoded (H', W', 3) image back at the original size recorded in latent metadata.

    pad: cropped back exactly; resize: resampled back; crop: the pixels cut away are gone, so the image
    keeps the size of the region that was encoded (recorded as crop_ltrb in original coordinates).
    """
    policy = meta.get("size_policy", "pad")
    if policy == "crop":
        return pixels
    return restore_size(pixels, policy, (_meta_int(meta, "original_height"), _meta_int(meta, "original_width")))


def restore_size(pixels: np.ndarray, policy: str, size: tuple[int, int]) -> np.ndarray:
    """Undo pad (crop back) or resize (resample back) to size (height, width); crop keeps the pixels."""
    oh, ow = size
    if policy == "pad":
        if pixels.shape[0] < oh or pixels.shape[1] < ow:
            raise InputError(
                f"decoded image {pixels.shape[1]}x{pixels.shape[0]} is smaller than the recorded original "
                f"{ow}x{oh}: the latent does not match its metadata"
            )
        return pixels[:oh, :ow]
    if policy == "resize":
        return resample(pixels, oh, ow) if pixels.shape[:2] != (oh, ow) else pixels
    if policy == "crop":
        return pixels
    raise InputError(f"latent metadata names an unknown size policy {policy!r}")


def resample(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bicubic resampling (antialiased when shrinking) of float (H, W, 3) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).clamp_(0.0, 1.0).contiguous().numpy()  # (1, 3, h, w) -> (h, w, 3)


def prepare_pixels(
    pixels: np.ndarray, factor: int, policy: str, multiple: int = 0
) -> tuple[np.ndarray, tuple[int, int], dict[str, Any]]:
    """(pixels for the batch, (height, width) the model sees, how to undo it): apply_size_policy, except
    that pad leaves the pixels as they are, since the batch is padded on the device (staging.py), and
    may pad further, to a multiple of `multiple` (a multiple of factor), so more images share a size."""
    h, w = pixels.shape[:2]
    if policy == "pad":
        step = math.lcm(factor, multiple) if multiple else factor
        eh, ew = h + -h % step, w + -w % step
        return pixels, (eh, ew), {"pad_right": ew - w, "pad_bottom": eh - h, "mode": "replicate"}
    if policy == "resize" and pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / np.float32(255.0)  # resampled in float, as read_image's pixels
    out, undo = apply_size_policy(pixels, factor, policy)
    return out, (out.shape[0], out.shape[1]), undo


def encoded_size(h: int, w: int, factor: int, policy: str, multiple: int = 0) -> tuple[int, int]:
    """The (height, width) prepare_pixels gives an h x w image."""
    if policy == "pad" and multiple:
        step = math.lcm(factor, multiple)
        return h + -h % step, w + -w % step
    return encoded_side(h, factor, policy), encoded_side(w, factor, policy)


def _image_probe(factor: int, policy: str, multiple: int = 0, exif: bool = True) -> Callable[[Item], Hashable]:
    """The engine's probe: the size an image will be batched at, from its header (exif: as displayed)."""

    def probe(item: Item) -> Hashable:
        with open_regular(item.input) as fh:
            w, h = image_size(fh, exif)
        return encoded_size(h, w, factor, policy, multiple)

    return probe


def _latent_probe(item: Item) -> Hashable:
    with open_regular(item.input) as fh:
        return latent_shape(fh, item.input.suffix.lower())


def _stage_images(runner: Runner, batch: list[Loaded], sample: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images on the device, (N, 3, H, W) padded to the batch's size; posterior noise when sampling)."""
    size = batch[0].extra["size"]
    x = runner.transfers.images([b.x for b in batch], size)
    if not sample:
        return x, None
    f = runner.config.downsample_factor
    shape = (runner.config.latent_channels, size[0] // f, size[1] // f)
    return x, torch.stack([_noise(seed, b.item.rel, shape) for b in batch])


def _images_nhwc(images: torch.Tensor) -> np.ndarray:
    """Decoded images as (N, H, W, 3) arrays: uint8 ones come so from the Runner, floats are (N, 3, H, W)."""
    return images.numpy() if images.dtype == torch.uint8 else images.permute(0, 2, 3, 1).numpy()


def _noise(seed: int, rel: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal noise that depends only on (seed, relative path): independent of batching."""
    digest = hashlib.sha256(f"{seed}\0{rel}".encode("utf-8", "surrogateescape")).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g)


def _sha256_file(path: Path) -> str:
    """sha256 of a regular file's bytes (InputError for anything else: never blocks on a FIFO)."""
    with open_regular(path) as fh:
        return sha256_of(fh)


BYTES_PER_PIXEL_MAX = 16  # RGBA float32: the most bytes per pixel any image file we read stores uncompressed
_SLACK_BYTES = 64 << 20  # headers, metadata, thumbnails, trailing data


def read_source(path: Path, max_pixels: int) -> tuple[io.BytesIO, str]:
    """(the file's bytes in memory, their sha256): one read, so the bytes decoded are the bytes hashed, even
    when the file is rewritten meanwhile (hashing and decoding the file twice could pair a new image with
    the old hash, and a rerun would keep it as current). A file larger than any image within max_pixels
    can be (0: no limit) is refused before it is read."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        limit = max_pixels * BYTES_PER_PIXEL_MAX + _SLACK_BYTES if max_pixels > 0 else 0
        if limit and size > limit:
            raise InputError(
                f"the file is {size / 2**20:.0f} MiB, more than an image within the limit of {max_pixels / 1e6:.1f} MP "
                f"can take ({limit / 2**20:.0f} MiB); pass a larger --max-pixels to read it"
            )
        data = fh.read(limit + 1 if limit else -1)
    if limit and len(data) > limit:
        raise InputError("the file grew past the size limit while it was read")
    return io.BytesIO(data), hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ encode

# Metadata entries that must match for an existing latent file to count as this run's output.
_SETTINGS_KEYS = ("model_sha256", "model_identity_sha256", "latent_spec", "posterior", "seed", "size_policy",
                  "latent_dtype", "alpha")


def encode_paths(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: Path,
    options: EncodeOptions = EncodeOptions(),
    run: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> Report:
    """Encode image files and folders into `out/<rel>.safetensors` latent files with metadata.

    An existing complete output made from the same source bytes with the same settings is skipped; a
    stale one (source edited, other model or settings) is recomputed, as is every output with overwrite.
    A file at an output path that is not a vaecli latent is replaced only with overwrite.
    """
    start = time.perf_counter()
    fmt = options.format
    if options.size_policy not in SIZE_POLICIES:
        raise ConfigError(f"unknown size policy {options.size_policy!r}; choose one of {', '.join(SIZE_POLICIES)}")
    if options.latent_dtype not in DTYPES:
        raise ConfigError(f"unknown latent dtype {options.latent_dtype!r}; choose one of {', '.join(DTYPES)}")
    if fmt not in CONTAINER_SUFFIX:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(CONTAINER_SUFFIX)}")
    check_container(vae.config, fmt)
    if fmt != "vaecli" and options.latent_dtype != "fp32":
        raise ConfigError(f"--format {fmt} stores float32 latents (what its reader expects); drop --latent-dtype")
    alpha = alpha_for(fmt, options.alpha)
    items, notes, removed = _prepare_run(inputs, IMAGE_SUFFIXES, out, latent_names(CONTAINER_SUFFIX[fmt]),
                                         flat=options.flat)
    runner = Runner(vae, run)
    factor = vae.config.size_multiple  # image sides: the downsample factor, times FLUX.2's patch
    spec = None if options.raw else container_spec(vae.config.latent_spec, fmt)
    store_dtype = DTYPES[options.latent_dtype]
    info = model_summary(vae)
    settings = {
        "model_sha256": info["weights_sha256"],
        "model_identity_sha256": info["identity_sha256"],
        "latent_spec": json.dumps(spec.to_dict()) if spec is not None else "none",
        "posterior": "sample" if options.sample else "mode",
        "seed": str(options.seed) if options.sample else "",
        "size_policy": options.size_policy,
        "latent_dtype": options.latent_dtype,
        "alpha": alpha,
        **({"pixels": "kohya"} if fmt == "kohya" else {}),  # stored orientation, Pillow's RGB conversion
    }
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
    engine = _Engine(items, size, options.workers, progress, batch_for, runner.device)

    def load(index: int, item: Item) -> Loaded | Skip:
        assert item.output is not None
        fh, source_sha = read_source(item.input, options.max_pixels)  # the bytes hashed are the bytes decoded
        want = {"source_sha256": source_sha, **settings}
        skip, note = reuse_output(latent_output_state(item.output), want, options.overwrite, item.output)
        if skip:
            return Skip()
        convention = "kohya" if fmt == "kohya" else "vaecli"
        pixels = decode_image(fh, alpha, options.max_pixels, convention, keep_uint8=True)
        h, w = pixels.shape[:2]
        prepared, encoded, undo = prepare_pixels(pixels, factor, options.size_policy)
        extra = {"width": w, "height": h, "size": encoded, "undo": undo, "source_sha256": source_sha}
        if note:
            engine.results[index].notes.append(note)
        return Loaded(index, item, prepared, extra)

    def compute(batch: list[Loaded]) -> Deferred:
        x, noise = _stage_images(runner, batch, options.sample, options.seed)
        pending = runner.submit_encode(x, spec, noise)

        def outputs() -> list[Any]:
            result = pending.result()
            errors = _note_batch(engine, batch, result, "encode")
            outs: list[Any] = []
            for i, err in enumerate(errors):
                z = result.tensor[i].to(store_dtype) if err is None else None
                if z is not None and not torch.isfinite(z).all():
                    err = InputError(f"latent overflows {options.latent_dtype}; use --latent-dtype fp32 or bf16")
                outs.append(err if err is not None else z)
            return outs

        return Deferred(outputs)

    def save(loaded: Loaded, z: torch.Tensor) -> None:
        e = loaded.extra
        meta = {
            "format": LATENT_FORMAT,
            "format_version": LATENT_FORMAT_VERSION,
            "vaecli_version": __version__,
            "model_name": info["name"],
            **settings,
            "seed_key": meta_name(loaded.item.rel) if options.sample else "",
            "compute_dtype": DTYPE_NAMES[runner.dtype],
            "downsample_factor": str(vae.config.downsample_factor),
            **({"size_multiple": str(factor)} if factor != vae.config.downsample_factor else {}),
            "original_width": str(e["width"]),
            "original_height": str(e["height"]),
            "encoded_width": str(e["size"][1]),
            "encoded_height": str(e["size"][0]),
            "size_params": json.dumps(e["undo"]),
            "source": meta_name(loaded.item.rel),
            "source_sha256": e["source_sha256"],
        }
        assert loaded.item.output is not None
        if fmt == "comfyui":
            write_comfyui(loaded.item.output, z, meta)
        elif fmt == "kohya":
            write_kohya(loaded.item.output, kohya_plain_arrays(z, meta))
        else:
            write_latent(loaded.item.output, z, meta)

    probe = _image_probe(factor, options.size_policy, exif=fmt != "kohya")  # kohya: pixels as stored
    engine.run(load, lambda b: b.extra["size"], compute, save, probe)
    if fmt == "kohya":
        notes.append("kohya format without --dataset: each latent has its image's own size; kohya uses a cache only "
                     "at the size of its bucket (use --dataset for a training cache)")
    return _report("encode", engine, vae, start, removed, notes, runner)


# ------------------------------------------------------------------------------------------------ decode


def check_container(config: Any, fmt: str) -> None:
    """Refuse a container that no tool reads for this family: sd-scripts (kohya's .npz) trains no FLUX.2,
    Qwen-Image or tiny-VAE model, so such a cache would be silently unusable."""
    if fmt == "kohya" and getattr(config, "family", "kl") != "kl":
        raise ConfigError(f"--format kohya: sd-scripts does not train {config.class_name} models (its .npz caches "
                          "are SD/SDXL/SD3/FLUX.1 latents); use --format vaecli (self-describing) or comfyui")


def container_spec(spec: LatentSpec, fmt: str) -> LatentSpec | None:
    """The normalization a container stores latents in: ours records any; kohya caches hold raw VAE
    latents; ComfyUI's .latent holds what its VAE node outputs: raw for the unpatchified families, the
    normalized patchified form for FLUX.2 (comfy/latent_formats.py Flux2: 128 channels, 16x downscale,
    no process_in scaling)."""
    if fmt == "vaecli":
        return spec
    if fmt == "comfyui" and spec.patch_size > 1:
        return spec
    return None


def latent_spec_from_meta(meta: Mapping[str, str], channels: int | None = None) -> LatentSpec | None:
    """The normalization a latent file was stored with (None for raw latents). LatentSpec checks its values
    (finite, non-zero scale, positive stds); here: an explicit scaling_factor, per-channel lists of `channels`."""
    value = meta.get("latent_spec", "none")
    if value == "none":
        return None
    data = meta_json(meta, "latent_spec")
    if not isinstance(data, dict) or data.get("scaling_factor") is None:
        raise InputError(f"latent metadata 'latent_spec' is not an object with a scaling_factor: {value!r}")
    for key in ("latents_mean", "latents_std"):
        values = data.get(key)
        if values is not None and channels is not None and (not isinstance(values, list) or len(values) != channels):
            raise InputError(f"latent metadata 'latent_spec': {key} must list {channels} numbers, one per channel")
    try:
        return LatentSpec.from_dict(data)
    except ConfigError as exc:
        raise InputError(f"latent metadata 'latent_spec': {exc}") from None


def stored_spec(lf: LatentFile, channels: int, model_spec: LatentSpec) -> LatentSpec | None:
    """The normalization a latent file's values carry, from its container's own convention: ComfyUI's
    marker (present: raw; absent: SD-scaled, as LoadLatent reads it; FLUX.2: normalized and patchified),
    kohya's raw caches, our metadata. A bare tensor carries none: InputError asking for --scaling-factor.
    `channels`: the file's; `model_spec`: the decoding model's normalization."""
    model_scale = model_spec.scaling_factor
    if lf.container in ("comfyui", "kohya"):
        patched = lf.container == "comfyui" and model_spec.patch_size > 1
        if lf.meta is not None and lf.meta.get("latent_spec", "none") != "none":
            if patched:
                return latent_spec_from_meta(lf.meta, channels)
            raise InputError(f"inconsistent file: its metadata says normalized latents, but a {lf.container} file "
                             "holds raw ones")
        if patched and channels == len(model_spec.latents_mean or ()):
            return model_spec  # ComfyUI's own FLUX.2 latents: normalized by the VAE's statistics
        if lf.container == "comfyui" and not lf.marker:
            return LatentSpec(COMFYUI_LEGACY_SCALE)  # LoadLatent multiplies such files by 1/0.18215
        return None
    if lf.meta is not None:
        return latent_spec_from_meta(lf.meta, channels)
    raise InputError(
        "bare latent without vaecli metadata: say how it is normalized with --scaling-factor "
        f"(and --shift-factor), e.g. --scaling-factor {model_scale:g} for this model's "
        "diffusion latents or --scaling-factor 1 for raw VAE latents"
    )


def _preview_latents(stored: torch.Tensor, spec: LatentSpec | None, tiny: torch.nn.Module) -> torch.Tensor:
    """A full VAE's diffusion latents as its tiny autoencoder takes them (unpatchified), or InputError when
    the file holds raw latents or latents of another latent space than the tiny model's."""
    if spec is None:
        raise InputError("raw latents: a tiny autoencoder decodes a full VAE's normalized (diffusion) latents, "
                         "and this file does not record how to normalize them; decode it with its full VAE, "
                         "or encode without --raw")
    space = tiny.info.latent_space if tiny.info else None
    if space is not None:
        from .config import FAMILY_PRESETS

        if space == "flux2":
            fits = spec.patch_size == 2
        else:
            preset = FAMILY_PRESETS[space]
            fits = (spec.patch_size == 1 and spec.latents_mean is None
                    and math.isclose(spec.scaling_factor, preset["scaling_factor"], rel_tol=1e-4)
                    and math.isclose(spec.shift_factor or 0.0, preset["shift_factor"] or 0.0, abs_tol=1e-6))
        if not fits:
            raise InputError(f"latent space mismatch: this file's latents are normalized as {spec.describe()}, "
                             f"not as {space} latents, which this tiny autoencoder decodes (--family {space})")
    z = spec.unpatchify(stored)  # FLUX.2: (4C, h/2, w/2) -> (C, h, w), what TAEF2 takes
    if z.shape[-3] != tiny.config.latent_channels:
        raise InputError(f"latent space mismatch: the file's latents have {z.shape[-3]} channels, this tiny "
                         f"autoencoder decodes {tiny.config.latent_channels}: use the one of its family (TAESD/"
                         "TAESDXL: 4, TAESD3/TAEF1: 16, TAEF2: 32)")
    return z


def _check_meta_header(meta: Mapping[str, str], info: Mapping[str, Any], force: bool) -> None:
    """Format version and maker of one of our latent files."""
    version = meta.get("format_version", "0")
    if not (version.isascii() and version.isdigit()):
        raise InputError(f"latent metadata has an invalid format_version {version!r}")
    if int(version) > int(LATENT_FORMAT_VERSION):
        raise InputError(f"written by a newer vaecli (latent format {version}); upgrade vaecli")
    made_by = meta.get("model_sha256", "")
    if made_by != info["weights_sha256"] and not force:
        name = meta.get("model_name", "?")
        raise InputError(
            f"made by another model ({name}, weights sha256 {made_by[:12]}) than the one in use "
            f"({info['name']}, {info['weights_sha256'][:12]}); pass --model {name if name != '?' else '<that model>'}, "
            "or --force to decode anyway"
        )


def decode_paths(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: Path,
    options: DecodeOptions = DecodeOptions(),
    run: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> Report:
    """Decode latent files and folders into `out/<rel>.<format>` images at their original size.

    Our files carry their normalization and size policy (both checked against the latent); bare tensors need
    scaling_factor/shift_factor. A latent of another model (weights sha256) fails unless `force`. An
    existing output made from the same latent bytes, model and settings is skipped; a stale one is remade.
    """
    start = time.perf_counter()
    for name in ("scaling_factor", "shift_factor"):
        value = getattr(options, name)
        if value is not None and (not math.isfinite(value) or (name == "scaling_factor" and value == 0)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite{', non-zero' if name == 'scaling_factor' else ''} number")
    items, notes, removed = _prepare_run(inputs, LATENT_SUFFIXES, out, image_names(options.format))
    runner = Runner(vae, run)
    factor = vae.config.downsample_factor
    channels = vae.config.latent_channels
    model_spec = vae.config.latent_spec
    # A tiny autoencoder previews the diffusion latents of a full VAE of its latent space (files of another
    # model by design); FLUX.2's come patchified, TAEF2 takes them unpatchified.
    preview = getattr(vae.config, "deterministic", False)
    patch = 2 if preview else model_spec.patch_size
    # FLUX.2's normalized latents are patchified: C*p*p channels, cells of factor*p pixels; raw ones are not
    accepted = sorted({channels, channels * patch * patch})

    def cell(c: int) -> int:
        return factor * patch if patch > 1 and c == channels * patch * patch else factor

    info = model_summary(vae)
    override = options.scaling_factor is not None or options.shift_factor is not None
    flag_spec = LatentSpec(
        options.scaling_factor if options.scaling_factor is not None else 1.0, options.shift_factor
    )
    settings = {
        "kind": "decode",
        "model_sha256": info["weights_sha256"],
        "model_identity_sha256": info["identity_sha256"],
        "image_format": options.format,
        "quality": str(options.quality) if options.format != "png" else "",
        "normalization": json.dumps(flag_spec.to_dict()) if override else "metadata",
    }
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=True)
    engine = _Engine(items, size, options.workers, progress, batch_for, runner.device)

    def check_shape(shape: tuple[int, int, int]) -> None:
        c, h, w = shape
        if c not in accepted:
            expect = " or ".join(map(str, accepted)) + (" (normalized, patchified)" if len(accepted) > 1 else "")
            raise InputError(
                f"latent has {c} channels but the model expects {expect}; it was made for another kind of VAE "
                "(pass its --model)"
            )
        f = cell(c)
        if options.max_pixels > 0 and h * w * f * f > options.max_pixels:
            raise InputError(
                f"decodes to {w * f}x{h * f} pixels, above the limit of {options.max_pixels / 1e6:.1f} MP; "
                f"pass --max-pixels {h * w * f * f} to decode it"
            )

    def load(index: int, item: Item) -> Loaded | Skip:
        assert item.output is not None
        fh, source_sha = read_source(item.input, options.max_pixels)  # the bytes hashed are the bytes decoded
        want = {"source_sha256": source_sha, **settings}
        skip, note = reuse_output(image_output_state(item.output), want, options.overwrite, item.output)
        if skip:
            return Skip()
        lf = load_latent(fh, item.input.suffix.lower(), check_shape)
        meta = lf.meta
        c, h, w = lf.tensor.shape
        f = cell(c)
        if meta is not None:
            _check_meta_header(meta, info, options.force or preview)
            target = (decoded_size(meta, h, w, f, options.max_pixels), meta.get("size_policy", "pad"))
        else:  # the latent's own size: a bucket (kohya, ComfyUI) or whatever a bare tensor holds
            target = ((h * f, w * f), "crop")
        spec = flag_spec if override else stored_spec(lf, c, model_spec)
        if not torch.isfinite(lf.tensor).all():
            raise InputError("latent holds NaN or Inf values")
        if (spec.patch_size if spec is not None else 1) * factor != f:
            raise InputError(f"latent of {c} channels does not fit its recorded normalization "
                             f"({spec.describe() if spec is not None else 'raw'}) for this model")
        if preview:
            z = model_spec.denormalize(_preview_latents(lf.tensor, spec, vae))
        else:
            z = spec.denormalize(lf.tensor) if spec is not None else lf.tensor
        if not torch.isfinite(z).all():
            raise InputError("latent overflows when its normalization is undone (values far out of range)")
        record = engine.results[index].notes
        if override and meta is not None:
            record.append("normalization from --scaling-factor/--shift-factor, not metadata")
        if note:
            record.append(note)
        provenance = {"vaecli_version": __version__, "source": item.rel, **want}
        return Loaded(index, item, z, {"target": target, "provenance": provenance})

    def compute(batch: list[Loaded]) -> Deferred:
        as_uint8 = all(b.extra["target"][1] != "resize" for b in batch)  # resize resamples floats
        pending = runner.submit_decode(torch.stack([b.x for b in batch]), None, as_uint8)  # (N, C, h, w) raw

        def outputs() -> list[Any]:
            result = pending.result()
            errors = _note_batch(engine, batch, result, "decode")
            images = _images_nhwc(result.tensor)
            return [err if err is not None else images[i] for i, err in enumerate(errors)]

        return Deferred(outputs)

    def save(loaded: Loaded, image: np.ndarray) -> None:
        (size_hw, policy), provenance = loaded.extra["target"], loaded.extra["provenance"]
        assert loaded.item.output is not None
        write_image(loaded.item.output, restore_size(image, policy, size_hw), options.format, options.quality, provenance)

    engine.run(load, lambda b: tuple(b.x.shape), compute, save, _latent_probe)
    return _report("decode", engine, vae, start, removed, notes, runner)


# --------------------------------------------------------------------------------------------- roundtrip


def diff_path(target: Path) -> Path:
    """Where roundtrip --diff writes the error map of reconstruction `target` (OUT/<rel>.png)."""
    return target.with_name(target.name[: -len(".png")] + ".diff.png")


def roundtrip_paths(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: Path | None = None,
    options: RoundtripOptions = RoundtripOptions(),
    run: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> Report:
    """Encode and decode in memory; PSNR, SSIM and max abs error on 8-bit RGB at the original size.

    With `out`, reconstructions go to `out/<rel>.png` (and error maps to `out/<rel>.diff.png`); an existing
    reconstruction made from the same source bytes, model and settings is skipped and scored from the file.
    """
    start = time.perf_counter()
    if options.size_policy not in SIZE_POLICIES:
        raise ConfigError(f"unknown size policy {options.size_policy!r}; choose one of {', '.join(SIZE_POLICIES)}")
    if not math.isfinite(options.diff_gain) or options.diff_gain < 0:
        raise ConfigError(f"--diff-gain must be a finite number >= 0, not {options.diff_gain}")
    siblings = (lambda target: (diff_path(target),)) if options.diff else None
    items, notes, removed = _prepare_run(inputs, IMAGE_SUFFIXES, out, image_names("png"), siblings)
    runner = Runner(vae, run)
    factor = vae.config.size_multiple  # FLUX.2: 16, the sizes its pipelines take
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
    engine = _Engine(items, size, options.workers, progress, batch_for, runner.device)
    settings = {
        "kind": "reconstruction",
        "model_sha256": model_summary(vae)["weights_sha256"],
        "model_identity_sha256": model_identity(vae),
        "size_policy": options.size_policy,
        "alpha": options.alpha,
        "posterior": "sample" if options.sample else "mode",
        "seed": str(options.seed) if options.sample else "",
    }

    def provenance(item: Item, source_sha: str, diff: bool) -> dict[str, str]:
        want = {"source_sha256": source_sha, **settings}
        if diff:
            want.update(kind="error-map", diff_gain=repr(float(options.diff_gain)))
        return {"vaecli_version": __version__, "source": item.rel, **want}

    def load(index: int, item: Item) -> Loaded | Skip:
        fh, source_sha = read_source(item.input, options.max_pixels)  # the bytes hashed are the bytes decoded
        pixels = decode_image(fh, options.alpha, options.max_pixels, keep_uint8=True)
        h, w = pixels.shape[:2]
        prepared, encoded, undo = prepare_pixels(pixels, factor, options.size_policy, options.pad_to)
        ref = _reference(pixels, undo)
        extra = {"width": w, "height": h, "size": encoded, "undo": undo, "ref": ref, "source_sha256": source_sha}
        if item.output is None:
            return Loaded(index, item, prepared, extra)
        reuse = _existing_reconstruction(item, provenance(item, source_sha, False), ref)
        maps = provenance(item, source_sha, True) if options.diff else None
        if isinstance(reuse, np.ndarray):  # current: score it, and write its error map if that is not current
            note = "scored from the existing reconstruction"
            if maps is not None:
                target = diff_path(item.output)
                keep, _ = reuse_output(image_output_state(target), _wanted(maps), options.overwrite, target)
                if not keep:
                    write_image(target, diff_map(ref, reuse, options.diff_gain), provenance=maps)
                    note += "; wrote its error map"
            return Skip(_scores(ref, reuse), note)
        if maps is not None:  # a file in the way of the error map fails the item before the model runs
            target = diff_path(item.output)
            reuse_output(image_output_state(target), _wanted(maps), options.overwrite, target)
        if reuse is not None:
            engine.results[index].notes.append(reuse)
        return Loaded(index, item, prepared, extra)

    def _existing_reconstruction(item: Item, record: dict[str, str], ref: np.ndarray) -> np.ndarray | str | None:
        """The current reconstruction's pixels, or a note on why it is remade (None: nothing there)."""
        assert item.output is not None
        skip, note = reuse_output(image_output_state(item.output), _wanted(record), options.overwrite, item.output)
        if not skip:
            return note
        try:
            rec = to_uint8(read_image(item.output, "drop", ref.shape[0] * ref.shape[1]))
        except InputError as exc:
            return f"replaced an unreadable reconstruction ({exc})"
        return rec if rec.shape == ref.shape else "replaced a reconstruction of another size"

    def compute(batch: list[Loaded]) -> Deferred:
        x, noise = _stage_images(runner, batch, options.sample, options.seed)
        pending = runner.submit_roundtrip(x, noise, as_uint8=options.size_policy != "resize")

        def outputs() -> list[Any]:
            enc, dec = pending.result()
            errors = _note_batch(engine, batch, enc, "encode")
            errors = [a or b for a, b in zip(errors, _note_batch(engine, batch, dec, "decode"))]
            images = _images_nhwc(dec.tensor)
            return [err if err is not None else images[i] for i, err in enumerate(errors)]

        return Deferred(outputs)

    def save(loaded: Loaded, image: np.ndarray) -> None:
        e = loaded.extra
        rec = to_uint8(restore_size(image, options.size_policy, (e["height"], e["width"])))
        engine.results[loaded.index].metrics.update(_scores(e["ref"], rec))
        target = loaded.item.output
        if target is None:
            return
        if options.diff:
            maps = provenance(loaded.item, e["source_sha256"], True)
            write_image(diff_path(target), diff_map(e["ref"], rec, options.diff_gain), provenance=maps)
        write_image(target, rec, provenance=provenance(loaded.item, e["source_sha256"], False))  # last

    probe = _image_probe(factor, options.size_policy, options.pad_to)
    engine.run(load, lambda b: b.extra["size"], compute, save, probe)
    return _report("roundtrip", engine, vae, start, removed, notes, runner)


def _reference(pixels: np.ndarray, undo: dict[str, Any]) -> np.ndarray:
    """The 8-bit original a reconstruction is scored against: the encoded region for crop."""
    if "crop_ltrb" in undo:
        left, top, right, bottom = undo["crop_ltrb"]
        pixels = pixels[top:bottom, left:right]
    return to_uint8(pixels)


def _scores(ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(ref, rec), "ssim": ssim(ref, rec), "max_abs_error": max_abs_error(ref, rec)}


def _wanted(record: Mapping[str, str]) -> dict[str, str]:
    """The entries of a provenance record that decide whether an output is current (not version or name)."""
    return {k: v for k, v in record.items() if k not in ("vaecli_version", "source")}
