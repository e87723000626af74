"""File-system safety: only regular files are read, outputs are published atomically, temp files are named
so that a cleanup removes only those of provably dead runs.

A temp file is `.<name>.tmp-<host>-<pid>-<start>-<rand>` beside its destination: `host` identifies the
machine and PID namespace (boot id, PID namespace, host name), `start` is the writer's process start time
(clock ticks since boot), so a recycled PID is told apart from the writer. A cleanup removes a temp file when
its writer is provably dead: same host and PID namespace, and that PID is not running or started at another
time. Temp files of other hosts or containers (whose processes cannot be seen from here) are removed only
once they have not been modified for FOREIGN_TEMP_AGE_S.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import InputError, VaecliError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    """Whether `text` is a URL (s3://, https://, ...) rather than a local path."""
    return _URL.match(text) is not None


SHARD_SUFFIXES = {".tar": "tar", ".parquet": "parquet"}  # what a dataset input shard is named


def shard_kind(text: str) -> str | None:
    """'tar' or 'parquet' for a shard path or URL (by the suffix of its name), else None. Here, not in
    dataset/, so that a plain `vaecli encode` can tell shards from images without loading the dataset package."""
    name = text.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((kind for suffix, kind in SHARD_SUFFIXES.items() if name.endswith(suffix)), None)


def json_path(text: str | os.PathLike[str] | None) -> str | None:
    """A local path as JSON reports write it: absolute and normalized (no `..`, symlinks kept as named),
    the same whatever the working folder or the way the path was typed; URLs as given."""
    if text is None:
        return None
    text = os.fspath(text)
    return text if is_url(text) else os.path.abspath(text)

FOREIGN_TEMP_AGE_S = 24 * 3600  # a writer's temp file is modified while it writes; a day-old one is abandoned
_TEMP = re.compile(r"^\..*\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")
_LEGACY_TEMP = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")  # vaecli 0.1 names: PID only, no host, no start time


# ------------------------------------------------------------------------------------------- reading


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_regular(path: Path) -> os.stat_result:
    """stat(path) following symlinks; InputError unless it is a regular file. Opens nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError("broken symlink" if os.path.islink(path) else "no such file") from None
    except PermissionError:
        raise InputError("permission denied: cannot read this file") from None
    except OSError as exc:
        raise InputError(f"cannot read this file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise InputError("is a folder, not a file")
        raise InputError(f"is {file_kind(st.st_mode)}, not a regular file; only regular files are read")
    return st


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading (symlinks followed); anything else is an InputError, never a hang.

    The open is non-blocking and the type is checked again on the open descriptor, so a FIFO or device
    swapped in after the first check is refused too, not waited on.
    """
    check_regular(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        raise InputError("permission denied: cannot read this file") from None
    except OSError as exc:
        raise InputError(f"cannot open this file: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"is {file_kind(mode)}, not a regular file; only regular files are read")
        if getattr(os, "O_NONBLOCK", 0):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_of(fh: BinaryIO) -> str:
    """sha256 of an open file's bytes from its start; leaves the position at the start."""
    fh.seek(0)
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    fh.seek(0)
    return h.hexdigest()


# -------------------------------------------------------------------------------------- temp names


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None if not running.

    Without /proc (macOS, BSD), 0 for a running process: PID reuse cannot be told apart there.
    """
    text = _read(f"/proc/{pid}/stat")
    if text:
        try:
            return int(text.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3
        except (IndexError, ValueError):
            return None
    if os.path.isdir("/proc/self"):
        return None  # /proc exists but has no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


def _host_id() -> str:
    """8 hex digits naming this machine and PID namespace: processes with another id cannot be seen."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    boot = _read("/proc/sys/kernel/random/boot_id").strip()
    return hashlib.sha256(f"{boot}\0{pid_ns}\0{socket.gethostname()}".encode()).hexdigest()[:8]


_identity: tuple[int, str] | None = None  # (pid, "<host>-<pid>-<start>") of this process, computed once per pid


def _writer_id() -> str:
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:  # recomputed in a forked child
        _identity = (pid, f"{_host_id()}-{pid}-{_start_ticks(pid) or 0}")
    return _identity[1]


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of `folder` (or its nearest existing parent) accepts."""
    for candidate in (folder, *folder.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):
            continue
    return 255


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process and call, within the name-length limit.

    `.<name>.tmp-<host>-<pid>-<start>-<rand>`; `<name>` is shortened (by bytes) when the whole would exceed
    the file system's limit, so names near that limit can still be written. The name is remembered until
    forget_temp: an interrupted run removes the temp files still in flight (remove_own_temp_files).
    """
    suffix = f".tmp-{_writer_id()}-{secrets.token_hex(4)}"
    room = name_max(path.parent) - 1 - len(suffix)
    name = os.fsencode(path.name)
    if len(name) > room:
        name = name[: max(room, 0)]
    tmp = path.with_name("." + os.fsdecode(name) + suffix)
    with _live_lock:
        _live_temps.add(tmp)
    return tmp


_live_lock = threading.Lock()
_live_temps: set[Path] = set()  # temp names of this process not yet published or removed


def forget_temp(tmp: Path) -> None:
    """`tmp` was published (renamed) or removed: an interrupted run has nothing left to remove there."""
    with _live_lock:
        _live_temps.discard(tmp)


def remove_own_temp_files() -> int:
    """Remove this process's temp files still in flight (a run interrupted while writing); how many. A write
    still running in another thread may recreate its file afterwards; that name is then removed by the next
    run's cleanup (its writer, this process, is dead by then)."""
    with _live_lock:
        live = list(_live_temps)
        _live_temps.clear()
    removed = 0
    for tmp in live:
        try:
            os.unlink(tmp)
            removed += 1
        except OSError:
            continue
    return removed


def temp_writer(name: str) -> tuple[str, int, int] | None:
    """(host, pid, start time) of the process that wrote temp file `name`; None for other names."""
    m = _TEMP.match(name)
    return (m["host"], int(m["pid"]), int(m["start"])) if m else None


def is_temp_name(name: str) -> bool:
    return _TEMP.match(name) is not None or _LEGACY_TEMP.match(name) is not None


def temp_is_dead(name: str, mtime: float, now: float | None = None) -> bool:
    """Whether the writer of temp file `name` is provably gone (see the module docstring)."""
    now = time.time() if now is None else now
    writer = temp_writer(name)
    if writer is None or writer[0] != _writer_id().split("-", 1)[0]:
        return is_temp_name(name) and now - mtime > FOREIGN_TEMP_AGE_S
    _, pid, start = writer
    running_since = _start_ticks(pid)
    if running_since is None:
        return True
    return start != 0 and running_since != 0 and running_since != start  # the PID now belongs to another process


def clean_temp_files(root: Path, recursive: bool = True) -> list[Path]:
    """Delete temporary files left under `root` (or only in it) by runs that provably died; others are kept."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for dirpath, subdirs, names in os.walk(root):
        if not recursive:
            subdirs.clear()
        for name in names:
            if not is_temp_name(name):
                continue
            path = Path(dirpath) / name
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and temp_is_dead(name, st.st_mtime, now):
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
    return removed


# ---------------------------------------------------------------------------------------- writing


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` then publish tmp as `path`: readers see the old file, the whole new one, or none.

    The temp file is created first (mode 0666 less the umask, as any new file), and that mode is restored
    if the writer replaced the file (safetensors writes 0600); its data is fsynced before the rename, and the
    folder after it, so a published name never points at data still in flight.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VaecliError(
            f"cannot create the output folder {path.parent}: {exc.strerror or exc} "
            "(a file in the way, or no permission?)"
        ) from None
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode and hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        forget_temp(tmp)
        raise VaecliError(f"cannot write {path}: {_os_reason(exc.errno, exc.strerror or str(exc))}") from None
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        forget_temp(tmp)
        foreign = _foreign_os_error(exc) if isinstance(exc, Exception) else None
        if foreign is not None:  # a writer in Rust or C (safetensors) that reports errno in its message
            raise VaecliError(f"cannot write {path}: {_os_reason(*foreign)}") from None
        raise
    forget_temp(tmp)
    _sync_folder_of(path)


_RUST_OS_ERROR = re.compile(r'Os \{ code: (\d+), kind: \w+, message: "([^"]*)" \}')


def _foreign_os_error(exc: Exception) -> tuple[int, str] | None:
    """(errno, text) of an I/O error that a non-Python writer reported as text: safetensors' SafetensorError
    says `IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })`."""
    m = _RUST_OS_ERROR.search(str(exc))
    return (int(m[1]), m[2]) if m else None


def _os_reason(errno_: int | None, text: str) -> str:
    """An OS error as a reason a user can act on: a full disk and an exhausted quota say so."""
    import errno

    if errno_ == errno.ENOSPC:
        return f"{text} (the disk is full: free space or choose another output folder)"
    if errno_ == getattr(errno, "EDQUOT", -1):
        return f"{text} (disk quota exceeded)"
    return text


def publish_temp(tmp: Path, path: Path) -> None:
    """Publish a file written to `tmp` by a streaming writer (a tar or parquet shard) as `path`, as
    atomic_write does: its data fsynced before the rename, its folder after it."""
    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    forget_temp(tmp)
    _sync_folder_of(path)


def _sync_folder_of(path: Path) -> None:
    if not _defer_folder_sync(path.parent):
        fsync_folder(path.parent)


# A run defers folder fsyncs to its end: one per folder instead of one per file (each costs about as much as
# the file's own fsync). Until then a crash can lose a rename, never expose a partial file: the output is
# then simply missing, and the next run makes it again.
_sync_lock = threading.Lock()
_sync_depth = 0  # nested folder_syncs_deferred blocks
_unsynced: set[Path] = set()  # folders renamed into since the outermost block began


def _defer_folder_sync(folder: Path) -> bool:
    with _sync_lock:
        if _sync_depth:
            _unsynced.add(folder)
        return _sync_depth > 0


@contextmanager
def folder_syncs_deferred() -> Iterator[None]:
    """Within this block atomic_write leaves folder fsyncs to the end of the outermost such block."""
    global _sync_depth
    with _sync_lock:
        _sync_depth += 1
    try:
        yield
    finally:
        with _sync_lock:
            _sync_depth -= 1
            folders = sorted(_unsynced) if _sync_depth == 0 else []
            if _sync_depth == 0:
                _unsynced.clear()
        for folder in folders:
            fsync_folder(folder)


def fsync_folder(folder: Path) -> None:
    """Persist a folder's entries (a rename into it); best effort: some file systems refuse folder fsync."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def probe_writable(folder: Path) -> None:
    """Create and remove a temp file in `folder`; raises OSError when files cannot be created there."""
    probe = temp_path(folder / "vaecli-probe")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    os.unlink(probe)
    forget_temp(probe)
