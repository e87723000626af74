"""Runs every case of the hostile-input corpus (hostile_corpus.CASES) and checks what each promises, plus
what every run must do: inputs untouched, one JSON document, one escaped line per failed item, no
traceback, no hang."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from cli_support import make_model, subprocess_env
from hostile_corpus import CASES, Case, Ctx

LINE_PREFIXES = ("error: ", "note: ", "warning: ", "interrupted: ")

# Subprocess entry: the CLI's main(), optionally with one read that never returns (a stalled mount).
BOOT = textwrap.dedent(
    """
    import os, sys, threading
    peak = os.environ.get("VAECLI_TEST_PEAK_FILE")
    if peak and os.path.exists("/proc/self/status"):  # this process's own peak RSS (VmHWM starts at exec)
        import atexit
        def record():
            with open("/proc/self/status") as f:
                kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
            with open(peak, "w") as out:
                out.write(kb)
        atexit.register(record)
    block = os.environ.get("VAECLI_TEST_BLOCK_READ")
    if block:
        import vaecli.batch.sources as batch  # where a run opens its inputs
        real = batch.open_regular
        def stalled(path):
            if str(path).endswith(block):
                threading.Event().wait()
            return real(path)
        batch.open_regular = stalled
    wblock = os.environ.get("VAECLI_TEST_BLOCK_WRITE")
    if wblock:  # a write that never finishes once its temp file is whole (a stalled disk)
        import vaecli.io as vio
        import vaecli.latents.native as vnative  # where latent files are written
        real_write = vio.atomic_write
        def stuck(path, write):
            if str(path).endswith(wblock):
                def held(tmp):
                    write(tmp)
                    threading.Event().wait()
                return real_write(path, held)
            return real_write(path, write)
        vio.atomic_write = vnative.atomic_write = stuck
    full = os.environ.get("VAECLI_TEST_ENOSPC")
    if full:  # the disk fills while safetensors writes this output (its Rust writer reports errno as text)
        import vaecli.io as vio
        import vaecli.latents.native as vnative
        from safetensors import SafetensorError
        real_write2 = vio.atomic_write
        def filling(path, write):
            if str(path).endswith(full):
                def fail(tmp):
                    tmp.write_bytes(b"partial")
                    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')
                return real_write2(path, fail)
            return real_write2(path, write)
        vio.atomic_write = vnative.atomic_write = filling
    swap = os.environ.get("VAECLI_TEST_SWAP_AFTER_READ")
    if swap:  # "a.png:new.png": once a.png's bytes have been read to the end, a.png becomes new.png
        import vaecli.batch.sources as batch  # where a run opens its inputs
        name, replacement = swap.split(":")
        opened = batch.open_regular
        class Swapping:
            def __init__(self, fh, path):
                self.fh, self.path = fh, path
            def read(self, n=-1):
                data = self.fh.read(n)
                at_end = self.fh.tell() >= os.fstat(self.fh.fileno()).st_size
                if at_end and not os.environ.get("_SWAPPED"):  # rewritten in place: the same inode
                    os.environ["_SWAPPED"] = "1"
                    with open(self.path, "r+b") as out:
                        out.write(open(replacement, "rb").read())
                        out.truncate()
                return data
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                self.fh.close()
            def __getattr__(self, attr):
                return getattr(self.fh, attr)
        def swapping(path):
            fh = opened(path)
            return Swapping(fh, str(path)) if str(path).endswith(name) else fh
        batch.open_regular = swapping
    folding = os.environ.get("VAECLI_TEST_FOLDING_FS")
    if folding:  # a simulated case- and normalization-insensitive volume: every folder named `folding`
        import vaecli.discovery as discovery
        real_probe = discovery._probe_folding
        discovery._probe_folding = lambda folder: (True, True) if folding in folder.parts else real_probe(folder)
    from vaecli.entry import main  # the console script's entry: signals handled before the CLI imports
    main(sys.argv[1:])
    """
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-vae"))


@pytest.fixture(scope="module")
def model_sha256(model) -> str:
    from vaecli.weights import load_vae

    return load_vae(model).info.weights_sha256


def invoke(args: list[str], timeout: float) -> tuple[int, str, str]:
    """The CLI's main() in this process (cwd = the case folder), in a thread so that a hang fails the test."""
    from vaecli.cli import main

    out, err, box = io.StringIO(), io.StringIO(), {}

    def target() -> None:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exc:
                box["code"] = exc.code
            except BaseException as exc:  # noqa: BLE001 - reported below
                box["raised"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"vaecli {' '.join(args)} did not finish within {timeout} s")
    assert "raised" not in box, f"main() raised {box.get('raised')!r}"
    return int(box.get("code") or 0), out.getvalue(), err.getvalue()


def spawn(case: Case, root: Path, args: list[str]) -> tuple[int, str, str, int]:
    """The CLI in a subprocess: (exit code, stdout, stderr, peak RSS in MiB); case.signum (SIGINT) when
    case.signal_after appears or case.signal_at seconds have passed; killed (and the test failed) at
    case.timeout."""
    peak = root.parent / f"{root.name}.peak"
    env = dict(subprocess_env(), **case.env, VAECLI_TEST_PEAK_FILE=str(peak))
    outs = [open(root.parent / f"{root.name}.{kind}", "w+") for kind in ("stdout", "stderr")]

    def preexec() -> None:
        if case.umask is not None:
            os.umask(case.umask)
        if case.stdout == "closed":
            os.close(1)  # `>&-`

    stdout: Any = outs[0]
    reader = None
    if case.stdout == "full":
        stdout = open("/dev/full", "w")
    elif case.stdout.startswith("head:"):  # `| head -c N`: the reader takes N bytes, then goes away
        read_fd, stdout = os.pipe()

        def take(n: int = int(case.stdout[5:])) -> None:
            got = b""
            while len(got) < n and (chunk := os.read(read_fd, n - len(got))):
                got += chunk
            outs[0].write(got.decode(errors="replace"))
            os.close(read_fd)

        reader = threading.Thread(target=take, daemon=True)
        reader.start()
    proc = subprocess.Popen(
        [sys.executable, "-c", BOOT, *args], cwd=root, env=env, stdout=stdout, stderr=outs[1], preexec_fn=preexec
    )
    if stdout is not outs[0]:
        os.close(stdout) if isinstance(stdout, int) else stdout.close()
    start, signalled = time.monotonic(), False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        elapsed = time.monotonic() - start
        due = (case.signal_after and (list(root.glob(case.signal_after)) or elapsed > 20)) or (
            case.signal_at and elapsed >= case.signal_at)
        if due and not signalled:
            proc.send_signal(case.signum)
            signalled = True
        if elapsed > case.timeout:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            pytest.fail(f"vaecli {' '.join(args)} did not finish within {case.timeout} s")
        time.sleep(0.002)
    proc.returncode = os.waitstatus_to_exitcode(status)
    texts = []
    for f in outs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    # The child's own VmHWM: ru_maxrss also counts the pytest process it was forked from (Linux keeps the
    # parent's high-water mark across fork and exec), which grows with the tests run before.
    if peak.exists():
        rss_mib = int(peak.read_text()) // 1024
    else:
        rss_mib = usage.ru_maxrss // 1024 if sys.platform != "darwin" else usage.ru_maxrss // 2**20
    return proc.returncode, texts[0], texts[1], rss_mib


def snapshot(root: Path, case: Case) -> dict[str, tuple[str, int, int]]:
    """sha256, mtime (ns) and mode of every regular file under in/ and of the protected files."""
    paths = []
    for top in [root / "in"]:
        for dirpath, _, names in os.walk(top):
            paths += [Path(dirpath) / n for n in names]
    for pattern in case.protect:
        paths += list(root.glob(pattern))
    state = {}
    for path in paths:
        st = os.lstat(path)
        if path.is_symlink() or not path.is_file():
            continue  # FIFOs, sockets, links: never opened here
        state[os.fsdecode(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns,
                                                      st.st_mode)
    return state


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case: Case, model: str, model_sha256: str, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "case"
    root.mkdir()
    monkeypatch.chdir(root)
    ctx = Ctx(model, model_sha256, lambda *args: invoke([*args, "--quiet"], 120)[0])
    case.build(root, ctx)
    before = snapshot(root, case)
    args = [a.replace("{model}", model) for a in case.args] + (["--json"] if case.json else [])
    if case.isolate:
        code, stdout, stderr, rss = spawn(case, root, args)
        if case.max_rss_mb:
            assert rss < case.max_rss_mb, f"peak RSS {rss} MiB"
    else:
        old_umask = os.umask(case.umask) if case.umask is not None else None
        try:
            code, stdout, stderr = invoke(args, case.timeout)
        finally:
            if old_umask is not None:
                os.umask(old_umask)

    assert code == case.code, (code, stderr)
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert all(line.startswith(LINE_PREFIXES) for line in lines), lines
    if case.stdout or not case.json:  # no document to read: stdout closed, full, cut short, or not asked for
        _check_files(case, root, before)
        if case.check is not None:
            case.check(root, {"stdout": stdout}, stderr)
        return
    doc = json.loads(stdout)  # exactly one document, nothing else on stdout
    assert isinstance(doc, dict) and {"ok", "failed", "skipped", "items"} <= set(doc), doc
    if case.code == 1:
        assert doc["failed"] >= 1 and sum(line.startswith("error: ") for line in lines) == doc["failed"], lines
    if case.code == 0:
        assert doc["failed"] == 0 and not any(line.startswith("error: ") for line in lines), lines
    if case.code == 2:
        assert doc.get("error") and sum(line.startswith("error: ") for line in lines) == 1, lines
    if case.message:
        import re

        assert re.search(case.message, stderr), stderr
    _check_files(case, root, before)
    if case.check is not None:
        case.check(root, doc, stderr)


def _check_files(case: Case, root: Path, before: dict[str, tuple[str, int, int]]) -> None:
    for pattern in case.exists:
        assert list(root.glob(pattern)), f"missing {pattern}"
    for pattern in case.absent:
        assert not list(root.glob(pattern)), f"unexpected {list(root.glob(pattern))}"
    after = snapshot(root, case)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"inputs modified or removed: {changed}"


def test_every_class_of_issue_11_has_cases() -> None:
    classes = {c.klass for c in CASES}
    assert classes >= {
        "overlap", "claims", "metadata sizes", "declared sizes", "special files", "truncated", "stale", "values",
        "temp files", "messages",
    }


def test_every_class_of_issue_23_has_cases() -> None:
    """Issue 23 (reliability round 2): each of its classes has cases, by the class label or the case name."""
    classes = {c.klass for c in CASES}
    names = " ".join(c.name for c in CASES)
    assert classes >= {"no inputs", "signals", "streams", "file contents", "claims", "stale", "truncated"}
    for word in ("config_change", "rewritten_while_read", "repainted", "truncated_round_2", "folding_fs",
                 "file_and_folder", "symlink_in_output", "tar_shard_bombs", "past_path_max", "libtiff",
                 "batch_size_huge", "sigterm", "sighup", "startup", "stdout_", "deep_json", "huge_int", "enospc"):
        assert word in names, word
