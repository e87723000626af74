"""Devices and precisions: which device a run uses, and the precision it computes in.

The compute precision of a run is derived here once (`compute_dtype`); callers take it from the Runner
(`Runner.dtype`) or from `RunOptions.compute_dtype`, never by repeating the rule.
"""

from __future__ import annotations

import torch

from . import choices
from .errors import ConfigError

DTYPES = dict(zip(choices.DTYPES, (torch.float32, torch.float16, torch.bfloat16), strict=True))
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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
