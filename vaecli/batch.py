"""Folder walking, batching by size, I/O overlapped with compute, resume, per-item results.

One core function per command (`encode_paths`, `decode_paths`, `roundtrip_paths`); each returns a Report
and never raises for a bad item: per-item failures are values. Reading runs in a thread pool ahead of the
model (a bounded prefetch window), writing in another pool behind it, so the model stays busy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch

from . import __version__
from .config import LatentSpec
from .discovery import Item, check_layout, check_output_root, discover
from .errors import ConfigError, InputError, Interrupted, VaecliError
from .files import folder_syncs_deferred, open_regular, sha256_of
from .io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    LATENT_SUFFIXES,
    OutputState,
    clean_temp_files,
    decode_image,
    image_output_state,
    latent_output_state,
    load_latent,
    meta_json,
    read_image,
    to_uint8,
    write_image,
    write_latent,
)
from .metrics import diff_map, max_abs_error, psnr, ssim
from .model import AutoencoderKL
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

__all__ = ["Item", "check_layout", "check_output_root", "discover"]  # re-exported: dataset.py imports them here

SIZE_POLICIES = ("pad", "crop", "resize")
Progress = Callable[[int, int], None]  # (items finished, items in total)


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
    alpha: str = "white"  # transparent pixels: composite over white or black, or drop the alpha channel
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused
    overwrite: bool = False  # recompute outputs that exist
    workers: int = 0  # reader threads; 0 = min(4, CPUs)


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
        d: dict[str, Any] = {"input": self.input, "output": self.output, "status": self.status}
        if self.error is not None:
            d["error"] = self.error
        d.update(self.metrics)
        if self.retries:
            d["retries"] = self.retries
        if self.notes:
            d["notes"] = self.notes
        return d


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
        if self.notes:
            d["notes"] = self.notes
        return d


# ------------------------------------------------------------------------------------------------- model


def open_model(source: str | None, family: str | None, device: str) -> AutoencoderKL:
    """Load the model (fp32 weights; the Runner makes lower-precision copies) on the resolved device."""
    from .weights import load_vae

    if source is not None and os.path.exists(source):
        import stat

        from .files import file_kind

        mode = os.stat(source).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # reading a FIFO would wait forever
            raise ConfigError(f"{source} is {file_kind(mode)}, not a model file or folder")

    return load_vae(source, device=resolve_device(device), dtype=torch.float32, family=family)


def model_summary(vae: AutoencoderKL) -> dict[str, Any]:
    info = getattr(vae, "info", None)
    return {
        "name": info.name if info else "unnamed",
        "weights_sha256": info.weights_sha256 if info else "",
        "device": str(next(vae.parameters()).device),
    }


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
    cache: dict[Hashable, int] = {}

    def size(key: Hashable) -> int:
        if key not in cache:
            shape = tuple(key)  # type: ignore[arg-type]
            h, w = (shape[-2] * f, shape[-1] * f) if latent_keys else (shape[0], shape[1])
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


class _Engine:
    """Prefetch in reader threads, batch equal keys, run the model here, save in writer threads."""

    def __init__(
        self,
        items: list[Item],
        batch_size: int,
        workers: int,
        progress: Progress | None,
        batch_for: Callable[[Hashable], int] | None = None,
    ) -> None:
        """batch_for: the batch size for one key (image size), for --batch-size auto; batch_size is then
        the largest it may return, which bounds read-ahead and queued writes."""
        if batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        self.batch_for = batch_for
        self.items = items
        self.results = [
            ItemResult(str(it.input), str(it.output) if it.output else None, notes=list(it.notes)) for it in items
        ]
        self.batch_size = batch_size
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.progress = progress
        self.events: list[str] = []
        self.computed = 0
        self.tiles = 0
        self._done = 0
        self._lock = threading.Lock()

    def finish(self, index: int, status: str, exc: BaseException | None = None) -> None:
        r = self.results[index]
        r.status = status
        if exc is not None:
            r.error = _message(exc)
            if not isinstance(exc, VaecliError):
                r.detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        with self._lock:
            self._done += 1
            if self.progress is not None:
                self.progress(self._done, len(self.items))

    def run(
        self,
        load: Callable[[int, Item], Loaded | Skip],
        key: Callable[[Loaded], Hashable],
        compute: Callable[[list[Loaded]], list[Any]],
        save: Callable[[Loaded, Any], None],
    ) -> None:
        """compute returns one value per Loaded: an output for `save`, or an exception for a failed item.

        Ctrl-C: reading stops at once, the outputs already computed get WRITE_GRACE_S to be written (each
        write is atomic either way), and Interrupted carries the results so far.
        """
        if self.progress is not None:
            self.progress(0, len(self.items))
        with folder_syncs_deferred():  # each output folder fsynced once, at the end
            self._run(load, key, compute, save)

    def _run(
        self,
        load: Callable[[int, Item], Loaded | Skip],
        key: Callable[[Loaded], Hashable],
        compute: Callable[[list[Loaded]], list[Any]],
        save: Callable[[Loaded, Any], None],
    ) -> None:
        readers = _DaemonPool(self.workers, "vaecli-read")
        writer = _DaemonPool(2, "vaecli-write")
        writes: deque[tuple[int, Future[None]]] = deque()
        try:
            self._loop(readers, writer, writes, load, key, compute, save)
        except KeyboardInterrupt:
            readers.shutdown(cancel=True)
            self._settle(writes)  # computed outputs are still written, for at most WRITE_GRACE_S
            writer.shutdown(cancel=True)
            raise Interrupted(self.results) from None
        except BaseException:
            readers.shutdown(cancel=True)
            writer.shutdown(cancel=False)
            raise
        readers.shutdown(cancel=True, wait=True)  # every read and write has been collected
        writer.shutdown(cancel=False, wait=True)

    def _loop(
        self,
        readers: _DaemonPool,
        writer: _DaemonPool,
        writes: deque[tuple[int, Future[None]]],
        load: Callable[[int, Item], Loaded | Skip],
        key: Callable[[Loaded], Hashable],
        compute: Callable[[list[Loaded]], list[Any]],
        save: Callable[[Loaded, Any], None],
    ) -> None:
        pending: dict[Hashable, list[Loaded]] = {}  # key (e.g. image size) -> items waiting for a full batch

        def run_batch(batch: list[Loaded]) -> None:
            try:
                outputs = compute(batch)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for one image: the batch fails
                outputs = [exc] * len(batch)
            self.computed += len(batch)
            for loaded, out in zip(batch, outputs):
                if isinstance(out, BaseException):
                    self.finish(loaded.index, "failed", out)
                else:
                    writes.append((loaded.index, writer.submit(save, loaded, out)))
            while len(writes) > 2 * self.batch_size + 2:  # bound the memory held by queued writes
                self._collect(*writes.popleft())

        for index, got in self._prefetch(readers, load):
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
                    run_batch(pending.pop(k))
                elif sum(len(b) for b in pending.values()) > 4 * self.batch_size:
                    run_batch(pending.pop(max(pending, key=lambda b: len(pending[b]))))
            while writes and writes[0][1].done():
                self._collect(*writes.popleft())
        for k in list(pending):
            run_batch(pending.pop(k))
        while writes:
            self._collect(*writes.popleft())

    def _settle(self, writes: deque[tuple[int, Future[None]]]) -> None:
        """After Ctrl-C: record the writes that finish within the grace period; a second Ctrl-C stops waiting."""
        deadline = time.monotonic() + WRITE_GRACE_S
        try:
            for index, future in writes:
                if future.cancelled():
                    continue
                try:
                    future.exception(timeout=max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    continue
                self._collect(index, future)
        except KeyboardInterrupt:
            pass

    def _collect(self, index: int, future: Future[None]) -> None:
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - a failed write fails its item only
            self.finish(index, "failed", exc)
        else:
            self.finish(index, "ok")

    def _prefetch(
        self, pool: _DaemonPool, load: Callable[[int, Item], Loaded | Skip]
    ) -> Iterator[tuple[int, Loaded | Skip | BaseException]]:
        """Items loaded in order, at most `depth` ahead of the consumer."""

        def task(index: int, item: Item) -> Loaded | Skip | BaseException:
            if item.error is not None:
                return InputError(item.error)
            try:
                return load(index, item)
            except Exception as exc:  # noqa: BLE001 - returned as the item's failure
                return exc

        depth = 2 * self.batch_size + self.workers
        window: deque[tuple[int, Future[Any]]] = deque()
        todo = iter(enumerate(self.items))
        for index, item in todo:
            window.append((index, pool.submit(task, index, item)))
            if len(window) >= depth:
                break
        while window:
            index, future = window.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                window.append((nxt[0], pool.submit(task, *nxt)))
            yield index, future.result()


def _report(
    command: str, engine: _Engine, vae: AutoencoderKL, start: float, removed: int, notes: list[str]
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
        notes=notes,
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


def _prepare_run(inputs: Sequence[str | Path], suffixes: Sequence[str], out: Path | None, out_suffix: str,
                 siblings: Callable[[Path], Sequence[Path]] | None = None) -> tuple[list[Item], list[str], int]:
    """(items, run notes, temp files removed): discovery, the output folder checked, dead temp files cleaned."""
    notes: list[str] = []
    items = discover(inputs, suffixes, out, out_suffix, siblings, notes)
    check_output_root(items, out)
    removed = len(clean_temp_files(out)) if out is not None else 0
    return items, notes, removed


# ------------------------------------------------------------------------------------- existing outputs

_LABELS = {"source_sha256": "source file", "model_sha256": "model"}


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
        if encoded_side(oh, factor, policy) != eh or encoded_side(ow, factor, policy) != ew:
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


def _pixels_batch(batch: list[Loaded]) -> torch.Tensor:
    stacked = torch.from_numpy(np.stack([b.x for b in batch]))  # (N, H, W, 3)
    return stacked.permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W), channels_last in memory


def _noise(seed: int, rel: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal noise that depends only on (seed, relative path): independent of batching."""
    digest = hashlib.sha256(f"{seed}\0{rel}".encode("utf-8", "surrogateescape")).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g)


def _sha256_file(path: Path) -> str:
    """sha256 of a regular file's bytes (InputError for anything else: never blocks on a FIFO)."""
    with open_regular(path) as fh:
        return sha256_of(fh)


# ------------------------------------------------------------------------------------------------ encode

# Metadata entries that must match for an existing latent file to count as this run's output.
_SETTINGS_KEYS = ("model_sha256", "latent_spec", "posterior", "seed", "size_policy", "latent_dtype", "alpha")


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
    if options.size_policy not in SIZE_POLICIES:
        raise ConfigError(f"unknown size policy {options.size_policy!r}; choose one of {', '.join(SIZE_POLICIES)}")
    if options.latent_dtype not in DTYPES:
        raise ConfigError(f"unknown latent dtype {options.latent_dtype!r}; choose one of {', '.join(DTYPES)}")
    items, notes, removed = _prepare_run(inputs, IMAGE_SUFFIXES, out, ".safetensors")
    runner = Runner(vae, run)
    factor = vae.config.downsample_factor
    spec = None if options.raw else vae.config.latent_spec
    store_dtype = DTYPES[options.latent_dtype]
    info = model_summary(vae)
    settings = {
        "model_sha256": info["weights_sha256"],
        "latent_spec": json.dumps(spec.to_dict()) if spec is not None else "none",
        "posterior": "sample" if options.sample else "mode",
        "seed": str(options.seed) if options.sample else "",
        "size_policy": options.size_policy,
        "latent_dtype": options.latent_dtype,
        "alpha": options.alpha,
    }
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
    engine = _Engine(items, size, options.workers, progress, batch_for)

    def load(index: int, item: Item) -> Loaded | Skip:
        assert item.output is not None
        with open_regular(item.input) as fh:
            source_sha = sha256_of(fh)
            want = {"source_sha256": source_sha, **settings}
            skip, note = reuse_output(latent_output_state(item.output), want, options.overwrite, item.output)
            if skip:
                return Skip()
            pixels = decode_image(fh, options.alpha, options.max_pixels)
        h, w = pixels.shape[:2]
        prepared, undo = apply_size_policy(pixels, factor, options.size_policy)
        extra = {"width": w, "height": h, "undo": undo, "source_sha256": source_sha}
        if note:
            engine.results[index].notes.append(note)
        return Loaded(index, item, prepared, extra)

    def compute(batch: list[Loaded]) -> list[Any]:
        x = _pixels_batch(batch)
        noise = None
        if options.sample:
            shape = (vae.config.latent_channels, x.shape[2] // factor, x.shape[3] // factor)
            noise = torch.stack([_noise(options.seed, b.item.rel, shape) for b in batch])
        result = runner.encode(x, spec, noise)
        errors = _note_batch(engine, batch, result, "encode")
        outs: list[Any] = []
        for i, err in enumerate(errors):
            if err is not None:
                outs.append(err)
                continue
            z = result.tensor[i].to(store_dtype)
            if not torch.isfinite(z).all():
                outs.append(InputError(f"latent overflows {options.latent_dtype}; use --latent-dtype fp32 or bf16"))
            else:
                outs.append(z)
        return outs

    def save(loaded: Loaded, z: torch.Tensor) -> None:
        e = loaded.extra
        meta = {
            "format": LATENT_FORMAT,
            "format_version": LATENT_FORMAT_VERSION,
            "vaecli_version": __version__,
            "model_name": info["name"],
            **settings,
            "seed_key": loaded.item.rel if options.sample else "",
            "compute_dtype": DTYPE_NAMES[runner.dtype],
            "downsample_factor": str(factor),
            "original_width": str(e["width"]),
            "original_height": str(e["height"]),
            "encoded_width": str(loaded.x.shape[1]),
            "encoded_height": str(loaded.x.shape[0]),
            "size_params": json.dumps(e["undo"]),
            "source": loaded.item.rel,
            "source_sha256": e["source_sha256"],
        }
        assert loaded.item.output is not None
        write_latent(loaded.item.output, z, meta)

    engine.run(load, lambda b: b.x.shape, compute, save)
    return _report("encode", engine, vae, start, removed, notes)


# ------------------------------------------------------------------------------------------------ decode


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
    items, notes, removed = _prepare_run(inputs, LATENT_SUFFIXES, out, "." + options.format)
    runner = Runner(vae, run)
    factor = vae.config.downsample_factor
    channels = vae.config.latent_channels
    info = model_summary(vae)
    override = options.scaling_factor is not None or options.shift_factor is not None
    flag_spec = LatentSpec(
        options.scaling_factor if options.scaling_factor is not None else 1.0, options.shift_factor
    )
    settings = {
        "kind": "decode",
        "model_sha256": info["weights_sha256"],
        "image_format": options.format,
        "quality": str(options.quality) if options.format != "png" else "",
        "normalization": json.dumps(flag_spec.to_dict()) if override else "metadata",
    }
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=True)
    engine = _Engine(items, size, options.workers, progress, batch_for)

    def check_shape(shape: tuple[int, int, int]) -> None:
        c, h, w = shape
        if c != channels:
            raise InputError(
                f"latent has {c} channels but the model expects {channels}; it was made for another kind of VAE (pass its --model)"
            )
        if options.max_pixels > 0 and h * w * factor * factor > options.max_pixels:
            raise InputError(
                f"decodes to {w * factor}x{h * factor} pixels, above the limit of {options.max_pixels / 1e6:.1f} MP; "
                f"pass --max-pixels {h * w * factor * factor} to decode it"
            )

    def load(index: int, item: Item) -> Loaded | Skip:
        assert item.output is not None
        with open_regular(item.input) as fh:
            want = {"source_sha256": sha256_of(fh), **settings}
            skip, note = reuse_output(image_output_state(item.output), want, options.overwrite, item.output)
            if skip:
                return Skip()
            lf = load_latent(fh, item.input.suffix.lower(), check_shape)
        meta = lf.meta
        _, h, w = lf.tensor.shape
        if meta is not None:
            _check_meta_header(meta, info, options.force)
            target = (decoded_size(meta, h, w, factor, options.max_pixels), meta.get("size_policy", "pad"))
            spec = flag_spec if override else latent_spec_from_meta(meta, channels)
        elif override:
            target, spec = ((h * factor, w * factor), "crop"), flag_spec
        else:
            raise InputError(
                "bare latent without vaecli metadata: say how it is normalized with --scaling-factor "
                f"(and --shift-factor), e.g. --scaling-factor {vae.config.scaling_factor:g} for this model's "
                "diffusion latents or --scaling-factor 1 for raw VAE latents"
            )
        if not torch.isfinite(lf.tensor).all():
            raise InputError("latent holds NaN or Inf values")
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

    def compute(batch: list[Loaded]) -> list[Any]:
        result = runner.decode(torch.stack([b.x for b in batch]), None)  # (N, C, h, w) raw latents
        errors = _note_batch(engine, batch, result, "decode")
        images = result.tensor.permute(0, 2, 3, 1).numpy()  # (N, 3, H, W) -> (N, H, W, 3)
        return [err if err is not None else images[i] for i, err in enumerate(errors)]

    def save(loaded: Loaded, image: np.ndarray) -> None:
        (size_hw, policy), provenance = loaded.extra["target"], loaded.extra["provenance"]
        assert loaded.item.output is not None
        write_image(loaded.item.output, restore_size(image, policy, size_hw), options.format, options.quality, provenance)

    engine.run(load, lambda b: tuple(b.x.shape), compute, save)
    return _report("decode", engine, vae, start, removed, notes)


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
    items, notes, removed = _prepare_run(inputs, IMAGE_SUFFIXES, out, ".png", siblings)
    runner = Runner(vae, run)
    factor = vae.config.downsample_factor
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
    engine = _Engine(items, size, options.workers, progress, batch_for)
    settings = {
        "kind": "reconstruction",
        "model_sha256": model_summary(vae)["weights_sha256"],
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
        with open_regular(item.input) as fh:
            source_sha = sha256_of(fh) if item.output is not None else ""
            pixels = decode_image(fh, options.alpha, options.max_pixels)
        h, w = pixels.shape[:2]
        prepared, undo = apply_size_policy(pixels, factor, options.size_policy)
        ref = _reference(pixels, undo)
        extra = {"width": w, "height": h, "undo": undo, "ref": ref, "source_sha256": source_sha}
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

    def compute(batch: list[Loaded]) -> list[Any]:
        x = _pixels_batch(batch)
        noise = None
        if options.sample:
            shape = (vae.config.latent_channels, x.shape[2] // factor, x.shape[3] // factor)
            noise = torch.stack([_noise(options.seed, b.item.rel, shape) for b in batch])
        enc = runner.encode(x, None, noise)
        errors = _note_batch(engine, batch, enc, "encode")
        dec = runner.decode(enc.tensor, None)
        errors = [a or b for a, b in zip(errors, _note_batch(engine, batch, dec, "decode"))]
        images = dec.tensor.permute(0, 2, 3, 1).numpy()  # (N, 3, H, W) -> (N, H, W, 3)
        return [err if err is not None else images[i] for i, err in enumerate(errors)]

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

    engine.run(load, lambda b: b.x.shape, compute, save)
    return _report("roundtrip", engine, vae, start, removed, notes)


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
