"""Host <-> device transfers for batches, arranged so the device never waits for the host.

On CUDA: host arrays are packed into page-locked (pinned) buffers that are reused across batches, copied
to the device on an upload stream without blocking the host, and turned into model input there (uint8 ->
float, replicate padding, NCHW in channels-last memory); the computation waits for that copy alone (an
event). Outputs are copied back into pinned buffers on a download stream once the computation queued
before them is done, so the copy of batch k overlaps the computation of batch k+1 (two streams: an
upload queued behind a download would wait for the computation that download waits for), and the host
waits only when it takes the result. Nothing here synchronises the device except `Download.wait`.

On the CPU there is no device to copy to: uploads are views of the host arrays and downloads are the
tensors themselves, but the padding and conversion code is the same. The asynchronous path (pool, packing,
copies, events) takes its primitives from a few methods (`asynchronous`, `host_empty`, `event`,
`to_device`) that tests replace to simulate an asynchronous device with CPU tensors (tests/test_staging.py),
so that path runs without a GPU too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch

U8_SCALE = 255.0  # 8-bit pixels: value / 255 -> [0, 1]


class _HostEvent:
    """The CPU's stand-in for a CUDA event: work on the CPU is finished when the call returns."""

    def record(self, stream: Any = None) -> None:
        self.at = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.at - self.at) * 1000.0  # milliseconds, as torch.cuda.Event


class PinnedPool:
    """Reusable page-locked host buffers: allocating pinned memory is slow (a driver call that maps the
    pages), so buffers are recycled, each handed out again only once the copy that used it has finished."""

    def __init__(self, transfers: Transfers, keep: int = 8) -> None:
        self._t = transfers
        self._free: list[torch.Tensor] = []  # flat uint8 buffers
        self._busy: list[tuple[Any, torch.Tensor]] = []  # (event of the last copy, buffer)
        self._keep = keep
        self.allocated = 0  # buffers allocated so far (tests, reports)

    def take(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of exactly `nbytes` (a view of a pooled one of at least that size)."""
        self._reclaim()
        fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fits:
            # by index: list.remove would compare tensors with ==, elementwise (an error for other sizes)
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            buf = self._t.host_empty(max(nbytes + nbytes // 4, 1 << 16))  # headroom: sizes vary a little
            self.allocated += 1
        return buf

    def release(self, buf: torch.Tensor, after: Any) -> None:
        """Give `buf` back once `after` (an event recorded after its last copy) has completed."""
        self._busy.append((after, buf))

    def _reclaim(self) -> None:
        still = []
        for event, buf in self._busy:
            (self._free.append(buf) if event.query() else still.append((event, buf)))
        self._busy = still
        while len(self._free) > self._keep:  # a run of ever larger sizes must not keep every old buffer
            self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))


@dataclass
class Download:
    """Device tensors on their way to the host; `wait()` returns them as ordinary CPU tensors."""

    hosts: list[torch.Tensor]
    done: Any  # event recorded after the copies
    buffer: torch.Tensor | None = None  # the pinned buffer holding `hosts`, returned to the pool by wait()
    pool: PinnedPool | None = None
    _result: list[torch.Tensor] | None = field(default=None, repr=False)

    def wait(self) -> list[torch.Tensor]:
        if self._result is None:
            self.done.synchronize()
            if self.buffer is None:
                self._result = self.hosts
            else:
                # Copied out of the pinned buffer, which goes back to the pool for the next batch (writers
                # may hold these outputs long after).
                self._result = [h.clone() for h in self.hosts]
                assert self.pool is not None
                self.pool.release(self.buffer, self.done)
        return self._result


class Transfers:
    """Copies between the host and one device (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        # Side streams for copies: to the device, and back to the host.
        self.up = torch.cuda.Stream(device) if self.cuda else None
        self.down = torch.cuda.Stream(device) if self.cuda else None
        self.pool = PinnedPool(self)

    # -- primitives (a simulated device replaces these three) ----------------------------------------------

    @property
    def asynchronous(self) -> bool:
        """Whether tensors must be copied to reach the device (and come back through pinned buffers)."""
        return self.cuda

    def host_empty(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 host buffer, page-locked where a CUDA device will copy from or to it."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def event(self) -> Any:
        return torch.cuda.Event(enable_timing=True) if self.cuda else _HostEvent()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy a (pinned) host tensor to the device without blocking the host (call inside side())."""
        return host.to(self.device, non_blocking=True)

    @contextlib.contextmanager
    def side(self, stream: Any) -> Iterator[None]:
        """Run the enclosed copies on `stream` (one of the side streams; None on the CPU)."""
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield

    def _keep_alive(self, t: torch.Tensor, stream: Any) -> None:
        """Tell the caching allocator that `t` is used on `stream` too (its memory not reused too early)."""
        if self.cuda and t.is_cuda:
            t.record_stream(stream)

    # -- host -> device --------------------------------------------------------------------------------------

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Host arrays -> tensors on the device, in one copy (all arrays of one dtype, as given)."""
        if not self.asynchronous:
            return [torch.from_numpy(_writable(a)) for a in arrays]
        dtype = arrays[0].dtype
        sizes = [a.nbytes for a in arrays]
        buf = self.pool.take(sum(sizes))
        view = buf.numpy()
        offsets = np.cumsum([0, *sizes])
        for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:], strict=True):
            view[lo:hi] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        with self.side(self.up):
            flat = self.to_device(buf[: offsets[-1]])
            copied = self.event()
            copied.record()
        self.pool.release(buf, copied)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)  # the computation waits for this copy, not for the downloads
            self._keep_alive(flat, compute)
        tdtype = _TORCH_DTYPES[np.dtype(dtype)]
        return [
            flat[lo:hi].view(tdtype).view(a.shape) for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:], strict=True)
        ]

    def images(self, arrays: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        """(H_i, W_i, C) host images -> one (N, C, H, W) batch on the device (channels-last memory), each
        padded to size (H, W) by replicating its last row and column. uint8 stays uint8 (4x less to copy;
        `to_model_range` converts on the device); mixed uint8 and float batches become float [0, 1]."""
        if len({a.dtype for a in arrays}) > 1:
            arrays = [a.astype(np.float32) / np.float32(U8_SCALE) if a.dtype == np.uint8 else a for a in arrays]
        h, w = size
        items = self.upload(arrays)
        c = arrays[0].shape[2]
        out = torch.empty((len(items), c, h, w), dtype=items[0].dtype, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        for i, item in enumerate(items):
            ih, iw = item.shape[:2]
            if ih > h or iw > w:
                raise ValueError(f"image {iw}x{ih} does not fit the batch size {w}x{h}")
            chw = item.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
            out[i, :, :ih, :iw] = chw
            if iw < w:
                out[i, :, :ih, iw:] = chw[:, :, iw - 1 : iw]
            if ih < h:
                out[i, :, ih:, :] = out[i, :, ih - 1 : ih, :]
        return out

    # -- device -> host --------------------------------------------------------------------------------------

    def download(self, tensors: Sequence[torch.Tensor]) -> Download:
        """Start copying device tensors back to the host once the work queued so far has made them."""
        if not self.asynchronous:
            done = self.event()
            done.record()
            return Download([t if t.device.type == "cpu" else t.cpu() for t in tensors], done)
        sizes = [t.numel() * t.element_size() for t in tensors]
        # each tensor starts at a multiple of 16 bytes: a byte view is reinterpreted as any dtype only
        # at an offset aligned to its element size (a bool mask before float32 outputs would not be)
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + -(-n // 16) * 16)
        buf = self.pool.take(starts[-1] + (sizes[-1] if sizes else 0))
        hosts = [buf[lo : lo + n].view(t.dtype).view(t.shape) for t, lo, n in zip(tensors, starts, sizes, strict=True)]
        if self.down is not None:
            self.down.wait_stream(torch.cuda.current_stream(self.device))  # after the work that makes them
        with self.side(self.down):
            for host, t in zip(hosts, tensors, strict=True):
                host.copy_(t, non_blocking=True)
                self._keep_alive(t, self.down)
            done = self.event()
            done.record()
        return Download(hosts, done, buf, self.pool)


def _writable(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable array (torch warns about read-only ones, e.g. views of decoded images)."""
    return a if a.flags.c_contiguous and a.flags.writeable else np.array(a, order="C")


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Pixels (uint8 in [0, 255], or float in [0, 1]) -> float32 in [-1, 1], on x's device.

    uint8 is divided by a 0-dim tensor, not a Python number: CUDA turns division by a host scalar into
    multiplication by its reciprocal, which differs in the last bit for half of the 256 values, while
    the host path divides (NumPy's `/ 255.0`)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(_u8_scale(x.device))
    return x * 2.0 - 1.0


@cache
def _u8_scale(device: torch.device) -> torch.Tensor:
    return torch.tensor(U8_SCALE, device=device)


def to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounding to nearest (as io.to_uint8)."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


_TORCH_DTYPES = {
    np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
}
