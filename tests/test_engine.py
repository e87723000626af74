"""The batch engine: items counted as they finish, failures reported at once, sizes grouped across the
whole input, batches launched one ahead of taking their outputs, stalled header reads not waited for."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vaecli.batch.engine as batch_engine
from vaecli.batch import Counts, Engine, Loaded, Skip
from vaecli.discovery import Item
from vaecli.errors import InputError
from vaecli.pipeline import Pending, Runner


def items(n: int, bad: tuple[int, ...] = ()) -> list[Item]:
    return [Item(Path(f"{i:02d}.png"), f"{i:02d}.png", Path(f"out/{i:02d}"),
                 "broken" if i in bad else None) for i in range(n)]


@dataclass
class Steps:
    """A Job made of functions (the engine's protocol: probe, load, key, compute, save)."""

    load: Callable[[int, Item], Loaded[Any] | Skip]
    key_of: Callable[[Loaded[Any]], Hashable]
    compute_fn: Callable[[list[Loaded[Any]]], Any]
    save_fn: Callable[[Loaded[Any], Any], None]
    probe: Callable[[Item], Hashable | None] | None = None

    def key(self, loaded: Loaded[Any]) -> Hashable:
        return self.key_of(loaded)

    def compute(self, batch: list[Loaded[Any]]) -> Any:
        return self.compute_fn(batch)

    def save(self, loaded: Loaded[Any], output: Any) -> None:
        self.save_fn(loaded, output)


def loaded(i: int, it: Item) -> Loaded[None]:
    return Loaded(i, it, np.zeros(1), None)


def test_writes_are_counted_as_they_finish_not_in_order():
    """A slow first write must not hold back the count of the writes finished after it (issue 14:
    '11 images on disk while it says 1/19')."""
    release = threading.Event()
    seen: list[Counts] = []
    counted_while_first_blocked = []

    def save(loaded: Loaded, out: object) -> None:
        if loaded.index == 0:
            assert release.wait(10)

    def progress(counts: Counts) -> None:
        seen.append(counts)
        if counts.ok == 5 and not release.is_set():  # every write but the first is done, and counted
            counted_while_first_blocked.append(counts.ok)
            release.set()

    engine = Engine(items(6), 4, 2, progress)  # up to 2 * 4 + 2 writes may queue
    engine.run(Steps(loaded, lambda b: 1, lambda batch: [0] * len(batch), save))
    assert counted_while_first_blocked == [5]
    assert [c.done for c in seen] == list(range(7)) and seen[-1].ok == 6 and seen[-1].total == 6
    assert all(c.item is not None and c.item.status == "ok" for c in seen[1:]) and seen[0].item is None


def test_failures_are_reported_when_they_happen():
    """A file that fails to read is reported (with its error) before later batches are computed."""
    log: list[str] = []

    def progress(counts: Counts) -> None:
        if counts.item is not None and counts.item.status == "failed":
            log.append(f"failed {counts.item.input}: {counts.item.error}")

    def compute(b: list[Loaded]) -> list[int]:
        log.append(f"compute {[x.index for x in b]}")
        return [0] * len(b)

    engine = Engine(items(6, bad=(1,)), 1, 1, progress)
    engine.run(Steps(loaded, lambda b: 1, compute, lambda b, o: None))
    assert log.index("failed 01.png: broken") < log.index("compute [5]")
    assert [r.status for r in engine.results] == ["ok", "failed", "ok", "ok", "ok", "ok"]


def test_sizes_grouped_across_the_whole_input():
    """40 items of 10 sizes, interleaved: every batch of 4 is full (the prefetch window alone cannot do it)."""
    sizes = {i: (8 * (1 + i % 10), 16) for i in range(40)}
    batches: list[list[int]] = []

    def compute(b: list[Loaded]) -> list[int]:
        assert len({sizes[x.index] for x in b}) == 1
        batches.append([x.index for x in b])
        return [0] * len(b)

    run = Engine(items(40), 4, 2, None)
    run.run(Steps(loaded, lambda b: sizes[b.index], compute, lambda b, o: None,
                  probe=lambda it: sizes[int(it.rel[:2])]))
    assert sorted(len(b) for b in batches) == [4] * 10
    unprobed: list[int] = []
    run = Engine(items(40), 4, 2, None)
    run.run(Steps(loaded, lambda b: sizes[b.index],
                  lambda b: unprobed.append(len(b)) or [0] * len(b), lambda b, o: None))
    assert min(unprobed) < 4  # without headers, the window flushes partial batches


def test_a_stalled_header_read_is_not_waited_for(monkeypatch):
    """One probe never answers (a stalled mount): the others' items run first, that one last."""
    monkeypatch.setattr(batch_engine, "PROBE_PATIENCE_S", 0.2)
    stall = threading.Event()
    order: list[int] = []

    def probe(it: Item) -> tuple[int, int]:
        if it.rel.startswith("02"):
            stall.wait(5)
        return (8, 8)

    start = time.monotonic()
    engine = Engine(items(6), 2, 3, None)
    engine.run(Steps(loaded, lambda b: 1,
                     lambda b: order.extend(x.index for x in b) or [0] * len(b), lambda b, o: None, probe))
    stall.set()
    assert time.monotonic() - start < 3 and order[-1] == 2 and sorted(order) == list(range(6))


def test_next_batch_launched_before_outputs_are_taken():
    """compute k+1 runs before the outputs of batch k are taken (the device never waits for the host)."""
    log: list[str] = []

    def compute(b: list[Loaded]) -> Pending:
        k = b[0].index // 2
        log.append(f"launch {k}")
        return Pending(lambda: log.append(f"take {k}") or [0] * len(b))

    engine = Engine(items(6), 2, 1, None)
    engine.run(Steps(loaded, lambda b: 1, compute, lambda b, o: None))
    assert log == ["launch 0", "launch 1", "take 0", "launch 2", "take 1", "take 2"]


def test_deferred_failures_fail_their_batch_only():
    def compute(b: list[Loaded]) -> Pending:
        def get() -> list[object]:
            if b[0].index == 0:
                raise InputError("device lost this batch")
            return [0] * len(b)

        return Pending(get)

    engine = Engine(items(4), 2, 1, None)
    engine.run(Steps(loaded, lambda b: 1, compute, lambda b, o: None))
    assert [r.status for r in engine.results] == ["failed", "failed", "ok", "ok"]
    assert engine.results[0].error == "device lost this batch"


def test_progress_errors_stop_the_run_from_a_writer_thread():
    """A progress callback that raises (a caller stopping the run) stops it even when it ran in a writer."""

    class Stop(Exception):
        pass

    def progress(counts: Counts) -> None:
        if counts.ok == 2:
            raise Stop

    engine = Engine(items(8), 1, 1, progress)
    with pytest.raises(Stop):
        engine.run(Steps(loaded, lambda b: 1, lambda b: [0] * len(b), lambda b, o: None))
    assert sum(r.status == "ok" for r in engine.results) < 8


def test_folder_batches_by_size_and_matches_one_by_one(tmp_path):
    """Mixed sizes interleaved on disk: a batched, size-grouped run gives the latents of one-image runs,
    bit for bit (pixels padded on the device as NumPy pads them), and runs fewer model calls."""
    from cli_support import make_model, noise_image
    from vaecli.batch import EncodeOptions, encode_paths
    from vaecli.latents import read_latent
    from vaecli.weights import load_vae

    vae = load_vae(make_model(tmp_path / "m"))
    for i in range(8):
        noise_image(tmp_path / "in" / f"{i}.png", 30 + 8 * (i % 2), 21, seed=i)  # 30x21 and 38x21, alternating
    calls: list[int] = []
    real = Runner.submit_encode

    def counting(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    Runner.submit_encode = counting
    try:
        grouped = encode_paths(vae, [tmp_path / "in"], tmp_path / "a", EncodeOptions(batch_size=4))
    finally:
        Runner.submit_encode = real
    single = encode_paths(vae, [tmp_path / "in"], tmp_path / "b", EncodeOptions(batch_size=1))
    assert grouped.count("ok") == single.count("ok") == 8 and sorted(calls) == [4, 4]
    for i in range(8):
        za, zb = (read_latent(tmp_path / d / f"{i}.safetensors").tensor for d in "ab")
        torch.testing.assert_close(za, zb, atol=1e-5, rtol=0)  # batch size may change the kernels' sums
    from vaecli.batch import apply_size_policy
    from vaecli.io import read_image

    pixels, _ = apply_size_policy(read_image(tmp_path / "in" / "1.png"), 8, "pad")  # the host path of before
    nhwc = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
    x = torch.empty(nhwc.shape, memory_format=torch.channels_last).copy_(nhwc)  # as the device batch is laid out
    ref = Runner(vae).encode(x, vae.config.latent_spec).tensor[0]
    assert torch.equal(read_latent(tmp_path / "b" / "1.safetensors").tensor, ref)
