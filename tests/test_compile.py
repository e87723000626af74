"""--compile: AOTInductor packages built once, loaded and run by later processes (accel.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, tiny_config
from vaecli import accel
from vaecli.pipeline import Runner, RunOptions

ROOT = Path(__file__).resolve().parent.parent

SMALL = dict(block_out_channels=(8, 16), norm_num_groups=4)  # tiny_config overrides: two levels compile fast

# One process: a tiny model with seeded weights decodes one latent through Runner(compile=True); its config
# comes as JSON (argv[2]) from the test's tiny_config, its weights are seeded as make_tiny_model seeds them.
# "second" replaces the eager decode with one that fails, so only the loaded package can produce the output.
WORKER = """
import json, sys, torch
torch.set_num_threads(1)
from vaecli.config import VAEConfig
from vaecli.models.kl import AutoencoderKL
from vaecli.pipeline import Runner, RunOptions
cfg = VAEConfig.from_dict(json.loads(sys.argv[2]))
torch.manual_seed(0)
vae = AutoencoderKL(cfg).eval()
if sys.argv[1] == "second":
    def eager_decode(*args, **kwargs):
        raise AssertionError("the eager decoder ran")
    AutoencoderKL.decode = eager_decode
z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
result = Runner(vae, RunOptions(compile=True)).decode(z)
print(json.dumps({"events": result.events, "out": result.tensor.flatten().tolist()}))
"""


def _worker(mode: str, cache: Path) -> dict:
    env = dict(os.environ, VAECLI_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL="O0")  # the C++ wrapper's -O level: a faster test compile
    config = json.dumps(tiny_config(**SMALL).to_dict())
    proc = subprocess.run([sys.executable, "-c", WORKER, mode, config], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="AOTInductor compiles C++ for CPU packages: no C++ compiler here")
@pytest.mark.slow  # an AOTInductor build: 98 s measured on a busy 2-core CPU
def test_second_process_runs_the_compiled_package(tmp_path):
    first = _worker("first", tmp_path)
    second = _worker("second", tmp_path)
    built = [e for e in first["events"] if e.startswith("compiled decode 1x4x4x4")]
    loaded = [e for e in second["events"] if e.startswith("loaded compiled decode 1x4x4x4")]
    assert built and loaded, (first["events"], second["events"])
    assert len(list((tmp_path / "aoti").glob("decode-*.pt2"))) == 1
    assert len(list((tmp_path / "aoti").glob("decode-*.ok"))) == 1  # checked in a separate process, once
    build_s = float(re.search(r" in ([\d.]+) s", built[0]).group(1))
    load_s = float(re.search(r" in ([\d.]+) s", loaded[0]).group(1))
    # Starts fast: no export and no compiler, only imports (on a CPU torch._inductor's imports and its
    # one-time vector-ISA probe are most of the load time).
    assert load_s < build_s / 3, (build_s, load_s)
    # The eager decoder could not run in the second process: its output is the package's, the same
    # program the first process built, and what the eager model computes (up to reordered sums).
    assert second["out"] == first["out"]
    vae = make_tiny_model(**SMALL)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    eager = Runner(vae).decode(z).tensor.flatten()
    torch.testing.assert_close(torch.tensor(second["out"]), eager, atol=1e-5, rtol=1e-5)


def test_runner_compiles_per_shape_and_falls_back_on_failure(monkeypatch):
    vae = make_tiny_model(**SMALL)
    built = []

    def fake_compile(model, op, example, plan):
        built.append((op, tuple(example.shape), example.dtype))
        if example.shape[0] == 2:
            raise RuntimeError("no C++ compiler found\nmore detail")
        fn = ((lambda x: model.decode(x, plan=plan)) if op == "decode"
              else (lambda x: model.encode_moments(x, plan=plan)))
        return accel.Compiled(fn, Path("x.pt2"), True, 0.5)

    monkeypatch.setattr(accel, "compile_op", fake_compile)
    assert Runner(vae).decode(torch.randn(1, 4, 4, 4)).events == [] and built == []  # off by default
    runner = Runner(vae, RunOptions(dtype=torch.bfloat16, compile=True))
    first = runner.decode(torch.randn(1, 4, 4, 4))
    again = runner.decode(torch.randn(1, 4, 4, 4))
    assert first.events == ["compiled decode 1x4x4x4 in 0.5 s (x.pt2)"] and again.events == []
    assert built == [("decode", (1, 4, 4, 4), torch.bfloat16)]  # the compute precision's copy, once per shape
    failed = runner.decode(torch.randn(2, 4, 4, 4))
    assert failed.events == ["compile of decode 2x4x4x4 failed, running eager: no C++ compiler found"]
    assert torch.isfinite(failed.tensor).all() and runner.decode(torch.randn(2, 4, 4, 4)).events == []
    assert len(built) == 2  # a failed shape is not retried


def _package_paths(vae, z, plan):
    """Where compile_op keeps the two package forms of vae's decode for inputs shaped like z."""
    key = accel.package_key(vae, "decode", z, plan)
    state = accel._Op(vae, "decode", plan).state_dict()
    return (accel.cache_dir() / f"decode-{key}.pt2",
            accel.cache_dir() / f"decode-{key}-embedded-{accel._weights_hash(state)}.pt2")


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="AOTInductor compiles C++ for CPU packages: no C++ compiler here")
@pytest.mark.slow  # an AOTInductor build: 116 s measured on a busy 2-core CPU
def test_when_bound_packages_fail_to_load_the_weights_go_inside(monkeypatch, tmp_path):
    """The second package form: a runtime whose loader fails on packages with weights bound at load
    gets one with the weights compiled in, checked the same way, which then runs."""
    monkeypatch.setenv("VAECLI_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")
    vae = make_tiny_model(**SMALL)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    runner = Runner(vae, RunOptions(compile=True))
    bound, embedded = _package_paths(vae, z, runner.plan)
    bound.parent.mkdir(parents=True)
    bound.write_bytes(b"not a package")  # a bound package that does not load
    result = runner.decode(z)
    assert len(result.events) == 1 and result.events[0].startswith("compiled decode 1x4x4x4 in ")
    assert result.events[0].endswith(f" s ({embedded.name})")
    assert bound.with_suffix(".failed").exists() and embedded.with_suffix(".ok").exists()
    torch.testing.assert_close(result.tensor, Runner(vae).decode(z).tensor, atol=1e-5, rtol=1e-5)
    other = make_tiny_model(**SMALL)
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.5)  # other weights, same config: another embedded package
    assert _package_paths(other, z, runner.plan)[1] != embedded


@pytest.mark.parametrize("check, reason", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crashed the process that loaded it (SIGSEGV)"),
    # the real check on a package file that is not one: a process that imports torch._inductor (31 s, busy CPU)
    pytest.param(None, "failed to load and run (", marks=pytest.mark.slow),
])
def test_a_package_that_crashes_its_loader_runs_eager(monkeypatch, tmp_path, check, reason):
    """AOTInductor's loader can die with SIGSEGV (H100, torch 2.11): the package is loaded first in a
    separate process; when that fails, the run goes on eager and says why, and later runs know it."""
    monkeypatch.setenv("VAECLI_CACHE_DIR", str(tmp_path))
    if check is not None:
        monkeypatch.setattr(accel, "_LOAD_CHECK", check)
    vae = make_tiny_model(**SMALL)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    runner = Runner(vae, RunOptions(compile=True))
    bound, embedded = _package_paths(vae, z, runner.plan)
    bound.parent.mkdir(parents=True)
    for package in (bound, embedded):
        package.write_bytes(b"not a package")  # both forms in the cache already: nothing is built
    result = runner.decode(z)
    assert len(result.events) == 1 and result.events[0].startswith(
        f"compile of decode 1x4x4x4 failed, running eager: bound: the compiled package {reason}"), result.events
    assert torch.equal(result.tensor, Runner(vae).decode(z).tensor)
    for package in (bound, embedded):
        assert package.with_suffix(".failed").exists() and not package.with_suffix(".ok").exists()

    def no_second_check(*args, **kwargs):
        raise AssertionError("checked again")

    monkeypatch.setattr(accel.subprocess, "run", no_second_check)  # the verdict is kept beside the package
    again = Runner(vae, RunOptions(compile=True)).decode(z)
    assert again.events == result.events


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VAECLI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert accel.cache_dir() == tmp_path / "vaecli" / "aoti"
    monkeypatch.setenv("VAECLI_CACHE_DIR", str(tmp_path / "c"))
    assert accel.cache_dir() == tmp_path / "c" / "aoti"
