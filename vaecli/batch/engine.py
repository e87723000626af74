"""The engine every run goes through: order items so equal sizes meet, read them ahead in reader threads,
batch equal keys, launch each batch on the device one ahead of taking its outputs, write in writer threads,
and count items as they finish. What a run does per item is a Job (probe, load, key, compute, save)."""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from ..discovery import Item
from ..errors import ConfigError, InputError, Interrupted, VaecliError
from ..files import folder_syncs_deferred
from ..pipeline import Pending
from ..plans import run_choices
from .report import Counts, ItemResult, Progress

WRITE_GRACE_S = 5.0  # on Ctrl-C, how long writes already running may take to finish
PROBE_PATIENCE_S = 0.5  # reading headers up front stops waiting once none has answered for this long

S = TypeVar("S")  # a job's record of one item (what its load learnt and its save needs)


class Skip:
    """Returned by a loader: the output is already complete (optionally with metrics read from it)."""

    def __init__(self, metrics: dict[str, float] | None = None, note: str | None = None) -> None:
        self.metrics = metrics or {}
        self.note = note


@dataclass
class Loaded(Generic[S]):
    """An item read and prepared, waiting for its batch."""

    index: int
    item: Item
    x: np.ndarray | torch.Tensor  # model input of this item
    state: S  # the job's typed record of this item (sizes, hashes, provenance...)


Outputs = list[Any]  # one value per item of a batch: its output for `save`, or an exception (the item fails)


class Job(Protocol):
    """What one command does per item; the Engine calls these from its threads.

    probe: the batch key of an item from its header alone (None when unknown), read for every item before
    the run so that equal keys are processed together; None (no probe): items run in their given order.
    load (reader threads): the item read and prepared, or Skip when its output is current.
    key: the batch key of a loaded item (items of equal keys share a model call).
    compute (main thread): one batch -> its outputs, or a Pending of them (taken after the next launch).
    save (writer threads): one output written.
    """

    @property
    def probe(self) -> Callable[[Item], Hashable | None] | None: ...

    def load(self, index: int, item: Item) -> Loaded[Any] | Skip: ...

    def key(self, loaded: Loaded[Any]) -> Hashable: ...

    def compute(self, batch: list[Loaded[Any]]) -> Outputs | Pending[Outputs]: ...

    def save(self, loaded: Loaded[Any], output: Any) -> None: ...


def io_threads(device: torch.device | None, readers: int = 0) -> tuple[int, int]:
    """(reader threads, writer threads) for a run on `device`: plans.TABLE's run-level row for it (the CPU's
    measured by scripts/pipeline_throughput.py; a GPU's not measured yet); readers > 0 is the user's count."""
    return run_choices(device or "cpu").io_threads.counts(os.cpu_count() or 1, readers)


def failure_message(exc: BaseException) -> str:
    """One line for a failed item: our own messages as they are, anything else described, not dumped."""
    if isinstance(exc, VaecliError):
        return str(exc)
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "out of memory for this item; try --tiling on, a smaller --batch-size, or a lower --max-pixels"
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"file system error{where}: {exc.strerror or text}"
    # What hostile file contents raise in parsers we do not own (each site we own gives its own reason):
    if isinstance(exc, RecursionError):
        return "the file holds a structure nested too deeply to read (a damaged or hostile file)"
    if isinstance(exc, OverflowError):
        return f"the file holds a number too large to use ({text[:120]})"
    return f"unexpected error ({type(exc).__name__}: {text[:200]}); --debug shows the traceback"


class _DaemonPool:
    """A minimal thread pool of daemon threads: a worker blocked on a stalled file system never keeps the
    process from exiting after Ctrl-C (ThreadPoolExecutor joins its workers at exit)."""

    def __init__(self, workers: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self, cancel: bool, wait: bool = False) -> None:
        """Stop the workers after their current job; with cancel, jobs not started are dropped; with wait,
        join them (only when no job can be blocked: after a run that finished)."""
        if cancel:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


Save = Callable[[Loaded[Any], Any], None]


class Engine:
    """Order items so equal sizes meet, prefetch in reader threads, batch equal keys, launch batches on the
    device one ahead of taking their outputs, save in writer threads; count items as they finish."""

    def __init__(
        self,
        items: list[Item],
        batch_size: int,
        workers: int,
        progress: Progress | None,
        batch_for: Callable[[Hashable], int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        """batch_for: the batch size for one key (image size), for --batch-size auto; batch_size is then
        the largest it may return, which bounds read-ahead and queued writes. device: where the model
        runs (sets the number of I/O threads, io_threads)."""
        if batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        self.batch_for = batch_for
        self.items = items
        self.results = [
            ItemResult(str(it.input), str(it.output) if it.output else None, notes=list(it.notes)) for it in items
        ]
        self.batch_size = batch_size
        self.workers, self.writers = io_threads(device, workers)
        self.progress = progress
        self.events: list[str] = []
        self.computed = 0
        self.tiles = 0
        self._tally = {"ok": 0, "failed": 0, "skipped": 0}
        self._lock = threading.Lock()
        self._closed = False  # after Ctrl-C: writes finishing later are no longer recorded
        self._progress_error: BaseException | None = None  # raised by the callback in a writer thread
        self._in_flight: tuple[list[Loaded[Any]], Outputs | Pending[Outputs]] | None = None
        self._writes: deque[Future[None]] = deque()
        self._stalled = False  # a header read never answered: a reader thread may be stuck for good

    def finish(self, index: int, status: str, exc: BaseException | None = None) -> None:
        """Record item `index` as ok, failed or skipped, and tell the progress callback at once."""
        r = self.results[index]
        with self._lock:
            if self._closed or r.status != "pending":
                return
            if exc is not None:
                r.error = failure_message(exc)
                if not isinstance(exc, VaecliError):
                    r.detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            r.status = status
            self._tally[status] += 1
            self._notify(r)

    def _notify(self, item: ItemResult | None) -> None:
        if self.progress is None or self._progress_error is not None:
            return
        try:
            self.progress(Counts(len(self.items), **self._tally, item=item))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread (_check)
            self._progress_error = exc

    def _check(self) -> None:
        """Raise, in the main thread, what the progress callback raised (it may run in a writer thread)."""
        if self._progress_error is not None:
            raise self._progress_error

    def run(self, job: Job) -> None:
        """Run `job` over the items. compute returns one value per Loaded (an output for `save`, or an
        exception for a failed item), or a Pending of them.

        Ctrl-C: reading stops at once, the batch in flight and the outputs already computed get
        WRITE_GRACE_S to be written (each write is atomic either way), and Interrupted carries the results.
        """
        with self._lock:
            self._notify(None)
        self._check()
        with folder_syncs_deferred():  # each output folder fsynced once, at the end
            self._run(job)

    def _run(self, job: Job) -> None:
        readers = _DaemonPool(self.workers, "vaecli-read")
        writer = _DaemonPool(self.writers, "vaecli-write")
        try:
            probe = job.probe if self.batch_size > 1 or self.batch_for is not None else None  # groups to gain
            order = self._order(readers, probe) if probe is not None else list(range(len(self.items)))
            self._loop(readers, writer, order, job)
        except KeyboardInterrupt:
            readers.shutdown(cancel=True)
            self._settle(writer, job.save)  # computed outputs are still written, for at most WRITE_GRACE_S
            writer.shutdown(cancel=True)
            raise Interrupted(self.results) from None
        except BaseException:
            readers.shutdown(cancel=True)
            writer.shutdown(cancel=False)
            raise
        readers.shutdown(cancel=True, wait=not self._stalled)  # every read and write has been collected
        writer.shutdown(cancel=False, wait=True)
        self._check()

    def _order(self, pool: _DaemonPool, probe: Callable[[Item], Hashable | None]) -> list[int]:
        """Item indices with equal keys next to each other (across the whole input, not only the prefetch
        window), from headers read in the reader threads. Items that fail to probe, or whose probe has not
        answered (a stalled file system), come last in their original order; known failures first."""

        def task(item: Item) -> Hashable | None:
            try:
                return probe(item) if item.error is None else None
            except Exception:  # noqa: BLE001 - the real read reports what is wrong with the item
                return None

        futures = {pool.submit(task, item): i for i, item in enumerate(self.items) if item.error is None}
        keys: dict[int, Hashable] = {}
        waiting = set(futures)
        while waiting:
            done, waiting = wait_futures(waiting, timeout=PROBE_PATIENCE_S, return_when=FIRST_COMPLETED)
            if not done:
                break
            for future in done:
                if future.result() is not None:
                    keys[futures[future]] = future.result()
        for future in waiting:
            self._stalled |= not future.cancel()  # still running: its reader thread is not waited for
        labels = {k: n for n, k in enumerate(dict.fromkeys(keys[i] for i in sorted(keys)))}  # first-seen order
        known = sorted(keys, key=lambda i: (labels[keys[i]], i))
        failing = [i for i, item in enumerate(self.items) if item.error is not None]
        rest = [i for i in range(len(self.items)) if i not in keys and self.items[i].error is None]
        return failing + known + rest

    def _loop(self, readers: _DaemonPool, writer: _DaemonPool, order: list[int], job: Job) -> None:
        pending: dict[Hashable, list[Loaded[Any]]] = {}  # key (e.g. image size) -> items waiting for a batch
        for index, got in self._prefetch(readers, job.load, order):
            if isinstance(got, BaseException):
                self.finish(index, "failed", got)
            elif isinstance(got, Skip):
                self.results[index].metrics.update(got.metrics)
                if got.note:
                    self.results[index].notes.append(got.note)
                self.finish(index, "skipped")
            else:
                k = job.key(got)
                pending.setdefault(k, []).append(got)
                if len(pending[k]) >= (self.batch_for(k) if self.batch_for else self.batch_size):
                    self._launch(writer, job, pending.pop(k))
                elif sum(len(b) for b in pending.values()) > 4 * self.batch_size:
                    self._launch(writer, job, pending.pop(max(pending, key=lambda b: len(pending[b]))))
            self._check()
        for k in list(pending):
            self._launch(writer, job, pending.pop(k))
        if self._in_flight is not None:
            self._take(writer, job.save, *self._in_flight)
            self._in_flight = None
        wait_futures(list(self._writes))
        self._check()

    def _launch(self, writer: _DaemonPool, job: Job, batch: list[Loaded[Any]]) -> None:
        """Compute one batch; the outputs of the batch before it are taken only now, when the device
        already has this one."""
        try:
            handle: Outputs | Pending[Outputs] = job.compute(batch)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for one image: the batch fails
            handle = [exc] * len(batch)
        self.computed += len(batch)
        previous, self._in_flight = self._in_flight, (batch, handle)
        if previous is not None:
            self._take(writer, job.save, *previous)
        self._check()

    def _take(
        self, writer: _DaemonPool, save: Save, batch: list[Loaded[Any]], handle: Outputs | Pending[Outputs],
        bound: bool = True,
    ) -> None:
        """Outputs of a launched batch: failures recorded, the rest queued for writing (with `bound`, the
        queue is kept short by waiting for the oldest writes)."""
        try:
            outputs = handle.result() if isinstance(handle, Pending) else handle
        except Exception as exc:  # noqa: BLE001 - the batch fails, the run goes on
            outputs = [exc] * len(batch)
        for loaded, out in zip(batch, outputs, strict=True):
            if isinstance(out, BaseException):
                self.finish(loaded.index, "failed", out)
            else:
                future = writer.submit(save, loaded, out)
                future.add_done_callback(partial(self._written, loaded.index))
                self._writes.append(future)
        while self._writes and self._writes[0].done():
            self._writes.popleft()
        while bound and len(self._writes) > 2 * self.batch_size + 2:  # bound the memory held by queued writes
            wait_futures([self._writes.popleft()])

    def _written(self, index: int, future: Future[None]) -> None:
        """A write finished (in a writer thread): the item is done, now."""
        if future.cancelled():
            return
        exc = future.exception()
        self.finish(index, "failed" if exc is not None else "ok", exc)

    def _settle(self, writer: _DaemonPool, save: Save) -> None:
        """After Ctrl-C: the batch in flight is taken and written with the rest, within the grace period
        (a second Ctrl-C stops waiting); writes that finish later are not recorded."""
        deadline = time.monotonic() + WRITE_GRACE_S
        try:
            if self._in_flight is not None:
                batch, handle = self._in_flight
                self._in_flight = None
                self._take(writer, save, batch, handle, bound=False)
            wait_futures(list(self._writes), timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            pass
        with self._lock:
            self._closed = True

    def _prefetch(
        self, pool: _DaemonPool, load: Callable[[int, Item], Loaded[Any] | Skip], order: list[int]
    ) -> Iterator[tuple[int, Loaded[Any] | Skip | BaseException]]:
        """Items loaded in `order`, at most `depth` ahead of the consumer."""

        def task(index: int, item: Item) -> Loaded[Any] | Skip | BaseException:
            if item.error is not None:
                return InputError(item.error)
            try:
                return load(index, item)
            except Exception as exc:  # noqa: BLE001 - returned as the item's failure
                return exc

        depth = 2 * self.batch_size + self.workers
        window: deque[tuple[int, Future[Any]]] = deque()
        todo = iter(order)
        for index in todo:
            window.append((index, pool.submit(task, index, self.items[index])))
            if len(window) >= depth:
                break
        while window:
            index, future = window.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                window.append((nxt, pool.submit(task, nxt, self.items[nxt])))
            yield index, future.result()
