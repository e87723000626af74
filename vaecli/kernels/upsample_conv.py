"""Nearest-neighbour x2 upsampling followed by a 3x3 convolution (padding 1), in four forms.

After nearest x2, output pixel (2i+a, 2j+b) sees only a 2x2 neighbourhood of input pixels, with the 3x3
weights summed over the taps that land on the same input pixel. Along one axis, phase a=0 reads input
offsets (-1, 0) with taps (w0, w1 + w2) and phase a=1 reads (0, +1) with taps (w0 + w1, w2). So the layer
is four 2x2 convolutions, one per output phase: 4/9 of the multiply-adds, no 4x larger intermediate,
the same values up to the rounding of sums.

- `reference`: diffusers' sequence, F.interpolate + conv2d (bit-identical to diffusers).
- `subpixel`: one 2x2 conv with 4x the output channels, then four strided copies into the output.
- `transposed`: the same as a 4x4 stride-2 transposed convolution (padding 1); one library call, no copies.
- `fused`: a Triton kernel computing the four phase convolutions as implicit GEMMs and writing each
  output pixel once (`supported` says where it can run; the others run anywhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Blocks, triton_installed, usable

# -- the plain-torch forms -------------------------------------------------------------------------------


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.interpolate(nearest, x2) then conv2d(padding 1), as diffusers' Upsample2D."""
    if not x.is_contiguous() and (x.shape[0] >= 64 or x.numel() * 4 > 2**31):
        x = x.contiguous()  # aten's channels_last nearest kernel fails past 2**31 output elements (as diffusers)
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def subpixel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One conv with the four phases' 2x2 kernels stacked as output channels, interleaved by four copies."""
    n, _, h, w = x.shape
    cout = weight.shape[0]
    k = folded(weight, "phases").reshape(4 * cout, weight.shape[1], 2, 2)  # (a*2+b)*Co + co
    k = k.contiguous(memory_format=_layout_of(x))
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), k, bias.repeat(4) if bias is not None else None)  # (N, 4*Co, h+1, w+1)
    y = y.view(n, 2, 2, cout, h + 1, w + 1)  # (N, a, b, Co, h+1, w+1)
    out = torch.empty((n, cout, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=_layout_of(x))
    grid = out.view(n, cout, h, 2, w, 2)  # (N, Co, i, a, j, b): out[.., 2i+a, 2j+b]
    for a in (0, 1):
        for b in (0, 1):
            grid[:, :, :, a, :, b] = y[:, a, b, :, a : a + h, b : b + w]
    return out


def transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv_transpose2d with a 4x4 kernel, stride 2, padding 1: output row 2i+a takes kernel rows a+1, a+3
    from input rows i, i-1 (a=0) or a, a+2 from rows i+1, i (a=1): the phase taps above."""
    k = folded(weight, "transposed").contiguous(memory_format=_layout_of(x))
    return F.conv_transpose2d(x, k, bias, stride=2, padding=1)


# -- folded weights --------------------------------------------------------------------------------------

# Along one axis: for phase a, the 3x3 taps summed into each of its two input offsets.
_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))
_FOLDED: dict[tuple, torch.Tensor] = {}  # (weight identity and version, form) -> folded weights


def folded(weight: torch.Tensor, form: str) -> torch.Tensor:
    """The 3x3 weights (Co, Ci, 3, 3) summed per phase, in fp32 then rounded once to weight's dtype:
    "phases" (a, b, Co, Ci, 2, 2) or "transposed" (Ci, Co, 4, 4). Cached per weight tensor version."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _fold(weight, form)  # differentiable, not cached
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device, form)
    if key not in _FOLDED:
        if len(_FOLDED) > 64:
            _FOLDED.clear()
        _FOLDED[key] = _fold(weight.detach(), form)
    return _FOLDED[key]


def _fold(weight: torch.Tensor, form: str) -> torch.Tensor:
    w = weight.float()
    co, ci = w.shape[:2]
    phases = torch.zeros(2, 2, co, ci, 2, 2, dtype=torch.float32, device=w.device)
    for a in (0, 1):
        for b in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    rows, cols = _TAPS[a][dy], _TAPS[b][dx]
                    phases[a, b, :, :, dy, dx] = w[:, :, list(rows)][:, :, :, list(cols)].sum(dim=(2, 3))
    if form == "phases":
        return phases.to(weight.dtype)
    # Transposed conv, stride 2, padding 1: output 2i+a gathers kernel row 2*(i - src) + a + 1 from input
    # row src; phase a's offsets (a - 1 + dy) map to kernel rows a + 1 - 2*(a - 1 + dy) = 3 - a - 2*dy.
    k = torch.zeros(ci, co, 4, 4, dtype=torch.float32, device=w.device)
    for a in (0, 1):
        for b in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    k[:, :, 3 - a - 2 * dy, 3 - b - 2 * dx] = phases[a, b, :, :, dy, dx].t()
    return k.to(weight.dtype)


def _layout_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# -- the Triton kernel -----------------------------------------------------------------------------------


def supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The fused kernel can run: see kernels.usable; any strides, 3x3 weights, at least 16 channels."""
    return (
        usable(x, weight, bias) and x.dim() == 4 and weight.shape[2:] == (3, 3) and weight.dtype == x.dtype
        and x.shape[1] == weight.shape[1] and min(weight.shape[:2]) >= 16
    )


def fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, blocks: Blocks) -> torch.Tensor:
    """The four phase convolutions in one Triton kernel when `supported`, else `reference`."""
    if not supported(x, weight, bias):
        return reference(x, weight, bias)
    n, ci, h, w = x.shape
    co = weight.shape[0]
    k = folded(weight, "phases").permute(0, 1, 4, 5, 3, 2).reshape(4, 4 * ci, co).contiguous()  # (phase, tap*Ci+ci, Co)
    out = torch.empty((n, co, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=_layout_of(x))
    bm, bn, bk = blocks.conv_tile  # plans.TABLE: the device's tiles (small under the interpreter)
    grid = (-(-(n * h * w) // bm), -(-co // bn), 4)
    # fp32 tiles: TF32 where cuDNN's convolutions use it too (torch's default), else exact products
    precision = ("tf32" if torch.backends.cudnn.allow_tf32 else "ieee") if x.dtype == torch.float32 else None
    # Triton's interpreter multiplies bf16 tiles wrongly (NumPy has no bf16): there the tiles go to fp32 first.
    upcast = x.device.type == "cpu" and x.dtype == torch.bfloat16
    _phase_conv[grid](
        x, k, bias if bias is not None else k, out, n * h * w, h, w, ci, co, *x.stride(), *out.stride(),
        HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, PRECISION=precision, UPCAST=upcast,
    )
    return out


if triton_installed():
    import triton
    import triton.language as tl

    @triton.jit
    def _phase_conv(x_ptr, k_ptr, b_ptr, y_ptr, M, H, W, Ci, Co, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # program (block of input pixels, block of output channels, phase a*2+b): an implicit GEMM
        # (pixels x 4*Ci) @ (4*Ci x Co) over the 2x2 input neighbourhood of the phase, written to out[2i+a, 2j+b]
        phase = tl.program_id(2)
        a = phase // 2
        b = phase % 2
        m = tl.program_id(0) * BM + tl.arange(0, BM)
        co = tl.program_id(1) * BN + tl.arange(0, BN)
        m_ok = m < M
        co_ok = co < Co
        j = m % W
        i = (m // W) % H
        img = (m // (W * H)).to(tl.int64)
        acc = tl.zeros((BM, BN), tl.float32)
        for tap in tl.static_range(4):
            iy = i + a - 1 + tap // 2
            ix = j + b - 1 + tap % 2
            inside = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            row = x_ptr + img * sxn + iy.to(tl.int64) * sxh + ix.to(tl.int64) * sxw
            for c0 in range(0, Ci, BK):
                c = c0 + tl.arange(0, BK)
                c_ok = c < Ci
                xa = tl.load(row[:, None] + c[None, :].to(tl.int64) * sxc, mask=inside[:, None] & c_ok[None, :],
                             other=0.0)
                kb = tl.load(k_ptr + (phase * 4 * Ci + tap * Ci + c)[:, None] * Co + co[None, :],
                             mask=c_ok[:, None] & co_ok[None, :], other=0.0)
                if UPCAST:
                    xa, kb = xa.to(tl.float32), kb.to(tl.float32)
                acc = tl.dot(xa, kb, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
        pixel = img * syn + (2 * i + a).to(tl.int64) * syh + (2 * j + b).to(tl.int64) * syw
        at = pixel[:, None] + co[None, :].to(tl.int64) * syc
        tl.store(y_ptr + at, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])
