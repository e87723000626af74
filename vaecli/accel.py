"""Speed settings for a loaded model: backend flags, memory layout and optional torch.compile with an
on-disk cache. Values are unchanged by everything here except compilation, which may reorder sums."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

from .model import AutoencoderKL


def cache_dir() -> Path:
    """Where compiled kernels are kept between processes (TORCHINDUCTOR_CACHE_DIR wins when set)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vaecli" / "inductor"


class Autotune:
    """Where cuDNN searches for the fastest convolution algorithms (torch.backends.cudnn.benchmark): only
    for calls whose input shape repeats. The search runs every candidate algorithm once per new shape and
    layer, a cost repaid only over later calls of that shape; a folder of mixed sizes, where most shapes
    come once, paid it on nearly every image (issue 13). The decision for all of vaecli is made here, per
    call: on from the `min_repeats`-th earlier call of the same shape (same-size folders, dataset buckets,
    benchmarks), and for tiled calls, whose tiles repeat one shape many times within the call.
    """

    def __init__(self, device: torch.device, min_repeats: int = 2) -> None:
        self.device = device
        self.min_repeats = min_repeats  # 0: always (a benchmark's warm-up absorbs the search)
        self.seen: dict[tuple[object, ...], int] = {}

    def before_call(self, key: tuple[object, ...], tiled: bool) -> bool:
        """Set the flag for the next call on inputs described by `key` (op, shape, dtype); returns it."""
        earlier = self.seen.get(key, 0)
        self.seen[key] = earlier + 1
        on = tiled or earlier >= self.min_repeats
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = on
        return on


def prepare(model: AutoencoderKL, compile: bool = False) -> AutoencoderKL:
    """NHWC weights (faster convolutions with oneDNN and cuDNN), backend flags, and optionally compiled
    encoder/decoder. Compiled kernels go to `cache_dir()`, so a second process skips most of the compile."""
    model = model.to(memory_format=torch.channels_last)
    if compile:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        # Whole-graph compilation of the two halves; shapes repeat within a run, so no dynamic shapes.
        model.encoder.compile(dynamic=False)
        model.decoder.compile(dynamic=False)
    return model


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc; a no-op elsewhere).

    A tiled call on the CPU allocates and frees many tile-sized blocks; glibc keeps the freed ones, with
    holes, so a process doing one tiled image after another (batch conversion) would see its resident
    memory creep up call after call. Trimming before and after each tiled call keeps it at one call's peak.
    """
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
