"""Host <-> device staging (staging.py) and the Runner's launch-then-take path, on the CPU.

The asynchronous (CUDA) path runs here on a simulated device: uploads copy into fresh tensors, copies
finish only when their event has been polled a few times, pinned buffers are ordinary ones. Results must
be bit-identical to the CPU path, and no pooled buffer may be handed out while a copy may still use it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaecli.io import to_uint8
from vaecli.pipeline import Runner, RunOptions
from vaecli.staging import Transfers, to_model_range, to_uint8_nhwc


class SlowEvent:
    """An event whose work completes only after `lag` polls (a copy still running on the device)."""

    def __init__(self, lag: int) -> None:
        self.lag, self.polls, self.synced, self.at = lag, 0, False, 0.0

    def record(self, stream=None) -> None:
        import time

        self.at = time.perf_counter()

    def query(self) -> bool:
        self.polls += 1
        return self.synced or self.polls > self.lag

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, end: SlowEvent) -> float:
        return (end.at - self.at) * 1000.0


class SimulatedDevice(Transfers):
    """The CUDA code path of Transfers on CPU tensors: every transfer is a real copy."""

    def __init__(self, lag: int = 2) -> None:
        super().__init__(torch.device("cpu"))
        self.lag = lag
        self.uploads = 0

    @property
    def asynchronous(self) -> bool:
        return True

    def event(self) -> SlowEvent:
        return SlowEvent(self.lag)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        self.uploads += 1
        return host.clone()


def pictures(sizes, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    return out if dtype == np.uint8 else [a.astype(np.float32) / np.float32(255.0) for a in out]


@pytest.mark.parametrize("transfers", [Transfers(torch.device("cpu")), SimulatedDevice()], ids=["cpu", "simulated"])
def test_images_padded_on_the_device_as_numpy_pads(transfers):
    """Replicate padding of each image to the batch size equals np.pad(mode='edge'); uint8 stays uint8,
    a batch mixing uint8 and float becomes float with uint8 / 255 exactly."""
    arrays = pictures([(13, 21), (16, 16), (9, 24)])
    x = transfers.images(arrays, (16, 24))
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 16, 24) and x.is_contiguous(memory_format=torch.channels_last)
    for a, got in zip(arrays, x, strict=True):
        ref = np.pad(a, ((0, 16 - a.shape[0]), (0, 24 - a.shape[1]), (0, 0)), mode="edge")
        assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)
    mixed = [arrays[0], pictures([(16, 24)], seed=1, dtype=np.float32)[0]]
    y = transfers.images(mixed, (16, 24))
    assert y.dtype == torch.float32
    ref = np.pad(arrays[0].astype(np.float32) / 255.0, ((0, 3), (0, 3), (0, 0)), mode="edge")
    assert np.array_equal(y[0].permute(1, 2, 0).numpy(), ref)


def test_pixel_conversions_match_the_host_path_bit_for_bit():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, axis=1)
    host = torch.from_numpy(u8.astype(np.float32) / 255.0) * 2.0 - 1.0  # what read_image's floats became
    assert torch.equal(to_model_range(torch.from_numpy(u8)), host)
    floats = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    floats[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.5 / 255, 1.5 / 255])  # exact halves: round half to even
    expect = to_uint8(floats.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(to_uint8_nhwc(floats).numpy(), expect)


def test_pinned_pool_waits_for_copies_before_reuse():
    dev = SimulatedDevice(lag=3)
    a = dev.pool.take(1000)
    first = dev.event()
    dev.pool.release(a, first)
    b = dev.pool.take(1000)  # the copy from `a` may still run: a new buffer
    assert b.data_ptr() != a.data_ptr() and dev.pool.allocated == 2
    first.synchronize()
    c = dev.pool.take(900)  # now `a` is free again, and large enough
    assert c.data_ptr() == a.data_ptr() and dev.pool.allocated == 2


def test_pinned_pool_with_many_free_buffers_of_different_sizes():
    """Mixed-size batches leave free buffers of several sizes: taking one that is not first in the free
    list, and trimming the list, must pick buffers by identity (an H100 run failed here: list.remove
    compared tensors elementwise)."""
    dev = SimulatedDevice(lag=0)
    bufs = [dev.pool.take(n) for n in (300_000, 100_000, 200_000, 50_000)]
    for b in bufs:
        dev.pool.release(b, dev.event())
    mid = dev.pool.take(150_000)  # the smallest that fits: the 200_000 one, third in the free list
    assert mid.data_ptr() == bufs[2].data_ptr() and dev.pool.allocated == 4
    dev.pool._keep = 1
    dev.pool.release(mid, dev.event())
    big = dev.pool.take(10)  # reclaim trims to the largest buffer only, then hands it out
    assert big.data_ptr() == bufs[0].data_ptr() and dev.pool.allocated == 4
    dev.upload([np.arange(5000, dtype=np.float32), np.ones(70_000, dtype=np.float32)])  # a real upload after


def test_download_packs_tensors_of_any_dtypes_in_any_order():
    dev = SimulatedDevice(lag=0)
    tensors = [torch.tensor([True, False, True]), torch.arange(6, dtype=torch.float32).view(2, 3),
               torch.arange(5, dtype=torch.uint8), torch.full((2, 2), 0.5, dtype=torch.float16)]
    for got, want in zip(dev.download(tensors).wait(), tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_download_results_outlive_their_pinned_buffer():
    """Outputs handed to writers are copies: the pooled buffer is reused by the next batch."""
    dev = SimulatedDevice(lag=0)
    first = dev.download([torch.full((4, 4), 1.0)]).wait()[0]
    dev.download([torch.full((4, 4), 2.0)]).wait()  # lands in the same pooled buffer
    assert torch.equal(first, torch.full((4, 4), 1.0)) and dev.pool.allocated == 1


@pytest.mark.parametrize("op", ["encode", "decode", "roundtrip"])
def test_simulated_device_gives_the_cpu_results(vae, op):
    """The whole Runner through the asynchronous staging path: identical numbers to the CPU path."""
    arrays = pictures([(40, 48), (33, 48), (40, 41)], seed=3)
    plain = Runner(vae)
    sim = Runner(vae)
    sim.transfers = SimulatedDevice()
    outs = []
    for runner in (plain, sim):
        x = runner.transfers.images(arrays, (40, 48))
        if op == "encode":
            noise = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
            outs.append(runner.submit_encode(x, vae.config.latent_spec, noise).result().tensor)
        elif op == "decode":
            z = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(2))
            outs.append(runner.submit_decode(z, vae.config.latent_spec, as_uint8=True).result().tensor)
        else:
            enc, dec = runner.submit_roundtrip(x, None, as_uint8=True).result()
            outs.append(dec.tensor)
    assert outs[0].dtype == outs[1].dtype and torch.equal(outs[0], outs[1])
    assert sim.transfers.uploads >= 1 and sim.transfers.pool.allocated >= 1
    if op != "encode":
        assert outs[0].shape == (3, 40, 48, 3) and outs[0].dtype == torch.uint8  # NHWC, ready to write


def test_launch_then_take_matches_the_synchronous_calls(vae):
    """Several batches launched before any is taken give what one-at-a-time calls give."""
    runner = Runner(vae)
    zs = [torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pending = [runner.submit_decode(z) for z in zs]
    for z, p in zip(zs, pending, strict=True):
        assert torch.equal(p.result().tensor, Runner(vae).decode(z).tensor)
    assert runner.busy_s > 0


def test_roundtrip_reencodes_a_non_finite_latent_and_decodes_it_again(vae):
    """A bf16 encode overflowing for one sample: that sample is encoded again in fp32 and decoded again;
    the other sample is untouched. The verdict came back with the outputs (no extra host wait)."""

    def poison(module, args, out):
        if out.dtype == torch.bfloat16:
            out = out.clone()
            out[1] = float("inf")
        return out

    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    handle = vae.encoder.conv_out.register_forward_hook(poison)
    try:
        enc, dec = Runner(vae, RunOptions(dtype=torch.bfloat16)).submit_roundtrip(x).result()
    finally:
        handle.remove()
    assert [(r.index, r.from_dtype, r.to_dtype) for r in enc.retries] == [(1, "bf16", "fp32")]
    assert not enc.failed and not dec.failed and torch.isfinite(dec.tensor).all()
    with torch.no_grad():
        z = vae.encode(x[1:] * 2 - 1).mode()  # fp32 encode of the retried sample
    again = Runner(vae, RunOptions(dtype=torch.bfloat16)).decode(z.contiguous(memory_format=torch.channels_last)).tensor
    torch.testing.assert_close(dec.tensor[1:], again, atol=0, rtol=0)  # the encoder's output is channels-last
    clean = Runner(vae, RunOptions(dtype=torch.bfloat16)).submit_roundtrip(x).result()[1].tensor
    assert torch.equal(dec.tensor[0], clean[0])  # the same batch without the overflow


def test_autotune_only_where_shapes_repeat():
    from vaecli.accel import Autotune

    tune = Autotune(torch.device("cpu"), min_repeats=2)
    before = torch.backends.cudnn.benchmark
    assert [tune.before_call(("decode", (1, 4, 8, 8)), False) for _ in range(4)] == [False, False, True, True]
    assert tune.before_call(("decode", (1, 4, 9, 8)), False) is False  # a new shape: no search
    assert tune.before_call(("decode", (1, 4, 64, 64)), True) is True  # tiles repeat one shape
    assert Autotune(torch.device("cpu"), min_repeats=0).before_call(("x",), False) is True
    assert torch.backends.cudnn.benchmark == before  # on the CPU the global flag is left alone
