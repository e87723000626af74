"""Triton kernels against their torch references, run by Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before the kernel modules are imported), and their fallbacks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton wheels exist for Linux only; CI runs these tests there")

from vaecli import kernels  # noqa: E402
from vaecli.kernels import groupnorm_silu as gn  # noqa: E402
from vaecli.kernels import upsample_conv as uc  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _input(shape, dtype, layout, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + offset).to(dtype).contiguous(memory_format=LAYOUTS[layout])


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny blocks and chunks: every group is split over several programs (the split reduction runs)."""
    monkeypatch.setattr(gn, "BLOCK", 32)
    monkeypatch.setattr(gn, "CHUNK", 64)
    monkeypatch.setattr(gn, "TILE", 128)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_matches_reference(layout, dtype, small_chunks):
    # 24 channels (not a power of two: masked columns), 35 positions (masked tails), 3 channels per group;
    # the small chunks split each group over several programs
    x = _input((1, 24, 7, 5), dtype, layout, offset=3.0)
    w = torch.randn(24).to(dtype)
    b = torch.randn(24).to(dtype)
    assert gn.supported(x, 8, w, b)
    y = gn.group_norm(x, 8, w, b, 1e-6, True)
    ref = gn.reference(x, 8, w, b, 1e-6, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=LAYOUTS[layout])
    torch.testing.assert_close(y, ref, **({"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moments_are_exact_in_fp32_on_a_large_offset(layout, small_chunks):
    """Welford per lane and Chan's merge: no cancellation where E[x^2] - E[x]^2 in fp32 would lose the
    variance (mean 1000, std 0.01: the naive formula's error would be ~1e2 times the variance)."""
    x = (1000.0 + 0.01 * torch.randn(1, 16, 9, 12, generator=torch.Generator().manual_seed(1)))
    x = x.contiguous(memory_format=LAYOUTS[layout])
    count, mean, m2 = gn.moments(x, 4)
    g = x.double().reshape(1, 4, -1)
    exact_mean = g.mean(2)
    exact_m2 = (g - exact_mean.unsqueeze(2)).square().sum(2)
    assert torch.equal(count, torch.full((1, 4), 4.0 * 9 * 12))
    torch.testing.assert_close(mean.double(), exact_mean, atol=1e-4, rtol=0)  # fp32 spacing at 1000 is 6e-5
    torch.testing.assert_close(m2.double(), exact_m2, rtol=2e-3, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_apply_with_given_statistics(layout, dtype):
    x = _input((2, 16, 3, 5), dtype, layout)
    mean = torch.randn(2, 4)
    rstd = torch.rand(2, 4) + 0.5
    w, b = torch.randn(16).to(dtype), torch.randn(16).to(dtype)
    for weight, bias, silu in ((w, b, True), (None, None, False)):
        y = gn.apply(x, mean, rstd, weight, bias, silu)
        ref = gn.apply_reference(x, mean, rstd, weight, bias, silu)
        assert y.is_contiguous(memory_format=LAYOUTS[layout])
        torch.testing.assert_close(y, ref, **({"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {}))


def test_group_norm_falls_back_to_the_reference(monkeypatch):
    x = _input((1, 16, 6, 6), torch.float32, "nchw")
    w, b = torch.randn(16), torch.randn(16)
    ref = gn.reference(x, 4, w, b, 1e-6, True)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel must not run here")

    monkeypatch.setattr(gn, "_moments", no_kernel)
    # Strided (neither NCHW- nor NHWC-dense) input: the kernels take no such layout.
    wide = _input((1, 16, 6, 12), torch.float32, "nchw")[..., ::2]
    assert not gn.supported(wide, 4, w, b)
    torch.testing.assert_close(gn.group_norm(wide, 4, w, b, 1e-6, True), gn.reference(wide, 4, w, b, 1e-6, True))
    # Autograd recording through the weights: kernels have no backward; gradients flow through the reference.
    wg = w.clone().requires_grad_()
    y = gn.group_norm(x, 4, wg, b, 1e-6, True)
    y.sum().backward()
    assert wg.grad is not None and torch.equal(y.detach(), ref)
    # Being traced by torch.compile/export: the reference ops, for inductor to fuse.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not gn.supported(x, 4, w, b)
    monkeypatch.undo()
    # A CPU without Triton's interpreter (every production CPU run).
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(gn, "_moments", no_kernel)
    assert not gn.supported(x, 4, w, b)
    assert torch.equal(gn.group_norm(x, 4, w, b, 1e-6, True), ref)


def test_devices_without_a_triton_backend():
    assert not kernels.device_ok(torch.empty(2, device="meta"))  # stands in for MPS/XPU: no backend
    assert not kernels.device_ok(torch.empty(2, dtype=torch.int32))  # dtype
    assert kernels.capability_ok((7, 0), torch.float16) and not kernels.capability_ok((6, 1), torch.float16)
    assert kernels.capability_ok((8, 0), torch.bfloat16) and not kernels.capability_ok((7, 5), torch.bfloat16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_forms_match_nearest_then_conv(layout, dtype):
    x = _input((1, 16, 3, 5), dtype, layout)
    w = (torch.randn(24, 16, 3, 3, generator=torch.Generator().manual_seed(2)) * 0.2).to(dtype)
    b = torch.randn(24).to(dtype)
    ref = uc.reference(x.float(), w.float(), b.float())  # fp32 on the same rounded inputs
    assert uc.supported(x, w, b)
    # The forms sum folded weights (rounded once to the dtype): half precision differs by a few ulps.
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    for form in (uc.subpixel, uc.transposed, uc.fused):
        y = form(x, w, b)
        assert y.shape == (1, 24, 6, 10) and y.dtype == dtype
        assert y.is_contiguous(memory_format=LAYOUTS[layout]), form.__name__
        torch.testing.assert_close(y.float(), ref, **tol)


def test_upsample_kernel_fallbacks_and_gradients(monkeypatch):
    x = _input((1, 8, 4, 4), torch.float32, "nchw")
    w, b = torch.randn(8, 8, 3, 3) * 0.2, torch.randn(8)
    monkeypatch.setattr(uc, "_phase_conv", None)  # would fail if launched
    assert not uc.supported(x, w, b)  # under 16 channels: tl.dot's minimum tile
    assert torch.equal(uc.fused(x, w, b), uc.reference(x, w, b))
    # The torch forms are differentiable through the folded weights (training with a fast plan).
    wg = w.clone().requires_grad_()
    grads = []
    for form in (uc.reference, uc.subpixel, uc.transposed):
        wg.grad = None
        form(x, wg, b).square().sum().backward()
        grads.append(wg.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-4, rtol=1e-5)
