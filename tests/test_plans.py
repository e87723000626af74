"""Execution plans: the table's completeness, the CUDA plan's bit-identity with diffusers (run on CPU
tensors), the CPU plan's accuracy, and GroupNorm on half-precision inputs without an fp32 copy."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from cli_support import ROOT
from conftest import make_tiny_model, tiny_config, twin_of
from vaecli import plans
from vaecli.errors import ConfigError
from vaecli.pipeline import Runner, RunOptions
from vaecli.plans import (
    KERNEL_OPS,
    NORMS,
    NOT_MEASURED,
    REFERENCE,
    TABLE,
    UPSAMPLES,
    Cited,
    apply_layout,
    laid_out,
    plan_for,
    run_choices,
)

NARROW = dict(block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8)
WIDE = dict(block_out_channels=[32, 256], layers_per_block=1, norm_num_groups=32)  # wide layers take CPU fast forms


def _pair(reference, dtype=torch.float32, **config):
    ref = reference(**config)
    return ref.to(dtype), twin_of(ref).to(dtype)


def _citations(row) -> list[Cited]:
    """Every Cited of a row, layer and run-level choices alike (each choice holds one)."""
    found = []
    for part in (row.layers, row.run):
        for f in dataclasses.fields(part):
            choice = getattr(part, f.name)
            found.append(choice.why)
    return found


def test_every_device_row_names_every_choice_and_its_measurement():
    fields = {"nhwc_from", "nhwc_needs_norm_kernel", "norm", "upsample", "wide_from", "tiles_nhwc", "attention",
              "kernels"}
    run = {"io_threads", "batch_limit", "untiled_peak", "memory", "heap_trim", "conv_search", "triton"}
    for device, row in TABLE.items():
        assert {f.name for f in dataclasses.fields(row.layers)} == fields, device
        assert {f.name for f in dataclasses.fields(row.run)} == run, device
        for why in _citations(row):
            # a file of this repository that measured the choice, or exactly "not measured"; and what it shows
            assert why.source == NOT_MEASURED or (ROOT / why.source).is_file(), (device, why.source)
            assert why.detail.strip(), (device, why)
        assert row.layers.norm.value in NORMS and row.layers.upsample.value in UPSAMPLES
        assert set(row.layers.kernels.value) <= set(KERNEL_OPS)
    # Kernels by default only where a GPU run measured them faster (H100, docs/performance.md).
    assert {d: row.layers.kernels.value for d, row in TABLE.items()} == {"cpu": (), "cuda": KERNEL_OPS, "mps": ()}


def test_run_level_choices_are_the_rows_values():
    """The values the run side used before they joined the table, per device (behaviour unchanged)."""
    cpu, cuda, mps, other = (run_choices(d) for d in ("cpu", "cuda:0", "mps", "xpu"))
    assert [r.batch_limit.most for r in (cpu, cuda, mps, other)] == [8, 32, 8, 8]
    assert cpu.io_threads.counts(2) == (2, 2) and cpu.io_threads.counts(16) == (4, 2)
    assert cuda.io_threads.counts(16) == (16, 8) and cuda.io_threads.counts(1) == (2, 2)
    assert cuda.io_threads.counts(64, readers=3) == (3, 8) and mps.io_threads == cuda.io_threads
    assert all((r.untiled_peak.encode, r.untiled_peak.decode) == (5.0, 7.0) for r in (cpu, cuda, mps, other))
    assert all((r.memory.call, r.memory.auto_batch, r.memory.oom_margin) == (0.8, 0.6, 1.5) for r in (cpu, cuda))
    assert [r.heap_trim.tiled_calls for r in (cpu, cuda, mps, other)] == [True, False, False, False]
    assert cuda.conv_search.min_repeats == 2 and cuda.conv_search.tiled
    assert cuda.triton.blocks.conv_tile == (64, 64, 32) and cpu.triton.blocks.conv_tile == (16, 16, 16)


def test_cuda_plan_without_triton_keeps_nchw_and_no_kernels(monkeypatch):
    """torch builds without Triton (Windows) get diffusers' layout: NHWC pays only with the norm kernel."""
    from vaecli import kernels

    cfg = tiny_config(**WIDE)
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)
    plan = plan_for("cuda", cfg)
    assert (plan.layout, plan.kernels) == (torch.contiguous_format, frozenset())
    assert plan_for("cuda", cfg, "on").kernels == frozenset(KERNEL_OPS)  # asked for: per-call fallbacks
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    assert plan_for("cuda", cfg).layout == torch.channels_last


def test_plan_for_devices_and_kernel_modes(monkeypatch):
    """The table's logic, on any machine: Triton's availability is given (it decides only whether
    `auto` keeps the kernels: test_cuda_plan_without_triton_keeps_nchw_and_no_kernels)."""
    from vaecli import kernels

    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    narrow, wide = tiny_config(**NARROW), tiny_config(**WIDE)
    cuda = plan_for("cuda", wide)
    assert (cuda.layout, cuda.norm, cuda.upsample, cuda.kernels) == (
        torch.channels_last, "native", "nearest", frozenset(KERNEL_OPS))
    assert plan_for("cuda", narrow).layout == torch.channels_last  # on CUDA with the kernels, every width
    plain = plan_for("cuda", wide, "off")
    assert (plain.layout, plain.norm, plain.upsample, plain.kernels) == (
        torch.contiguous_format, "native", "nearest", frozenset())
    assert plan_for("cpu", wide).layout == torch.channels_last
    assert plan_for("cpu", narrow).layout == torch.contiguous_format
    assert plan_for("cuda:1", wide, "on").kernels == frozenset(KERNEL_OPS)
    assert plan_for("cpu", wide, "off") is REFERENCE and plan_for("cuda", wide, "off") is REFERENCE
    assert plan_for("xpu", wide) is REFERENCE  # a device nobody measured: diffusers' sequence
    with pytest.raises(ConfigError, match="kernels mode"):
        plan_for("cpu", wide, "fast")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [NARROW, WIDE], ids=["narrow", "wide"])
def test_plan_without_kernels_is_diffusers_bit_for_bit(reference, dtype, config, device):
    """`--kernels off` on every device (the CUDA path run on CPU tensors) computes exactly diffusers'
    sequence of operations: wide models too, where the CPU default runs NHWC with transposed upsampling."""
    ref, ours = _pair(reference, dtype, **config)
    plan = plan_for(device, ours.config, "off")
    assert plan is REFERENCE
    apply_layout(ours, plan)
    x = (torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    z = torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
        mine = ours.encode(x, plan=plan)
        assert torch.equal(mine.mean, theirs.mean) and torch.equal(mine.logvar, theirs.logvar)
        assert torch.equal(ours.decode(z, plan=plan), ref.decode(z).sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_default_plan_with_kernels_matches_diffusers(reference, dtype):
    """The CUDA default (Triton kernels for GroupNorm+SiLU and upsample+conv), run on CPU tensors by Triton's
    interpreter: diffusers' results within rounding (fp32: tight; bf16: a few bf16 steps of the output)."""
    pytest.importorskip("triton", reason="Triton wheels exist for Linux only; CI runs this there")
    ref, ours = _pair(reference, dtype, **NARROW)
    plan = plan_for("cuda", ours.config)
    assert plan.kernels == frozenset(KERNEL_OPS)
    apply_layout(ours, plan)
    x = (torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    z = torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x, plan=plan).mean, ref.encode(x).latent_dist.mean, **tol)
        mine, theirs = ours.decode(z, plan=plan), ref.decode(z).sample
    torch.testing.assert_close(mine, theirs, **tol)
    assert not torch.equal(mine, theirs) or dtype == torch.float32  # the kernels ran (bf16 rounds differently)


def test_cpu_plan_narrow_bit_identical_wide_close(reference):
    for config, exact in ((NARROW, True), (WIDE, False)):
        ref, ours = _pair(reference, **config)
        plan = plan_for("cpu", ours.config)
        apply_layout(ours, plan)
        x = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
        z = torch.randn(1, 4, 4, 3, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            pairs = [(ours.encode(x, plan=plan).mean, ref.encode(x).latent_dist.mean),
                     (ours.decode(z, plan=plan), ref.decode(z).sample)]
        for mine, theirs in pairs:
            if exact:
                assert torch.equal(mine, theirs)
            else:
                torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_native_half_groupnorm_is_as_accurate_as_an_fp32_copy():
    """aten's GroupNorm accumulates fp16/bf16 statistics in fp32 (plans._group_norm cites the source), so
    normalizing the bf16/fp16 tensor directly is as accurate as normalizing an fp32 copy: within one output
    ulp of the float64 result for NCHW, on inputs with a large offset. (For NHWC, aten's CPU kernel sums x
    and x^2 in fp32, E[x^2] - E[x]^2, and loses precision on such inputs whichever the input dtype; the
    fp32 copy does not help there either.)"""
    norm = torch.nn.GroupNorm(8, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
        norm.bias.copy_(torch.randn(64))
    x = 300.0 + torch.randn(2, 64, 24, 24, generator=torch.Generator().manual_seed(4))
    exact = torch.nn.functional.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), 1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        half = norm.to(dtype)
        for layout in (torch.contiguous_format, torch.channels_last):
            xh = x.to(dtype).contiguous(memory_format=layout)
            exact_h = torch.nn.functional.group_norm(xh.double(), 8, half.weight.double(), half.bias.double(), 1e-6)
            errs = {form: (plans._group_norm(xh, half, form).double() - exact_h).abs().max().item() for form in NORMS}
            ulp = exact_h.abs().max().item() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
            assert errs["native"] <= errs["fp32"] + ulp, (dtype, layout, errs)
            if layout == torch.contiguous_format:
                assert errs["native"] <= ulp, (dtype, errs)
        norm = norm.float()
    assert exact.isfinite().all()


def test_runner_plans_layout_and_kernels(reference):
    """Runner takes the device's plan: its layout goes to the weights once; --kernels on runs the Triton
    kernels where they can (CPU: Triton's interpreter, under the tests), encode and decode, same results."""
    pytest.importorskip("triton")
    from vaecli.kernels import groupnorm_silu as gn
    from vaecli.kernels import upsample_conv as uc

    _, vae = _pair(reference, **{**NARROW, "block_out_channels": [16, 16]})
    launches = []
    for name, module in (("_moments_nchw", gn), ("_apply_nchw", gn), ("_phase_conv", uc)):
        kernel = getattr(module, name)

        class Counting:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                launches.append(self.n)
                return self.k[grid]

        setattr(module, name, Counting(kernel, name))
    try:
        x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        off = Runner(vae, RunOptions(kernels="off"))
        on = Runner(vae, RunOptions(kernels="on"))
        assert on.plan.kernels == frozenset(KERNEL_OPS) and off.plan.kernels == frozenset()
        enc_on, enc_off = on.encode(x).tensor, off.encode(x).tensor
        assert {"_moments_nchw", "_apply_nchw"} <= set(launches)  # the encoder's norms ran as kernels
        launches.clear()
        dec_on, dec_off = on.decode(enc_off).tensor, off.decode(enc_off).tensor
        assert {"_moments_nchw", "_apply_nchw", "_phase_conv"} <= set(launches)  # decoder: norms and upsampling
    finally:
        for name, module in (("_moments_nchw", gn), ("_apply_nchw", gn), ("_phase_conv", uc)):
            setattr(module, name, getattr(module, name).k)
    torch.testing.assert_close(enc_on, enc_off, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec_on, dec_off, atol=1e-4, rtol=1e-4)


def _snapshot(model: torch.nn.Module) -> dict:
    """What a caller can see of its model: tensors (identity, values, strides, dtype), module classes, mode."""
    state = model.state_dict(keep_vars=True)
    tensors = {name: (id(t), t.detach().clone(), t.stride(), t.dtype) for name, t in state.items()}
    return {"tensors": tensors, "classes": [type(m) for m in model.modules()], "training": model.training}


def _same(a: dict, b: dict) -> bool:
    if a["classes"] != b["classes"] or a["training"] != b["training"] or a["tensors"].keys() != b["tensors"].keys():
        return False
    return all(
        i == j and torch.equal(x, y) and s == t and d == e
        for (i, x, s, d), (j, y, t, e) in ((a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    )


def test_runner_never_changes_the_callers_model():
    """The CPU plan of a wide model is channels-last: the Runner runs a laid-out copy (sharing every tensor
    the layout does not touch), the caller's model keeps its parameters, strides and classes; a model
    already in the plan's layout runs as it is."""
    vae = make_tiny_model(**WIDE)  # seed 0
    before = _snapshot(vae)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    outputs = {}
    for kernels, dtype in (("auto", torch.float32), ("off", torch.float32), ("auto", torch.bfloat16)):
        runner = Runner(vae, RunOptions(kernels=kernels, dtype=dtype))
        z = runner.encode(x).tensor
        outputs[kernels, dtype] = (z, runner.decode(z).tensor)
        assert _same(before, _snapshot(vae)), (kernels, dtype)
    assert plan_for("cpu", vae.config).layout == torch.channels_last  # the case where a copy is needed
    ours = laid_out(vae, plan_for("cpu", vae.config))
    assert ours is not vae and ours.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert ours.encoder.conv_in.bias is vae.encoder.conv_in.bias  # untouched tensors are shared, not copied
    mine = apply_layout(copy.deepcopy(vae), plan_for("cpu", vae.config))  # a model of the caller's own, laid out
    assert laid_out(mine, plan_for("cpu", vae.config)) is mine and Runner(mine).model(torch.float32) is mine
    z, y = outputs["auto", torch.float32]
    assert torch.equal(Runner(mine).encode(x).tensor, z) and torch.equal(Runner(mine).decode(z).tensor, y)
    assert laid_out(vae, REFERENCE) is vae  # already diffusers' layout
