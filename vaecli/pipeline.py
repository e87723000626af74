"""Batches through the model: pixel range, latent normalization, precision policy, NaN retries, launch.

Pixels are [0, 1] floats at this module's edge and [-1, 1] inside the model; latents returned by `encode`
are normalized by the LatentSpec given (raw when none). Memory (slices, tiling, the out-of-memory ladder)
is memory.py's; devices and precisions are devices.py's; how layers run is plans.py's.

Which plan runs: the device's plan (plans.plan_for with `RunOptions.kernels`, "auto" by default, as the
CLI's `--kernels auto`): the fastest plan measured whose results match diffusers' within the tested
tolerances; `kernels="off"` is the exact mode, diffusers' own sequence of operations bit for bit. The same
default holds for the CLI and for `Runner(vae)`, and a Runner never changes the model it is given.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from . import accel, memory
from .accel import Autotune, trim_heap
from .choices import DEFAULTS
from .config import LatentSpec, VAEConfig
from .devices import DTYPE_NAMES, compute_dtype, precision_ladder
from .memory import OOM_ERRORS, MemoryLadder, MemoryModel
from .models.kl import AutoencoderKL
from .plans import RunChoices, laid_out, plan_for, run_choices
from .staging import Download, Transfers, to_model_range, to_uint8_nhwc
from .tiling import tiled_decode, tiled_encode_moments


@dataclass(frozen=True)
class RunOptions:
    """How to run the model; every field has a CLI flag of the same name, and the same default."""

    dtype: torch.dtype = torch.float32  # requested compute precision
    upcast: bool | None = None  # None: honour config.force_upcast (fp16 -> fp32), as diffusers' SDXL pipelines
    tiling: str = DEFAULTS.tiling  # "on", "off" or "auto" (on when an untiled run would not fit)
    tile_size: int = DEFAULTS.tile_size  # tile side in image pixels, for encode and decode alike
    tile_overlap: int = DEFAULTS.tile_overlap  # overlap between neighbouring tiles in image pixels
    slicing: int | None = None  # run batches in slices of this many samples
    tile_batch: int = 4  # tiles per model call when tiling
    compile: bool = False  # untiled calls run as compiled packages (accel.py), cached on disk across runs
    # the device's plan (plans.TABLE); "on": every Triton kernel; "off": diffusers' exact sequence
    kernels: str = DEFAULTS.kernels

    def compute_dtype(self, config: VAEConfig) -> torch.dtype:
        """The precision a run of `config`'s model computes in (fp16 may be upcast): the one derivation."""
        return compute_dtype(self.dtype, config.force_upcast, self.upcast)


@dataclass
class Retry:
    """One sample re-run at higher precision because its output was not finite."""

    index: int
    from_dtype: str
    to_dtype: str


@dataclass
class BatchResult:
    """Outputs of one batch, with what had to be done to get them."""

    tensor: torch.Tensor  # (N, ...) on the CPU, float32 (uint8 images when asked); rows in `failed` are undefined
    failed: dict[int, str] = field(default_factory=dict)  # sample index -> error message
    retries: list[Retry] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # e.g. OOM batch splits, tiling fallback
    tiles: int = 0  # tiles run (0: untiled)


_SLOW_PRECISION = 3.0  # probe time ratio to fp32 above which a half-precision CPU run gets a note


def _probe_ms(dtype: torch.dtype) -> float:
    """Best of three timings of one 64-channel 3x3 convolution at 32x32 in `dtype` on the CPU (ms)."""
    x = torch.randn(1, 64, 32, 32).to(dtype)
    w = torch.randn(64, 64, 3, 3).to(dtype) * 0.05
    best = float("inf")
    with torch.no_grad():
        torch.nn.functional.conv2d(x, w, padding=1)  # first call: kernel selection, not timed
        for _ in range(3):
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            best = min(best, time.perf_counter() - t)
    return best * 1e3


def cpu_precision_notes(device: torch.device, dtype: torch.dtype) -> list[str]:
    """A note when fp16/bf16 on this CPU has no fast kernels (measured, ~50 ms): CPUs without AVX512-FP16/
    AMX run fp16 convolutions on a slow generic path, ~135x fp32's time in one user's 128 px decode."""
    if device.type != "cpu" or dtype not in (torch.float16, torch.bfloat16):
        return []
    base = _probe_ms(torch.float32)
    ratio = _probe_ms(dtype) / base
    if ratio <= _SLOW_PRECISION:
        return []
    name = DTYPE_NAMES[dtype]
    note = (f"--dtype {name} is slow on this CPU (a probe convolution took {ratio:.0f}x fp32's time: no fast {name} "
            f"kernels here); --dtype fp32 is faster on this machine")
    if dtype == torch.float16:
        bf16 = _probe_ms(torch.bfloat16) / base
        if bf16 <= _SLOW_PRECISION:
            note += f", or --dtype bf16 ({bf16:.1f}x fp32's probe time)"
    return [note]


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t.flatten(1)).all(dim=1)


T = TypeVar("T")
U = TypeVar("U")


class Pending(Generic[T]):
    """Work launched on the device whose outputs are still on their way back; `result()` waits for them
    (the only wait of a batch), so a caller can launch the next batch first and keep the device busy while
    this one comes back. The one future type of a run: the Runner returns it, `then` turns it into the
    outputs a Job hands the batch engine, which takes them after launching the next batch."""

    def __init__(self, settle: Callable[[], T]) -> None:
        self._settle: Callable[[], T] | None = settle
        self._result: T | None = None

    def result(self) -> T:
        if self._settle is not None:
            self._result, self._settle = self._settle(), None
        assert self._result is not None
        return self._result

    def then(self, step: Callable[[T], U]) -> Pending[U]:
        """A Pending of `step` applied to this result, run when it is asked for (nothing waits now)."""
        return Pending(lambda: step(self.result()))


Post = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (raw float32 rows, their indices) -> output


@dataclass
class _Launch:
    """One model call in flight: what a retry needs, and the device tensors being copied back."""

    op: str
    x: torch.Tensor  # float32 model input on the device, kept for retries at higher precision
    post: Post
    out: torch.Tensor  # post(raw output), on the device
    finite: torch.Tensor  # (N,) bool, on the device: whether each raw output row is finite
    result: BatchResult
    started: object  # device events around the call (busy time, read once the outputs are back)
    ended: object


class Runner:
    """A loaded model with its precision policy; encodes and decodes batches and recovers from NaN and OOM.

    Each operation exists twice: `encode`/`decode` return the result, `submit_encode`/`submit_decode`/
    `submit_roundtrip` return a Pending at once (on CUDA the work is queued, its outputs copied back on a
    side stream, staging.py), so the caller can prepare and launch the next batch before taking this one.
    Outputs are checked for NaN/Inf on the device and the verdict comes back with them: no extra wait.
    Higher-precision copies of the model are made only when a retry needs one, and kept for later batches.
    The model given is never changed: when the plan needs another weight layout, the Runner runs a copy
    (plans.laid_out: only the re-laid-out weights are new, every other tensor is shared).
    """

    def __init__(self, vae: AutoencoderKL, options: RunOptions = RunOptions()) -> None:
        self.options = options
        self.device = next(vae.parameters()).device
        self.dtype = options.compute_dtype(vae.config)
        self.config = vae.config
        # How the layers run on this device (plans.TABLE), with the weights in the plan's layout.
        self.plan = plan_for(self.device, vae.config, options.kernels)
        self._models: dict[torch.dtype, AutoencoderKL] = {next(vae.parameters()).dtype: laid_out(vae, self.plan)}
        self.ladder = precision_ladder(self.dtype, self.device)
        # (op, shape) -> compiled op, or None where compiling failed (that shape then runs eager)
        self._compiled: dict[tuple[str, tuple[int, ...]], accel.Compiled | None] = {}
        self.transfers = Transfers(self.device)
        model = MemoryModel(vae.config, self.device)
        self.memory = MemoryLadder(model, options.tiling, options.tile_size, options.tile_overlap, options.tile_batch)
        self.busy_s = 0.0  # time the device spent in model calls (device events on CUDA), for reports
        self.autotune = Autotune(self.device)
        self.notes = cpu_precision_notes(self.device, self.dtype)  # for the run's report

    def model(self, dtype: torch.dtype) -> AutoencoderKL:
        """The model in `dtype`, converted from the loaded one on first use (a copy: never the caller's)."""
        if dtype not in self._models:
            base = next(iter(self._models.values()))
            self._models[dtype] = copy.deepcopy(base).to(dtype)
        return self._models[dtype]

    def compiled(self, op: str, model: AutoencoderKL, x: torch.Tensor, result: BatchResult) -> accel.Compiled | None:
        """The compiled op for x's shape when options.compile (compute precision only: retries at higher
        precision are rare and stay eager); built or loaded on first use, each reported in the events."""
        if not self.options.compile or x.dtype != self.dtype:
            return None
        key = (op, tuple(x.shape))
        if key not in self._compiled:
            shape = "x".join(map(str, x.shape))
            try:
                c = accel.compile_op(model, op, x, self.plan)
            except Exception as exc:  # export or compiler failure (no C++ compiler, unsupported op...)
                self._compiled[key] = None
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                result.events.append(f"compile of {op} {shape} failed, running eager: {reason}")
                return None
            self._compiled[key] = c
            how = "compiled" if c.built else "loaded compiled"
            result.events.append(f"{how} {op} {shape} in {c.seconds:.1f} s ({c.path.name})")
        return self._compiled[key]

    # -- public operations --------------------------------------------------------------------------------

    def encode(
        self, pixels: torch.Tensor, spec: LatentSpec | None = None, noise: torch.Tensor | None = None
    ) -> BatchResult:
        """Images (N, C, H, W) in [0, 1] (or uint8 in [0, 255]) -> latents (N, c, H/f, W/f), normalized by
        `spec` when given.

        noise: standard-normal tensor of the latent shape to sample the posterior (mean + std * noise);
        None takes the posterior mode. Drawing it outside keeps samples independent of batching.
        """
        return self.submit_encode(pixels, spec, noise).result()

    def encode_moments(self, pixels: torch.Tensor) -> BatchResult:
        """Images in [0, 1] -> posterior moments (N, 2c, h, w): mean and clamped-later logvar, raw."""
        return self._submit("encode", to_model_range(self._on_device(pixels)), _as_is).result()

    def decode(self, latents: torch.Tensor, spec: LatentSpec | None = None) -> BatchResult:
        """Latents (N, c, h, w), normalized by `spec` when given -> images (N, C, h*f, w*f) in [0, 1]."""
        return self.submit_decode(latents, spec).result()

    def submit_encode(
        self, pixels: torch.Tensor, spec: LatentSpec | None = None, noise: torch.Tensor | None = None
    ) -> Pending[BatchResult]:
        """`encode`, launched: the Pending's result is what `encode` returns."""
        return self._submit("encode", to_model_range(self._on_device(pixels)), self._latents_post(spec, noise))

    def submit_decode(
        self, latents: torch.Tensor, spec: LatentSpec | None = None, as_uint8: bool = False
    ) -> Pending[BatchResult]:
        """`decode`, launched; as_uint8: images come back as uint8 (N, H, W, C), rounded as io.to_uint8
        (a quarter of the bytes to copy back and nothing left to convert on the host)."""
        z = self._on_device(latents).float()
        z = spec.denormalize(z) if spec is not None else z
        return self._submit("decode", z, _image_post(as_uint8))

    def submit_roundtrip(
        self, pixels: torch.Tensor, noise: torch.Tensor | None = None, as_uint8: bool = False
    ) -> Pending[tuple[BatchResult, BatchResult]]:
        """Encode then decode on the device (the latents never leave it). The result is (encode, decode):
        the decode result holds the images; a sample that failed to encode is listed in the encode result's
        `failed`, and one re-encoded at higher precision is decoded again."""
        x = to_model_range(self._on_device(pixels))
        latents_post = self._latents_post(None, noise)
        enc = self._launch("encode", x, latents_post)
        dec = self._launch("decode", enc.out, _image_post(as_uint8))
        download = self.transfers.download([dec.out, enc.finite, dec.finite])
        return Pending(lambda: self._settle_roundtrip(enc, dec, download))

    # -- launching and settling ---------------------------------------------------------------------------

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """t on the device: host tensors through the pinned staging buffers (asynchronous on CUDA)."""
        if t.device == self.device:
            return t
        if t.device.type == "cpu" and self.transfers.asynchronous and t.dtype in (torch.uint8, torch.float32):
            return self.transfers.upload([t.numpy()])[0]
        return t.to(self.device)

    def _latents_post(self, spec: LatentSpec | None, noise: torch.Tensor | None) -> Post:
        # A deterministic encoder (AutoencoderTiny) has a point posterior: a sample is its mode exactly.
        deterministic = getattr(self.config, "deterministic", False)
        noise_dev = self._on_device(noise) if noise is not None and not deterministic else None

        def post(moments: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            mean, logvar = moments.chunk(2, dim=1)  # (N, 2c, h, w) -> 2 x (N, c, h, w)
            if noise_dev is None:
                z = mean
            else:
                eps = noise_dev if rows is None else noise_dev[rows.to(noise_dev.device)]
                z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean)
            return spec.normalize(z) if spec is not None else z

        return post

    def _submit(self, op: str, x: torch.Tensor, post: Post) -> Pending[BatchResult]:
        launch = self._launch(op, x, post)
        download = self.transfers.download([launch.out, launch.finite])
        return Pending(lambda: self._settle(launch, download))

    def _launch(self, op: str, x: torch.Tensor, post: Post) -> _Launch:
        """Queue one model call over x (float32, model range, on the device) and its NaN/Inf check."""
        result = BatchResult(torch.empty(0))
        started, ended = self.transfers.event(), self.transfers.event()
        started.record()
        raw = self._sliced(op, self.model(self.dtype), x.to(self.dtype), result)
        ended.record()
        return _Launch(op, x, post, post(raw, None), _finite_rows(raw), result, started, ended)

    def _settle(self, launch: _Launch, download: Download) -> BatchResult:
        out, finite = download.wait()
        self._count_busy(launch)
        result = launch.result
        result.tensor = out
        bad = (~finite).nonzero().flatten().tolist()  # finite is on the host already: no extra wait
        if bad:
            self._retry(launch, bad, out)
        return result

    def _settle_roundtrip(self, enc: _Launch, dec: _Launch, download: Download) -> tuple[BatchResult, BatchResult]:
        images, enc_ok, dec_ok = download.wait()
        self._count_busy(enc, dec)
        dec.result.tensor = images
        bad_enc = (~enc_ok).nonzero().flatten().tolist()
        if bad_enc:  # latents fixed at higher precision (or failed), then decoded again
            latents = enc.out.clone()
            self._retry(enc, bad_enc, latents)
            redo = [i for i in bad_enc if i not in enc.result.failed]
            if redo:
                again = self.submit_decode(latents[redo], None, images.dtype == torch.uint8).result()
                images[redo] = again.tensor
                dec.result.retries += [Retry(redo[r.index], r.from_dtype, r.to_dtype) for r in again.retries]
                dec.result.failed.update({redo[i]: msg for i, msg in again.failed.items()})
                dec.result.events += again.events
        bad_dec = [i for i in (~dec_ok).nonzero().flatten().tolist() if i not in bad_enc]
        if bad_dec:
            self._retry(dec, bad_dec, images)
        return enc.result, dec.result

    def _retry(self, launch: _Launch, bad: list[int], out: torch.Tensor) -> None:
        """Re-run the non-finite rows up the precision ladder; rows still non-finite in fp32 fail.
        Writes the new rows into `out` (the host result, or the device tensor for roundtrip latents)."""
        result = launch.result
        start = time.perf_counter()
        for lower, higher in zip(self.ladder, self.ladder[1:], strict=False):
            if not bad:
                break
            result.retries += [Retry(i, DTYPE_NAMES[lower], DTYPE_NAMES[higher]) for i in bad]
            rows = torch.tensor(bad, device=launch.x.device)
            raw = self._sliced(launch.op, self.model(higher), launch.x[rows].to(higher), result)
            out[bad] = launch.post(raw, rows).to(out.device)
            bad = [i for i, ok in zip(bad, _finite_rows(raw).tolist(), strict=True) if not ok]
        for i in bad:
            result.failed[i] = _non_finite_message(launch.x[i])
        self.busy_s += time.perf_counter() - start

    def _count_busy(self, *launches: _Launch) -> None:
        for launch in launches:
            self.busy_s += launch.started.elapsed_time(launch.ended) / 1000.0  # type: ignore[attr-defined]

    # -- one model call, tiled or not ---------------------------------------------------------------------

    def _call(self, op: str, model: AutoencoderKL, x: torch.Tensor, tiled: bool, result: BatchResult) -> torch.Tensor:
        if not tiled:
            compiled = self.compiled(op, model, x, result)
            if compiled is not None:
                return compiled(x)
            return model.encode_moments(x, plan=self.plan) if op == "encode" else model.decode(x, plan=self.plan)
        o, mem = self.options, self.memory
        trim = self.run.heap_trim.tiled_calls
        if trim:
            trim_heap()
        tiled_fn = tiled_encode_moments if op == "encode" else tiled_decode
        y, report = tiled_fn(model, x, o.tile_size, o.tile_overlap, mem.tile_batch, mem.whole_image_stats, self.plan)
        if trim:
            trim_heap()
        result.tiles += report.tiles
        return y

    def _sliced(self, op: str, model: AutoencoderKL, x: torch.Tensor, result: BatchResult) -> torch.Tensor:
        """Run `op` over x in slices as the memory ladder plans them; the float32 result stays on the
        device. Out of memory, though predicted to fit: the ladder says what to try next (memory.py)."""
        n = x.shape[0]
        planned = self.memory.plan(op, x, min(self.options.slicing or n, n), result.events)
        size, tiled = planned.slice, planned.tiled
        self.autotune.before_call((op, tuple(x.shape), x.dtype), tiled)
        outs: list[torch.Tensor] = []
        failures = 0
        start = 0
        with torch.no_grad():  # not inference_mode: retried rows are written back into the result
            while start < n:
                part = x[start : start + size]
                try:
                    y = self._call(op, model, part, tiled, result)
                except OOM_ERRORS:
                    memory.free_cache(self.device)
                    failures += 1
                    size, tiled = self.memory.after_oom(op, part, size, tiled, failures == 1, result.events)
                    continue
                outs.append(y.float())
                start += part.shape[0]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @property
    def run(self) -> RunChoices:
        """The device's run-level choices (plans.TABLE)."""
        return run_choices(self.device)


def _as_is(raw: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return raw


def _image_post(as_uint8: bool) -> Post:
    def post(raw: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        images = ((raw + 1.0) / 2.0).clamp_(0.0, 1.0)  # [-1, 1] -> [0, 1]
        return to_uint8_nhwc(images) if as_uint8 else images

    return post


def _non_finite_message(x: torch.Tensor) -> str:
    """Why a sample's output is NaN/Inf in fp32: its input (NaN/Inf, or huge values), or else the weights."""
    finite = torch.isfinite(x)
    if not finite.all():
        return "the input holds NaN or Inf values (not a model problem)"
    peak = float(x.abs().max())
    if peak > 1e4:
        return f"model output is NaN/Inf even in fp32: input values are far out of range (max |x| = {peak:.3g})"
    return "model output is NaN/Inf even in fp32 for a finite, in-range input: the model's weights are probably broken"
