"""Triton kernels against their torch references, run by Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before the kernel modules are imported), and their fallbacks."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

pytest.importorskip("triton", reason="Triton wheels exist for Linux only; CI runs these tests there")

from vaecli import kernels  # noqa: E402
from vaecli.kernels import groupnorm_silu as gn  # noqa: E402
from vaecli.kernels import upsample_conv as uc  # noqa: E402
from vaecli.plans import run_choices  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU = run_choices("cpu").triton.blocks  # what CPU tensors (Triton's interpreter) get from plans.TABLE


def _input(shape, dtype, layout, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + offset).to(dtype).contiguous(memory_format=LAYOUTS[layout])


@pytest.fixture
def small_chunks():
    """Tiny blocks and chunks: every group is split over several programs (the split reduction runs)."""
    return replace(CPU, norm_block=32, norm_chunk=64, norm_tile=128)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_matches_reference(layout, dtype, small_chunks):
    # 24 channels (not a power of two: masked columns), 35 positions (masked tails), 3 channels per group;
    # the small chunks split each group over several programs
    x = _input((1, 24, 7, 5), dtype, layout, offset=3.0)
    w = torch.randn(24).to(dtype)
    b = torch.randn(24).to(dtype)
    assert gn.supported(x, 8, w, b)
    y = gn.group_norm(x, 8, w, b, 1e-6, True, blocks=small_chunks)
    ref = gn.reference(x, 8, w, b, 1e-6, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=LAYOUTS[layout])
    torch.testing.assert_close(y, ref, **({"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moments_are_exact_in_fp32_on_a_large_offset(layout, small_chunks):
    """Welford per lane and Chan's merge: no cancellation where E[x^2] - E[x]^2 in fp32 would lose the
    variance (mean 1000, std 0.01: the naive formula's error would be ~1e2 times the variance)."""
    x = (1000.0 + 0.01 * torch.randn(1, 16, 9, 12, generator=torch.Generator().manual_seed(1)))
    x = x.contiguous(memory_format=LAYOUTS[layout])
    count, mean, m2 = gn.moments(x, 4, blocks=small_chunks)
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
        y = gn.apply(x, mean, rstd, weight, bias, silu, blocks=CPU)
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
    torch.testing.assert_close(gn.group_norm(wide, 4, w, b, 1e-6, True, blocks=CPU),
                               gn.reference(wide, 4, w, b, 1e-6, True))
    # Autograd recording through the weights: kernels have no backward; gradients flow through the reference.
    wg = w.clone().requires_grad_()
    y = gn.group_norm(x, 4, wg, b, 1e-6, True, blocks=CPU)
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
    assert torch.equal(gn.group_norm(x, 4, w, b, 1e-6, True, blocks=CPU), ref)


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
    for form in (uc.subpixel, uc.transposed, partial(uc.fused, blocks=CPU)):
        y = form(x, w, b)
        assert y.shape == (1, 24, 6, 10) and y.dtype == dtype
        assert y.is_contiguous(memory_format=LAYOUTS[layout]), form
        torch.testing.assert_close(y.float(), ref, **tol)


def test_upsample_kernel_fallbacks_and_gradients(monkeypatch):
    x = _input((1, 8, 4, 4), torch.float32, "nchw")
    w, b = torch.randn(8, 8, 3, 3) * 0.2, torch.randn(8)
    monkeypatch.setattr(uc, "_phase_conv", None)  # would fail if launched
    assert not uc.supported(x, w, b)  # under 16 channels: tl.dot's minimum tile
    assert torch.equal(uc.fused(x, w, b, blocks=CPU), uc.reference(x, w, b))
    # The torch forms are differentiable through the folded weights (training with a fast plan).
    wg = w.clone().requires_grad_()
    grads = []
    for form in (uc.reference, uc.subpixel, uc.transposed):
        wg.grad = None
        form(x, wg, b).square().sum().backward()
        grads.append(wg.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-4, rtol=1e-5)


class _Launches:
    """Stands in for a Triton kernel: records each launch grid, runs nothing."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 256, 1024, 1024), (1, 128, 8192, 8192), (64, 512, 512, 512)])
def test_launch_grids_fit_cuda_limits(monkeypatch, layout, shape):
    """CUDA caps grid axes y and z at 65535 programs (x at 2^31 - 1): SD's decoder at 1024^2 in NHWC once
    asked for 65536 on y ('invalid argument' on an H100). Meta tensors: the launch arithmetic of large
    images runs here without memory or a GPU."""
    grids = []
    for name in ("_moments_nchw", "_moments_nhwc", "_finalize", "_apply_nchw", "_apply_nhwc"):
        monkeypatch.setattr(gn, name, _Launches(grids))
    monkeypatch.setattr(uc, "_phase_conv", _Launches(grids))
    monkeypatch.setattr(uc, "supported", lambda *a: True)
    x = torch.empty(shape, device="meta", dtype=torch.bfloat16).contiguous(memory_format=LAYOUTS[layout])
    c = shape[1]
    for blocks in (run_choices(x.device).triton.blocks, run_choices("cuda").triton.blocks):  # any device's sizes
        _, mean, _, rstd = gn._moments(x, 32, 1e-6, blocks)
        gn._apply(x, mean, rstd, torch.empty(c, device="meta"), torch.empty(c, device="meta"), True, blocks)
        uc.fused(x, torch.empty(c, c, 3, 3, device="meta", dtype=torch.bfloat16), None, blocks=blocks)
    assert len(grids) == 8
    for grid in grids:
        assert 1 <= grid[0] < 2**31 and all(1 <= g <= 65535 for g in grid[1:]), grid


COMPILE_FOR_GPU = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vaecli.kernels import groupnorm_silu as gn, upsample_conv as uc

def sig(names, types):
    return dict(zip(names.split(), types))

apply_sig = sig("x_ptr y_ptr mean_ptr rstd_ptr w_ptr b_ptr hw C cg G NB",
                ["*bf16", "*bf16", "*fp32", "*fp32", "*bf16", "*bf16", "i32", "i32", "i32", "i32", "i32"])
conv_sig = sig("x_ptr k_ptr b_ptr y_ptr M H W Ci Co sxn sxc sxh sxw syn syc syh syw",
               ["*bf16"] * 4 + ["i32"] * 5 + ["i64"] * 8)
flags = dict(HAS_W=True, HAS_B=True, SILU=True)
cases = [
    (gn._moments_nchw, {"x_ptr": "*bf16", "part_ptr": "*fp32", "length": "i32", "span": "i32", "S": "i32"},
     dict(BLOCK=1024)),
    (gn._moments_nhwc, {"x_ptr": "*bf16", "part_ptr": "*fp32", "hw": "i32", "C": "i32", "rows_per": "i32", "S": "i32"},
     dict(ROWS=8, COLS=512)),
    (gn._finalize, sig("part_ptr out_ptr G pieces plane s_n s_g s_chunk per_chunk eps",
                       ["*fp32", "*fp32"] + ["i32"] * 7 + ["fp32"]), dict(BLOCK=256)),
    (gn._apply_nchw, apply_sig, dict(BLOCK=1024, **flags)),
    (gn._apply_nhwc, apply_sig, dict(ROWS=8, COLS=512, **flags)),
    (uc._phase_conv, conv_sig, dict(HAS_BIAS=True, BM=64, BN=64, BK=32, PRECISION=None, UPCAST=False)),
]
for fn, signature, constants in cases:
    signature = {**signature, **{k: "constexpr" for k in constants}}
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm.get("cubin") or compiled.asm.get("ptx"), fn
    print("compiled", fn.__name__)
"""


def test_kernels_compile_for_a_hopper_gpu_without_one():
    """The interpreter does not type-check like Triton's compiler: compile every kernel for sm_90 (Triton's
    bundled ptxas, no GPU needed), in a process where the interpreter is off."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled ") == 6
