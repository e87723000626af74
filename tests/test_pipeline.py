"""Runner: latent normalization, slicing, tiling, NaN retries at higher precision and OOM recovery."""

from __future__ import annotations

import pytest
import torch

from vaecli import memory
from vaecli.config import LatentSpec
from vaecli.devices import compute_dtype, precision_ladder
from vaecli.memory import estimate_peak_bytes, estimate_tiled_bytes
from vaecli.models.kl import AutoencoderKL
from vaecli.pipeline import Runner, RunOptions
from vaecli.tiling import Grid, tiled_decode, tiled_encode_moments


def image(n=2, h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def test_spec_normalize_roundtrip():
    z = torch.randn(2, 4, 3, 5)
    for spec in (
        LatentSpec(0.18215),
        LatentSpec(0.3611, 0.1159),
        LatentSpec(0.5, None, (0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 1.5)),
    ):
        torch.testing.assert_close(spec.denormalize(spec.normalize(z)), z, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(LatentSpec(0.3611, 0.1159).normalize(z), (z - 0.1159) * 0.3611)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(4, 1, 1)
    std = torch.tensor([1.0, 2.0, 0.5, 1.5]).view(4, 1, 1)
    torch.testing.assert_close(
        LatentSpec(0.5, None, (0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 1.5)).normalize(z), (z - mean) * 0.5 / std
    )


def test_runner_matches_model_and_spec(vae):
    x = image()
    runner = Runner(vae)
    spec = vae.config.latent_spec
    result = runner.encode(x, spec)
    with torch.no_grad():
        raw = vae.encode(x * 2 - 1).mode()
    torch.testing.assert_close(result.tensor, spec.normalize(raw), atol=1e-6, rtol=1e-6)
    decoded = runner.decode(result.tensor, spec).tensor
    with torch.no_grad():
        ref = ((vae.decode(raw) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(decoded, ref, atol=1e-5, rtol=1e-5)
    assert not result.failed and not result.retries and result.tiles == 0


def test_sampling_with_noise(vae):
    x = image(1)
    noise = torch.randn(1, 4, 6, 8)
    z = Runner(vae).encode(x, None, noise).tensor
    with torch.no_grad():
        post = vae.encode(x * 2 - 1)
    torch.testing.assert_close(z, post.mean + post.std * noise, atol=1e-6, rtol=1e-6)


def test_slicing_same_outputs(vae):
    """Slices give the unsliced numbers; only convolution kernels chosen per batch size may reorder sums."""
    x = image(5)
    full = Runner(vae).encode(x).tensor
    sliced = Runner(vae, RunOptions(slicing=2)).encode(x).tensor
    torch.testing.assert_close(sliced, full, atol=1e-5, rtol=0)
    one_by_one = torch.cat([Runner(vae).encode(x[i : i + 1]).tensor for i in range(5)])
    assert torch.equal(Runner(vae, RunOptions(slicing=1)).encode(x).tensor, one_by_one)
    z = torch.randn(3, 4, 5, 7)
    torch.testing.assert_close(
        Runner(vae, RunOptions(slicing=1)).decode(z).tensor, Runner(vae).decode(z).tensor, atol=1e-5, rtol=0
    )


def test_grid_covers_with_equal_tiles():
    for length, tile, overlap in [(100, 64, 8), (64, 64, 8), (65, 64, 8), (257, 64, 16), (30, 64, 8), (129, 16, 4)]:
        g = Grid.fit(length, tile, overlap)
        assert g.size <= tile and g.starts[0] == 0 and g.starts[-1] + g.size == length
        for a, b in zip(g.starts, g.starts[1:], strict=False):
            assert a + g.size - b >= min(overlap, g.size - 1)  # neighbours share at least `overlap`
        ramps = g.ramps(8)
        total = torch.zeros(length * 8)
        for start, w in zip(g.starts, ramps, strict=True):
            total[start * 8 : (start + g.size) * 8] += w
        assert (total > 0).all()


def test_owned_ranges_partition_the_axis():
    for length, tile, overlap in [(100, 64, 8), (257, 64, 16), (129, 16, 4), (40, 16, 15)]:
        g = Grid.fit(length, tile, overlap)
        covered = []
        for i, start in enumerate(g.starts):
            lo, hi = g.owned(i)
            covered.extend(range(start + lo, start + hi))
        assert covered == list(range(length))  # every cell owned by exactly one tile, in order


def test_single_tile_equals_untiled(vae):
    """A tile covering the whole image uses its exact statistics: same numbers as the untiled model."""
    x = image(2) * 2 - 1
    with torch.no_grad():
        moments, report = tiled_encode_moments(vae, x, 512, 64)
        assert report.tiles == 2  # one per image
        torch.testing.assert_close(moments, vae.encode_moments(x), atol=1e-5, rtol=1e-5)
        z = torch.randn(2, 4, 6, 8)
        y, _ = tiled_decode(vae, z, 512, 64)
        torch.testing.assert_close(y, vae.decode(z), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(96, 136), (72, 200)])
def test_tiling_runs_many_tiles_on_odd_sizes(vae, size):
    x = image(2, *size)
    runner = Runner(vae, RunOptions(tiling="on", tile_size=32, tile_overlap=16))
    enc = runner.encode(x)
    assert enc.tiles > 2 * 2  # more than one tile per image actually ran
    assert enc.tensor.shape == (2, 4, size[0] // 8, size[1] // 8) and torch.isfinite(enc.tensor).all()
    dec = runner.decode(enc.tensor)
    assert dec.tiles > 2 * 2 and dec.tensor.shape == (2, 3, *size)


def test_compute_dtype_policy():
    assert compute_dtype(torch.float16, force_upcast=True, upcast=None) == torch.float32
    assert compute_dtype(torch.float16, force_upcast=True, upcast=False) == torch.float16
    assert compute_dtype(torch.float16, force_upcast=False, upcast=True) == torch.float32
    assert compute_dtype(torch.bfloat16, force_upcast=True, upcast=None) == torch.bfloat16
    cpu = torch.device("cpu")
    assert precision_ladder(torch.float16, cpu) == [torch.float16, torch.bfloat16, torch.float32]
    assert precision_ladder(torch.float32, cpu) == [torch.float32]


def test_nan_retried_at_higher_precision(vae):
    """An overflow injected in bf16 for sample 1 only: that sample alone is re-run in fp32."""
    def poison(module, args, out):
        if out.dtype == torch.bfloat16:
            out = out.clone()
            out[1] = float("inf")
        return out

    handle = vae.decoder.conv_out.register_forward_hook(poison)
    try:
        z = torch.randn(3, 4, 4, 4)
        runner = Runner(vae, RunOptions(dtype=torch.bfloat16))
        result = runner.decode(z)
    finally:
        handle.remove()
    assert [(r.index, r.from_dtype, r.to_dtype) for r in result.retries] == [(1, "bf16", "fp32")]
    assert not result.failed and torch.isfinite(result.tensor).all()
    with torch.no_grad():
        ref = ((vae.decode(z[1:2]) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(result.tensor[1:2], ref, atol=1e-6, rtol=1e-6)


def test_nan_at_every_precision_reported_as_failed(vae):
    def poison(module, args, out):
        out = out.clone()
        out[0] = float("nan")
        return out

    handle = vae.decoder.conv_out.register_forward_hook(poison)
    try:
        result = Runner(vae, RunOptions(dtype=torch.bfloat16)).decode(torch.randn(2, 4, 4, 4))
    finally:
        handle.remove()
    assert list(result.failed) == [0] and "NaN" in result.failed[0]
    assert torch.isfinite(result.tensor[1]).all()


class FakeMemory:
    """A device with `free` bytes on which every call needs `k` times what vaecli's memory model predicts
    (k unknown to the Runner): calls that do not fit raise OutOfMemoryError, the others run for real."""

    def __init__(self, monkeypatch, free: int, k: float, capacity: int | None = None) -> None:
        import vaecli.pipeline as pipeline

        self.free, self.k, self.calls = free, k, []
        monkeypatch.setattr(memory, "free_memory", lambda device: free)
        monkeypatch.setattr(memory, "memory_capacity", lambda device: capacity or free)
        untiled = {"encode": AutoencoderKL.encode_moments, "decode": AutoencoderKL.decode}
        for op, real in untiled.items():
            monkeypatch.setattr(AutoencoderKL, "encode_moments" if op == "encode" else op, self._untiled(op, real))
        monkeypatch.setattr(pipeline, "tiled_decode", self._tiled("decode", pipeline.tiled_decode))
        monkeypatch.setattr(pipeline, "tiled_encode_moments", self._tiled("encode", pipeline.tiled_encode_moments))

    def _check(self, kind: str, need: float) -> None:
        fits = self.k * need <= self.free
        self.calls.append((kind, fits))
        if not fits:
            raise torch.OutOfMemoryError("simulated")

    def _untiled(self, op, real):
        def call(model, x, *args, **kwargs):
            h, w = (x.shape[-2], x.shape[-1]) if op == "encode" else (x.shape[-2] * 8, x.shape[-1] * 8)
            self._check(f"{op} x{x.shape[0]}",
                        estimate_peak_bytes(model.config, x.shape[0], h, w, x.element_size(), op))
            return real(model, x, *args, **kwargs)

        return call

    def _tiled(self, op, real):
        def call(model, x, tile, overlap, batch=4, whole=True, *args, **kwargs):
            h, w = (x.shape[-2], x.shape[-1]) if op == "encode" else (x.shape[-2] * 8, x.shape[-1] * 8)
            need = estimate_tiled_bytes(model.config, op, x.shape[0], h, w, x.element_size(), tile, overlap, batch,
                                        whole)
            self._check(f"tiled {op} x{x.shape[0]} batch {batch} {'whole' if whole else 'per-tile'}", need)
            return real(model, x, tile, overlap, batch, whole, *args, **kwargs)

        return call

    @property
    def failures(self) -> int:
        return sum(not fits for _, fits in self.calls)


def test_tiling_predicted_before_anything_is_tried(vae, monkeypatch):
    """auto: a call predicted not to fit runs tiled at once; off: untiled unless it could never fit."""
    one = estimate_peak_bytes(vae.config, 1, 48, 48, 4, "decode")
    mem = FakeMemory(monkeypatch, free=int(one / 0.9), k=1.0)
    z = torch.randn(2, 4, 6, 6)
    result = Runner(vae, RunOptions(tiling="auto", tile_size=24, tile_overlap=8)).decode(z)
    assert mem.failures == 0 and result.tiles > 2 and mem.calls[0][0].startswith("tiled decode")
    assert result.events[0].startswith("predicted") and "80% of free memory" in result.events[0]

    mem = FakeMemory(monkeypatch, free=int(one / 0.9), k=1.0)  # fits in free memory, not in 80% of it
    off = Runner(vae, RunOptions(tiling="off", tile_size=24, tile_overlap=8)).decode(z)
    assert mem.calls[0] == ("decode x1", True) and off.tiles == 0  # sliced to one image per call, untiled
    assert off.events == [
        f"predicted {one / 1e6:.1f} MB per image for an untiled decode of 48x48: batch run in slices of 1"]
    torch.testing.assert_close(off.tensor, Runner(vae).decode(z).tensor, atol=1e-5, rtol=0)

    mem = FakeMemory(monkeypatch, free=int(one * 0.9), k=1.0)  # can never fit: tiled even when off
    never = Runner(vae, RunOptions(tiling="off", tile_size=24, tile_overlap=8)).decode(z)
    assert mem.failures == 0 and never.tiles > 2 and "above the device holds" in never.events[0]
    assert "tile batch reduced to" in never.events[0] or "one image per call" in never.events[0]


@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("k, room", [(1.3, 4.5), (1.6, 4.2), (1.8, 1.1), (1.6, 0.7)])
def test_out_of_memory_costs_at_most_one_retry(vae, monkeypatch, op, k, room):
    """Calls need k times the prediction (k < 1.875: any error the 80% margin and one correction cover).
    Free memory holds `room` untiled images by the prediction; whatever the batch ends up as (slices, or
    tiles when not even one image fits), the ladder fails at most once, then every call fits."""
    one = estimate_peak_bytes(vae.config, 1, 48, 48, 4, op)
    mem = FakeMemory(monkeypatch, free=int(one * room), k=k, capacity=int(one * 100))
    runner = Runner(vae, RunOptions(tiling="off", tile_size=24, tile_overlap=8, tile_batch=4))
    x = image(6, 48, 48) if op == "encode" else torch.randn(6, 4, 6, 6)
    result = runner.encode(x) if op == "encode" else runner.decode(x)
    assert mem.failures <= 1, mem.calls
    assert mem.calls[-1][1] and all(fits for _, fits in mem.calls[mem.calls.index((mem.calls[0][0], False)) + 1:]) \
        if mem.failures else True
    assert torch.isfinite(result.tensor).all() and not result.failed
    if mem.failures:
        assert result.events and result.events[-1].startswith("out of memory")
    untiled_fit = k * one <= mem.free
    assert (result.tiles == 0) == untiled_fit  # tiles only when not even one image fits
    if untiled_fit:  # slices give the batch's numbers
        reference = Runner(vae).encode(x) if op == "encode" else Runner(vae).decode(x)
        torch.testing.assert_close(result.tensor, reference.tensor, atol=1e-5, rtol=0)


def test_second_failure_steps_down_one_rung(vae, monkeypatch):
    """A device far worse than predicted (untiled calls never fit): after the one corrected jump, each
    failure steps down one rung, ending in tiles."""
    calls = []
    original = AutoencoderKL.decode

    def fake_decode(self, z, checkpointing=False, plan=None):
        calls.append(z.shape[0])
        raise torch.OutOfMemoryError("simulated")  # untiled decoding never fits

    monkeypatch.setattr(AutoencoderKL, "decode", fake_decode)
    z = torch.randn(4, 4, 6, 6)
    result = Runner(vae, RunOptions(tile_size=24, tile_overlap=8)).decode(z)
    monkeypatch.setattr(AutoencoderKL, "decode", original)
    assert calls == [4, 2, 1]
    assert result.events[:3] == [
        "out of memory at 4 per call: predicted to fit 2, run in slices of 2",
        "out of memory: batch halved to 1",
        "out of memory at batch 1: switched to tiling (24 px tiles)",
    ]
    assert result.tiles > 4 and result.tensor.shape == (4, 3, 48, 48) and torch.isfinite(result.tensor).all()


def test_auto_tiling_follows_free_memory(vae, monkeypatch):
    runner = Runner(vae, RunOptions(tiling="auto", tile_size=24, tile_overlap=8))
    monkeypatch.setattr(memory, "free_memory", lambda device: 1 << 40)
    assert runner.decode(torch.randn(1, 4, 6, 6)).tiles == 0
    monkeypatch.setattr(memory, "free_memory", lambda device: 1024)
    assert runner.decode(torch.randn(1, 4, 6, 6)).tiles > 1


def test_auto_batch_size_from_free_memory(vae, monkeypatch):
    from vaecli.plans import run_choices

    cpu = torch.device("cpu")
    per_image = estimate_peak_bytes(vae.config, 1, 512, 512, 4)
    monkeypatch.setattr(memory, "free_memory", lambda device: int(per_image * 3 / 0.6))
    assert memory.auto_batch_size(vae.config, 512, 512, torch.float32, cpu) == 3
    monkeypatch.setattr(memory, "free_memory", lambda device: 10)
    assert memory.auto_batch_size(vae.config, 512, 512, torch.float32, cpu) == 1  # never below one
    monkeypatch.setattr(memory, "free_memory", lambda device: 1 << 50)
    assert memory.auto_batch_size(vae.config, 512, 512, torch.float32, cpu) == run_choices("cpu").batch_limit.most


def test_tiled_cpu_calls_trim_the_heap(vae, monkeypatch):
    """Tiled CPU calls hand freed heap memory back before and after (batch runs must not creep up in RSS)."""
    import vaecli.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "trim_heap", lambda: calls.append(1))
    Runner(vae, RunOptions(tiling="off")).decode(torch.randn(1, 4, 6, 6))
    assert calls == []
    Runner(vae, RunOptions(tiling="on", tile_size=24, tile_overlap=8)).decode(torch.randn(1, 4, 6, 6))
    assert calls == [1, 1]


def test_oom_in_the_tile_lockstep_falls_back_to_per_tile_statistics(vae, monkeypatch):
    """When even one tile per call does not fit with whole-image statistics, tiles are normalized by
    themselves (memory of one tile) and the run reports it instead of failing."""
    import vaecli.tiling as tiling

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(tiling._Lockstep, "run", no_memory)
    z = torch.randn(2, 4, 6, 8)
    result = Runner(vae, RunOptions(tiling="on", tile_size=24, tile_overlap=8, tile_batch=2)).decode(z)
    assert result.events[-1] == (
        "out of memory while tiling with whole-image statistics: each tile now normalized by itself "
        "(memory of one tile; tone shifts between tiles possible)"
    )
    assert result.events[0].startswith("out of memory while tiling: one image per call")
    assert result.tiles > 2 and result.tensor.shape == (2, 3, 48, 64) and torch.isfinite(result.tensor).all()
    with torch.no_grad():
        own, _ = tiling.tiled_decode(vae, z, 24, 8, whole_image_stats=False)
    torch.testing.assert_close(result.tensor, ((own + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
