"""run_bench on a tiny saved model: row contents in-process and in worker processes, and its errors."""

from __future__ import annotations

import pytest
import torch

from vaecli import VaecliError, save_vae
from vaecli.bench import ROW_KEYS, run_bench
from vaecli.errors import InputError, WeightsError
from vaecli.pipeline import Runner


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model) -> str:
    """conftest's tiny model as it is (force_upcast true), saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("tiny-vae")
    save_vae(tiny_model(), folder)
    return str(folder)


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker-processes"])
def test_rows(model, isolate):
    seen: list[dict] = []
    rows = run_bench(
        model, resolutions=[64], device="cpu", warmup=1, iters=1, isolate=isolate, progress=seen.append
    )
    assert seen == rows
    assert [r["op"] for r in rows] == ["encode", "decode"]
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        assert row["error"] is None
        assert (row["resolution"], row["batch_size"], row["dtype"], row["compute_dtype"]) == (64, 1, "fp32", "fp32")
        assert row["ms_per_img"] > 0 and row["img_per_s"] > 0 and row["warmup_s"] > 0
        assert row["iters"] == 1 and row["tiles"] == 0 and row["compile"] is False
        assert 0 < row["device_busy"] <= 1  # the share of a call spent in torch operators
        assert row["device"].startswith("cpu (")
        assert row["peak_allocated_bytes"] is None  # CUDA only
        if isolate:  # peak RSS of the op alone, in its own process
            assert row["peak_memory_bytes"] > 0
            assert row["peak_rss_bytes"] > row["peak_memory_bytes"]
        else:  # a shared process cannot attribute its peak RSS to one op
            assert row["peak_memory_bytes"] is None


def test_peak_memory_is_the_timed_calls_alone(model, monkeypatch):
    """The busy share comes from one more call under torch.profiler, after the peak is read: neither the
    profiler's records nor anything that call allocates may count in the op's peak memory (they did: a
    tiled 1024^2 decode read 812 MB instead of 554 MB)."""
    from vaecli import bench

    def busy_share_allocating(call, dev):
        block = torch.ones(100 * 2**20, dtype=torch.float32)  # 400 MB, touched
        return float(block[0]) / 2

    monkeypatch.setattr(bench, "_busy_share", busy_share_allocating)
    job = bench.Job(model=model, op="decode", resolution=64, batch_size=1, dtype="fp32", tiling="off",
                    device="cpu", warmup=1, iters=1, tile_size=512, tile_overlap=64, compile=False, family=None,
                    subfolder=None, revision=None, variant=None, threads=torch.get_num_threads())
    row = bench._worker(job)
    assert row["device_busy"] == 0.5
    if row["peak_memory_bytes"] is None:
        pytest.skip("this kernel cannot reset a process's peak RSS (/proc/self/clear_refs)")
    assert row["peak_memory_bytes"] < 200 * 2**20  # 0 is possible: freed memory of earlier tests is reused


def test_out_of_memory_fails_its_row_only(model, monkeypatch):
    def out_of_memory(self, latents, spec=None):
        raise VaecliError("out of memory even for one tile: use a smaller --tile-size, or --device cpu")

    # What Runner raises once its fallbacks (smaller batches, tiling, fewer tiles per call) are spent.
    monkeypatch.setattr(Runner, "decode", out_of_memory)
    encode, decode = run_bench(model, resolutions=[64], device="cpu", warmup=0, iters=1, isolate=False)
    assert encode["error"] is None and encode["ms_per_img"] > 0
    assert decode["error"].startswith("out of memory") and decode["ms_per_img"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_cuda(model):
    rows = run_bench(model, resolutions=[64, 128], dtype="bf16", device="cuda", iters=2)
    for row in rows:
        assert row["error"] is None and row["compute_dtype"] == "bf16" and row["ms_per_img"] > 0
        assert 0 < row["peak_memory_bytes"] < row["peak_allocated_bytes"]  # activations above weights + input
        assert row["peak_rss_bytes"] is None


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker-processes"])
def test_missing_model(tmp_path, isolate):
    with pytest.raises(WeightsError, match="no such file or folder"):
        run_bench(str(tmp_path / "missing"), resolutions=[64], device="cpu", iters=1, isolate=isolate)


def test_worker_error_keeps_its_type(model):
    # 60 is not a multiple of the downsample factor 8: raised in the worker, re-raised here as the same type.
    with pytest.raises(InputError, match="multiple of the model's downsample factor 8"):
        run_bench(model, resolutions=[60], device="cpu", warmup=0, iters=1, isolate=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="fp8"), "unknown dtype"),
        (dict(tiling="sometimes"), "unknown tiling mode"),
        (dict(resolutions=[0]), "not a positive integer"),
        (dict(iters=0), "iters >= 1"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_settings(model, kwargs, message):
    with pytest.raises(VaecliError, match=message):
        run_bench(model, **kwargs)
