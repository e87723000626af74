"""Folder walking, batching by size, I/O overlapped with compute, resume, per-item results.

One core function per command (`encode_paths`, `decode_paths`, `roundtrip_paths`); each returns a Report
and never raises for a bad item: per-item failures are values. Reading runs in a thread pool ahead of the
model (a bounded prefetch window), writing in another pool behind it, so the model stays busy.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .config import LatentSpec
from .errors import ConfigError, InputError, VaecliError
from .io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    LATENT_SUFFIXES,
    clean_temp_files,
    is_temp_name,
    latent_is_complete,
    meta_json,
    read_image,
    read_latent,
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
        return d


# ------------------------------------------------------------------------------------------------- model


def open_model(source: str | None, family: str | None, device: str) -> AutoencoderKL:
    """Load the model (fp32 weights; the Runner makes lower-precision copies) on the resolved device."""
    from .weights import load_vae

    return load_vae(source, device=resolve_device(device), dtype=torch.float32, family=family)


def model_summary(vae: AutoencoderKL) -> dict[str, Any]:
    info = getattr(vae, "info", None)
    return {
        "name": info.name if info else "unnamed",
        "weights_sha256": info.weights_sha256 if info else "",
        "device": str(next(vae.parameters()).device),
    }


# --------------------------------------------------------------------------------------------- discovery


@dataclass
class Item:
    """One input file and where its output goes."""

    input: Path
    rel: str  # path relative to the folder it was found in (or its name), posix: names outputs, seeds noise
    output: Path | None
    error: str | None = None  # known before reading: missing path, output collision


def discover(inputs: Sequence[str | Path], suffixes: Sequence[str], out: Path | None, out_suffix: str) -> list[Item]:
    """Expand files and folders (recursively, by suffix, hidden names skipped) into items with outputs.

    `D/a/b.jpg` found in folder D -> `out/a/b<out_suffix>`; a file named directly -> `out/<stem><out_suffix>`.
    Files under `out` are never inputs.
    """
    items: list[Item] = []
    owner: dict[Path, Item] = {}
    seen: set[Path] = set()
    out_resolved = out.resolve() if out is not None else None

    def add(path: Path, rel: str) -> None:
        if path.resolve() in seen:
            return  # named twice (or a file inside a folder also given): one item
        seen.add(path.resolve())
        stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
        target = out / (stem + out_suffix) if out is not None else None
        item = Item(path, rel, target)
        if target is not None:
            key = target.resolve()
            if key in owner:
                item.error = f"its output {target} is also the output of {owner[key].input}; rename one of them"
            else:
                owner[key] = item
        items.append(item)

    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            for found in _walk(path, suffixes, out_resolved):
                add(found, found.relative_to(path).as_posix())
        elif path.exists():
            add(path, path.name)
        else:
            items.append(Item(path, path.name, None, "no such file or folder"))
    return items


def check_output_root(items: list[Item], out: Path | None) -> None:
    """When the output folder cannot be created, fail every item up front instead of after the model ran."""
    if out is None:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"cannot create the output folder {out}: {exc.strerror or exc} (a file in the way, or no permission?)"
        for item in items:
            item.error = item.error or message


def _walk(root: Path, suffixes: Sequence[str], exclude: Path | None) -> Iterator[Path]:
    for dirpath, dirnames, names in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )
        for name in sorted(names):
            if name.startswith(".") or is_temp_name(name):
                continue  # hidden files: .DS_Store, macOS '._x.jpg' resource forks, our temp files
            if Path(name).suffix.lower() in suffixes:
                yield here / name


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
    if isinstance(exc, VaecliError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot write{where}: {exc.strerror or exc}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


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
        self.results = [ItemResult(str(it.input), str(it.output) if it.output else None) for it in items]
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
        """compute returns one value per Loaded: an output for `save`, or an exception for a failed item."""
        if self.progress is not None:
            self.progress(0, len(self.items))
        readers = ThreadPoolExecutor(self.workers, thread_name_prefix="vaecli-read")
        writer = ThreadPoolExecutor(2, thread_name_prefix="vaecli-write")
        writes: deque[tuple[int, Future[None]]] = deque()
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

        try:
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
        finally:
            # On Ctrl-C stop reading ahead at once; queued writes still finish (each one is atomic).
            readers.shutdown(wait=False, cancel_futures=True)
            writer.shutdown(wait=True)

    def _collect(self, index: int, future: Future[None]) -> None:
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - a failed write fails its item only
            self.finish(index, "failed", exc)
        else:
            self.finish(index, "ok")

    def _prefetch(
        self, pool: ThreadPoolExecutor, load: Callable[[int, Item], Loaded | Skip]
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


def _report(command: str, engine: _Engine, vae: AutoencoderKL, start: float, removed: int) -> Report:
    return Report(
        command,
        engine.results,
        model=model_summary(vae),
        events=engine.events,
        elapsed_s=time.perf_counter() - start,
        computed=engine.computed,
        tiles=engine.tiles,
        temp_files_removed=removed,
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
        nh, nw = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
        return resample(pixels, nh, nw), {"resample": "bicubic-antialias"}
    raise ConfigError(f"unknown size policy {policy!r}; choose one of {', '.join(SIZE_POLICIES)}")


def undo_size_policy(pixels: np.ndarray, meta: dict[str, str]) -> np.ndarray:
    """A decoded (H', W', 3) image back at the original size recorded in latent metadata.

    pad: cropped back exactly; resize: resampled back; crop: the pixels cut away are gone, so the image
    keeps the size of the region that was encoded (recorded as crop_ltrb in original coordinates).
    """
    policy = meta.get("size_policy", "pad")
    try:
        oh, ow = int(meta["original_height"]), int(meta["original_width"])
    except (KeyError, ValueError):
        raise InputError("latent metadata lacks a valid original_width/original_height") from None
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
    digest = hashlib.sha256(f"{seed}\0{rel}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """
    start = time.perf_counter()
    if options.size_policy not in SIZE_POLICIES:
        raise ConfigError(f"unknown size policy {options.size_policy!r}; choose one of {', '.join(SIZE_POLICIES)}")
    if options.latent_dtype not in DTYPES:
        raise ConfigError(f"unknown latent dtype {options.latent_dtype!r}; choose one of {', '.join(DTYPES)}")
    items = discover(inputs, IMAGE_SUFFIXES, out, ".safetensors")
    check_output_root(items, out)
    removed = len(clean_temp_files(out))
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
        source_sha = _sha256_file(item.input) if item.input.is_file() else ""
        note = None
        if item.output is not None and not options.overwrite:
            meta = latent_is_complete(item.output)
            if meta is not None:
                stale = [k for k in _SETTINGS_KEYS if meta.get(k, "") != settings[k]]
                if meta.get("source_sha256") != source_sha:
                    stale.insert(0, "source file")
                if not stale:
                    return Skip()
                note = f"replaced a stale output (changed: {', '.join(stale)})"
        pixels = read_image(item.input, options.alpha, options.max_pixels)
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
    return _report("encode", engine, vae, start, removed)


# ------------------------------------------------------------------------------------------------ decode


def latent_spec_from_meta(meta: dict[str, str]) -> LatentSpec | None:
    """The normalization a latent file was stored with; None for raw latents."""
    value = meta.get("latent_spec", "none")
    if value == "none":
        return None
    data = meta_json(meta, "latent_spec")
    if not isinstance(data, dict):
        raise InputError(f"latent metadata 'latent_spec' is not an object: {value!r}")
    return LatentSpec.from_dict(data)


def decode_paths(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: Path,
    options: DecodeOptions = DecodeOptions(),
    run: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> Report:
    """Decode latent files and folders into `out/<rel>.<format>` images at their original size.

    Our files carry their normalization and size policy; bare tensors need scaling_factor/shift_factor.
    A latent of another model (weights sha256) fails unless `force`. Existing outputs are skipped.
    """
    start = time.perf_counter()
    items = discover(inputs, LATENT_SUFFIXES, out, "." + options.format)
    check_output_root(items, out)
    removed = len(clean_temp_files(out))
    runner = Runner(vae, run)
    factor = vae.config.downsample_factor
    info = model_summary(vae)
    override = options.scaling_factor is not None or options.shift_factor is not None
    flag_spec = LatentSpec(
        options.scaling_factor if options.scaling_factor is not None else 1.0, options.shift_factor
    )
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=True)
    engine = _Engine(items, size, options.workers, progress, batch_for)

    def load(index: int, item: Item) -> Loaded | Skip:
        if item.output is not None and not options.overwrite and item.output.exists():
            return Skip()  # images are written atomically: existing means complete
        lf = read_latent(item.input)
        meta = lf.meta
        if meta is not None:
            version = meta.get("format_version", "0")
            if not version.isdigit():
                raise InputError(f"latent metadata has an invalid format_version {version!r}")
            if int(version) > int(LATENT_FORMAT_VERSION):
                raise InputError(
                    f"written by a newer vaecli (latent format {meta['format_version']}); upgrade vaecli"
                )
            made_by = meta.get("model_sha256", "")
            if made_by != info["weights_sha256"] and not options.force:
                raise InputError(
                    f"made by another model ({meta.get('model_name', '?')}, weights sha256 {made_by[:12]}) "
                    f"than the one in use ({info['name']}, {info['weights_sha256'][:12]}); pass "
                    f"--model {meta.get('model_name', '<that model>')}, or --force to decode anyway"
                )
            spec = flag_spec if override else latent_spec_from_meta(meta)
        elif override:
            spec = flag_spec
        else:
            raise InputError(
                "bare latent without vaecli metadata: say how it is normalized with --scaling-factor "
                f"(and --shift-factor), e.g. --scaling-factor {vae.config.scaling_factor:g} for this model's "
                "diffusion latents or --scaling-factor 1 for raw VAE latents"
            )
        c, h, w = lf.tensor.shape
        if c != vae.config.latent_channels:
            raise InputError(
                f"latent has {c} channels but the model expects {vae.config.latent_channels}; "
                "it was made for another kind of VAE (pass its --model)"
            )
        if options.max_pixels > 0 and h * w * factor * factor > options.max_pixels:
            raise InputError(
                f"decodes to {w * factor}x{h * factor} pixels, above the limit of {options.max_pixels / 1e6:.1f} MP; "
                f"pass --max-pixels {h * w * factor * factor} to decode it"
            )
        z = spec.denormalize(lf.tensor) if spec is not None else lf.tensor
        if not torch.isfinite(z).all():
            raise InputError("latent holds NaN or Inf values")
        if override and meta is not None:
            engine.results[index].notes.append("normalization from --scaling-factor/--shift-factor, not metadata")
        return Loaded(index, item, z, {"meta": meta})

    def compute(batch: list[Loaded]) -> list[Any]:
        result = runner.decode(torch.stack([b.x for b in batch]), None)  # (N, C, h, w) raw latents
        errors = _note_batch(engine, batch, result, "decode")
        images = result.tensor.permute(0, 2, 3, 1).numpy()  # (N, 3, H, W) -> (N, H, W, 3)
        return [err if err is not None else images[i] for i, err in enumerate(errors)]

    def save(loaded: Loaded, image: np.ndarray) -> None:
        meta = loaded.extra["meta"]
        if meta is not None:
            image = undo_size_policy(image, meta)
        assert loaded.item.output is not None
        write_image(loaded.item.output, image, options.format, options.quality)

    engine.run(load, lambda b: tuple(b.x.shape), compute, save)
    return _report("decode", engine, vae, start, removed)


# --------------------------------------------------------------------------------------------- roundtrip


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
    reconstruction is skipped and scored from the file instead of recomputed.
    """
    start = time.perf_counter()
    if options.size_policy not in SIZE_POLICIES:
        raise ConfigError(f"unknown size policy {options.size_policy!r}; choose one of {', '.join(SIZE_POLICIES)}")
    items = discover(inputs, IMAGE_SUFFIXES, out, ".png")
    check_output_root(items, out)
    removed = len(clean_temp_files(out)) if out is not None else 0
    runner = Runner(vae, run)
    factor = vae.config.downsample_factor
    size, batch_for = batch_sizer(options.batch_size, vae, run, latent_keys=False)
    engine = _Engine(items, size, options.workers, progress, batch_for)

    def reference(pixels: np.ndarray, undo: dict[str, Any]) -> np.ndarray:
        if "crop_ltrb" in undo:
            left, top, right, bottom = undo["crop_ltrb"]
            pixels = pixels[top:bottom, left:right]
        return to_uint8(pixels)

    def scores(ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
        return {"psnr": psnr(ref, rec), "ssim": ssim(ref, rec), "max_abs_error": max_abs_error(ref, rec)}

    def load(index: int, item: Item) -> Loaded | Skip:
        pixels = read_image(item.input, options.alpha, options.max_pixels)
        h, w = pixels.shape[:2]
        prepared, undo = apply_size_policy(pixels, factor, options.size_policy)
        ref = reference(pixels, undo)
        if item.output is not None and not options.overwrite and item.output.exists():
            try:
                rec = to_uint8(read_image(item.output, "drop", 0))
            except InputError:
                rec = None  # unreadable: recompute it
            if rec is not None and rec.shape == ref.shape:
                return Skip(scores(ref, rec), "scored from the existing reconstruction")
        return Loaded(index, item, prepared, {"width": w, "height": h, "undo": undo, "ref": ref})

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
        meta = {"size_policy": options.size_policy, "original_width": str(e["width"]), "original_height": str(e["height"])}
        rec = to_uint8(undo_size_policy(image, meta))
        engine.results[loaded.index].metrics.update(scores(e["ref"], rec))
        target = loaded.item.output
        if target is None:
            return
        if options.diff:
            diff_path = target.with_name(target.name[: -len(".png")] + ".diff.png")
            write_image(diff_path, diff_map(e["ref"], rec, options.diff_gain))
        write_image(target, rec)  # last: its existence marks the item complete

    engine.run(load, lambda b: b.x.shape, compute, save)
    return _report("roundtrip", engine, vae, start, removed)
