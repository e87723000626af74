"""Tiled encode and decode with whole-image GroupNorm statistics, so tiles show no seams or tone shifts.

Why tiles differ from the untiled run in other tools: GroupNorm normalizes with the mean and variance of
the tensor it sees, so each tile normalizes by its own content (dark tile, bright tile: different tones).
Here every tile is normalized with the statistics of the whole image instead:

1. The global parts of the network run untiled at latent resolution, where they are small: the decoder's
   conv_in and mid block (self-attention over all positions), the encoder's mid block and output head.
2. The local, convolution-only part (encoder down blocks; decoder up blocks and output) runs per tile.
   A first pass runs small windows spread evenly over the image as one batch and pools, at every
   GroupNorm, the statistics of their interiors per image: estimates of the whole image's statistics.
   The second pass runs every tile normalized with exactly those statistics, so all tiles agree.
3. Tiles overlap and are blended with precomputed linear ramps (`out += y * w`, `norm += w`, divide once).

Grids are laid out in latent cells, so encoder tiles start on multiples of the downsample factor and see
the same stride-2 sampling grid as the untiled run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .model import AutoencoderKL, GroupNorm

# The statistics pass runs windows covering about this fraction of the image (more: better estimates,
# more time and memory), and each blending batch holds at most about this fraction of the image's pixels
# (memory of a tiled call stays a small fraction of an untiled one).
STATS_AREA = 0.10
BATCH_AREA = 0.12


@dataclass(frozen=True)
class Grid:
    """Tile origins along one axis, in latent cells; every tile has the same `size`."""

    starts: tuple[int, ...]
    size: int
    length: int

    @classmethod
    def fit(cls, length: int, tile: int, overlap: int) -> "Grid":
        """The fewest equal tiles of at most `tile` cells covering `length` with at least `overlap` shared."""
        if length <= tile:
            return cls((0,), length, length)
        overlap = min(overlap, tile - 1)
        n = math.ceil((length - overlap) / (tile - overlap))
        size = min(tile, math.ceil((length + (n - 1) * overlap) / n))  # shrink tiles to spread the overlap
        starts = tuple(round(i * (length - size) / (n - 1)) for i in range(n))
        return cls(starts, size, length)

    def ramps(self, scale: int) -> torch.Tensor:
        """(n_tiles, size*scale) blend weights: linear up and down over the parts shared with neighbours."""
        n, size = len(self.starts), self.size * scale
        w = torch.ones(n, size)
        pos = torch.arange(size, dtype=torch.float32) + 0.5
        for i, start in enumerate(self.starts):
            if i > 0:
                shared = (self.starts[i - 1] + self.size - start) * scale
                w[i] = torch.minimum(w[i], (pos / shared).clamp(max=1.0))
            if i < n - 1:
                shared = (start + self.size - self.starts[i + 1]) * scale
                w[i] = torch.minimum(w[i], ((size - pos) / shared).clamp(max=1.0))
        return w


@dataclass(frozen=True)
class Tile:
    image: int  # index in the batch
    y: int  # origin in latent cells
    x: int
    iy: int  # index in the grid
    ix: int


class WholeImageStats:
    """GroupNorm statistics pooled over tile interiors per image (record), then reused for every tile (replay).

    Keyed by norm module; each GroupNorm runs once per forward of the local part, so keys are unambiguous.
    """

    def __init__(self) -> None:
        self.table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(norm) -> (mean, rstd) (n_img, G)
        self.recording = False
        self.owners: torch.Tensor = torch.zeros(0, dtype=torch.long)  # (B,) image index of each tile
        self.boxes: list[tuple[int, int, int, int]] = []  # per tile: interior (y0, y1, x0, x1), input units
        self.input_size = (1, 1)  # spatial size of the tile input the boxes refer to
        self.images = 0

    def bind(self, owners: list[int], boxes: list[tuple[int, int, int, int]], input_size: tuple[int, int]) -> None:
        self.owners = torch.tensor(owners, dtype=torch.long)
        self.boxes, self.input_size = boxes, input_size

    def normalize(self, norm: GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.table[id(norm)] = self._measure(norm, x)
        mean, rstd = self.table[id(norm)]
        b, c = x.shape[:2]
        per = c // norm.num_groups
        owners = self.owners.to(mean.device)
        scale = rstd[owners].repeat_interleave(per, dim=1)  # (B, C)
        shift = mean[owners].repeat_interleave(per, dim=1)
        if norm.weight is not None:
            scale = scale * norm.weight.float()
        bias = -shift * scale + (norm.bias.float() if norm.bias is not None else 0.0)
        y = x.float() * scale.view(b, c, 1, 1) + bias.view(b, c, 1, 1)
        return y.to(x.dtype)

    def _measure(self, norm: GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image, per-group mean and 1/std over the tiles' interiors, accumulated in float64."""
        g = norm.num_groups
        fy = x.shape[-2] / self.input_size[0]  # this layer's resolution relative to the tile input
        fx = x.shape[-1] / self.input_size[1]
        total = torch.zeros(self.images, g, dtype=torch.float64, device=x.device)
        total_sq = torch.zeros_like(total)
        count = torch.zeros(self.images, 1, dtype=torch.float64, device=x.device)
        for b, (y0, y1, x0, x1) in enumerate(self.boxes):
            part = x[b, :, int(y0 * fy) : int(y1 * fy), int(x0 * fx) : int(x1 * fx)]
            part = part.reshape(g, -1).double()  # (G, C/G * h * w)
            owner = int(self.owners[b])
            total[owner] += part.sum(dim=1)
            total_sq[owner] += part.square().sum(dim=1)
            count[owner] += part.shape[1]
        mean = total / count
        var = (total_sq / count - mean.square()).clamp(min=0.0)
        return mean.float(), torch.rsqrt(var + norm.eps).float()


@dataclass
class TileReport:
    """What a tiled call did, for summaries and tests."""

    tiles: int = 0  # tiles run in the blending pass
    stats_tiles: int = 0  # windows run in the statistics pass
    grid: tuple[int, int] = (1, 1)
    notes: list[str] = field(default_factory=list)


def stats_windows(h: int, w: int, tile: int, overlap: int) -> tuple[int, list[tuple[int, int]], int]:
    """Windows for the statistics pass: (side, origins, halo), in latent cells.

    Half-tile windows on a stratified grid covering about STATS_AREA of the image; statistics come from each
    window's interior (a `halo` of cells at inner edges is left out: its values feel the window's border).
    """
    side = min(max(tile // 2, 2 * overlap + 4), h, w)
    k = max(1, round(STATS_AREA * h * w / (side * side)))
    ky = max(1, min(h // side or 1, round(math.sqrt(k * h / w))))
    kx = max(1, min(w // side or 1, math.ceil(k / ky)))
    origins = [
        (min(h - side, int((iy + 0.5) * h / ky - side / 2)) if h > side else 0,
         min(w - side, int((ix + 0.5) * w / kx - side / 2)) if w > side else 0)
        for iy in range(ky)
        for ix in range(kx)
    ]
    return side, [(max(0, y), max(0, x)) for y, x in origins], max(1, overlap // 2)


def _window_box(origin: int, side: int, length: int, halo: int) -> tuple[int, int]:
    lo = 0 if origin == 0 else halo
    hi = side if origin + side >= length else side - halo
    return lo, max(hi, lo + 1)


def _tiles(n: int, grid_y: Grid, grid_x: Grid) -> list[Tile]:
    return [
        Tile(img, y, x, iy, ix)
        for img in range(n)
        for iy, y in enumerate(grid_y.starts)
        for ix, x in enumerate(grid_x.starts)
    ]


def _crop(src: torch.Tensor, tiles: list[Tile], size_y: int, size_x: int, scale: int) -> torch.Tensor:
    """(len(tiles), C, size_y*scale, size_x*scale) crops of src (N, C, H, W) at the tiles' origins."""
    return torch.stack(
        [src[t.image, :, t.y * scale : (t.y + size_y) * scale, t.x * scale : (t.x + size_x) * scale] for t in tiles]
    )


def _run_tiled(
    local,
    src: torch.Tensor,
    in_scale: int,
    out_scale: int,
    out_channels: int,
    tile: int,
    overlap: int,
    batch: int,
) -> tuple[torch.Tensor, TileReport]:
    """Run `local(x, stats)` over tiles of src (N, C, h*in_scale, w*in_scale) into (N, out_channels, h*out_scale, ...).

    tile and overlap are in latent cells; in_scale/out_scale are pixels per latent cell on either side.
    """
    n = src.shape[0]
    h, w = src.shape[-2] // in_scale, src.shape[-1] // in_scale
    gy, gx = Grid.fit(h, tile, overlap), Grid.fit(w, tile, overlap)
    tiles = _tiles(n, gy, gx)
    stats = WholeImageStats()
    stats.images = n
    size_in = (gy.size * in_scale, gx.size * in_scale)

    # Pass 1: whole-image statistics from windows spread over each image, run as one batch.
    if len(tiles) == n:  # one tile per image: it is the image, so its statistics are exact
        windows, wy, wx, boxes = tiles, gy.size, gx.size, [(0, h * in_scale, 0, w * in_scale)] * n
    else:
        side, origins, halo = stats_windows(h, w, tile, overlap)
        windows, wy, wx, boxes = [Tile(img, y, x, 0, 0) for img in range(n) for y, x in origins], side, side, []
        for t in windows:
            y0, y1 = _window_box(t.y, side, h, halo)
            x0, x1 = _window_box(t.x, side, w, halo)
            boxes.append((y0 * in_scale, y1 * in_scale, x0 * in_scale, x1 * in_scale))
    stats.recording = True
    stats.bind([t.image for t in windows], boxes, (wy * in_scale, wx * in_scale))
    local(_crop(src, windows, wy, wx, in_scale), stats)
    stats.recording = False
    # Tiles of equal size from every image share batches, as many as BATCH_AREA of one image allows.
    batch = max(1, min(batch, int(BATCH_AREA * h * w / (gy.size * gx.size))))

    # Pass 2: every tile with those statistics, blended into the output.
    out = None
    norm = torch.zeros(1, 1, h * out_scale, w * out_scale, device=src.device)
    ramp_y, ramp_x = gy.ramps(out_scale).to(src.device), gx.ramps(out_scale).to(src.device)
    for i in range(0, len(tiles), batch):
        part = tiles[i : i + batch]
        stats.bind([t.image for t in part], [], size_in)
        y = local(_crop(src, part, gy.size, gx.size, in_scale), stats).float()
        if out is None:
            out = torch.zeros(n, out_channels, h * out_scale, w * out_scale, device=src.device)
        for t, yt in zip(part, y):
            wt = ramp_y[t.iy].view(-1, 1) * ramp_x[t.ix].view(1, -1)  # (ty, tx)
            ys, xs = t.y * out_scale, t.x * out_scale
            region = (slice(ys, ys + yt.shape[-2]), slice(xs, xs + yt.shape[-1]))
            out[t.image, :, region[0], region[1]] += yt * wt
            if t.image == 0:
                norm[0, 0, region[0], region[1]] += wt
    assert out is not None
    report = TileReport(len(tiles), len(windows), (len(gy.starts), len(gx.starts)))
    return out / norm, report


def tiled_encode_moments(
    model: AutoencoderKL, x: torch.Tensor, tile_px: int, overlap_px: int, batch: int = 4
) -> tuple[torch.Tensor, TileReport]:
    """Image (N, C, H, W) in [-1, 1], H and W multiples of the downsample factor -> moments, tile by tile."""
    f = model.config.downsample_factor
    tile, overlap = max(1, tile_px // f), max(0, overlap_px // f)
    enc = model.encoder
    channels = model.config.block_out_channels[-1]
    feats, report = _run_tiled(
        lambda t, s: enc.features(t, stats=s), x, f, 1, channels, tile, overlap, batch
    )
    moments = enc.head(feats.to(x.dtype).contiguous(memory_format=_layout(x)))
    if model.quant_conv is not None:
        moments = model.quant_conv(moments)
    return moments, report


def tiled_decode(
    model: AutoencoderKL, z: torch.Tensor, tile_px: int, overlap_px: int, batch: int = 4
) -> tuple[torch.Tensor, TileReport]:
    """Raw latents (N, c, h, w) -> image (N, C, h*f, w*f), the upsampling part tile by tile."""
    f = model.config.downsample_factor
    tile, overlap = max(1, tile_px // f), max(0, overlap_px // f)
    if model.post_quant_conv is not None:
        z = model.post_quant_conv(z)
    dec = model.decoder
    trunk = dec.trunk(z)
    image, report = _run_tiled(
        lambda t, s: dec.upsample(t, stats=s), trunk, 1, f, model.config.out_channels, tile, overlap, batch
    )
    return image.to(z.dtype), report


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
