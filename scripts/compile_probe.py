"""Where `--compile` breaks on a GPU: each way of building and loading an AOTInductor package of the
default model's decode, in its own process (a crash costs only that variant), with Python's fault handler
on and a line on stderr after every stage, so a segfault names the stage and the stack it died in.

    python scripts/compile_probe.py --device cuda --json probe.json

Variants (all bf16, decode of a 64x64 latent, the device's default plan):
  shipped    vaecli.accel.compile_op: weights outside the package, bound with user_managed=True
  copied     the same package, weights copied in at load (load_constants user_managed=False)
  in-so      weights compiled into the package (AOTInductor's default), nothing bound at load
  runner     Runner(vae, RunOptions(compile=True)).decode, as the CLI runs it
Then `shipped` again in a fresh process with the same cache (the warm load a second CLI run does).
On gpu_report.py's compile run of 2026-11-27 (H100, torch 2.11) the cold and the warm process both
ended with SIGSEGV and printed nothing: this names the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
t0 = time.time()
def stage(name):
    print(f"stage {name} {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
import torch, vaecli
from vaecli import accel
from vaecli.plans import apply_layout, plan_for
variant, device = sys.argv[1], sys.argv[2]
vae = vaecli.load_vae(device=device, dtype=torch.bfloat16)
plan = plan_for(device, vae.config, "auto")
apply_layout(vae, plan)
z = torch.randn(1, vae.config.latent_channels, 64, 64, generator=torch.Generator().manual_seed(0))
z = z.to(device, torch.bfloat16)
with torch.inference_mode():
    ref = vae.decode(z, plan=plan)
stage("eager")
result = {"variant": variant}
if variant in ("shipped", "warm"):
    compiled = accel.compile_op(vae, "decode", z, plan)
    result.update(built=compiled.built, build_or_load_s=round(compiled.seconds, 1))
    stage("loaded")
    fn = compiled
elif variant == "runner":
    from vaecli.pipeline import Runner, RunOptions
    runner = Runner(vae, RunOptions(dtype=torch.bfloat16, compile=True))
    stage("runner")
    ref = ((ref.float().cpu() + 1) / 2).clamp(0, 1)  # Runner.decode returns [0, 1] on the CPU
    fn = lambda x: runner.decode(x).tensor
else:
    module = accel._Op(vae, "decode", plan).eval()
    with torch.no_grad():
        program = torch.export.export(module, (z,))
    stage("exported")
    path = __import__("pathlib").Path(sys.argv[3]) / f"{variant}.pt2"
    configs = {"aot_inductor.package_constants_in_so": variant == "in-so"}
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    stage("compiled")
    fn = torch._inductor.aoti_load_package(str(path))
    stage("loaded")
    if variant == "copied":
        state = module.state_dict()
        fn.load_constants({k: state[k] for k in fn.get_constant_fqns()}, check_full_update=True, user_managed=False)
        stage("constants")
with torch.inference_mode():
    y = fn(z)
    if device == "cuda":
        torch.cuda.synchronize()
    stage("ran")
    times = []
    for _ in range(5):
        t = time.perf_counter(); fn(z); torch.cuda.synchronize() if device == "cuda" else None
        times.append(time.perf_counter() - t)
result.update(max_abs_diff=float((y.float() - ref.float()).abs().max()), ms=round(1000 * sorted(times)[2], 2))
stage("done")
print(json.dumps(result), flush=True)
"""


def probe(variant: str, device: str, cache: Path, timeout: float) -> dict:
    env = dict(os.environ, VAECLI_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", WORKER, variant, device, str(cache)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return {"variant": variant, "timed_out_after_s": timeout, "stderr_tail": err[-3000:]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    entry = json.loads(lines[-1]) if lines else {"variant": variant}
    entry.update(rc=proc.returncode, wall_s=round(time.monotonic() - start, 1),
                 stages=[line for line in proc.stderr.splitlines() if line.startswith("stage ")])
    if proc.returncode != 0:
        entry["stderr_tail"] = proc.stderr[-4000:]
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per process")
    parser.add_argument("--variants", default="shipped,copied,in-so,runner")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="vaecli-probe-"))
    variants = args.variants.split(",")
    caches = {v: root / v for v in variants}
    for c in caches.values():
        c.mkdir()
    results: list[dict] = []

    def save(entry: dict) -> None:
        results.append(entry)
        print(json.dumps(entry)[:1500], flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")

    with ThreadPoolExecutor(len(variants)) as pool:  # compiles are CPU-bound and independent
        for entry in pool.map(lambda v: probe(v, args.device, caches[v], args.timeout), variants):
            save(entry)
    if "shipped" in variants:
        save(probe("warm", args.device, caches["shipped"], args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
