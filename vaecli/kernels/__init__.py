"""Fused Triton kernels, one module per op, each with its plain-torch reference beside it.

A kernel runs only where `usable` says so: on CUDA GPUs of compute capability 7.0 or later (8.0 for
bf16) with Triton installed, or on CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1 set
before the kernel modules are imported: how the tests run them without a GPU). Everywhere else (CPUs,
MPS, old GPUs, autograd recording, torch.compile tracing, unsupported dtypes or layouts) callers take the
reference. Which ops use kernels on which device is decided in plans.py, not here.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Blocks:
    """Launch sizes of the kernels; which sizes a device gets is plans.TABLE's choice (`triton` row)."""

    norm_chunk: int  # GroupNorm moments: elements per program (enough work each, enough programs per image)
    norm_block: int  # GroupNorm NCHW: elements per load
    norm_tile: int  # GroupNorm NHWC: elements per (rows x channels) load
    norm_finalize: int  # GroupNorm: the most partial results one finalize program merges per load
    norm_warps: int  # GroupNorm NHWC programs: warps each
    conv_tile: tuple[int, int, int]  # upsample conv: (pixels, output channels, input channels) per tile


@lru_cache(maxsize=1)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter is on: kernels run as NumPy on CPU tensors (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=8)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_ok(t: torch.Tensor) -> bool:
    """Triton can run on t's device with t's dtype."""
    if not triton_installed() or t.dtype not in DTYPES:
        return False
    if t.device.type == "cpu":
        return interpreting()
    if t.device.type != "cuda":
        return False  # MPS, XPU...: no Triton backend here
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return capability_ok(_capability(index), t.dtype)


def available_for(device: torch.device) -> bool:
    """The kernels can be expected to run on `device` at all: Triton installed (CUDA builds of torch ship it;
    Windows builds do not) and, where the GPU can be asked, compute capability 7.0 or later. Plans choose
    their layout by this: without the norm kernel, channels-last costs on CUDA."""
    if not triton_installed():
        return False
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return capability_ok(_capability(index), torch.float16)
    return True


def capability_ok(capability: tuple[int, int], dtype: torch.dtype) -> bool:
    """Triton needs compute capability 7.0 (Volta); bf16 arithmetic needs 8.0 (Ampere)."""
    return capability[0] >= (8 if dtype == torch.bfloat16 else 7)


def no_autograd(*tensors: torch.Tensor | None) -> bool:
    """No gradient is recorded through these tensors (kernels have no backward)."""
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def usable(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """A kernel may run on x (and these parameters): device, dtype, no autograd, not being traced."""
    if torch.compiler.is_compiling():
        return False  # let torch.compile/export see (and fuse) the reference ops
    return x.numel() > 0 and device_ok(x) and no_autograd(x, *params)


def layout(x: torch.Tensor) -> str | None:
    """'nchw' or 'nhwc' for a dense 4-D tensor in one of those layouts, else None (the kernels take no others)."""
    if x.dim() != 4:
        return None
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None
