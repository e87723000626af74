"""Tiled encode and decode with whole-image GroupNorm statistics, so tiles show no seams or tone shifts.

Why tiles differ from the untiled run in other tools: GroupNorm normalizes with the mean and variance of
the tensor it sees, so each tile normalizes by its own content (dark tile, bright tile: different tones).
Here every tile is normalized with the statistics of the whole image instead:

1. The global parts of the network run untiled at latent resolution, where they are small: the decoder's
   conv_in and mid block (self-attention over all positions), the encoder's mid block and output head.
2. The local, convolution-only part (encoder conv_in and down blocks; decoder up blocks and output) runs
   over all tiles in lockstep, one layer at a time. Before a GroupNorm normalizes any tile, its statistics
   are summed (float64) over the cells each tile owns; owned cells partition the image, so these are the
   statistics of the whole image (the untiled ones, up to the tiles' border effects, which the overlap keeps
   away from owned cells). Every tile then uses the same statistics.
3. Tiles overlap and are blended with precomputed linear ramps (`out += y * w`, `norm += w`, divide once).

Memory: between layers the tiles wait in half precision (fp16, or bf16 where values exceed fp16's range),
so the peak is about one half-precision copy of the widest local activation of the whole image (times the
overlap), plus one batch of tiles in compute precision: a fraction of an untiled call, which holds several
full-precision copies. Inside a resnet the first convolution's output is recomputed rather than kept for
all tiles (one extra convolution per resnet, a third less peak memory); norm-free layers run inside the
neighbouring resnet's sweeps, so the full-resolution tensors they make or take (encoder conv_in and first
downsampler, decoder last upsampler) need not be stored for all tiles (`_Lockstep.run`). Tiles run with
the caller's plan (plans.py): its memory layout, upsampling form and GroupNorm kernels, including for the
pooled statistics and for normalizing by them. Measured figures: README.md.

Grids are laid out in latent cells, so encoder tiles start on multiples of the downsample factor and see
the same stride-2 sampling grid as the untiled run.

The above is for families whose row in the family table (families.Family) has `whole_image_norms`
(AutoencoderKL, FLUX.2). Others have no statistics to share: with `global_mid_blocks` (Qwen-Image, per-position
RMS norms) the mid blocks still run untiled and only the convolutional paths are tiled; without (the tiny
autoencoders) each tile is the whole model on its crop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import torch

from . import families
from .models.kl import AutoencoderKL, DownBlock, GroupNorm, ResnetBlock, UpBlock, Upsample
from .models.qwenimage import AutoencoderKLQwenImage
from .models.tiny import AutoencoderTiny
from .plans import REFERENCE, Plan

TileableVAE = AutoencoderKL | AutoencoderTiny | AutoencoderKLQwenImage  # every family's model

# A batch of tiles (one model call) holds at most about this fraction of the image's pixels, so the
# compute-precision temporaries of a batch stay small next to the stored half-precision tiles.
BATCH_AREA = 0.05


@dataclass(frozen=True)
class Grid:
    """Tile origins along one axis, in latent cells; every tile has the same `size`."""

    starts: tuple[int, ...]
    size: int
    length: int

    @classmethod
    def fit(cls, length: int, tile: int, overlap: int) -> Grid:
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

    def owned(self, i: int) -> tuple[int, int]:
        """The cells of tile i nearer to its centre than to a neighbour's: tiles' owned ranges partition the axis."""
        lo = 0 if i == 0 else (self.starts[i - 1] + self.size - self.starts[i]) // 2
        last = i == len(self.starts) - 1
        hi = self.size if last else self.size - (self.starts[i] + self.size - self.starts[i + 1] + 1) // 2
        return lo, hi


@dataclass(frozen=True)
class Tile:
    image: int  # index in the batch
    y: int  # origin in latent cells
    x: int
    iy: int  # index in the grid
    ix: int


@dataclass
class TileReport:
    """What a tiled call did, for summaries and tests."""

    tiles: int = 0  # tiles run (all images)
    grid: tuple[int, int] = (1, 1)  # tiles per image along y and x


class WholeImageStats:
    """GroupNorm statistics shared by every tile (plans.NormStats): a table of per-image, per-group
    (mean, 1/std) per norm, handed out for a batch of tiles whose owners are bound."""

    def __init__(self) -> None:
        self.table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(norm) -> (mean, rstd), (images, G)
        self.owners = torch.zeros(0, dtype=torch.long)  # (B,) image index of each tile of the bound batch

    def bind(self, owners: list[int]) -> None:
        self.owners = torch.tensor(owners, dtype=torch.long)

    def moments(self, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        mean, rstd = self.table[id(norm)]
        owners = self.owners.to(mean.device)
        return mean[owners], rstd[owners]  # (B, G) each


class _Sums:
    """Running float64 sums of one norm's input over the tiles' owned cells, per image and group."""

    def __init__(self, images: int, groups: int, device: torch.device) -> None:
        self.total = torch.zeros(images, groups, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros_like(self.total)
        self.count = torch.zeros(images, 1, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, chunk: _Chunk, size_in: tuple[int, int], plan: Plan) -> None:
        g = self.total.shape[1]
        fy = x.shape[-2] / size_in[0]  # this layer's resolution relative to the tile input
        fx = x.shape[-1] / size_in[1]
        for b, (y0, y1, x0, x1) in enumerate(chunk.owned):
            part = x[b : b + 1, :, int(y0 * fy) : int(y1 * fy), int(x0 * fx) : int(x1 * fx)]
            # Count, mean and centred sum of squares per group of the owned cells (fp32, no cancellation;
            # the plan's kernel where it has one), combined into the image's float64 sums (sum, sum of
            # squares).
            stats = plan.moments(part, g)  # (1, G) each
            count, mean, m2 = (t.double().view(g) for t in stats)
            img = chunk.tiles[b].image
            self.total[img] += mean * count
            self.total_sq[img] += m2 + count * mean.square()
            self.count[img] += count[0]

    def mean_rstd(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean.square()).clamp(min=0.0)
        return mean.float(), torch.rsqrt(var + eps).float()


@dataclass
class _Chunk:
    """One batch of tiles (one model call at each layer) and its activation between layers."""

    tiles: list[Tile]
    owned: list[tuple[int, int, int, int]]  # per tile: owned (y0, y1, x0, x1) in tile-input units
    x: torch.Tensor | None


class _Lockstep:
    """All tiles of a batch of images, advanced layer by layer; see the module docstring."""

    def __init__(self, src: torch.Tensor, in_scale: int, tile: int, overlap: int, batch: int, plan: Plan) -> None:
        n = src.shape[0]
        self.plan = plan
        h, w = src.shape[-2] // in_scale, src.shape[-1] // in_scale
        self.src, self.scale, self.images, self.dtype = src, in_scale, n, src.dtype
        self.gy, self.gx = Grid.fit(h, tile, overlap), Grid.fit(w, tile, overlap)
        self.tiles = [
            Tile(img, y, x, iy, ix)
            for img in range(n)
            for iy, y in enumerate(self.gy.starts)
            for ix, x in enumerate(self.gx.starts)
        ]
        # Tiles of every image share batches, as many as BATCH_AREA of one image allows.
        per = max(1, min(batch, int(BATCH_AREA * h * w / (self.gy.size * self.gx.size))))
        self.size_in = (self.gy.size * in_scale, self.gx.size * in_scale)
        self.stats = WholeImageStats()
        self.batches = [self.tiles[i : i + per] for i in range(0, len(self.tiles), per)]
        self.chunks: list[_Chunk] = []  # made by start(): callers first check for the one-tile case

    def start(self) -> None:
        """Crop every tile (the lockstep keeps them all)."""
        self.chunks = [self.crop(tiles) for tiles in self.batches]

    def crop(self, tiles: list[Tile]) -> _Chunk:
        """A chunk holding the crops of `tiles` (in the plan's tile layout) and their owned boxes."""
        s, sy, sx = self.scale, self.gy.size, self.gx.size
        x = torch.stack([self.src[t.image, :, t.y * s : (t.y + sy) * s, t.x * s : (t.x + sx) * s] for t in tiles])
        x = x.contiguous(memory_format=self.plan.tile_layout)
        owned = [self.owned_box(t) for t in tiles]
        return _Chunk(tiles, owned, x)

    def owned_box(self, t: Tile) -> tuple[int, int, int, int]:
        """The cells tile t owns, (y0, y1, x0, x1) in tile-input units (pixels for the encoder's input)."""
        (y0, y1), (x0, x1), s = self.gy.owned(t.iy), self.gx.owned(t.ix), self.scale
        return y0 * s, y1 * s, x0 * s, x1 * s

    @property
    def report(self) -> TileReport:
        return TileReport(len(self.tiles), (len(self.gy.starts), len(self.gx.starts)))

    # -- one layer over every chunk ---------------------------------------------------------------------

    def inputs(self, pre: torch.nn.Module | None = None) -> Iterator[tuple[_Chunk, torch.Tensor]]:
        """Each chunk's activation in compute precision (through `pre` first, if given), one chunk at a time."""
        for c in self.chunks:
            assert c.x is not None  # a chunk's activation is dropped only after its last layer
            x = c.x.to(self.dtype)
            yield c, (x if pre is None else self.layer(pre, x))

    def pool(self, norm: GroupNorm, pairs: Iterable[tuple[_Chunk, torch.Tensor]]) -> None:
        """Sum `norm`'s input over every chunk's owned cells, then make the result its statistics."""
        sums: _Sums | None = None
        for c, t in pairs:
            sums = sums or _Sums(self.images, norm.num_groups, t.device)
            sums.add(t, c, self.size_in, self.plan)
        assert sums is not None
        self.stats.table[id(norm)] = sums.mean_rstd(norm.eps)

    def norm_act(self, norm: GroupNorm, act: str, c: _Chunk, t: torch.Tensor) -> torch.Tensor:
        self.stats.bind([t_.image for t_ in c.tiles])
        return self.plan.norm_act(norm, t, act, self.stats)

    def layer(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A norm-free layer (conv_in, down/upsampler) on x, with the plan where the layer takes one."""
        return module(x, self.plan) if isinstance(module, Upsample) else module(x)

    def run(self, modules: list[torch.nn.Module], recompute: tuple[torch.nn.Module, ...] = ()) -> None:
        """Advance every chunk through `modules` (ResnetBlocks and norm-free layers, in order).

        A norm-free layer after a resnet runs inside that resnet's last sweep (`post`: never stored at its
        input size, no extra work). One listed in `recompute` runs inside the next resnet's sweeps instead
        (`pre`: recomputed in each of its three sweeps, so only its input is ever stored): for a layer that
        enlarges the tensor (conv_in, the last upsampler), that keeps the largest tensor out of storage.
        """
        pre: torch.nn.Module | None = None
        i = 0
        while i < len(modules):
            m = modules[i]
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            if isinstance(m, ResnetBlock):
                post = nxt if nxt is not None and not isinstance(nxt, ResnetBlock) and nxt not in recompute else None
                self.step(m, pre, post)
                pre, i = None, i + (2 if post is not None else 1)
            elif pre is None and m in recompute and isinstance(nxt, ResnetBlock):
                pre, i = m, i + 1
            else:
                self.step(m, pre)
                pre, i = None, i + 1
        if pre is not None:
            self.step(pre)

    def step(
        self, module: torch.nn.Module, pre: torch.nn.Module | None = None, post: torch.nn.Module | None = None
    ) -> None:
        """Advance every chunk through `pre`, `module` (a ResnetBlock or a norm-free layer) and `post`."""
        if not isinstance(module, ResnetBlock):
            for c, x in self.inputs(pre):
                y = self.layer(module, x)
                c.x = _compact(y if post is None else self.layer(post, y))
            return
        r = module

        def inner(c: _Chunk, x: torch.Tensor) -> torch.Tensor:
            return r.conv1(self.norm_act(r.norm1, r.act, c, x))

        self.pool(r.norm1, self.inputs(pre))
        self.pool(r.norm2, ((c, inner(c, x)) for c, x in self.inputs(pre)))
        for c, x in self.inputs(pre):  # recompute conv1: keeping its output for every tile would raise the peak
            out = r.conv2(self.norm_act(r.norm2, r.act, c, inner(c, x)))
            out = out.add_(r.conv_shortcut(x) if r.conv_shortcut is not None else x)
            c.x = _compact(out if post is None else self.layer(post, out))


class _Blender:
    """Accumulates tile outputs with linear ramps: out += y * w, norm += w, one division at the end."""

    def __init__(self, run: _Lockstep, out_scale: int, channels: int) -> None:
        h, w = run.gy.length * out_scale, run.gx.length * out_scale
        dev = run.src.device
        self.scale = out_scale
        self.out = torch.zeros(run.images, channels, h, w, device=dev)
        self.norm = torch.zeros(1, 1, h, w, device=dev)
        self.ramp_y, self.ramp_x = run.gy.ramps(out_scale).to(dev), run.gx.ramps(out_scale).to(dev)

    def add(self, tiles: list[Tile], y: torch.Tensor) -> None:
        for t, yt in zip(tiles, y.float(), strict=True):
            wt = self.ramp_y[t.iy].view(-1, 1) * self.ramp_x[t.ix].view(1, -1)  # (ty, tx)
            ys, xs = t.y * self.scale, t.x * self.scale
            rows, cols = slice(ys, ys + yt.shape[-2]), slice(xs, xs + yt.shape[-1])
            self.out[t.image, :, rows, cols] += yt * wt
            if t.image == 0:  # every image has the same grid
                self.norm[0, 0, rows, cols] += wt

    def result(self) -> torch.Tensor:
        return self.out / self.norm


def _per_tile(run: _Lockstep, local: Callable[[torch.Tensor], torch.Tensor], blend: _Blender) -> None:
    """Each batch of tiles through `local` with its own statistics, cropped one batch at a time: memory
    stays that of one batch whatever the image size, at the price of per-tile tone differences."""
    for tiles in run.batches:
        chunk = run.crop(tiles)
        assert chunk.x is not None  # a fresh crop
        blend.add(tiles, local(chunk.x))


def _grid(model: TileableVAE, src: torch.Tensor, in_scale: int, tile_px: int, overlap_px: int, batch: int,
          plan: Plan) -> _Lockstep:
    """The tiles of `src` (the model's input at `in_scale` pixels per latent cell), in latent cells."""
    f = model.config.downsample_factor
    return _Lockstep(src, in_scale, max(1, tile_px // f), max(0, overlap_px // f), batch, plan)


def _tiled_split(model: AutoencoderKLQwenImage, x: torch.Tensor, op: str, tile_px: int, overlap_px: int,
                 batch: int, plan: Plan) -> tuple[torch.Tensor, TileReport]:
    """Models whose normalization is per position (Qwen-Image's RMS norm): the global part (mid-block
    attention) runs untiled at 1/f resolution, only the convolutional paths run in overlapping tiles; no
    statistics to share, so a tile equals the untiled computation wherever the overlap covers the
    receptive field."""
    f = model.config.downsample_factor
    if op == "encode":
        run = _grid(model, x, f, tile_px, overlap_px, batch, plan)
        enc = model.encoder
        if len(run.tiles) == x.shape[0]:
            return model.encode_moments(x, plan=plan), run.report
        blend = _Blender(run, 1, model.config.block_out_channels[-1])
        _per_tile(run, lambda t: enc.features(t, plan=plan), blend)
        return model.quant_conv(enc.head(blend.result().to(x.dtype), plan=plan)), run.report
    dec = model.decoder
    trunk = dec.trunk(model.post_quant_conv(x), plan=plan)
    run = _grid(model, trunk, 1, tile_px, overlap_px, batch, plan)
    if len(run.tiles) == x.shape[0]:
        return model.decode(x, plan=plan), run.report
    blend = _Blender(run, f, model.config.out_channels)
    _per_tile(run, lambda t: dec.upsample(t, plan=plan), blend)
    return blend.result().to(x.dtype).clamp_(-1.0, 1.0), run.report


def _tiled_whole(model: TileableVAE, x: torch.Tensor, op: str, tile_px: int, overlap_px: int, batch: int,
                 plan: Plan) -> tuple[torch.Tensor, TileReport]:
    """Models without norms or global layers (AutoencoderTiny: convolutions and ReLUs only, the one GroupNorm
    of TAEF2 inside a block): each tile is the whole model on its crop, blended with the ramps."""
    f = model.config.downsample_factor
    run = _grid(model, x, f if op == "encode" else 1, tile_px, overlap_px, batch, plan)
    fn: Callable[[torch.Tensor], torch.Tensor] = (
        (lambda t: model.encode_moments(t, plan=plan)) if op == "encode" else (lambda t: model.decode(t, plan=plan)))
    if len(run.tiles) == x.shape[0]:
        return fn(x), run.report
    channels = 2 * model.config.latent_channels if op == "encode" else model.config.out_channels
    blend = _Blender(run, 1 if op == "encode" else f, channels)
    _per_tile(run, fn, blend)
    return blend.result().to(x.dtype), run.report


def _shared_statistics(model: TileableVAE) -> AutoencoderKL | None:
    """`model` when its family's row says its GroupNorms need whole-image statistics (AutoencoderKL's
    structure, FLUX.2's included: the lockstep below); None for families whose tiles run on their own."""
    row = families.of_config(model.config)
    return cast(AutoencoderKL, model) if row.whole_image_norms else None


def _tiled_per_position(model: TileableVAE, x: torch.Tensor, op: str, tile_px: int, overlap_px: int, batch: int,
                        plan: Plan) -> tuple[torch.Tensor, TileReport]:
    """Families without whole-image statistics, as their row says: mid blocks untiled when they are global
    (Qwen-Image), else the whole model per tile (tiny)."""
    if families.of_config(model.config).global_mid_blocks:
        split = cast(AutoencoderKLQwenImage, model)  # per-position norms around global mid blocks
        return _tiled_split(split, x, op, tile_px, overlap_px, batch, plan)
    return _tiled_whole(model, x, op, tile_px, overlap_px, batch, plan)


def tiled_encode_moments(
    model: TileableVAE, x: torch.Tensor, tile_px: int, overlap_px: int, batch: int = 4,
    whole_image_stats: bool = True, plan: Plan = REFERENCE,
) -> tuple[torch.Tensor, TileReport]:
    """Image (N, C, H, W) in [-1, 1], H and W multiples of the downsample factor -> moments, tile by tile.

    whole_image_stats=False normalizes each tile by itself (the usual method: bounded memory, visible tone
    shifts); the pipeline falls back to it only when the lockstep runs out of memory. plan: how the
    layers run (plans.py), for every tile and for the statistics. How tiles run is the model family's
    (families.Family.whole_image_norms, global_mid_blocks).
    """
    kl = _shared_statistics(model)
    if kl is None:
        return _tiled_per_position(model, x, "encode", tile_px, overlap_px, batch, plan)
    run = _grid(kl, x, kl.config.downsample_factor, tile_px, overlap_px, batch, plan)
    if len(run.tiles) == x.shape[0]:  # one tile per image covers it: that is the untiled computation
        return kl.encode_moments(x, plan=plan), run.report
    enc = kl.encoder
    blend = _Blender(run, 1, kl.config.block_out_channels[-1])
    if whole_image_stats:
        modules: list[torch.nn.Module] = [enc.conv_in]
        for down in cast(Iterable[DownBlock], enc.down_blocks):
            modules += [*down.resnets, *(down.downsamplers or [])]
        run.start()
        run.run(modules, (enc.conv_in,))  # conv_in is cheap to recompute; its output would be the largest stored
        for c in run.chunks:
            assert c.x is not None  # every chunk ran through the modules
            blend.add(c.tiles, c.x)
            c.x = None
    else:
        _per_tile(run, lambda t: enc.features(t, plan=plan), blend)
    moments = enc.head(blend.result().to(x.dtype).contiguous(memory_format=plan.layout), plan=plan)
    if kl.quant_conv is not None:
        moments = kl.quant_conv(moments)
    return moments, run.report


def tiled_decode(
    model: TileableVAE, z: torch.Tensor, tile_px: int, overlap_px: int, batch: int = 4,
    whole_image_stats: bool = True, plan: Plan = REFERENCE,
) -> tuple[torch.Tensor, TileReport]:
    """Raw latents (N, c, h, w) -> image (N, C, h*f, w*f), the upsampling part tile by tile
    (whole_image_stats and plan: as in tiled_encode_moments)."""
    kl = _shared_statistics(model)
    if kl is None:
        return _tiled_per_position(model, z, "decode", tile_px, overlap_px, batch, plan)
    f = kl.config.downsample_factor
    z = z.contiguous(memory_format=plan.layout)
    if kl.post_quant_conv is not None:
        z = kl.post_quant_conv(z)
    dec = kl.decoder
    trunk = dec.trunk(z, plan=plan)
    run = _grid(kl, trunk, 1, tile_px, overlap_px, batch, plan)
    if len(run.tiles) == z.shape[0]:  # one tile per image covers it: that is the untiled computation
        return dec.upsample(trunk, plan=plan), run.report
    blend = _Blender(run, f, kl.config.out_channels)
    if not whole_image_stats:
        _per_tile(run, lambda t: dec.upsample(t, plan=plan), blend)
        return blend.result().to(z.dtype), run.report
    run.start()
    modules: list[torch.nn.Module] = []
    ups: list[torch.nn.Module] = []
    for up in cast(Iterable[UpBlock], dec.up_blocks):
        modules += [*up.resnets, *(up.upsamplers or [])]
        ups += [*(up.upsamplers or [])]
    # The last upsampler's output (full resolution, before the channel count drops) would be the largest
    # stored tensor: recompute it inside the next resnet instead (two extra convolutions).
    run.run(modules, tuple(ups[-1:]))
    last = dec.conv_norm_out
    run.pool(last, run.inputs())
    for c, x in run.inputs():
        blend.add(c.tiles, dec.conv_out(run.norm_act(last, "silu", c, x)))  # SiLU whatever act_fn says
        c.x = None
    return blend.result().to(z.dtype), run.report


def _compact(x: torch.Tensor) -> torch.Tensor:
    """Half-size storage between layers: fp16 (11-bit mantissa, ~5e-4 relative) where values fit in its
    range, else bf16. Statistics are pooled from the stored values, so a tile is normalized with the
    statistics of exactly the values it normalizes."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x
    if x.abs().amax() < 6e4:
        return x.to(torch.float16)
    return x.to(torch.bfloat16)

