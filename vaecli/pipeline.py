"""Batches through the model: pixel range, latent normalization, precision policy, NaN and OOM fallback.

Pixels are [0, 1] floats at this module's edge and [-1, 1] inside the model; latents returned by `encode`
are normalized by the LatentSpec given (raw when none).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Generic, TypeVar

import torch

from . import accel
from .accel import Autotune, trim_heap
from .config import LatentSpec, VAEConfig
from .errors import ConfigError, VaecliError
from .models.kl import AutoencoderKL
from .plans import apply_layout, plan_for
from .staging import Download, Transfers, to_model_range, to_uint8_nhwc
from .tiling import tiled_decode, tiled_encode_moments

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _oom_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        types.append(torch.OutOfMemoryError)
    return tuple(types)


OOM_ERRORS = _oom_types()


@dataclass(frozen=True)
class RunOptions:
    """How to run the model; every field has a CLI flag of the same name."""

    dtype: torch.dtype = torch.float32  # requested compute precision
    upcast: bool | None = None  # None: honour config.force_upcast (fp16 -> fp32), as diffusers' SDXL pipelines
    tiling: str = "off"  # "on", "off" or "auto" (on when an untiled run would not fit)
    tile_size: int = 512  # tile side in image pixels, for encode and decode alike
    tile_overlap: int = 64  # overlap between neighbouring tiles in image pixels
    slicing: int | None = None  # run batches in slices of this many samples
    tile_batch: int = 4  # tiles per model call when tiling
    compile: bool = False  # untiled calls run as compiled packages (accel.py), cached on disk across runs
    kernels: str = "auto"  # Triton kernels: "auto" (as plans.TABLE says for the device), "on", "off"


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


def compute_dtype(requested: torch.dtype, force_upcast: bool, upcast: bool | None) -> torch.dtype:
    """The precision actually used: fp16 becomes fp32 when the model asks for upcasting (or --upcast)."""
    if requested == torch.float16 and (force_upcast if upcast is None else upcast):
        return torch.float32
    return requested


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


def precision_ladder(start: torch.dtype, device: torch.device) -> list[torch.dtype]:
    """The precisions to try in order when outputs are not finite: fp16 -> bf16 (where supported) -> fp32."""
    ladder = [start]
    if start == torch.float16 and bf16_supported(device):
        ladder.append(torch.bfloat16)
    if start != torch.float32:
        ladder.append(torch.float32)
    return ladder


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit device (cpu, cuda, cuda:N, mps) must be available."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"no CUDA device {dev.index} (this machine has {torch.cuda.device_count()})")
    if dev.type == "mps" and not mps_available():
        raise ConfigError("--device mps: no MPS device is available (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


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


@dataclass(frozen=True)
class CallPlan:
    """How one model call runs: slices of `slice` samples, tiled or not (chosen from free memory)."""

    slice: int
    tiled: bool


class Runner:
    """A loaded model with its precision policy; encodes and decodes batches and recovers from NaN and OOM.

    Each operation exists twice: `encode`/`decode` return the result, `submit_encode`/`submit_decode`/
    `submit_roundtrip` return a Pending at once (on CUDA the work is queued, its outputs copied back on a
    side stream, staging.py), so the caller can prepare and launch the next batch before taking this one.
    Outputs are checked for NaN/Inf on the device and the verdict comes back with them: no extra wait.
    Higher-precision copies of the model are made only when a retry needs one, and kept for later batches.
    """

    def __init__(self, vae: AutoencoderKL, options: RunOptions = RunOptions()) -> None:
        self.options = options
        self.device = next(vae.parameters()).device
        self.dtype = compute_dtype(options.dtype, vae.config.force_upcast, options.upcast)
        self.config = vae.config
        # How the layers run on this device (plans.TABLE); the weights take the plan's layout once, here.
        self.plan = plan_for(self.device, vae.config, options.kernels)
        self._models: dict[torch.dtype, AutoencoderKL] = {next(vae.parameters()).dtype: apply_layout(vae, self.plan)}
        self.ladder = precision_ladder(self.dtype, self.device)
        # (op, shape) -> compiled op, or None where compiling failed (that shape then runs eager)
        self._compiled: dict[tuple[str, tuple[int, ...]], accel.Compiled | None] = {}
        self.transfers = Transfers(self.device)
        # Tiles share whole-image statistics unless even one tile per call ran out of memory: then each tile
        # is normalized by itself (memory of one tile, possible tone shifts), and the run says so.
        self.whole_image_stats = True
        self.memory = MemoryModel(vae.config, self.device)
        self._plans: dict[tuple[str, tuple[int, ...], torch.dtype], CallPlan] = {}
        self.busy_s = 0.0  # time the device spent in model calls (device events on CUDA), for reports
        self.autotune = Autotune(self.device)
        self.notes = cpu_precision_notes(self.device, self.dtype)  # for the run's report

    def model(self, dtype: torch.dtype) -> AutoencoderKL:
        """The model in `dtype`, converted from the loaded one on first use."""
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
    ) -> "Pending[BatchResult]":
        """`encode`, launched: the Pending's result is what `encode` returns."""
        return self._submit("encode", to_model_range(self._on_device(pixels)), self._latents_post(spec, noise))

    def submit_decode(
        self, latents: torch.Tensor, spec: LatentSpec | None = None, as_uint8: bool = False
    ) -> "Pending[BatchResult]":
        """`decode`, launched; as_uint8: images come back as uint8 (N, H, W, C), rounded as io.to_uint8
        (a quarter of the bytes to copy back and nothing left to convert on the host)."""
        z = self._on_device(latents).float()
        z = spec.denormalize(z) if spec is not None else z
        return self._submit("decode", z, _image_post(as_uint8))

    def submit_roundtrip(
        self, pixels: torch.Tensor, noise: torch.Tensor | None = None, as_uint8: bool = False
    ) -> "Pending[tuple[BatchResult, BatchResult]]":
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

    def _submit(self, op: str, x: torch.Tensor, post: Post) -> "Pending[BatchResult]":
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
        for lower, higher in zip(self.ladder, self.ladder[1:]):
            if not bad:
                break
            result.retries += [Retry(i, DTYPE_NAMES[lower], DTYPE_NAMES[higher]) for i in bad]
            rows = torch.tensor(bad, device=launch.x.device)
            raw = self._sliced(launch.op, self.model(higher), launch.x[rows].to(higher), result)
            out[bad] = launch.post(raw, rows).to(out.device)
            bad = [i for i, ok in zip(bad, _finite_rows(raw).tolist()) if not ok]
        for i in bad:
            result.failed[i] = _non_finite_message(launch.x[i])
        self.busy_s += time.perf_counter() - start

    def _count_busy(self, *launches: _Launch) -> None:
        for launch in launches:
            self.busy_s += launch.started.elapsed_time(launch.ended) / 1000.0  # type: ignore[attr-defined]

    # -- one model call, tiled or not ---------------------------------------------------------------------

    def should_tile(self, op: str, x: torch.Tensor) -> bool:
        """Whether a call on x (N, C, H, W) would run tiled (see memory_plan)."""
        return self.memory_plan(op, x, BatchResult(torch.empty(0))).tiled

    def memory_plan(self, op: str, x: torch.Tensor, result: BatchResult) -> CallPlan:
        """Slices and tiling for a call on x, predicted from free memory before anything is tried.

        tiling on: tiled; auto: tiled when one sample would not fit in 80% of free memory; off: untiled
        unless one sample could never fit (more than the device holds), which would only fail after a long
        wait. Untiled batches are sliced to what fits (same results, computed in parts). When the prediction
        changes what was asked, the result's events say so, once per input shape while it stays the same.
        """
        key = (op, tuple(x.shape), x.dtype)
        said: list[str] = []
        plan = self._predict(op, x, said)
        if self._plans.get(key) != plan:
            result.events += said
            self._plans[key] = plan
        return plan

    def _predict(self, op: str, x: torch.Tensor, events: list[str]) -> CallPlan:
        o, n = self.options, x.shape[0]
        size = min(o.slicing or n, n)
        h, w = self.memory.image_size(op, x)
        elem = x.element_size()
        if o.tiling == "on":
            size, changes = self._fit_tiles(op, size, h, w, elem)
            events += [f"tiling: {'; '.join(changes)}"] if changes else []
            return CallPlan(size, True)
        one = self.memory.untiled(op, 1, h, w, elem)
        limit = self.memory.capacity() if o.tiling == "off" else 0.8 * self.memory.free()
        what = f"an untiled {op} of {w}x{h}"
        if one > limit:
            where = "the device holds" if o.tiling == "off" else "80% of free memory"
            size, changes = self._fit_tiles(op, size, h, w, elem)
            changes.insert(0, f"tiled ({o.tile_size} px tiles)")
            events.append(f"predicted {_gb(one)} for {what}, above {where} ({_gb(limit)}): {'; '.join(changes)}")
            return CallPlan(size, True)
        fits = max(1, int(0.8 * self.memory.free() // one))
        if fits < size:
            events.append(f"predicted {_gb(one)} per image for {what}: batch run in slices of {fits}")
            size = fits
        return CallPlan(size, False)

    def _fit_tiles(
        self, op: str, n: int, h: int, w: int, elem: int, below: int | None = None
    ) -> tuple[int, list[str]]:
        """(images per tiled call, changes made): one image per call, fewer tiles per call, then per-tile
        statistics, until the tiled call is predicted to fit in 80% of free memory (tile batch at most
        `below` when given). The tile settings changed stay for the rest of the run, as after an OOM."""
        budget = 0.8 * self.memory.free()
        changes = []
        if n > 1 and self._need(op, n, h, w, elem, True) > budget:
            n = 1
            changes.append("one image per call")
        batch = self.options.tile_batch if below is None else min(below, self.options.tile_batch)
        while batch > 1 and self._need(op, n, h, w, elem, True, batch) > budget:
            batch //= 2
        if max(batch, 1) < self.options.tile_batch:
            self.options = replace(self.options, tile_batch=max(batch, 1))
            changes.append(f"tile batch reduced to {self.options.tile_batch}")
        if self.whole_image_stats and (batch < 1 or self._need(op, n, h, w, elem, True) > budget):
            self.whole_image_stats = False
            changes.append("each tile normalized by itself (memory of one tile; tone shifts between tiles possible)")
        return n, changes

    def _call(self, op: str, model: AutoencoderKL, x: torch.Tensor, tiled: bool, result: BatchResult) -> torch.Tensor:
        o = self.options
        if not tiled:
            compiled = self.compiled(op, model, x, result)
            if compiled is not None:
                return compiled(x)
            return model.encode_moments(x, plan=self.plan) if op == "encode" else model.decode(x, plan=self.plan)
        cpu = x.device.type == "cpu"
        if cpu:
            trim_heap()
        tiled_fn = tiled_encode_moments if op == "encode" else tiled_decode
        y, report = tiled_fn(model, x, o.tile_size, o.tile_overlap, o.tile_batch, self.whole_image_stats, self.plan)
        if cpu:
            trim_heap()
        result.tiles += report.tiles
        return y

    # -- batching and OOM recovery --------------------------------------------------------------------------

    def _sliced(self, op: str, model: AutoencoderKL, x: torch.Tensor, result: BatchResult) -> torch.Tensor:
        """Run `op` over x in slices as planned; the float32 result stays on the device.

        Out of memory, though predicted to fit: the memory model learns how far off it was and the next
        attempt is the plan it now predicts to fit (fewer samples per slice, tiling, fewer tiles per call,
        per-tile statistics), so one failure costs one retry; a second failure steps down one rung at a time.
        """
        planned = self.memory_plan(op, x, result)
        size, tiled = planned.slice, planned.tiled
        self.autotune.before_call((op, tuple(x.shape), x.dtype), tiled)
        outs: list[torch.Tensor] = []
        failures = 0
        start = 0
        with torch.no_grad():  # not inference_mode: retried rows are written back into the result
            while start < x.shape[0]:
                part = x[start : start + size]
                try:
                    y = self._call(op, model, part, tiled, result)
                except OOM_ERRORS:
                    _free_cache(self.device)
                    failures += 1
                    size, tiled = self._after_oom(op, part, size, tiled, failures == 1, result)
                    continue
                outs.append(y.float())
                start += part.shape[0]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _after_oom(
        self, op: str, part: torch.Tensor, size: int, tiled: bool, first: bool, result: BatchResult
    ) -> tuple[int, bool]:
        """The next (slice size, tiled) after an out-of-memory error at (size, tiled); see _sliced."""
        if not first:
            return self._step_down(size, tiled, result)
        h, w = self.memory.image_size(op, part)
        elem = part.element_size()
        self.memory.learn(op, self._need(op, size, h, w, elem, tiled), self.memory.free())
        self._plans.clear()  # every cached prediction was made with the old estimate
        if not tiled:
            fits = min(size - 1, int(0.8 * self.memory.free() // self.memory.untiled(op, 1, h, w, elem)))
            if fits >= 1:
                result.events.append(f"out of memory at {size} per call: predicted to fit {fits}, run in slices of {fits}")
                return fits, False
        # The same tiled call would fail again: at least one tile fewer per call, unless it held several images.
        below = self.options.tile_batch // 2 if tiled and size == 1 else None
        changes = [] if tiled else [f"switched to tiling ({self.options.tile_size} px tiles)"]
        if tiled and size > 1:
            changes.append("one image per call")
        changes += self._fit_tiles(op, 1, h, w, elem, below)[1]
        if not changes:
            return self._step_down(size, tiled, result)
        result.events.append(f"out of memory{' while tiling' if tiled else f' at {size} per call'}: {'; '.join(changes)}")
        return 1, True

    def _need(self, op: str, n: int, h: int, w: int, elem: int, tiled: bool, tile_batch: int | None = None) -> float:
        if not tiled:
            return self.memory.untiled(op, n, h, w, elem)
        o = self.options
        return self.memory.tiled(
            op, n, h, w, elem, o.tile_size, o.tile_overlap, tile_batch or o.tile_batch, self.whole_image_stats
        )

    def _step_down(self, size: int, tiled: bool, result: BatchResult) -> tuple[int, bool]:
        """One rung down the memory ladder: halve the slice; tile; halve the tile batch; per-tile statistics."""
        if size > 1:
            size = max(1, size // 2)
            result.events.append(f"out of memory: batch halved to {size}")
        elif not tiled:
            tiled = True
            result.events.append(f"out of memory at batch 1: switched to tiling ({self.options.tile_size} px tiles)")
        elif self.options.tile_batch > 1:
            self.options = replace(self.options, tile_batch=self.options.tile_batch // 2)
            result.events.append(f"out of memory while tiling: tile batch halved to {self.options.tile_batch}")
        elif self.whole_image_stats:
            self._per_tile(result)
        else:
            raise VaecliError("out of memory even for one tile: use a smaller --tile-size, or --device cpu")
        return size, tiled

    def _per_tile(self, result: BatchResult) -> None:
        self.whole_image_stats = False
        result.events.append(
            "out of memory while tiling with whole-image statistics: each tile now normalized "
            "by itself (memory of one tile; tone shifts between tiles possible)"
        )


def _as_is(raw: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return raw


def _image_post(as_uint8: bool) -> Post:
    def post(raw: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        images = ((raw + 1.0) / 2.0).clamp_(0.0, 1.0)  # [-1, 1] -> [0, 1]
        return to_uint8_nhwc(images) if as_uint8 else images

    return post


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _non_finite_message(x: torch.Tensor) -> str:
    """Why a sample's output is NaN/Inf in fp32: its input (NaN/Inf, or huge values), or else the weights."""
    finite = torch.isfinite(x)
    if not finite.all():
        return "the input holds NaN or Inf values (not a model problem)"
    peak = float(x.abs().max())
    if peak > 1e4:
        return f"model output is NaN/Inf even in fp32: input values are far out of range (max |x| = {peak:.3g})"
    return "model output is NaN/Inf even in fp32 for a finite, in-range input: the model's weights are probably broken"


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- memory ----------------------------------------------------------------------------------------------------

# Peak bytes of an untiled call per image pixel, in units of (widest full-resolution channels x element
# size). Measured with vaecli on an H100 (bf16, SD layout; shared/bench/h100-2026-11-27 and issue 13):
# decode 512^2 batch 16 15.4 GB, 2048^2 15.0 GB -> 7.0; encode 512^2 batch 16 10.2 GB -> 4.8.
UNTILED_PEAK = {"encode": 5.0, "decode": 7.0}


class MemoryModel:
    """Predicted peak memory of model calls on one device, corrected after an out-of-memory error."""

    def __init__(self, config: VAEConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.scale = {"encode": 1.0, "decode": 1.0}  # learned: true peak / estimate, at least

    def image_size(self, op: str, x: torch.Tensor) -> tuple[int, int]:
        """(height, width) in pixels of the images a call on x reads or makes."""
        f = 1 if op == "encode" else self.config.downsample_factor
        return x.shape[-2] * f, x.shape[-1] * f

    def untiled(self, op: str, n: int, h: int, w: int, elem: int) -> float:
        return self.scale[op] * estimate_peak_bytes(self.config, n, h, w, elem, op)

    def tiled(
        self, op: str, n: int, h: int, w: int, elem: int, tile: int, overlap: int, batch: int, whole: bool
    ) -> float:
        return self.scale[op] * estimate_tiled_bytes(self.config, op, n, h, w, elem, tile, overlap, batch, whole)

    def learn(self, op: str, predicted: float, free: int) -> None:
        """A call predicted at `predicted` bytes did not fit in `free`: scale later predictions so it would
        have been put at 1.5x free memory (the margin covers an error larger than this one showed)."""
        if predicted > 0:
            self.scale[op] *= max(1.0, 1.5 * free / predicted)

    def free(self) -> int:
        return free_memory(self.device)

    def capacity(self) -> int:
        return memory_capacity(self.device)


def estimate_peak_bytes(config: VAEConfig, n: int, height: int, width: int, element_size: int, op: str = "decode") -> int:
    """Rough peak memory of an untiled call at image size height x width (UNTILED_PEAK copies of the widest
    full-resolution tensor: the decoder upsamples its second level's channels to full size)."""
    chs = config.decoder_channels if op == "decode" else config.block_out_channels
    widest = max(chs[0], chs[1] if len(chs) > 1 else chs[0])
    return int(UNTILED_PEAK[op] * n * height * width * widest * element_size)


def estimate_tiled_bytes(
    config: VAEConfig, op: str, n: int, height: int, width: int, element_size: int, tile: int, overlap: int,
    batch: int, whole_image_stats: bool,
) -> int:
    """Rough peak memory of a tiled call (tiling.py): one batch of tiles as an untiled call, the blended
    output (float32), and with whole-image statistics the tiles' full-resolution activations stored in half
    precision (widened by the overlap), plus the untiled latent-resolution trunk of the decoder.
    Not yet measured on a GPU; on a failure the ladder corrects it (MemoryModel.learn)."""
    chs = config.decoder_channels if op == "decode" else config.block_out_channels
    tile = min(tile, max(height, width))
    need = estimate_peak_bytes(config, min(batch, n), tile, tile, element_size, op)
    out_channels = config.out_channels if op == "decode" else 2 * config.latent_channels
    f = config.downsample_factor
    out_pixels = n * height * width if op == "decode" else n * height * width // (f * f)
    need += 4 * 2 * out_pixels * (out_channels + 1)
    if whole_image_stats:
        grow = (tile / max(tile - overlap, 1)) ** 2
        need += int(1.2 * 2 * n * height * width * chs[0] * grow)
        if op == "decode":
            need += 6 * n * (height // f) * (width // f) * chs[-1] * element_size
    return int(need)


AUTO_BATCH_MAX = {"cuda": 32, "mps": 8, "cpu": 8}  # past these, throughput stops growing


def auto_batch_size(config: VAEConfig, height: int, width: int, dtype: torch.dtype, device: torch.device) -> int:
    """The batch for images of height x width that fits in about 60% of free memory (at least 1)."""
    per_image = estimate_peak_bytes(config, 1, height, width, torch.tensor([], dtype=dtype).element_size())
    fits = int(0.6 * free_memory(device) // max(per_image, 1))
    return max(1, min(fits, AUTO_BATCH_MAX.get(device.type, 8)))


def free_memory(device: torch.device) -> int:
    """Bytes the next allocation can count on: free CUDA memory, or MemAvailable for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return _meminfo("MemAvailable") or 8 << 30  # unknown platform: assume a modest machine


def memory_capacity(device: torch.device) -> int:
    """The most a call could ever get: the GPU's total memory, or MemAvailable for the CPU (beyond it the
    host swaps or its out-of-memory killer ends the process)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return free_memory(device)


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
