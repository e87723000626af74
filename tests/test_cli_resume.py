"""Resume and atomicity: reruns skip complete outputs; a run killed with SIGKILL leaves no partial file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cli_support import ROOT, make_model, noise_image, run_cli, run_json, subprocess_env
from vaecli.files import clean_temp_files, is_temp_name, temp_path
from vaecli.latents import latent_is_complete


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-vae"))


def test_second_run_skips_and_overwrite_recomputes(model, tmp_path):
    src = tmp_path / "in"
    for i in range(3):
        noise_image(src / f"{i}.png", 24, 24, seed=i)
    out = tmp_path / "lat"
    code, first, _ = run_json("encode", src, "-o", out, "--model", model)
    assert code == 0 and first["ok"] == 3
    code, second, _ = run_json("encode", src, "-o", out, "--model", model)
    assert code == 0 and (second["ok"], second["skipped"]) == (0, 3)
    code, third, _ = run_json("encode", src, "-o", out, "--model", model, "--overwrite")
    assert code == 0 and third["ok"] == 3
    # A partial (truncated) output is not complete: it is recomputed.
    damaged = out / "1.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:50])
    code, fourth, _ = run_json("encode", src, "-o", out, "--model", model)
    assert (fourth["ok"], fourth["skipped"]) == (1, 2) and latent_is_complete(damaged)
    # An edited source or other settings make the output stale: recomputed, with a note.
    noise_image(src / "2.png", 24, 24, seed=99)
    code, fifth, _ = run_json("encode", src, "-o", out, "--model", model)
    assert (fifth["ok"], fifth["skipped"]) == (1, 2)
    assert "source file" in fifth["items"][2]["notes"][0]
    code, sixth, _ = run_json("encode", src, "-o", out, "--model", model, "--raw")
    assert sixth["ok"] == 3


def test_decode_resume(model, tmp_path):
    src = tmp_path / "in"
    noise_image(src / "a.png", 16, 16)
    assert run_cli("encode", src, "-o", tmp_path / "lat", "--model", model).exit_code == 0
    code, first, _ = run_json("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model)
    code, second, _ = run_json("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model)
    assert first["ok"] == 1 and second["skipped"] == 1


def test_temp_files_of_dead_runs_are_cleaned(tmp_path):
    """Only provably dead writers' temp files go: same host and PID namespace, and the PID gone or reused;
    others' (another container or host) only once a day old."""
    target = tmp_path / "sub" / "x.safetensors"
    target.parent.mkdir()
    mine = temp_path(target)
    mine.write_text("live")  # this process is alive: kept
    host = mine.name.split(".tmp-")[1].split("-")[0]
    parent = os.getppid()  # alive, but started at another time than a name can claim
    dead = target.with_name(f".x.safetensors.tmp-{host}-999999999-123-0123abcd")
    reused = target.with_name(f".x.safetensors.tmp-{host}-{parent}-1-0123abcd")
    foreign = target.with_name(".x.safetensors.tmp-00000000-1-5-0123abcd")  # another container: cannot tell
    legacy = target.with_name(".x.safetensors.tmp-999999999-0123abcd")  # vaecli 0.1: no host in the name
    old = target.with_name(".y.safetensors.tmp-00000000-1-5-0123abcd")
    for path in (dead, reused, foreign, legacy, old):
        path.write_text("partial")
        assert is_temp_name(path.name)
    day = time.time() - 25 * 3600
    os.utime(old, (day, day))
    assert is_temp_name(mine.name)
    assert sorted(clean_temp_files(tmp_path)) == sorted([dead, reused, old])
    assert mine.exists() and foreign.exists() and legacy.exists()


def test_kill_9_mid_run_then_resume(model, tmp_path):
    src, out = tmp_path / "in", tmp_path / "lat"
    n = 60
    for i in range(n):
        noise_image(src / f"{i:03d}.png", 256, 256, seed=i)
    cmd = [sys.executable, "-m", "vaecli", "encode", str(src), "-o", str(out), "--model", model, "-b", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(p.suffix == ".safetensors" for p in out.iterdir()):
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    names = [p.name for p in out.iterdir()]
    finals = [name for name in names if not is_temp_name(name)]
    assert 0 < len(finals) < n
    for name in finals:  # every file under a real name is complete
        assert latent_is_complete(out / name), name
    code, doc, _ = run_json("encode", src, "-o", out, "--model", model)
    assert code == 0
    assert doc["skipped"] == len(finals) and doc["ok"] == n - len(finals)
    assert not [p for p in out.iterdir() if is_temp_name(p.name)]
    assert all(latent_is_complete(out / f"{i:03d}.safetensors") for i in range(n))
