"""GroupNorm (+SiLU) with fp32 statistics for NCHW and NHWC tensors: Triton kernels and their torch reference.

Three kernels, so that large images spread over the whole GPU (a kernel per (image, group) would run 32
programs for a batch of one):
1. `_moments_*`: the tensor is cut into chunks (NCHW: S chunks of each contiguous group; NHWC: S chunks
   of rows, all channels, so every load is a whole contiguous row); each program keeps a Welford count,
   mean and centred sum of squares (M2) per lane in fp32 and merges its lanes with Chan's formula, which
   has no cancellation, unlike E[x^2] - E[x]^2;
2. `_finalize`: per (image, group), the chunks' moments merged the same way -> mean, 1/std;
3. `_apply_*`: y = (x - mean) * rstd * w + b, then SiLU, in fp32, stored in x's dtype and layout.
Statistics supplied from outside (tiling's whole-image statistics) skip 1 and 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Blocks, layout, triton_installed, usable

# -- reference -------------------------------------------------------------------------------------------


def reference(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, silu: bool
) -> torch.Tensor:
    """fp32 GroupNorm (+SiLU) of x, returned in x's dtype: what the kernels compute."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.group_norm(x.float(), groups, w, b, eps)
    return (F.silu(y) if silu else y).to(x.dtype)


def moments_reference(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (image, group) element count, mean and centred sum of squares, fp32, of x in any layout or crop.

    torch.var_mean reduces a strided view in one pass with Welford's update (no cancellation, no full-size
    temporaries: tiling calls this on crops of every tile); fp16/bf16 inputs go to fp32 one group at a
    time, so the statistics are fp32's while the copy stays a group's size."""
    g = x.unflatten(1, (groups, -1))  # (N, G, C/G, H, W): a view whatever x's strides
    if g.dtype == torch.float32:
        var, mean = torch.var_mean(g, dim=(2, 3, 4), correction=0)
    else:
        pairs = [torch.var_mean(g[:, i].float(), dim=(1, 2, 3), correction=0) for i in range(groups)]
        var, mean = torch.stack([v for v, _ in pairs], 1), torch.stack([m for _, m in pairs], 1)
    count = torch.full_like(mean, g[0, 0].numel())
    return count, mean, var * count


def apply_reference(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, silu: bool,
) -> torch.Tensor:
    """Normalize x (N, C, H, W) with given per (image, group) fp32 mean and rstd (N, G); x's dtype and layout."""
    n, c = x.shape[:2]
    per = c // mean.shape[1]
    scale = rstd.repeat_interleave(per, dim=1)  # (N, C)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.repeat_interleave(per, dim=1) * scale
    if bias is not None:
        shift = shift + bias.float()
    y = x.float() * scale.view(n, c, 1, 1) + shift.view(n, c, 1, 1)
    return (F.silu(y) if silu else y).to(x.dtype)


# -- entry points ----------------------------------------------------------------------------------------


def supported(x: torch.Tensor, groups: int, *params: torch.Tensor | None) -> bool:
    """The kernels can run on x: see kernels.usable, plus a dense NCHW/NHWC 4-D layout and whole groups."""
    return usable(x, *params) and layout(x) is not None and x.shape[1] % groups == 0


def group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, silu: bool,
    *, blocks: Blocks,
) -> torch.Tensor:
    """GroupNorm (+SiLU) of x with fp32 statistics; the kernels when `supported`, else `reference`."""
    if not supported(x, groups, weight, bias):
        return reference(x, groups, weight, bias, eps, silu)
    _, mean, _, rstd = _moments(x, groups, eps, blocks)
    return _apply(x, mean, rstd, weight, bias, silu, blocks)


def moments(x: torch.Tensor, groups: int, *, blocks: Blocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (image, group) count, mean and M2 of x, fp32 (N, G) each; the kernels when `supported`."""
    if not supported(x, groups):
        return moments_reference(x, groups)
    count, mean, m2, _ = _moments(x, groups, 0.0, blocks)
    return count, mean, m2


def apply(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, silu: bool, *, blocks: Blocks,
) -> torch.Tensor:
    """Normalize x with given statistics (N, G) fp32; the kernel when `supported`, else `apply_reference`."""
    if not supported(x, mean.shape[1], weight, bias):
        return apply_reference(x, mean, rstd, weight, bias, silu)
    return _apply(x, mean.float().contiguous(), rstd.float().contiguous(), weight, bias, silu, blocks)


# -- launching -------------------------------------------------------------------------------------------

def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _moments(x: torch.Tensor, groups: int, eps: float, blocks: Blocks) -> tuple[torch.Tensor, ...]:
    """count, mean, M2 and rstd per (image, group), each (N, G) fp32, from the moments and finalize kernels."""
    chunk, block, tile = blocks.norm_chunk, blocks.norm_block, blocks.norm_tile
    n, c, h, w = x.shape
    hw, cg = h * w, c // groups
    out = torch.empty(4, n * groups, dtype=torch.float32, device=x.device)  # count, mean, m2, rstd
    if layout(x) == "nchw":
        length = cg * hw  # one group is contiguous
        span = max(block, -(-min(chunk, length) // block) * block)
        s = -(-length // span)
        part = torch.empty(3, n * groups, s, dtype=torch.float32, device=x.device)
        _moments_nchw[(n * groups * s,)](x, part, length, span, s, BLOCK=block)
        strides = (groups * s, s, 1, 1)  # (image, group, chunk, channel-in-group) in `part`
    else:
        cols = _pow2(c)
        rows = max(1, tile // cols)
        rows_per = -(-max(rows, chunk // c) // rows) * rows
        s = -(-hw // rows_per)
        part = torch.empty(3, n, s, c, dtype=torch.float32, device=x.device)
        # 3 fp32 tiles live per program
        _moments_nhwc[(n * s,)](x, part, hw, c, rows_per, s, ROWS=rows, COLS=cols, num_warps=blocks.norm_warps)
        strides = (s * c, cg, c, cg)
    pieces = s * strides[3] if layout(x) == "nhwc" else s
    _finalize[(n * groups,)](
        part, out, groups, pieces, part[0].numel(), *strides, eps, BLOCK=min(blocks.norm_finalize, _pow2(pieces))
    )
    return tuple(out.view(4, n, groups))  # 4 x (N, G)


def _apply(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, silu: bool, blocks: Blocks,
) -> torch.Tensor:
    n, c, h, w = x.shape
    hw, groups = h * w, mean.shape[1]
    y = torch.empty_like(x)  # same layout as x
    wt = weight if weight is not None else mean  # placeholders when absent (never read)
    bs = bias if bias is not None else mean
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    if layout(x) == "nchw":
        block = blocks.norm_block
        nb = -(-hw // block)
        _apply_nchw[(n * c * nb,)](x, y, mean, rstd, wt, bs, hw, c, c // groups, groups, nb, BLOCK=block, **flags)
    else:
        cols = _pow2(c)
        rows = max(1, blocks.norm_tile // cols)
        nb = -(-hw // rows)
        _apply_nhwc[(n * nb,)](
            x, y, mean, rstd, wt, bs, hw, c, c // groups, groups, nb, ROWS=rows, COLS=cols,
            num_warps=blocks.norm_warps, **flags,
        )
    return y


# -- kernels (defined only where Triton is installed; the interpreter is chosen when this module is imported)

if triton_installed():
    import triton
    import triton.language as tl

    @triton.jit
    def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
        n = n_a + n_b
        frac = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
        delta = mean_b - mean_a
        return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac, n

    @triton.jit
    def _merge_lanes(mean, m2, cnt, AXIS: tl.constexpr):
        # Chan's formula over all lanes at once: M2 = sum M2_i + sum n_i (mean_i - mean)^2 (no cancellation)
        n = tl.sum(cnt, AXIS)
        mu = tl.sum(cnt * mean, AXIS) / tl.maximum(n, 1.0)
        d = mean - tl.expand_dims(mu, AXIS)
        return mu, tl.sum(m2, AXIS) + tl.sum(cnt * d * d, AXIS), n

    @triton.jit
    def _moments_nchw(x_ptr, part_ptr, length, span, S, BLOCK: tl.constexpr):
        # program (image*group, chunk): elements [chunk*span, +span) of a contiguous group of `length`
        ng = (tl.program_id(0) // S).to(tl.int64)
        chunk = tl.program_id(0) % S
        base = x_ptr + ng * length
        lanes = tl.arange(0, BLOCK)
        mean = tl.zeros((BLOCK,), tl.float32)
        m2 = tl.zeros((BLOCK,), tl.float32)
        cnt = tl.zeros((BLOCK,), tl.float32)
        for off in range(0, span, BLOCK):
            idx = chunk * span + off + lanes
            valid = (idx < length) & (off + lanes < span)
            v = tl.load(base + idx, mask=valid, other=0.0).to(tl.float32)
            # Welford's update per lane (written out: nested jit calls are slow in the interpreter)
            cnt += valid.to(tl.float32)
            delta = v - mean
            mean = tl.where(valid, mean + delta / tl.maximum(cnt, 1.0), mean)
            m2 = tl.where(valid, m2 + delta * (v - mean), m2)
        mean_t, m2_t, cnt_t = _merge_lanes(mean, m2, cnt, 0)
        slot = ng * S + chunk
        plane = tl.num_programs(0).to(tl.int64)  # N*G*S partials per quantity
        tl.store(part_ptr + slot, cnt_t)
        tl.store(part_ptr + plane + slot, mean_t)
        tl.store(part_ptr + 2 * plane + slot, m2_t)

    @triton.jit
    def _moments_nhwc(x_ptr, part_ptr, hw, C, rows_per, S, ROWS: tl.constexpr, COLS: tl.constexpr):
        # program (image, chunk): rows [chunk*rows_per, +rows_per) of the (hw, C) plane, moments per channel
        n = (tl.program_id(0) // S).to(tl.int64)
        chunk = tl.program_id(0) % S
        cols = tl.arange(0, COLS)
        lanes = tl.arange(0, ROWS)
        col_ok = cols < C
        base = x_ptr + n * hw * C
        mean = tl.zeros((ROWS, COLS), tl.float32)
        m2 = tl.zeros((ROWS, COLS), tl.float32)
        cnt = tl.zeros((ROWS, COLS), tl.float32)
        for off in range(0, rows_per, ROWS):
            r = chunk * rows_per + off + lanes
            valid = ((r < hw) & (off + lanes < rows_per))[:, None] & col_ok[None, :]
            v = tl.load(base + r.to(tl.int64)[:, None] * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            cnt += valid.to(tl.float32)  # Welford's update per lane, as in _moments_nchw
            delta = v - mean
            mean = tl.where(valid, mean + delta / tl.maximum(cnt, 1.0), mean)
            m2 = tl.where(valid, m2 + delta * (v - mean), m2)
        mean_c, m2_c, cnt_c = _merge_lanes(mean, m2, cnt, 0)
        slot = (n * S + chunk) * C + cols
        plane = tl.num_programs(0).to(tl.int64) * C  # N*S*C partials per quantity
        tl.store(part_ptr + slot, cnt_c, mask=col_ok)
        tl.store(part_ptr + plane + slot, mean_c, mask=col_ok)
        tl.store(part_ptr + 2 * plane + slot, m2_c, mask=col_ok)

    @triton.jit
    def _finalize(part_ptr, out_ptr, G, pieces, plane, s_n, s_g, s_chunk, per_chunk, eps, BLOCK: tl.constexpr):
        # program (image*group): merge its `pieces` partial moments; piece p is chunk p // per_chunk,
        # channel-in-group p % per_chunk (NCHW partials have one piece per chunk)
        ng = tl.program_id(0)
        base = (ng // G) * s_n + (ng % G) * s_g
        mean = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
        m2 = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
        cnt = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
        for off in range(0, pieces, BLOCK):
            p = off + tl.arange(0, BLOCK)
            ok = p < pieces
            at = base + (p // per_chunk) * s_chunk + p % per_chunk
            c_b = tl.load(part_ptr + at, mask=ok, other=0.0)
            mean_b = tl.load(part_ptr + plane + at, mask=ok, other=0.0)
            m2_b = tl.load(part_ptr + 2 * plane + at, mask=ok, other=0.0)
            mean_r, m2_r, cnt_r = _merge_lanes(mean_b, m2_b, c_b, 0)
            mean, m2, cnt = _welford_combine(mean, m2, cnt, mean_r, m2_r, cnt_r)
        total = tl.num_programs(0)
        tl.store(out_ptr + ng, cnt)
        tl.store(out_ptr + total + ng, mean)
        tl.store(out_ptr + 2 * total + ng, m2)
        tl.store(out_ptr + 3 * total + ng, 1.0 / tl.sqrt(m2 / tl.maximum(cnt, 1.0) + eps))

    @triton.jit
    def _affine(v, mean, rstd, w, b, SILU: tl.constexpr):
        scale = rstd * w
        y = v * scale + (b - mean * scale)
        if SILU:
            y = y * tl.sigmoid(y)
        return y

    @triton.jit
    def _apply_nchw(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, hw, C, cg, G, NB, BLOCK: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
        # program (image*channel, block of hw): one channel's scale and shift for the whole block
        nc = tl.program_id(0) // NB
        c = nc % C
        ng = (nc // C) * G + c // cg
        w = tl.load(w_ptr + c).to(tl.float32) if HAS_W else 1.0
        b = tl.load(b_ptr + c).to(tl.float32) if HAS_B else 0.0
        idx = (tl.program_id(0) % NB) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < hw
        at = nc.to(tl.int64) * hw + idx
        v = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        y = _affine(v, tl.load(mean_ptr + ng), tl.load(rstd_ptr + ng), w, b, SILU)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _apply_nhwc(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, hw, C, cg, G, NB, ROWS: tl.constexpr,
                    COLS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
        # program (image, block of rows): a (rows, channels) tile with per-channel statistics as vectors
        n = tl.program_id(0) // NB
        cols = tl.arange(0, COLS)
        col_ok = cols < C
        ng = n * G + cols // cg
        mean = tl.load(mean_ptr + ng, mask=col_ok, other=0.0)
        rstd = tl.load(rstd_ptr + ng, mask=col_ok, other=0.0)
        w = tl.load(w_ptr + cols, mask=col_ok, other=1.0).to(tl.float32) if HAS_W else tl.full((COLS,), 1.0, tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_B else tl.zeros((COLS,), tl.float32)
        r = (tl.program_id(0) % NB) * ROWS + tl.arange(0, ROWS)
        ok = (r < hw)[:, None] & col_ok[None, :]
        at = (n.to(tl.int64) * hw + r.to(tl.int64))[:, None] * C + cols[None, :]
        v = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        y = _affine(v, mean[None, :], rstd[None, :], w[None, :], b[None, :], SILU)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)
