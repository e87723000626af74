"""Memory: how much a model call is predicted to need, and the ladder that recovers from running out.

`MemoryModel` predicts the peak bytes of untiled and tiled calls on one device (factors and budgets from
plans.TABLE) and learns from out-of-memory errors; `MemoryLadder` owns a run's memory state (the learned
scale, the tile batch, whole-image or per-tile statistics, the predictions per input shape) and answers
two questions of the Runner: how to run a call (`plan`), and what to try after one ran out (`after_oom`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import VAEConfig
from .errors import VaecliError
from .plans import run_choices


def _oom_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        types.append(torch.OutOfMemoryError)
    return tuple(types)


OOM_ERRORS = _oom_types()



@dataclass(frozen=True)
class CallPlan:
    """How one model call runs: slices of `slice` samples, tiled or not (chosen from free memory)."""

    slice: int
    tiled: bool


def estimate_peak_bytes(
    config: VAEConfig, n: int, height: int, width: int, element_size: int, op: str = "decode",
    device: str | torch.device = "cpu",
) -> int:
    """Rough peak memory of an untiled call at image size height x width (the device's `untiled_peak`
    copies of the widest full-resolution tensor: the decoder upsamples its second level's channels to
    full size)."""
    chs = config.decoder_channels if op == "decode" else config.block_out_channels
    widest = max(chs[0], chs[1] if len(chs) > 1 else chs[0])
    factor = getattr(run_choices(device).untiled_peak, op)
    return int(factor * n * height * width * widest * element_size)


def estimate_tiled_bytes(
    config: VAEConfig, op: str, n: int, height: int, width: int, element_size: int, tile: int, overlap: int,
    batch: int, whole_image_stats: bool, device: str | torch.device = "cpu",
) -> int:
    """Rough peak memory of a tiled call (tiling.py): one batch of tiles as an untiled call, the blended
    output (float32), and with whole-image statistics the tiles' full-resolution activations stored in half
    precision (widened by the overlap), plus the untiled latent-resolution trunk of the decoder.
    Not yet measured on a GPU; on a failure the ladder corrects it (MemoryModel.learn)."""
    chs = config.decoder_channels if op == "decode" else config.block_out_channels
    tile = min(tile, max(height, width))
    need = estimate_peak_bytes(config, min(batch, n), tile, tile, element_size, op, device)
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


def auto_batch_size(config: VAEConfig, height: int, width: int, dtype: torch.dtype, device: torch.device) -> int:
    """The batch for images of height x width that fits in the device's `auto_batch` share of free memory
    (at least 1, at most its batch limit)."""
    run = run_choices(device)
    per_image = estimate_peak_bytes(config, 1, height, width, torch.tensor([], dtype=dtype).element_size(),
                                    device=device)
    fits = int(run.memory.auto_batch * free_memory(device) // max(per_image, 1))
    return max(1, min(fits, run.batch_limit.most))


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


def free_cache(device: torch.device) -> None:
    """Hand the caching allocator's unused blocks back after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryModel:
    """Predicted peak memory of model calls on one device, corrected after an out-of-memory error."""

    def __init__(self, config: VAEConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.budget = run_choices(device).memory
        self.scale = {"encode": 1.0, "decode": 1.0}  # learned: true peak / estimate, at least

    def image_size(self, op: str, x: torch.Tensor) -> tuple[int, int]:
        """(height, width) in pixels of the images a call on x reads or makes."""
        f = 1 if op == "encode" else self.config.downsample_factor
        return x.shape[-2] * f, x.shape[-1] * f

    def untiled(self, op: str, n: int, h: int, w: int, elem: int) -> float:
        return self.scale[op] * estimate_peak_bytes(self.config, n, h, w, elem, op, self.device)

    def tiled(
        self, op: str, n: int, h: int, w: int, elem: int, tile: int, overlap: int, batch: int, whole: bool
    ) -> float:
        need = estimate_tiled_bytes(self.config, op, n, h, w, elem, tile, overlap, batch, whole, self.device)
        return self.scale[op] * need

    def learn(self, op: str, predicted: float, free: int) -> None:
        """A call predicted at `predicted` bytes did not fit in `free`: scale later predictions so it would
        have been put at `oom_margin` x free memory (the margin covers an error larger than this one showed)."""
        if predicted > 0:
            self.scale[op] *= max(1.0, self.budget.oom_margin * free / predicted)

    def free(self) -> int:
        return free_memory(self.device)  # looked up at call time: tests patch it

    def capacity(self) -> int:
        return memory_capacity(self.device)

    def budget_bytes(self) -> float:
        """What one call may be predicted to take: the device's `call` share of free memory."""
        return self.budget.call * self.free()


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class MemoryLadder:
    """A run's memory decisions: slices and tiling predicted before a call, and after an out-of-memory
    error the next attempt. Owns what those decisions change for the rest of the run: the model's learned
    scale, the tile batch, and whether tiles share whole-image statistics (one tile's memory when not).

    tiling "on": tiled; "auto": tiled when one sample would not fit in the call budget; "off": untiled
    unless one sample could never fit (more than the device holds), which would only fail after a long wait.
    """

    def __init__(self, model: MemoryModel, tiling: str, tile_size: int, tile_overlap: int, tile_batch: int) -> None:
        self.model = model
        self.tiling, self.tile_size, self.tile_overlap = tiling, tile_size, tile_overlap
        self.tile_batch = tile_batch  # tiles per model call; lowered when they do not fit
        # Tiles share whole-image statistics unless even one tile per call ran out of memory: then each tile
        # is normalized by itself (memory of one tile, possible tone shifts), and the run says so.
        self.whole_image_stats = True
        self._plans: dict[tuple[str, tuple[int, ...], torch.dtype], CallPlan] = {}

    def plan(self, op: str, x: torch.Tensor, n: int, events: list[str]) -> CallPlan:
        """Slices (of at most n samples) and tiling for a call on x, predicted from free memory. Untiled
        batches are sliced to what fits (same results, computed in parts). When the prediction changes what
        was asked, `events` says so, once per input shape while it stays the same."""
        key = (op, tuple(x.shape), x.dtype)
        said: list[str] = []
        plan = self._predict(op, x, n, said)
        if self._plans.get(key) != plan:
            events += said
            self._plans[key] = plan
        return plan

    def _predict(self, op: str, x: torch.Tensor, size: int, events: list[str]) -> CallPlan:
        m = self.model
        h, w = m.image_size(op, x)
        elem = x.element_size()
        if self.tiling == "on":
            size, changes = self._fit_tiles(op, size, h, w, elem)
            events += [f"tiling: {'; '.join(changes)}"] if changes else []
            return CallPlan(size, True)
        one = m.untiled(op, 1, h, w, elem)
        limit = m.capacity() if self.tiling == "off" else m.budget_bytes()
        what = f"an untiled {op} of {w}x{h}"
        if one > limit:
            where = "the device holds" if self.tiling == "off" else f"{m.budget.call:.0%} of free memory"
            size, changes = self._fit_tiles(op, size, h, w, elem)
            changes.insert(0, f"tiled ({self.tile_size} px tiles)")
            events.append(f"predicted {gb(one)} for {what}, above {where} ({gb(limit)}): {'; '.join(changes)}")
            return CallPlan(size, True)
        fits = max(1, int(m.budget_bytes() // one))
        if fits < size:
            events.append(f"predicted {gb(one)} per image for {what}: batch run in slices of {fits}")
            size = fits
        return CallPlan(size, False)

    def _fit_tiles(
        self, op: str, n: int, h: int, w: int, elem: int, below: int | None = None
    ) -> tuple[int, list[str]]:
        """(images per tiled call, changes made): one image per call, fewer tiles per call, then per-tile
        statistics, until the tiled call is predicted to fit in the call budget (tile batch at most `below`
        when given). The tile settings changed stay for the rest of the run, as after an OOM."""
        budget = self.model.budget_bytes()
        changes = []
        if n > 1 and self.need(op, n, h, w, elem, True) > budget:
            n = 1
            changes.append("one image per call")
        batch = self.tile_batch if below is None else min(below, self.tile_batch)
        while batch > 1 and self.need(op, n, h, w, elem, True, batch) > budget:
            batch //= 2
        if max(batch, 1) < self.tile_batch:
            self.tile_batch = max(batch, 1)
            changes.append(f"tile batch reduced to {self.tile_batch}")
        if self.whole_image_stats and (batch < 1 or self.need(op, n, h, w, elem, True) > budget):
            self.whole_image_stats = False
            changes.append("each tile normalized by itself (memory of one tile; tone shifts between tiles possible)")
        return n, changes

    def need(self, op: str, n: int, h: int, w: int, elem: int, tiled: bool, tile_batch: int | None = None) -> float:
        """Predicted bytes of a call on n images of h x w (with this run's tile settings when tiled)."""
        if not tiled:
            return self.model.untiled(op, n, h, w, elem)
        return self.model.tiled(
            op, n, h, w, elem, self.tile_size, self.tile_overlap, tile_batch or self.tile_batch, self.whole_image_stats
        )

    def after_oom(
        self, op: str, part: torch.Tensor, size: int, tiled: bool, first: bool, events: list[str]
    ) -> tuple[int, bool]:
        """The next (slice size, tiled) after an out-of-memory error at (size, tiled) on `part`.

        The first failure teaches the memory model how far off it was, and the next attempt is the plan it
        now predicts to fit (fewer samples per slice, tiling, fewer tiles per call, per-tile statistics), so
        one failure costs one retry; a second failure steps down one rung at a time."""
        if not first:
            return self._step_down(size, tiled, events)
        m = self.model
        h, w = m.image_size(op, part)
        elem = part.element_size()
        m.learn(op, self.need(op, size, h, w, elem, tiled), m.free())
        self._plans.clear()  # every cached prediction was made with the old estimate
        if not tiled:
            fits = min(size - 1, int(m.budget_bytes() // m.untiled(op, 1, h, w, elem)))
            if fits >= 1:
                events.append(f"out of memory at {size} per call: predicted to fit {fits}, run in slices of {fits}")
                return fits, False
        # The same tiled call would fail again: at least one tile fewer per call, unless it held several images.
        below = self.tile_batch // 2 if tiled and size == 1 else None
        changes = [] if tiled else [f"switched to tiling ({self.tile_size} px tiles)"]
        if tiled and size > 1:
            changes.append("one image per call")
        changes += self._fit_tiles(op, 1, h, w, elem, below)[1]
        if not changes:
            return self._step_down(size, tiled, events)
        where = " while tiling" if tiled else f" at {size} per call"
        events.append(f"out of memory{where}: {'; '.join(changes)}")
        return 1, True

    def _step_down(self, size: int, tiled: bool, events: list[str]) -> tuple[int, bool]:
        """One rung down the memory ladder: halve the slice; tile; halve the tile batch; per-tile statistics."""
        if size > 1:
            size = max(1, size // 2)
            events.append(f"out of memory: batch halved to {size}")
        elif not tiled:
            tiled = True
            events.append(f"out of memory at batch 1: switched to tiling ({self.tile_size} px tiles)")
        elif self.tile_batch > 1:
            self.tile_batch //= 2
            events.append(f"out of memory while tiling: tile batch halved to {self.tile_batch}")
        elif self.whole_image_stats:
            self.whole_image_stats = False
            events.append(
                "out of memory while tiling with whole-image statistics: each tile now normalized "
                "by itself (memory of one tile; tone shifts between tiles possible)"
            )
        else:
            raise VaecliError("out of memory even for one tile: use a smaller --tile-size, or --device cpu")
        return size, tiled
