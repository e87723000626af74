"""Batches through the model: pixel range, latent normalization, precision policy, NaN and OOM fallback.

Pixels are [0, 1] floats at this module's edge and [-1, 1] inside the model; latents returned by `encode`
are normalized by the LatentSpec given (raw when none).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch

from . import accel
from .accel import configure_backends, trim_heap
from .config import LatentSpec, VAEConfig
from .errors import ConfigError, VaecliError
from .model import AutoencoderKL
from .plans import apply_layout, plan_for
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

    tensor: torch.Tensor  # (N, ...) float32 on the CPU; rows listed in `failed` are undefined
    failed: dict[int, str] = field(default_factory=dict)  # sample index -> error message
    retries: list[Retry] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # e.g. OOM batch splits, tiling fallback
    tiles: int = 0  # tiles run (0: untiled)


def compute_dtype(requested: torch.dtype, force_upcast: bool, upcast: bool | None) -> torch.dtype:
    """The precision actually used: fp16 becomes fp32 when the model asks for upcasting (or --upcast)."""
    if requested == torch.float16 and (force_upcast if upcast is None else upcast):
        return torch.float32
    return requested


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


class Runner:
    """A loaded model with its precision policy; encodes and decodes batches and recovers from NaN and OOM.

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
        configure_backends(self.device)  # cuDNN autotuning for every CUDA run, compiled or not
        # Tiles share whole-image statistics unless even one tile per call ran out of memory: then each tile
        # is normalized by itself (memory of one tile, possible tone shifts), and the run says so.
        self.whole_image_stats = True

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
        """Images (N, C, H, W) in [0, 1] -> latents (N, c, H/f, W/f), normalized by `spec` when given.

        noise: standard-normal tensor of the latent shape to sample the posterior (mean + std * noise);
        None takes the posterior mode. Drawing it outside keeps samples independent of batching.
        """

        result = self._run("encode", pixels * 2.0 - 1.0)
        moments = result.tensor
        mean, logvar = moments.chunk(2, dim=1)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean)
        result.tensor = spec.normalize(z) if spec is not None else z
        return result

    def encode_moments(self, pixels: torch.Tensor) -> BatchResult:
        """Images in [0, 1] -> posterior moments (N, 2c, h, w): mean and clamped-later logvar, raw."""
        return self._run("encode", pixels * 2.0 - 1.0)

    def decode(self, latents: torch.Tensor, spec: LatentSpec | None = None) -> BatchResult:
        """Latents (N, c, h, w), normalized by `spec` when given -> images (N, C, h*f, w*f) in [0, 1]."""
        z = spec.denormalize(latents.float()) if spec is not None else latents.float()
        result = self._run("decode", z)
        result.tensor = ((result.tensor + 1.0) / 2.0).clamp_(0.0, 1.0)
        return result

    # -- one model call, tiled or not ---------------------------------------------------------------------

    def should_tile(self, op: str, x: torch.Tensor) -> bool:
        """Tiling policy: on, off, or auto (on when the untiled call would not fit in free memory)."""
        if self.options.tiling == "on":
            return True
        if self.options.tiling == "off":
            return False
        f = self.config.downsample_factor
        scale = 1 if op == "encode" else f
        need = estimate_peak_bytes(self.config, x.shape[0], x.shape[-2] * scale, x.shape[-1] * scale, x.element_size())
        return need > 0.8 * free_memory(self.device)

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

    # -- batching, precision fallback and OOM recovery -----------------------------------------------------

    def _run(self, op: str, x: torch.Tensor) -> BatchResult:
        n = x.shape[0]
        result = BatchResult(torch.empty(0))
        out = self._sliced(op, self.model(self.dtype), x.to(self.device, self.dtype), result)
        result.tensor = out
        bad = (~_finite_rows(out)).nonzero().flatten().tolist()
        for lower, higher in zip(self.ladder, self.ladder[1:]):
            if not bad:
                break
            for i in bad:
                result.retries.append(Retry(i, DTYPE_NAMES[lower], DTYPE_NAMES[higher]))
            redo = self._sliced(op, self.model(higher), x[bad].to(self.device, higher), result)
            result.tensor[bad] = redo
            bad = [i for i, ok in zip(bad, _finite_rows(redo).tolist()) if not ok]
        for i in bad:
            result.failed[i] = _non_finite_message(x[i])
        assert result.tensor.shape[0] == n
        return result

    def _sliced(self, op: str, model: AutoencoderKL, x: torch.Tensor, result: BatchResult) -> torch.Tensor:
        """Run `op` over x in slices (options.slicing); float32 CPU result.

        On out-of-memory: halve the slice; at one sample, switch to tiling; when tiled, halve the tile batch;
        at one tile per call, give up whole-image statistics (each tile normalized by itself).
        """
        size = self.options.slicing or x.shape[0]
        tiled = self.should_tile(op, x[:size])
        outs: list[torch.Tensor] = []
        start = 0
        with torch.no_grad():  # not inference_mode: retried rows are written back into the result
            while start < x.shape[0]:
                part = x[start : start + size]
                try:
                    y = self._call(op, model, part, tiled, result)
                except OOM_ERRORS:
                    _free_cache(self.device)
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
                        self.whole_image_stats = False
                        result.events.append(
                            "out of memory while tiling with whole-image statistics: each tile now normalized "
                            "by itself (memory of one tile; tone shifts between tiles possible)"
                        )
                    else:
                        raise VaecliError(
                            "out of memory even for one tile: use a smaller --tile-size, or --device cpu"
                        ) from None
                    continue
                outs.append(y.float().cpu())
                start += part.shape[0]
        return torch.cat(outs) if len(outs) > 1 else outs[0]


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


def estimate_peak_bytes(config: VAEConfig, n: int, height: int, width: int, element_size: int) -> int:
    """Rough peak memory of an untiled call at image size height x width: a few full-resolution tensors
    of the widest full-resolution stage (the decoder upsamples its second level's channels to full size)."""
    chs = config.block_out_channels
    widest = max(chs[0], chs[1] if len(chs) > 1 else chs[0])
    return 4 * n * height * width * widest * element_size


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
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown platform: assume a modest machine
