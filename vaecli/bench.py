"""Timing and peak memory of encode and decode through `Runner`, the path the CLI takes (returns data, prints nothing).

Peak memory is measured per (op, resolution): on CUDA with the allocator's peak statistics, on the CPU as the
peak resident set size of a fresh worker process (`python -m vaecli.bench --worker <json>`), since a process's
peak RSS cannot be attributed to one operation once others have run in it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import errors
from .choices import TILING_MODES
from .devices import DTYPE_NAMES, DTYPES, resolve_device
from .errors import ConfigError, InputError, VaecliError
from .memory import OOM_ERRORS
from .models.kl import AutoencoderKL
from .pipeline import Runner, RunOptions
from .plans import apply_layout, plan_for
from .weight_files import DEFAULT_MODEL, default_model_dir, locate
from .weights import load_vae

OPS = ("encode", "decode")
ROW_KEYS = (
    "op",  # "encode" or "decode"
    "resolution",  # square image side in pixels (decode: the image it produces)
    "batch_size",
    "dtype",  # requested precision
    "compute_dtype",  # precision Runner actually used (fp16 may be upcast to fp32)
    "tiling",  # requested tiling mode
    "tiles",  # tiles per call of the last timed run (0: untiled), which shows what "auto" chose
    "compile",  # encoder and decoder run through torch.compile (its time lands in warmup_s)
    "ms_per_img",  # median over timed iterations, divided by the batch size
    "img_per_s",
    "peak_memory_bytes",  # peak above the memory in use just before the op (None where not measurable)
    "peak_rss_bytes",  # absolute peak RSS of the worker process (CPU, isolated runs only)
    "peak_allocated_bytes",  # absolute peak of torch's CUDA allocator, weights included (CUDA only)
    "warmup_s",  # duration of the first warm-up call (first-call costs: kernel selection, allocator growth)
    "device_busy",  # share of one more call's time the device computed (CUDA: kernel time; CPU: time in
    # torch operators), by torch.profiler; the rest went to the host (Python, kernel launches, waiting)
    "iters",
    "device",  # human-readable device name
    "model",  # what was loaded (path or "vaecli-default")
    "events",  # what Runner reported (OOM batch splits, tiling fallback), de-duplicated
    "error",  # None, or why this measurement failed (e.g. out of memory); the other rows still ran
)


@dataclass(frozen=True)
class Job:
    """One (op, resolution) measurement; the JSON a worker process receives."""

    model: str | None
    op: str
    resolution: int
    batch_size: int
    dtype: str
    tiling: str
    device: str  # resolved: "cpu", "cuda", "cuda:1", "mps"
    warmup: int
    iters: int
    tile_size: int
    tile_overlap: int
    compile: bool
    family: str | None
    subfolder: str | None  # model folder selection, as load_vae takes them
    revision: str | None
    variant: str | None
    threads: int  # torch CPU threads, so a worker computes with the parent's setting
    kernels: str = "auto"  # plans.KERNEL_MODES


def run_bench(
    model: str | None = None,
    resolutions: list[int] = [512],  # noqa: B006 - read, never mutated (the CLI passes its own list)
    batch_size: int = 1,
    dtype: str = "fp32",
    tiling: str = "off",
    device: str = "auto",
    warmup: int = 1,
    iters: int = 3,
    tile_size: int = 512,
    tile_overlap: int = 64,
    family: str | None = None,
    isolate: bool | None = None,
    compile: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    kernels: str = "auto",
    subfolder: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> list[dict[str, Any]]:
    """Time encode and decode of random square inputs at each resolution; one row per (resolution, op).

    model: as `load_vae` takes it (None: the embedded default model); family: its latent-family preset;
    subfolder, revision, variant: as load_vae's.
    Each op gets `warmup` untimed calls, then `iters` timed calls separated by device synchronisation;
    rows report the median. Encode inputs are uniform pixels in [0, 1], decode inputs standard-normal
    latents of the model's latent shape, both seeded. Inputs start on the device; outputs are returned to
    the CPU in float32 as Runner does, so that copy is part of the time.
    isolate: run each (op, resolution) in a fresh worker process; None means yes on the CPU (the only way
    to measure its peak memory per op) and no on GPUs. compile, kernels: RunOptions'. Row keys: ROW_KEYS.
    Raises a VaecliError for unusable arguments or models; a measurement that runs out of memory yields a
    row with `error` set instead. progress: called with each row as soon as it is measured.
    """
    _check_args(resolutions, batch_size, dtype, tiling, warmup, iters, tile_size, tile_overlap)
    dev = resolve_device(device)
    if isolate is None:
        isolate = dev.type == "cpu"
    # Fail on a missing model before starting any worker; load_vae says the same in-process.
    locate(default_model_dir() if model is None else model, subfolder, variant, revision)
    jobs = [
        Job(
            model=None if model is None else str(model), op=op, resolution=res, batch_size=batch_size, dtype=dtype,
            tiling=tiling, device=str(dev), warmup=warmup, iters=iters, tile_size=tile_size,
            tile_overlap=tile_overlap, compile=compile, family=family, subfolder=subfolder, revision=revision,
            variant=variant, threads=torch.get_num_threads(), kernels=kernels,
        )
        for res in resolutions
        for op in OPS
    ]
    vae = None if isolate else _load(jobs[0])
    rows = []
    for job in jobs:
        row = _run_worker(job) if vae is None else measure(vae, job)
        if progress is not None:
            progress(row)
        rows.append(row)
    return rows


def device_name(device: str | torch.device) -> str:
    """A human-readable name: the GPU's name for CUDA, 'cpu (N threads)' for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


def measure(vae: AutoencoderKL, job: Job) -> dict[str, Any]:
    """Time one (op, resolution) on an already loaded model; peak memory is measured on CUDA only."""
    dev = torch.device(job.device)
    runner, call = _prepare(vae, job)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    row = _time(vae, runner, call, job)
    if dev.type == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        row["peak_memory_bytes"] = row["peak_allocated_bytes"] - before
    return _add_busy_share(row, call, dev)


# -- timing -----------------------------------------------------------------------------------------------


def _check_args(
    resolutions: list[int], batch_size: int, dtype: str, tiling: str, warmup: int, iters: int, tile_size: int,
    tile_overlap: int,
) -> None:
    problems = []
    if not resolutions:
        problems.append("no resolutions given")
    problems += [f"resolution {r} is not a positive integer" for r in resolutions if not isinstance(r, int) or r <= 0]
    if batch_size < 1:
        problems.append(f"batch size {batch_size} must be >= 1")
    if dtype not in DTYPES:
        problems.append(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if tiling not in TILING_MODES:
        problems.append(f"unknown tiling mode {tiling!r} (one of {', '.join(TILING_MODES)})")
    if warmup < 0 or iters < 1:
        problems.append(f"need warmup >= 0 and iters >= 1 (got {warmup} and {iters})")
    if tile_size < 1 or not 0 <= tile_overlap < tile_size:
        problems.append(f"need 0 <= tile overlap ({tile_overlap}) < tile size ({tile_size})")
    if problems:
        raise VaecliError("invalid benchmark settings: " + "; ".join(problems))


def _options(job: Job) -> RunOptions:
    return RunOptions(
        dtype=DTYPES[job.dtype], tiling=job.tiling, tile_size=job.tile_size, tile_overlap=job.tile_overlap,
        compile=job.compile, kernels=job.kernels,
    )


def _load(job: Job) -> AutoencoderKL:
    """The model on the job's device, already in the precision and the weight layout Runner will compute
    with (one copy only: the benchmark owns this model, so it may lay it out in place)."""
    torch.set_num_threads(job.threads)
    vae = load_vae(job.model, device=job.device, family=job.family, subfolder=job.subfolder, revision=job.revision,
                   variant=job.variant)
    options = _options(job)
    wanted = options.compute_dtype(vae.config)
    vae = vae.to(wanted) if wanted != torch.float32 else vae
    return apply_layout(vae, plan_for(next(vae.parameters()).device, vae.config, options.kernels))


def _prepare(vae: AutoencoderKL, job: Job) -> tuple[Runner, Callable[[], Any]]:
    """A Runner for the job and a zero-argument call running its op on seeded random input."""
    cfg = vae.config
    f = cfg.downsample_factor
    if job.resolution % f:
        raise InputError(f"resolution {job.resolution} is not a multiple of the model's downsample factor {f}")
    runner = Runner(vae, _options(job))
    runner.autotune.min_repeats = 0  # the same shape every call: the warm-up absorbs cuDNN's search
    gen = torch.Generator().manual_seed(0)
    n, side = job.batch_size, job.resolution
    if job.op == "encode":
        pixels = torch.rand(n, cfg.in_channels, side, side, generator=gen).to(runner.device)  # (N, C, H, W)
        return runner, lambda: runner.encode(pixels)
    latents = torch.randn(n, cfg.latent_channels, side // f, side // f, generator=gen)  # (N, c, H/f, W/f)
    latents = latents.to(runner.device)
    return runner, lambda: runner.decode(latents)


def _time(vae: AutoencoderKL, runner: Runner, call: Callable[[], Any], job: Job) -> dict[str, Any]:
    """Warm up, then time `iters` calls, each between device synchronisations; a row with the median."""
    dev = runner.device
    events: list[str] = []
    warmup_s: float | None = None
    times: list[float] = []
    tiles = 0
    error: str | None = None
    try:
        for i in range(job.warmup + job.iters):
            _sync(dev)
            start = time.perf_counter()
            result = call()
            _sync(dev)
            elapsed = time.perf_counter() - start
            if i == 0 and job.warmup:
                warmup_s = elapsed
            if i >= job.warmup:
                times.append(elapsed)
            events += [e for e in result.events if e not in events]
            tiles = result.tiles
            if result.failed:  # the time is still real; say why the outputs are not
                note = f"{len(result.failed)} sample(s) non-finite even in fp32"
                events += [note] if note not in events else []
    except (ConfigError, InputError):
        raise  # unusable settings: every row would fail alike
    except (VaecliError, MemoryError, *OOM_ERRORS) as exc:
        # Out of memory (Runner's, or the host's) at one size must not cost the rows of the others.
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    median = statistics.median(times) if times and error is None else None
    row = {
        "op": job.op,
        "resolution": job.resolution,
        "batch_size": job.batch_size,
        "dtype": job.dtype,
        "compute_dtype": DTYPE_NAMES[runner.dtype],
        "tiling": job.tiling,
        "tiles": tiles,
        "compile": job.compile,
        "ms_per_img": median * 1000.0 / job.batch_size if median else None,
        "img_per_s": job.batch_size / median if median else None,
        "peak_memory_bytes": None,
        "peak_rss_bytes": None,
        "peak_allocated_bytes": None,
        "warmup_s": warmup_s,
        "device_busy": None,  # filled in by _add_busy_share once the op's peak memory is read
        "iters": len(times),
        "device": device_name(dev),
        "model": vae.info.name if vae.info is not None else None,
        "events": events,
        "error": error,
    }
    return row


def _add_busy_share(row: dict[str, Any], call: Callable[[], Any], dev: torch.device) -> dict[str, Any]:
    """One more call under the profiler, after the timed ones and after their peak memory was read (the
    profiler's records and its slower call must count in neither)."""
    if row["ms_per_img"] is not None:
        row["device_busy"] = _busy_share(call, dev)
    return row


def _busy_share(call: Callable[[], Any], dev: torch.device) -> float | None:
    """Share of one call's wall time the device spent computing: the sum of CUDA kernel times, or on the
    CPU of the time inside torch operators (self times: nested operators counted once), by torch.profiler.
    None when the profiler is unavailable or fails."""
    try:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        _sync(dev)
        with _fd2_silenced(), profile(activities=activities) as prof:  # kineto logs to fd 2 at start and stop
            start = time.perf_counter()
            call()
            _sync(dev)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        if dev.type == "cuda":
            busy_us = sum(e.self_device_time_total for e in events)
        else:
            busy_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::"))
    except Exception:  # noqa: BLE001 - the share is extra information; its absence is reported as None
        return None
    return min(1.0, busy_us / 1e6 / wall) if wall > 0 else None


@contextlib.contextmanager
def _fd2_silenced() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 to /dev/null (Python's sys.stderr is flushed first)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()




# -- isolated measurement in a worker process -------------------------------------------------------------


def _run_worker(job: Job) -> dict[str, Any]:
    """Measure `job` in a fresh interpreter; a VaecliError raised there is raised here with the same type."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)  # so the worker imports this very vaecli
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "vaecli.bench", "--worker", json.dumps(asdict(job))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        if proc.returncode < 0:  # killed by a signal: on Linux usually the out-of-memory killer
            return _failed_row(job, f"worker killed by signal {-proc.returncode} (out of memory?)")
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise VaecliError(f"benchmark worker failed ({job.op} {job.resolution}px): {tail}")
    out = json.loads(lines[-1])
    if "raise" in out:
        cls = getattr(errors, out["raise"], VaecliError)
        raise (cls if isinstance(cls, type) and issubclass(cls, VaecliError) else VaecliError)(out["message"])
    return out


def _failed_row(job: Job, error: str) -> dict[str, Any]:
    row: dict[str, Any] = {key: None for key in ROW_KEYS}
    row.update(
        op=job.op, resolution=job.resolution, batch_size=job.batch_size, dtype=job.dtype, tiling=job.tiling, tiles=0,
        compile=job.compile, iters=0, device=device_name(job.device), model=job.model or DEFAULT_MODEL, events=[],
        error=error,
    )
    return row


def _worker(job: Job) -> dict[str, Any]:
    """Load, prepare the input, then measure the op alone: its peak memory above what was resident before it."""
    dev = torch.device(job.device)
    vae = _load(job)
    if dev.type != "cpu":
        return measure(vae, job)
    runner, call = _prepare(vae, job)
    gc.collect()
    # Loading makes transient copies of the weights whose RSS peak can exceed the op's: reset the peak.
    reset = _reset_peak_rss()
    baseline = _current_rss()
    row = _time(vae, runner, call, job)
    peak = _peak_rss()
    row["peak_rss_bytes"] = peak
    row["peak_memory_bytes"] = max(peak - baseline, 0) if reset else None
    return _add_busy_share(row, call, dev)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _worker_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m vaecli.bench --worker <job json>  (run_bench starts these)", file=sys.stderr)
        return 2
    job = Job(**json.loads(argv[1]))
    try:
        row = _worker(job)
    except VaecliError as exc:
        row = {"raise": type(exc).__name__, "message": str(exc)}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
