"""Speed settings for a loaded model: backend flags and `--compile`, which runs encode/decode as
AOTInductor packages cached on disk. Values are unchanged by everything here except compilation, which may
reorder sums.

Why packages and not torch.compile's own on-disk caches: on an H100 (2026-11-27, torch 2.11) a second
`vaecli bench --compile` process took 30 s to start and then ran encode at eager speed (79.8 ms vs 24.6 ms
compiled in the first process). On a CPU the second process hits the FX-graph and AOTAutograd caches and
runs the compiled graph (dynamo counters: frames ok, fxgraph_cache_hit, no recompiles), so what broke is
most likely in the GPU-only half of inductor's warm start, which rebuilds Triton kernels and their
autotuning choices from the cache (upstream reports of that path losing autotuned configs or whole kernels
on warm starts: pytorch/pytorch #189121, #181789, #194918); scripts/gpu_report.py's compile section
records the evidence on the next GPU. Besides, `nn.Module.compile()` kept its compiled code as module
state, re-checked dynamo's guards on every call, and silently ran eager from the 9th input size on
(dynamo's recompile limit of 8 per code object; with dynamic=False every new size is one more entry).

An AOTInductor package is the compiled program itself: exported once per (op, input shape, dtype,
device, plan, code version), compiled with its kernel choices baked in, and loaded by later processes in
seconds (mostly torch._inductor's imports), with no tracing, guards or autotuning; the model's own weights
are bound to it (no copy). A second process therefore runs exactly the code the first one compiled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .models.kl import AutoencoderKL
from .plans import Plan, run_choices


def cache_dir() -> Path:
    """Where compiled packages are kept between processes (VAECLI_CACHE_DIR, else XDG_CACHE_HOME/vaecli)."""
    base = os.environ.get("VAECLI_CACHE_DIR")
    if base:
        return Path(base) / "aoti"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vaecli" / "aoti"


class Autotune:
    """Where cuDNN searches for the fastest convolution algorithms (torch.backends.cudnn.benchmark): only
    for calls whose input shape repeats. The search runs every candidate algorithm once per new shape and
    layer, a cost repaid only over later calls of that shape; a folder of mixed sizes, where most shapes
    come once, paid it on nearly every image (issue 13). The decision for all of vaecli is made here, per
    call, as the device's `conv_search` row of plans.TABLE says: on from the `min_repeats`-th earlier call
    of the same shape (same-size folders, dataset buckets, benchmarks), and for tiled calls, whose tiles
    repeat one shape many times within the call.
    """

    def __init__(self, device: torch.device, min_repeats: int | None = None) -> None:
        """min_repeats: None takes the device's row; 0 searches always (a benchmark's warm-up absorbs it)."""
        row = run_choices(device).conv_search
        self.device = device
        self.min_repeats = row.min_repeats if min_repeats is None else min_repeats
        self.tiled = row.tiled  # tiled calls search whatever their count
        self.seen: dict[tuple[object, ...], int] = {}

    def before_call(self, key: tuple[object, ...], tiled: bool) -> bool:
        """Set the flag for the next call on inputs described by `key` (op, shape, dtype); returns it."""
        earlier = self.seen.get(key, 0)
        self.seen[key] = earlier + 1
        on = (tiled and self.tiled) or earlier >= self.min_repeats
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = on
        return on


# -- compiled encode/decode --------------------------------------------------------------------------------


@dataclass
class Compiled:
    """One compiled op for one input shape."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    path: Path
    built: bool  # compiled in this process (False: loaded from the cache)
    seconds: float  # time to build or load
    calls: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(x)


class _Op(torch.nn.Module):
    """encode_moments or decode of `model` under `plan`, as a module torch.export can trace."""

    def __init__(self, model: AutoencoderKL, op: str, plan: Plan) -> None:
        super().__init__()
        self.model, self.op, self.plan = model, op, plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "encode":
            return self.model.encode_moments(x, plan=self.plan)
        return self.model.decode(x, plan=self.plan)


def compile_op(model: AutoencoderKL, op: str, example: torch.Tensor, plan: Plan) -> Compiled:
    """The compiled `op` ("encode" -> moments, "decode" -> image) for inputs shaped like `example`:
    loaded from cache_dir() when a previous process built it, else exported, compiled and saved there
    (atomically). Raises whatever export or compilation raises, or why no package form loads (callers
    fall back to eager).

    Two package forms, tried in order, each checked once in a separate process (`checked_load`):
    "bound": the weights stay outside the package and the model's own tensors are bound at load (one copy,
    one package per shape for any weights); "embedded": the weights are compiled into the package
    (AOTInductor's default form, a package per shape and per set of weights), for runtimes whose loader
    fails on the first form (the H100 of 2026-11-27 crashed loading "bound" packages)."""
    start = time.perf_counter()
    state = _Op(model, op, plan).state_dict()
    key = package_key(model, op, example, plan)
    reasons = []
    for form in PACKAGE_FORMS:
        suffix = "" if form == "bound" else f"-embedded-{_weights_hash(state)}"
        path = cache_dir() / f"{op}-{key}{suffix}.pt2"
        built = not path.exists()
        if built:
            _build(_Op(model, op, plan).eval(), example, path, embed=form == "embedded")
        trouble = checked_load(path, state, example, bind=form == "bound")
        if trouble is not None:
            reasons.append(f"{form}: {trouble}")
            continue
        package = torch._inductor.aoti_load_package(str(path))
        if form == "bound":
            constants = {k: state[k] for k in package.get_constant_fqns()}
            package.load_constants(constants, check_full_update=True, user_managed=True)
        return Compiled(package, path, built, time.perf_counter() - start)
    raise RuntimeError("; ".join(reasons))


PACKAGE_FORMS = ("bound", "embedded")


def _weights_hash(state: dict[str, torch.Tensor]) -> str:
    """Of the weights' values (an embedded package holds them): names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# Loads a package and runs it once on zeros (zero weights too), in a process of its own: on an H100
# (torch 2.11.0+cu130, 2026-11-27; scripts/compile_probe.py) AOTInductor's package loader died with SIGSEGV
# inside torch._C._aoti.AOTIModelPackageLoader, in a fresh process as in the one that built the package.
# A crash there cannot be caught, so each package is tried once where a crash costs nothing.
_LOAD_CHECK = """
import json, sys, torch
spec = json.load(sys.stdin)
package = torch._inductor.aoti_load_package(spec["path"])
def zeros(t):
    return torch.empty_strided(t["shape"], t["stride"], dtype=getattr(torch, t["dtype"]), device=t["device"]).zero_()
if spec["bind"]:
    constants = {k: zeros(spec["constants"][k]) for k in package.get_constant_fqns()}
    package.load_constants(constants, check_full_update=True, user_managed=True)
package(zeros(spec["input"]))
if spec["input"]["device"].startswith("cuda"):
    torch.cuda.synchronize()
print("loaded and ran")
"""
LOAD_CHECK_TIMEOUT_S = 600.0


def checked_load(path: Path, state: dict[str, torch.Tensor], example: torch.Tensor, bind: bool = True) -> str | None:
    """None when the package at `path` loads and runs in a separate process (bind: with zero tensors bound
    as its weights), else why not. The verdict is kept beside the package (NAME.ok / NAME.failed), so each
    package is tried once per cache."""
    ok, failed = path.with_suffix(".ok"), path.with_suffix(".failed")
    if ok.exists():
        return None
    if failed.exists():
        return failed.read_text().strip() or "an earlier load check failed"

    def describe(t: torch.Tensor) -> dict:
        return {"shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype).removeprefix("torch."),
                "device": str(t.device)}

    spec = {"path": str(path), "bind": bind, "input": describe(example),
            "constants": {k: describe(v) for k, v in state.items()}}
    try:
        proc = subprocess.run([sys.executable, "-c", _LOAD_CHECK], input=json.dumps(spec), capture_output=True,
                              text=True, timeout=LOAD_CHECK_TIMEOUT_S)
        code = proc.returncode
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    except subprocess.TimeoutExpired:
        code, tail = None, ""
    if code == 0:
        _note(ok, "loaded and ran in a separate process")
        return None
    if code is None:
        how = f"did not load and run within {LOAD_CHECK_TIMEOUT_S:.0f} s"
    elif code < 0:
        how = f"crashed the process that loaded it ({_signal_name(-code)})"
    else:
        how = f"failed to load and run ({tail or f'exit {code}'})"
    reason = f"the compiled package {how} with torch {torch.__version__}"
    _note(failed, reason)
    return reason


def _note(path: Path, text: str) -> None:
    """Keep a verdict beside its package; a cache that cannot be written to only means checking again."""
    try:
        path.write_text(text + "\n")
    except OSError:
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _build(module: torch.nn.Module, example: torch.Tensor, path: Path, embed: bool = False) -> None:
    with torch.no_grad():
        program = torch.export.export(module, (example,))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        # "bound" form: the weights stay outside the package (bound at load: one copy, the model's own)
        torch._inductor.aoti_compile_and_package(
            program, package_path=tmp, inductor_configs={"aot_inductor.package_constants_in_so": embed}
        )
        os.replace(tmp, path)  # another process compiling the same key writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def package_key(model: AutoencoderKL, op: str, example: torch.Tensor, plan: Plan) -> str:
    """Everything the compiled program depends on except the weights' values (bound at load)."""
    w = next(model.parameters())  # AutoencoderKL: encoder.conv_in.weight; any family: its first layer
    dev = example.device
    gpu = [torch.cuda.get_device_name(dev), list(torch.cuda.get_device_capability(dev))] if dev.type == "cuda" else None
    facts = {
        "op": op,
        "shape": list(example.shape),
        "dtype": str(example.dtype),
        "input_layout": _layout_name(example),
        "weights": [str(w.dtype), _layout_name(w)],
        "device": dev.type,
        "gpu": gpu,
        "config": model.config.to_dict(),
        "plan": plan.describe(),
        "torch": torch.__version__,
        "code": _code_hash(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _layout_name(t: torch.Tensor) -> str:
    return "nhwc" if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else "nchw"


@lru_cache(maxsize=1)
def _code_hash() -> str:
    """Hash of the modules that define the computation: a changed model or kernel never loads a stale package."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted([*(here / "models").glob("*.py"), here / "plans.py", *(here / "kernels").glob("*.py")]):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# -- heap ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc; a no-op elsewhere).

    A tiled call on the CPU allocates and frees many tile-sized blocks; glibc keeps the freed ones, with
    holes, so a process doing one tiled image after another (batch conversion) would see its resident
    memory creep up call after call. Trimming before and after each tiled call keeps it at one call's peak.
    """
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
