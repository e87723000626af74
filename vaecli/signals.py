"""Ctrl-C, SIGTERM and SIGHUP end a CLI run the same way: the run stops reading, writes already running get
their grace period, temp files are removed, the report (the JSON document under --json) is printed, and
the exit code is 128 + the signal's number (130, 143, 129), as a shell reports a process ended by it.

SIGTERM is what `timeout`, `docker stop`, systemd and Slurm's scancel send, SIGHUP what a closed terminal
sends; by default either kills Python at once (no report, temp files left). Here each becomes the
KeyboardInterrupt that Ctrl-C raises, so every path that handles Ctrl-C handles them too. Only the CLI
installs this (library callers keep their own handlers); it is stdlib only, so the console script installs
it before importing anything heavy.
"""

from __future__ import annotations

import threading
from types import FrameType

try:  # the C module: `signal` builds its enums at import, some tens of ms in which Ctrl-C would still be Python's
    import _signal as _sig
except ImportError:  # pragma: no cover - an interpreter without it
    import signal as _sig  # type: ignore[no-redef]

SIGINT = int(_sig.SIGINT)
HANDLED = tuple(int(getattr(_sig, name)) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(_sig, name))

_received: int | None = None  # the first handled signal of this process
_reporting = False  # the report is being printed: later signals are recorded, never raised


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received is None:
        _received = signum
    if not _reporting:
        raise KeyboardInterrupt


def install() -> dict[int, object]:
    """Route SIGINT, SIGTERM and SIGHUP to KeyboardInterrupt (main thread only; elsewhere a no-op). A signal
    the parent set to be ignored (nohup's SIGHUP, a background job's SIGINT) stays ignored. Returns the
    handlers replaced, for restore()."""
    previous: dict[int, object] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in HANDLED:
        try:
            old = _sig.getsignal(signum)
            if old == _sig.SIG_IGN:
                continue
            _sig.signal(signum, _handler)
            previous[signum] = old
        except (OSError, ValueError):  # an embedded interpreter that owns its signals
            continue
    return previous


def ours(previous: dict[int, object]) -> bool:
    """Whether handlers install() replaced are this module's own (an earlier install in this process, e.g.
    entry.py's): those are kept to the end of the process rather than put back."""
    return any(h is _handler for h in previous.values())


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers install() replaced (a caller of cli.main in its own process keeps its own), and
    forget this run's signal."""
    for signum, handler in previous.items():
        try:
            _sig.signal(signum, handler)  # type: ignore[arg-type]
        except (OSError, ValueError, TypeError):
            continue
    reset()


def received() -> int:
    """The signal that interrupted the run: the first one handled, SIGINT when none was (a plain
    KeyboardInterrupt, e.g. raised by a test)."""
    return _received if _received is not None else SIGINT


def was_signalled() -> bool:
    """Whether a handled signal arrived in this process."""
    return _received is not None


def exit_code() -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + received()


def name() -> str:
    """How the report names what interrupted the run: Ctrl-C, SIGTERM or SIGHUP."""
    import signal

    signum = received()
    if signum == SIGINT:
        return "Ctrl-C"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def reporting() -> None:
    """From now on signals no longer interrupt: the report being printed is the one promise left."""
    global _reporting
    _reporting = True


def reset() -> None:
    """Forget a received signal (a new run in the same process, as tests do)."""
    global _received, _reporting
    _received, _reporting = None, False
