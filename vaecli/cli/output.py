"""Where the CLI writes: the two consoles, streams that never let printing change a run's outcome, exit codes,
and the escaping that keeps a file name from forging a terminal line."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

# soft_wrap: a summary line stays one line in a pipe or log (Rich would wrap it at 80 columns there).
out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)

OK = 0
ITEMS_FAILED = 1
USAGE = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report a process ended by Ctrl-C (SIGTERM 143, SIGHUP 129: signals.py)
BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout was closed by its reader


def one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def printable(text: str) -> str:
    """`text` safe to print on one terminal line: control and format characters (newline, carriage return,
    escape sequences, bidirectional overrides) and undecodable bytes of file names become escapes, so a
    file name can never forge a line or recolour the terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}" if ch not in "\n\r\t" else repr(ch)[1:-1])
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)


def secondary_rank() -> bool:
    """Under torchrun, a process other than rank 0: it prints no JSON document and no summary (rank 0's
    report holds every rank's items), so stdout carries exactly one document."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) != 0
    except ValueError:
        return False


def print_json(doc: dict[str, Any]) -> None:
    if secondary_rank():
        return
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


class StdoutFailed(BaseException):
    """stdout cannot be written (closed, full, its reader gone): raised past every `except Exception`, so no
    handler mistakes it for a failure of the run's own work and tries to print to stdout again."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


class Stream:
    """sys.stdout or sys.stderr for one CLI run. What a file name cannot be encoded as in the stream's
    encoding (PYTHONIOENCODING=ascii and café.png) is written as a backslash escape: printing never changes
    the outcome. stdout that cannot be written (closed: None; full; a reader gone) raises StdoutFailed;
    stderr that cannot be written is given up silently (there is nowhere left to say so)."""

    def __init__(self, stream: Any, role: str) -> None:
        self._stream, self._role, self._dead = stream, role, stream is None
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass

    def _fail(self, exc: BaseException) -> None:
        self._dead = True
        if self._role == "stdout":
            raise StdoutFailed(exc) from None

    def write(self, text: str) -> int:
        if self._dead:
            if self._role == "stdout":
                raise StdoutFailed(OSError(9, "stdout is closed"))
            return len(text)
        try:
            return self._stream.write(text)  # type: ignore[no-any-return]
        except UnicodeEncodeError:  # a stream that cannot be reconfigured
            encoding = getattr(self._stream, "encoding", None) or "ascii"
            escaped = text.encode(encoding, "backslashreplace").decode(encoding)
            return self._stream.write(escaped)  # type: ignore[no-any-return]
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            self._fail(exc)
            return len(text)

    def flush(self) -> None:
        if self._dead:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def isatty(self) -> bool:
        try:
            return not self._dead and self._stream.isatty()  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)
