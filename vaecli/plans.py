"""How each layer runs on each device: one table, every choice with the measurement behind it.

The model has one module tree and one set of weights; a `Plan` passed to its forward methods decides how
the layers compute: the memory layout of activations and conv weights, GroupNorm's implementation for
half-precision inputs, the upsampling form, the attention call, and which Triton kernels (vaecli/kernels)
replace torch ops. `plan_for(device, config, kernels)` builds the plan of a device from TABLE; `REFERENCE`
is diffusers' own sequence of operations, the default of the model's methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
import torch.nn.functional as F

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import VAEConfig

NORMS = ("native", "fp32")  # GroupNorm of fp16/bf16 inputs: on the input dtype, or on an fp32 copy
UPSAMPLES = ("nearest", "subpixel", "transposed")  # kernels/upsample_conv.py: the torch forms
KERNEL_OPS = ("norm", "upsample")  # ops that have a Triton kernel
KERNEL_MODES = ("auto", "on", "off")  # auto: TABLE's choice for the device


@dataclass(frozen=True)
class Choice:
    value: Any
    measured: str  # the measurement (or source reading) this choice rests on


# One row per device; `wide_from` applies to layers (upsampling) and `nhwc_from` to whole models (layout):
# narrower ones keep diffusers' exact sequence of operations, which reproduces its outputs bit for bit.
TABLE: dict[str, dict[str, Choice]] = {
    "cpu": {
        "nhwc_from": Choice(256, "2-core x86 CPU, oneDNN: NHWC 3x3 convs ~15% faster than NCHW at SD widths "
                                 "(README Speed); narrow models gain little and keep NCHW"),
        "norm": Choice("native", "docs/performance.md, CPU 2026-11-27: bf16 GroupNorm 256x128x128 15 ms native vs "
                                 "82 ms on an fp32 copy (fp16 17 vs 51); SD bf16 decode 256^2 0.77 of diffusers' "
                                 "time vs 0.90 before; aten's CPU kernel accumulates in fp32 (see _group_norm)"),
        "upsample": Choice("transposed", "docs/performance.md, CPU 2026-11-27: one 512ch 64x64 fp32 NHWC layer: "
                                         "nearest+conv 2043 ms, subpixel 1369 ms, conv_transpose2d 855 ms; SD decode "
                                         "256^2 fp32: 0.73 of diffusers' time, 0.86 with subpixel (same run)"),
        "nhwc_needs_norm_kernel": Choice(False, "aten's CPU GroupNorm has a channels-last kernel "
                                                "(GroupNormKernelImplChannelsLastInternal)"),
        "wide_from": Choice(256, "narrow layers: diffusers' exact sequence (bit-identical outputs)"),
        "tiles_nhwc": Choice(True, "2-core CPU 2026-11-27, `vaecli bench -r 1024 --tiling on`, default model (narrow, "
                                   "NCHW untiled), two runs each: tiled decode 8.8-9.3 s and 436-501 MB with NHWC "
                                   "tiles, 9.8-9.9 s and 492-585 MB with NCHW; encode 276-325 MB vs 350-354 MB. "
                                   "Tiled results are not diffusers' bit for bit in any layout"),
        "attention": Choice("sdpa", "diffusers' call (AttnProcessor2_0); one head over all positions"),
        "kernels": Choice((), "Triton has no CPU backend; its interpreter (tests) is far slower than aten"),
    },
    "cuda": {
        "nhwc_from": Choice(0, "docs/performance.md, H100 2026-11-27 (gpu_report, 555d39b): with the kernels, "
                               "NHWC beat NCHW in 17 of 18 rows (bf16 decode 1024 2.40x vs 2.06x diffusers' "
                               "speed, fp32 encode 512 b16 1.36x vs 1.15x; fp32 decode 512 b16 1.20x both)"),
        "nhwc_needs_norm_kernel": Choice(True, "H100 2026-11-27 (../shared/bench/h100-2026-11-27): without the "
                                               "Triton norm, the NHWC path ran 1.3-1.8x slower than diffusers' "
                                               "NCHW; aten's GroupNorm on NHWC ~2x slower than on NCHW (sglang)"),
        "norm": Choice("native", "diffusers' call; aten's CUDA kernel accumulates fp16/bf16 in fp32 (see "
                                 "_group_norm); the fp32 copy was part of the slower H100 path"),
        "upsample": Choice("nearest", "diffusers' sequence; subpixel's strided copies were part of the slower H100 "
                                      "path; transposed and the fused kernel await scripts/gpu_report.py"),
        "wide_from": Choice(0, "every layer: the CUDA choices do not depend on width"),
        "tiles_nhwc": Choice(False, "tiles follow the layout (NHWC only with the norm kernel: "
                                    "nhwc_needs_norm_kernel)"),
        "attention": Choice("sdpa", "diffusers' call; flash/efficient SDPA kernels in fp16/bf16"),
        "kernels": Choice(("norm", "upsample"), "docs/performance.md, H100 2026-11-27 (gpu_report, b21920b): "
                                                "SD layout, speedup over diffusers with both kernels vs without, "
                                                "bf16 decode 1024 2.04x vs 1.03x, encode 1024 2.05x vs 1.01x, "
                                                "fp16 decode 512 b16 1.77x vs 1.32x, fp32 encode 1024 1.60x vs "
                                                "1.02x; `--kernels off` keeps diffusers' sequence bit for bit"),
    },
    "mps": {
        "nhwc_from": Choice(None, "not measured: diffusers' layout"),
        "nhwc_needs_norm_kernel": Choice(False, "not measured: NHWC is not used on MPS"),
        "norm": Choice("fp32", "not measured: MPS GroupNorm's accumulation precision for fp16 is undocumented, "
                               "so statistics are taken on an fp32 copy"),
        "upsample": Choice("nearest", "not measured: diffusers' sequence"),
        "wide_from": Choice(0, "every layer: the MPS choices do not depend on width"),
        "tiles_nhwc": Choice(False, "not measured: tiles follow the layout"),
        "attention": Choice("sdpa", "not measured: diffusers' call"),
        "kernels": Choice((), "Triton has no MPS backend"),
    },
}


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
                return activate(None if silu else act, gn.apply(x, mean, rstd, w, b, silu))
            return activate(act, gn.apply_reference(x, mean, rstd, w, b, False))
        if fused:
            return activate(None if silu else act, gn.group_norm(x, norm.num_groups, w, b, norm.eps, silu))
        return activate(act, _group_norm(x, norm, self.norm))

    def moments(self, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (image, group) count, mean and centred sum of squares of x, fp32 (tiling's statistics)."""
        from .kernels import groupnorm_silu as gn

        if "norm" in self.kernels and gn.usable(x):
            # the kernels take dense NCHW/NHWC tensors: a crop is copied first (the reference takes views)
            dense = x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
            if gn.supported(dense, groups):
                return gn.moments(dense, groups)
        return gn.moments_reference(x, groups)

    def upsample_conv(self, conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """Nearest x2 then `conv` (3x3, padding 1), in this plan's form for the layer's width."""
        from .kernels import upsample_conv as uc

        w, b = conv.weight, conv.bias
        if "upsample" in self.kernels and uc.supported(x, w, b):
            return uc.fused(x, w, b)
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
    value = {name: choice.value for name, choice in TABLE[kind].items()}
    ops = frozenset(value["kernels"]) if kernels == "auto" else frozenset(KERNEL_OPS)
    if kernels == "auto" and ops:
        from . import kernels as triton_kernels

        if not triton_kernels.available_for(torch.device(device)):
            ops = frozenset()  # no Triton here (or too old a GPU): the row's choices without kernels
    nhwc = (getattr(config, "channels_last", True) and value["nhwc_from"] is not None and max(*config.block_out_channels, *config.decoder_channels) >= value["nhwc_from"]
            and ("norm" in ops or not value["nhwc_needs_norm_kernel"]))
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
    """Put the model's conv weights in the plan's memory layout (in place; values unchanged), so that
    convolutions do not convert them on every call."""
    return model.to(memory_format=plan.layout)


def measurements(device: str) -> dict[str, str]:
    """What each of a device's choices rests on (for reports and docs)."""
    return {name: choice.measured for name, choice in TABLE[torch.device(device).type].items()}
