"""Every per-device choice in one table, each with the file in this repository that measured it.

TABLE has a row per kind of device with two parts. `layers`: how the layers compute (a `Plan` passed to
the model's forward methods: memory layout of activations and conv weights, GroupNorm's implementation for
half-precision inputs, the upsampling form, the attention call, which Triton kernels replace torch ops);
`plan_for(device, config, kernels)` builds a device's plan from it, and `REFERENCE` is diffusers' own
sequence of operations, the default of the model's methods. `run`: the run-level choices (I/O threads,
the automatic batch limit, the memory model's factors and budgets, heap trimming, cuDNN's autotuning,
the kernels' block sizes), read through `run_choices(device)`. Each choice cites its measurement
(`Cited.source`: a repository file, or exactly "not measured"); tests/test_plans.py checks the files exist.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.nn.functional as F

from . import families
from .choices import KERNEL_MODES  # auto: TABLE's choice for the device
from .errors import ConfigError
from .kernels import Blocks

if TYPE_CHECKING:
    from .config import VAEConfig

NORMS = ("native", "fp32")  # GroupNorm of fp16/bf16 inputs: on the input dtype, or on an fp32 copy
UPSAMPLES = ("nearest", "subpixel", "transposed")  # kernels/upsample_conv.py: the torch forms
KERNEL_OPS = ("norm", "upsample")  # ops that have a Triton kernel

M = TypeVar("M", bound=torch.nn.Module)


NOT_MEASURED = "not measured"  # the `source` of a choice nobody has measured (yet)


@dataclass(frozen=True)
class Cited:
    """What a choice rests on: `source` is the file in this repository that measured it (a path from the
    repository root) or exactly NOT_MEASURED; `detail` gives the figures or the reasoning."""

    source: str
    detail: str


@dataclass(frozen=True)
class Choice:
    """One layer choice of a device row, with what it rests on."""

    value: Any
    why: Cited


@dataclass(frozen=True)
class LayerChoices:
    """How the layers of a model run on a device (plan_for turns these into a Plan)."""

    nhwc_from: Choice  # widest layer (channels) from which the whole model runs channels-last; None: never
    nhwc_needs_norm_kernel: Choice  # channels-last only with the Triton GroupNorm kernel
    norm: Choice  # NORMS
    upsample: Choice  # UPSAMPLES, for layers at least `wide_from` wide
    wide_from: Choice
    tiles_nhwc: Choice  # tiled calls keep their tiles channels-last
    attention: Choice
    kernels: Choice  # KERNEL_OPS run by Triton with --kernels auto


@dataclass(frozen=True)
class IOThreads:
    """Reader and writer threads of the batch engine: one reader per CPU core and one writer per two,
    each clamped to its (fewest, most)."""

    readers: tuple[int, int]
    writers: tuple[int, int]
    why: Cited

    def counts(self, cpus: int, readers: int = 0) -> tuple[int, int]:
        """(reader threads, writer threads) on a host with `cpus` cores; readers > 0 is the user's count."""
        return readers or _clamp(cpus, *self.readers), _clamp(cpus // 2, *self.writers)


@dataclass(frozen=True)
class BatchLimit:
    """The largest automatic batch (--batch-size auto): past it, throughput stops growing."""

    most: int
    why: Cited


@dataclass(frozen=True)
class PeakFactors:
    """Peak bytes of an untiled call per image pixel, in units of (widest full-resolution channels x
    element size), per op (memory.estimate_peak_bytes)."""

    encode: float
    decode: float
    why: Cited


@dataclass(frozen=True)
class MemoryBudget:
    """How much of the free memory a run plans to use, and how an out-of-memory error corrects the model."""

    call: float  # share of free memory one model call may be predicted to take
    auto_batch: float  # share of free memory --batch-size auto fills
    oom_margin: float  # after an OOM, the failed call is re-predicted at this multiple of free memory
    why: Cited


@dataclass(frozen=True)
class HeapTrim:
    """Whether tiled calls hand freed heap memory back to the OS before and after (accel.trim_heap)."""

    tiled_calls: bool
    why: Cited


@dataclass(frozen=True)
class ConvSearch:
    """When cuDNN searches for the fastest convolution algorithms (accel.Autotune): from the
    `min_repeats`-th earlier call of the same shape, and for every tiled call (its tiles repeat one shape)."""

    min_repeats: int
    tiled: bool
    why: Cited


@dataclass(frozen=True)
class TritonTiles:
    """Block sizes of the Triton kernels (vaecli/kernels) for tensors on this device."""

    blocks: Blocks
    why: Cited


@dataclass(frozen=True)
class RunChoices:
    """Run-level choices of one device: threads, batch and memory limits, heap, autotuning, kernel blocks."""

    io_threads: IOThreads
    batch_limit: BatchLimit
    untiled_peak: PeakFactors
    memory: MemoryBudget
    heap_trim: HeapTrim
    conv_search: ConvSearch
    triton: TritonTiles


@dataclass(frozen=True)
class DeviceRow:
    """Every choice vaecli makes for one kind of device."""

    layers: LayerChoices
    run: RunChoices


def _clamp(v: int, low: int, high: int) -> int:
    return max(low, min(high, v))


_H100 = "docs/bench/h100-2026-11-27-report/run2_rows.json"
_PEAKS = PeakFactors(
    5.0, 7.0,
    Cited(_H100, "H100 bf16, SD layout, vaecli 2026-11-27: decode 512^2 batch 16 15.4 GB and 2048^2 15.0 GB "
                 "-> 7.0; encode 512^2 batch 16 10.2 GB -> 4.8 (this file: the same day's peak_memory_bytes)"),
)
_PEAKS_UNMEASURED = PeakFactors(
    _PEAKS.encode, _PEAKS.decode, Cited(NOT_MEASURED, "the H100 factors (cuda row); the OOM ladder corrects them")
)
_BUDGET = MemoryBudget(
    0.8, 0.6, 1.5,
    Cited(NOT_MEASURED, "margins for the estimate's error; tests/test_pipeline.py checks that one correction "
                        "covers calls needing up to 1.875x the prediction"),
)
_BATCH8 = BatchLimit(8, Cited(NOT_MEASURED, "throughput assumed flat past 8 images per call"))
_GPU_THREADS = IOThreads(
    (2, 16), (2, 8),
    Cited(NOT_MEASURED, "the host decodes, hashes, encodes and compresses every file while the device computes: "
                        "a thread per core (Pillow releases the GIL while decoding and compressing)"),
)
_SEARCH = ConvSearch(2, True, Cited(NOT_MEASURED, "cuDNN's search costs every candidate algorithm once per new "
                                                  "shape and layer; a folder of mixed sizes paid it on nearly "
                                                  "every image (issue 13)"))
_NO_SEARCH = ConvSearch(2, True, Cited(NOT_MEASURED, "no cuDNN on this device: the flag is left alone"))
_NORM_BLOCKS = dict(norm_chunk=16384, norm_block=1024, norm_tile=4096, norm_finalize=1024, norm_warps=8)


# One row per device; `wide_from` applies to layers (upsampling) and `nhwc_from` to whole models (layout):
# narrower ones keep diffusers' exact sequence of operations, which reproduces its outputs bit for bit.
TABLE: dict[str, DeviceRow] = {
    "cpu": DeviceRow(
        LayerChoices(
            nhwc_from=Choice(256, Cited(NOT_MEASURED, "2-core x86 CPU, oneDNN: NHWC 3x3 convs ~15% faster than NCHW "
                                                      "at SD widths (figure not kept); narrow models keep NCHW")),
            nhwc_needs_norm_kernel=Choice(False, Cited(NOT_MEASURED, "source reading: aten's CPU GroupNorm has "
                                                       "a channels-last kernel "
                                                       "(GroupNormKernelImplChannelsLastInternal)")),
            norm=Choice("native", Cited("docs/performance.md", "CPU 2026-11-27: bf16 GroupNorm 256x128x128 15 ms "
                                        "native vs 82 ms on an fp32 copy (fp16 17 vs 51); SD bf16 decode 256^2 0.77 "
                                        "of diffusers' time vs 0.90 before; aten's CPU kernel accumulates in fp32")),
            upsample=Choice("transposed", Cited("docs/performance.md", "CPU 2026-11-27: one 512ch 64x64 fp32 NHWC "
                                                "layer: nearest+conv 2043 ms, subpixel 1369 ms, conv_transpose2d "
                                                "855 ms; SD decode 256^2 fp32: 0.73 of diffusers' time, 0.86 with "
                                                "subpixel (same run)")),
            wide_from=Choice(256, Cited("tests/test_plans.py", "narrow layers: diffusers' exact sequence "
                                        "(bit-identical outputs, test_cpu_plan_narrow_bit_identical_wide_close)")),
            tiles_nhwc=Choice(True, Cited("docs/performance.md", "2-core CPU 2026-11-27, `vaecli bench -r 1024 "
                                          "--tiling on`: tiled decode 8.8-9.3 s and 436-501 MB with NHWC tiles, "
                                          "9.8-9.9 s and 492-585 MB with NCHW; encode 276-325 MB vs 350-354 MB")),
            attention=Choice("sdpa", Cited(NOT_MEASURED, "diffusers' call (AttnProcessor2_0); one head")),
            kernels=Choice((), Cited(NOT_MEASURED, "Triton has no CPU backend; its interpreter (tests) is far "
                                                   "slower than aten")),
        ),
        RunChoices(
            io_threads=IOThreads((1, 4), (2, 2), Cited(
                "docs/bench/cpu-2026-11-27-pipeline_throughput.json",
                "the model takes every core: min(4, CPUs) readers and 2 writers kept the model busy 97-98% of the "
                "time (scripts/pipeline_throughput.py)")),
            batch_limit=_BATCH8,
            untiled_peak=_PEAKS_UNMEASURED,
            memory=_BUDGET,
            heap_trim=HeapTrim(True, Cited(NOT_MEASURED, "glibc keeps freed tile-sized blocks with holes: resident "
                                                         "memory crept up tiled call after tiled call")),
            conv_search=_NO_SEARCH,
            triton=TritonTiles(Blocks(**_NORM_BLOCKS, conv_tile=(16, 16, 16)), Cited(
                NOT_MEASURED, "Triton's interpreter (tests): small conv tiles keep it quick")),
        ),
    ),
    "cuda": DeviceRow(
        LayerChoices(
            nhwc_from=Choice(0, Cited("docs/performance.md", "H100 2026-11-27 (gpu_report, 555d39b): with the "
                                      "kernels, NHWC beat NCHW in 17 of 18 rows (bf16 decode 1024 2.40x vs 2.06x "
                                      "diffusers' speed, fp32 encode 512 b16 1.36x vs 1.15x; fp32 decode 512 b16 "
                                      "1.20x both)")),
            nhwc_needs_norm_kernel=Choice(True, Cited("docs/performance.md", "H100 2026-11-27 (baseline before "
                                                      "plans): without the Triton norm, the NHWC path ran "
                                                      "1.3-1.8x slower than diffusers' NCHW")),
            norm=Choice("native", Cited(NOT_MEASURED, "diffusers' call; source reading: aten's CUDA kernel "
                                                      "accumulates fp16/bf16 in fp32 (see _group_norm)")),
            upsample=Choice("nearest", Cited("docs/performance.md", "H100 2026-11-27 run 1: transposed 1.00-1.07x "
                                             "(1.44x at decode 512 b16), below the fused kernel; not taken")),
            wide_from=Choice(0, Cited(NOT_MEASURED, "every layer: the CUDA choices do not depend on width")),
            tiles_nhwc=Choice(False, Cited(NOT_MEASURED, "tiles follow the layout (NHWC only with the norm "
                                                         "kernel: nhwc_needs_norm_kernel)")),
            attention=Choice("sdpa", Cited(NOT_MEASURED, "diffusers' call; flash/efficient SDPA in fp16/bf16")),
            kernels=Choice(("norm", "upsample"), Cited(_H100, "H100 2026-11-27 (docs/performance.md): SD layout, "
                                                       "speedup over diffusers with both kernels vs without, bf16 "
                                                       "decode 1024 2.04x vs 1.03x, encode 1024 2.05x vs 1.01x, "
                                                       "fp32 encode 1024 1.60x vs 1.02x")),
        ),
        RunChoices(
            io_threads=_GPU_THREADS,
            batch_limit=BatchLimit(32, Cited(NOT_MEASURED, "throughput assumed flat past 32 images per call")),
            untiled_peak=_PEAKS,
            memory=_BUDGET,
            heap_trim=HeapTrim(False, Cited(NOT_MEASURED, "tiles live in device memory (caching allocator)")),
            conv_search=_SEARCH,
            triton=TritonTiles(Blocks(**_NORM_BLOCKS, conv_tile=(64, 64, 32)), Cited(
                NOT_MEASURED, "the sizes the H100 rows ran with (docs/performance.md); no other size was tried")),
        ),
    ),
    "mps": DeviceRow(
        LayerChoices(
            nhwc_from=Choice(None, Cited(NOT_MEASURED, "diffusers' layout")),
            nhwc_needs_norm_kernel=Choice(False, Cited(NOT_MEASURED, "NHWC is not used on MPS")),
            norm=Choice("fp32", Cited(NOT_MEASURED, "MPS GroupNorm's accumulation precision for fp16 is "
                                                    "undocumented, so statistics are taken on an fp32 copy")),
            upsample=Choice("nearest", Cited(NOT_MEASURED, "diffusers' sequence")),
            wide_from=Choice(0, Cited(NOT_MEASURED, "every layer: the MPS choices do not depend on width")),
            tiles_nhwc=Choice(False, Cited(NOT_MEASURED, "tiles follow the layout")),
            attention=Choice("sdpa", Cited(NOT_MEASURED, "diffusers' call")),
            kernels=Choice((), Cited(NOT_MEASURED, "Triton has no MPS backend")),
        ),
        RunChoices(
            io_threads=_GPU_THREADS,
            batch_limit=_BATCH8,
            untiled_peak=_PEAKS_UNMEASURED,
            memory=_BUDGET,
            heap_trim=HeapTrim(False, Cited(NOT_MEASURED, "unified memory; not tried")),
            conv_search=_NO_SEARCH,
            triton=TritonTiles(Blocks(**_NORM_BLOCKS, conv_tile=(16, 16, 16)), Cited(
                NOT_MEASURED, "Triton has no MPS backend: never launched")),
        ),
    ),
}

# Devices without a row (xpu, ...): the run-level choices of an unmeasured accelerator, diffusers' layers.
UNMEASURED_RUN = replace(TABLE["mps"].run, heap_trim=HeapTrim(False, Cited(NOT_MEASURED, "not tried")))


def run_choices(device: str | torch.device) -> RunChoices:
    """The run-level choices for `device` (TABLE's row, or UNMEASURED_RUN for a device without one); e.g.
    `run_choices(device).io_threads.counts(os.cpu_count())` for the batch engine's threads."""
    row = TABLE.get(torch.device(device).type)
    return row.run if row is not None else UNMEASURED_RUN


class NormStats(Protocol):
    """GroupNorm statistics supplied from outside the tensor (tiling: those of the whole image)."""

    def moments(self, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (mean, rstd) of shape (batch, groups) for the batch being normalized."""
        ...


_ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "gelu": F.gelu,
    "relu": F.relu,
}
_IN_PLACE = {"silu", "swish", "mish", "relu"}  # activations torch can apply in place


def activate(name: str | None, x: torch.Tensor) -> torch.Tensor:
    """act(x), in place on x (a fresh GroupNorm output) when no gradient is recorded: one allocation fewer
    per layer, the same values."""
    if name is None:
        return x
    if name in _IN_PLACE and not torch.is_grad_enabled():
        return _ACTIVATIONS[name](x, inplace=True)
    return _ACTIVATIONS[name](x)


@dataclass(frozen=True)
class Plan:
    """How the layers of one model run on one device (see TABLE). Holds no weights."""

    name: str  # "reference", or the TABLE row it came from
    layout: torch.memory_format = torch.contiguous_format  # activations and conv weights
    tiles_nhwc: bool = False  # tiled calls keep their tiles channels-last whatever `layout` says
    norm: str = "native"  # NORMS
    upsample: str = "nearest"  # UPSAMPLES, for layers at least `wide_from` wide
    wide_from: int = 0
    attention: str = "sdpa"
    kernels: frozenset[str] = field(default_factory=frozenset)  # KERNEL_OPS run by Triton where supported

    # -- the ops the models (models/) ask for ----------------------------------------------------------------------

    def norm_act(
        self, norm: torch.nn.GroupNorm, x: torch.Tensor, act: str | None, stats: NormStats | None = None
    ) -> torch.Tensor:
        """act(norm(x)); with `stats`, normalized by those statistics instead of x's own."""
        from .kernels import groupnorm_silu as gn

        w, b = norm.weight, norm.bias
        silu = act in ("silu", "swish")
        fused = "norm" in self.kernels and gn.supported(x, norm.num_groups, w, b)
        if stats is not None:
            mean, rstd = stats.moments(norm)
            if fused:
                return activate(None if silu else act, gn.apply(x, mean, rstd, w, b, silu, blocks=_blocks(x)))
            return activate(act, gn.apply_reference(x, mean, rstd, w, b, False))
        if fused:
            y = gn.group_norm(x, norm.num_groups, w, b, norm.eps, silu, blocks=_blocks(x))
            return activate(None if silu else act, y)
        return activate(act, _group_norm(x, norm, self.norm))

    def moments(self, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (image, group) count, mean and centred sum of squares of x, fp32 (tiling's statistics)."""
        from .kernels import groupnorm_silu as gn

        if "norm" in self.kernels and gn.usable(x):
            # the kernels take dense NCHW/NHWC tensors: a crop is copied first (the reference takes views)
            dense = x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
            if gn.supported(dense, groups):
                return gn.moments(dense, groups, blocks=_blocks(x))
        return gn.moments_reference(x, groups)

    def upsample_conv(self, conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """Nearest x2 then `conv` (3x3, padding 1), in this plan's form for the layer's width."""
        from .kernels import upsample_conv as uc

        w, b = conv.weight, conv.bias
        if "upsample" in self.kernels and uc.supported(x, w, b):
            return uc.fused(x, w, b, blocks=_blocks(x))
        form = self.upsample if conv.out_channels >= self.wide_from else "nearest"
        return {"nearest": uc.reference, "subpixel": uc.subpixel, "transposed": uc.transposed}[form](x, w, b)

    @property
    def tile_layout(self) -> torch.memory_format:
        """The memory layout of tiles in tiled calls."""
        return torch.channels_last if self.tiles_nhwc else self.layout

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Single-head self-attention, as the plan says (SDPA on every device so far)."""
        return F.scaled_dot_product_attention(q, k, v)

    def describe(self) -> dict[str, Any]:
        """The plan as JSON-friendly values (reports, cache keys)."""
        return {
            "name": self.name, "layout": "nhwc" if self.layout == torch.channels_last else "nchw",
            "tiles": "nhwc" if self.tile_layout == torch.channels_last else "nchw",
            "norm": self.norm, "upsample": self.upsample, "wide_from": self.wide_from,
            "attention": self.attention, "kernels": sorted(self.kernels),
        }


def _blocks(x: torch.Tensor) -> Blocks:
    """The kernels' launch sizes for x's device (TABLE's `triton` row; CUDA plans run on CPU tensors in tests)."""
    return run_choices(x.device).triton.blocks


def _group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, form: str) -> torch.Tensor:
    """GroupNorm without stats or kernels. "native" is diffusers' call. For fp16/bf16 inputs aten
    accumulates the statistics in fp32 on both devices (PyTorch source, aten/src/ATen/native/):
    cuda/group_norm_kernel.cu, GroupNormKernelImplInternal<T, T_ACC = acc_type<T, true>> (Welford in
    T_ACC = float in RowwiseMomentsCUDAKernel; scale and shift in float in ComputeFusedParamsCUDAKernel);
    cpu/group_norm_kernel.cpp, GroupNormKernelImplInternal and GroupNormKernelImplChannelsLastInternal
    (RowwiseMoments / ColumnwiseMoments / CalcMeanVar in opmath_t = float). "fp32" normalizes an fp32 copy
    (for devices where that is not known); the result is rounded to x's dtype either way."""
    if form == "fp32" and x.dtype in (torch.float16, torch.bfloat16):
        w = norm.weight.float() if norm.weight is not None else None
        b = norm.bias.float() if norm.bias is not None else None
        return F.group_norm(x.float(), norm.num_groups, w, b, norm.eps).to(x.dtype)
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


REFERENCE = Plan("reference")  # diffusers' sequence: NCHW, native GroupNorm, nearest + conv, SDPA


def plan_for(device: str | torch.device, config: VAEConfig, kernels: str = "auto") -> Plan:
    """The plan for running `config`'s model on `device`, from TABLE; kernels "on" forces the Triton
    kernels ("on" still falls back per call where a kernel cannot run); "off" is diffusers' exact sequence
    of operations on every device (REFERENCE: no kernels and none of TABLE's layouts or forms either), so
    `--kernels off` reproduces diffusers' outputs bit for bit wherever it runs."""
    if kernels not in KERNEL_MODES:
        raise ConfigError(f"unknown kernels mode {kernels!r}; use {', '.join(KERNEL_MODES)}")
    kind = torch.device(device).type
    if kind not in TABLE or kernels == "off":
        return REFERENCE  # a device nobody measured, or exactness asked for: diffusers' sequence
    layers = TABLE[kind].layers
    value = {f.name: getattr(layers, f.name).value for f in fields(layers)}
    ops = frozenset(value["kernels"]) if kernels == "auto" else frozenset(KERNEL_OPS)
    if kernels == "auto" and ops:
        from . import kernels as triton_kernels

        if not triton_kernels.available_for(torch.device(device)):
            ops = frozenset()  # no Triton here (or too old a GPU): the row's choices without kernels
    widest = max(*config.block_out_channels, *config.decoder_channels)
    nhwc = (
        families.of_config(config).channels_last
        and value["nhwc_from"] is not None
        and widest >= value["nhwc_from"]
        and ("norm" in ops or not value["nhwc_needs_norm_kernel"])
    )
    return Plan(
        name=kind,
        layout=torch.channels_last if nhwc else torch.contiguous_format,
        tiles_nhwc=value["tiles_nhwc"],
        norm=value["norm"],
        upsample=value["upsample"],
        wide_from=value["wide_from"],
        attention=value["attention"],
        kernels=ops,
    )


def apply_layout(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """Put the model's conv weights in the plan's memory layout, IN PLACE (values unchanged), so that
    convolutions do not convert them on every call. Runner never calls this on a caller's model: see
    `laid_out`."""
    return model.to(memory_format=plan.layout)  # type: ignore[call-overload]  # Module.to takes it; stubs omit


def laid_out(model: M, plan: Plan) -> M:
    """`model` with its conv weights in the plan's layout, the caller's model left as it is: the model
    itself when they are in that layout already, else a copy whose re-laid-out tensors are new and every
    other tensor (biases, norms, ...) is shared with `model` (one extra copy of the conv weights only)."""
    dims = (4,) if plan.layout == torch.channels_last else (4, 5)  # Module.to re-lays 5-D tensors only to NCHW

    def stale(t: torch.Tensor) -> bool:
        return t.dim() in dims and not t.is_contiguous(memory_format=plan.layout)

    params = list(model.parameters())
    buffers = list(model.buffers())
    if not any(stale(t) for t in (*params, *buffers)):
        return model
    memo: dict[int, Any] = {}
    for p in params:
        new = p.detach().contiguous(memory_format=plan.layout) if stale(p) else None
        memo[id(p)] = torch.nn.Parameter(new, requires_grad=p.requires_grad) if new is not None else p
    for b in buffers:
        memo[id(b)] = b.contiguous(memory_format=plan.layout) if stale(b) else b
    return copy.deepcopy(model, memo)  # the memo hands deepcopy our tensors instead of copies of them
