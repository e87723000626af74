"""One command for a GPU session: vaecli against diffusers on every row of issue 12, in one process.

    python scripts/gpu_report.py --json gpu_report.json          # CUDA, at most --budget seconds (480)
    python scripts/gpu_report.py --device cpu --quick --json r.json  # tiny model, small sizes (CI smoke test)

Sections, in order (each guarded: one that fails is recorded with its error and the next one runs; the
JSON is rewritten after every row; sections that would start past the time budget are skipped, saying so):
  env       device, driver/library versions, the plan table (vaecli.plans) with its measurements
  rows      encode/decode x 512/1024 x batch 1/16 (--quick: 64/128 x 1/2), bf16 then fp16 then fp32:
            diffusers, vaecli's default plan, the same with every Triton kernel and with none (where that
            differs from the default), and the kernels in the other memory layout (NCHW/NHWC);
            alternating calls, medians, time ratio and max |diff| vs diffusers
  accuracy  the embedded default model on the bundled photos: bf16 (default plan, kernels on/off) against
            diffusers fp32 on the same weights; latent max |diff|, 8-bit PSNR of decodes
  tiling    tiled vs untiled encode/decode at 2048 and 4096 (bf16, default plan): time, peak memory,
            max |diff| and PSNR of the tiled result against the untiled one
  pipeline  issue 13: JPEG folders (512^2, mixed sizes) end to end against the model alone, 8192^2
            decode/encode with --tiling auto and off (scripts/pipeline_throughput.py's gpu_rows), at
            most PIPELINE_CAP_S seconds
  compile   --compile in a cold then a warm process (fresh package cache), decode 1024 bf16: seconds
            from process start to the first compiled decode, compiled vs eager ms, and the events (which
            package form loaded, or why none did); skipped with --quick
The summary at the end prints each row's speedup over diffusers and the issue's bars as pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))

import vaecli  # noqa: E402
from bench_vs_diffusers import bench_op, build_models, inference, sync  # noqa: E402
from vaecli import accel, kernels  # noqa: E402
from vaecli.bench import device_name  # noqa: E402
from vaecli.devices import DTYPES  # noqa: E402
from vaecli.pipeline import Runner, RunOptions  # noqa: E402
from vaecli.plans import TABLE, apply_layout, plan_for  # noqa: E402

# (op, side, batch) per row, as in issue 12's table; --quick shrinks sides and batches.
ROWS = [("encode", 512, 1), ("decode", 512, 1), ("encode", 1024, 1), ("decode", 1024, 1), ("encode", 512, 16),
        ("decode", 512, 16)]
QUICK_SIDE = {512: 32, 1024: 64}
QUICK_BATCH = {1: 1, 16: 2}
BARS = [  # (dtype, op, side, batch, least speedup over diffusers of the default plan), issue 12
    ("bf16", "decode", 1024, 1, 3.5), ("bf16", "encode", 1024, 1, 3.0), ("bf16", "encode", 512, 16, 3.0),
    ("bf16", "decode", 512, 16, 3.0), ("fp16", "decode", 1024, 1, 3.5), ("fp16", "encode", 1024, 1, 3.0),
    ("fp16", "encode", 512, 16, 3.0), ("fp16", "decode", 512, 16, 3.0),
]


class Report:
    """The JSON document, written atomically after every change, and the time budget."""

    def __init__(self, path: Path | None, budget_s: float) -> None:
        self.path, self.budget_s, self.start = path, budget_s, time.monotonic()
        self.doc: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget_s, "sections": {}}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.start, 1)
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    def section(
        self, name: str, fn: Callable[[Report, dict[str, Any]], None], need_s: float, skip: str | None = None
    ) -> None:
        """Run one section into doc['sections'][name]; failures and skips are recorded, never raised."""
        out: dict[str, Any] = {"status": "running"}
        self.doc["sections"][name] = out
        if skip is None and need_s > 0 and self.left() < need_s:  # need 0: always runs (env)
            skip = f"time budget: {self.left():.0f} s left, needs about {need_s:.0f} s"
        if skip is not None:
            out.update(status="skipped", reason=skip)
            print(f"== {name}: skipped ({skip})", flush=True)
            self.save()
            return
        print(f"== {name} ({self.left():.0f} s of budget left)", flush=True)
        t = time.monotonic()
        try:
            fn(self, out)
            out["status"] = "ok" if out.get("status") == "running" else out["status"]
        except Exception as exc:  # one failing section must not cost the others
            out.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
            print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            out["seconds"] = round(time.monotonic() - t, 1)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.save()


# -- sections -----------------------------------------------------------------------------------------------


def env_section(args: argparse.Namespace) -> Callable[[Report, dict[str, Any]], None]:
    def run(report: Report, out: dict[str, Any]) -> None:
        import diffusers

        out.update(
            device=device_name(args.device), torch=torch.__version__, diffusers=diffusers.__version__,
            python=platform.python_version(), vaecli=vaecli.__version__, git=_git_rev(),
            code=accel._code_hash(),  # model, plans and kernels as run (a device's copy of .git may be older)
            triton=_version("triton"), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            capability=list(torch.cuda.get_device_capability()) if args.device == "cuda" else None,
            kernels_run_here={
                str(dt).removeprefix("torch."): kernels.device_ok(torch.empty(1, device=args.device, dtype=dt))
                for dt in (torch.bfloat16, torch.float16, torch.float32)
            },
            plan_table={dev: dataclasses.asdict(row) for dev, row in TABLE.items()},  # layer and run-level choices
        )
        shown = ("device", "torch", "diffusers", "triton", "cuda", "git")
        print("   " + " | ".join(f"{k} {out[k]}" for k in shown), flush=True)

    return run


def rows_section(args: argparse.Namespace) -> Callable[[Report, dict[str, Any]], None]:
    def run(report: Report, out: dict[str, Any]) -> None:
        device = torch.device(args.device)
        out["rows"], out["skipped_rows"] = [], []
        later = args.chosen & {"accuracy", "compile", "tiling", "pipeline"}
        reserve = 10 if args.quick or not later else 160  # for the sections chosen after this one
        for dtype_name in args.dtypes.split(","):
            if report.left() < reserve + 20:
                out["skipped_rows"].append(f"{dtype_name}: time budget")
                continue
            dtype = DTYPES[dtype_name]
            ours, theirs = build_models(args.config, device, dtype)
            base = plan_for(device, ours.config, "auto")
            apply_layout(ours, base)
            variants = {"vaecli": (ours, base)}  # the default plan (TABLE's row for the device)
            for mode in ("on", "off"):  # the default with every kernel, and with none (diffusers' sequence)
                plan = plan_for(device, ours.config, mode)
                if plan != base:
                    variants[f"vaecli-kernels-{mode}"] = (ours, plan)
            # the other candidate for the CUDA row of plans.TABLE: the kernels in the other memory layout
            kernels_on = plan_for(device, ours.config, "on")
            other = "nchw" if kernels_on.layout == torch.channels_last else "nhwc"
            flipped = dataclasses.replace(kernels_on, name=f"kernels-{other}",
                                          layout=torch.channels_last if other == "nhwc" else torch.contiguous_format)
            variants[f"vaecli-kernels-{other}"] = (apply_layout(copy.deepcopy(ours), flipped), flipped)
            for op, side, batch in ROWS:
                side, batch = (QUICK_SIDE[side], QUICK_BATCH[batch]) if args.quick else (side, batch)
                if report.left() < reserve:
                    out["skipped_rows"].append(f"{dtype_name} {op} {side} b{batch}: time budget")
                    continue
                try:
                    row = _row(variants, theirs, op, side, batch, device, dtype, args)
                except Exception as exc:  # e.g. out of memory: the other rows still run
                    row = {"op": op, "resolution": side, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:500]}
                    out["status"] = "partial"
                row.update(dtype=dtype_name)
                out["rows"].append(row)
                _print_row(row)
                report.save()
            del ours, theirs, variants
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if out["skipped_rows"]:
            out["status"] = "partial"

    return run


def _row(variants: dict[str, tuple[Any, Any]], theirs: Any, op: str, side: int, batch: int, device: torch.device,
         dtype: torch.dtype, args: argparse.Namespace) -> dict[str, Any]:
    """One row: diffusers and each (model, plan) variant of ours, alternating; medians and differences."""
    gen = torch.Generator().manual_seed(1)
    cfg = theirs.config
    if op == "encode":
        x = (torch.rand(batch, 3, side, side, generator=gen) * 2 - 1).to(device, dtype)
        calls = {"diffusers": inference(lambda: theirs.encode(x).latent_dist.mean)}
        for name, (m, p) in variants.items():
            calls[name] = inference(lambda m=m, p=p: m.encode(x, plan=p).mean)
    else:
        f = 2 ** (len(cfg.block_out_channels) - 1)
        z = torch.randn(batch, cfg.latent_channels, side // f, side // f, generator=gen).to(device, dtype)
        calls = {"diffusers": inference(lambda: theirs.decode(z).sample)}
        for name, (m, p) in variants.items():
            calls[name] = inference(lambda m=m, p=p: m.decode(z, plan=p))
    failed = {}
    for name in [n for n in calls if n != "diffusers"]:
        try:  # one call first: an implementation that fails (a kernel that does not compile...) is dropped
            calls[name]()
        except Exception as exc:
            failed[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            del calls[name]
    iters = 1 if args.quick else args.iters if batch == 1 else max(2, args.iters - 2)
    stats = bench_op(calls, op, device, warmup=1 if args.quick else 2, iters=iters)
    base = stats["diffusers"]["median_s"]
    impls = {}
    for name, s in stats.items():
        impls[name] = {
            "ms_per_img": s["median_s"] * 1000 / batch,
            "speedup_vs_diffusers": base / s["median_s"],
            "paired_ratio": statistics.median(
                t / d for t, d in zip(s["times_s"], stats["diffusers"]["times_s"], strict=False)),
            "max_abs_diff_vs_diffusers": s["max_abs_diff_vs_diffusers"],
            "first_call_s": s["first_call_s"],
            "peak_memory_bytes": s["peak_memory_bytes"],
        }
    return {"op": op, "resolution": side, "batch": batch, "iters": iters, "impls": {**impls, **failed}}


def _print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"   {row['dtype']} {row['op']} {row['resolution']} b{row['batch']}: failed: {row['error']}", flush=True)
        return
    parts = [f"{name} failed: {v['error'][:120]}" if "error" in v else
             f"{name} {v['ms_per_img']:.2f} ms ({v['speedup_vs_diffusers']:.2f}x, "
             f"diff {v['max_abs_diff_vs_diffusers']:.1e})"
             for name, v in row["impls"].items()]
    print(f"   {row['dtype']} {row['op']} {row['resolution']} b{row['batch']}: " + "; ".join(parts), flush=True)


def tiling_section(args: argparse.Namespace) -> Callable[[Report, dict[str, Any]], None]:
    def run(report: Report, out: dict[str, Any]) -> None:
        device = torch.device(args.device)
        ours, theirs = build_models(args.config, device, torch.bfloat16)
        del theirs
        # The Runners below share this model: in the plan's layout already, none of them needs a copy of it.
        apply_layout(ours, plan_for(device, ours.config, "auto"))
        sides, tile, overlap = ((64,), 32, 8) if args.quick else ((2048, 4096), 512, 64)
        out["tile_size"], out["tile_overlap"], out["rows"] = tile, overlap, []
        for side in sides:
            for op in ("decode", "encode"):
                if report.left() < 15:
                    out.setdefault("skipped_rows", []).append(f"{op} {side}: time budget")
                    out["status"] = "partial"
                    continue
                row = _tiled_row(ours, op, side, tile, overlap, device)
                out["rows"].append(row)
                print(f"   {op} {side}: untiled {row['untiled_ms']:.0f} ms {row['untiled_peak_gib']} GiB, tiled "
                      f"{row['tiled_ms']:.0f} ms {row['tiled_peak_gib']} GiB ({row['tiles']} tiles), "
                      f"PSNR {row['psnr_db']:.1f} dB, max diff {row['max_abs_diff']:.1e}", flush=True)
                report.save()

    return run


def _tiled_row(ours: Any, op: str, side: int, tile: int, overlap: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    f = ours.config.downsample_factor
    if op == "encode":
        x = torch.rand(1, 3, side, side, generator=gen)
    else:
        x = torch.randn(1, ours.config.latent_channels, side // f, side // f, generator=gen)
    result: dict[str, Any] = {"op": op, "resolution": side}
    outs = {}
    for mode in ("off", "on", "off", "on"):  # alternate; the second of each is timed
        runner = Runner(ours, RunOptions(dtype=torch.bfloat16, tiling=mode, tile_size=tile, tile_overlap=overlap))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t = time.perf_counter()
        res = runner.encode(x) if op == "encode" else runner.decode(x)
        sync(device)
        key = "tiled" if mode == "on" else "untiled"
        result[f"{key}_ms"] = (time.perf_counter() - t) * 1000
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result[f"{key}_peak_gib"] = round(peak / 2**30, 2) if peak is not None else None
        outs[key] = res.tensor
        if mode == "on":
            result["tiles"] = res.tiles
    diff = (outs["tiled"] - outs["untiled"]).abs()
    result["max_abs_diff"] = diff.max().item()
    span = (outs["untiled"].max() - outs["untiled"].min()).item() or 1.0
    mse = diff.square().mean().item()
    result["psnr_db"] = 10 * math.log10(span**2 / mse) if mse > 0 else float("inf")
    return result


def accuracy_section(args: argparse.Namespace) -> Callable[[Report, dict[str, Any]], None]:
    def run(report: Report, out: dict[str, Any]) -> None:
        from diffusers import AutoencoderKL as DiffusersVAE
        from PIL import Image

        from vaecli.weight_files import default_model_dir

        device = torch.device(args.device)
        theirs = DiffusersVAE.from_pretrained(default_model_dir(), torch_dtype=torch.float32).to(device).eval()
        ours = vaecli.load_vae(device=device, dtype=torch.bfloat16)
        plans = {"default": plan_for(device, ours.config, "auto")}
        for mode in ("on", "off"):  # with every kernel and with none, where that differs from the default
            if plan_for(device, ours.config, mode) != plans["default"]:
                plans[f"kernels-{mode}"] = plan_for(device, ours.config, mode)
        apply_layout(ours, plans["default"])
        out["images"] = []
        side = 64 if args.quick else 768
        for path in sorted((ROOT / "examples").glob("*.jpg"))[: 1 if args.quick else None]:
            img = Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC)
            pixels = torch.from_numpy(__import__("numpy").array(img))  # (H, W, 3) uint8
            x = pixels.permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)  # (1, 3, H, W) in [-1, 1]
            with torch.inference_mode():
                z_ref = theirs.encode(x).latent_dist.mean
                ref8 = _to8(theirs.decode(z_ref).sample)
                entry: dict[str, Any] = {"image": path.name, "side": side}
                for name, p in plans.items():
                    try:
                        entry[name] = _accuracy(ours, p, x, z_ref, ref8)
                    except Exception as exc:  # one plan failing keeps the other's figures
                        entry[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                        out["status"] = "partial"
            out["images"].append(entry)
            print(f"   {path.name}: " + "; ".join(
                f"{n} failed" if "error" in entry[n] else f"{n} latent diff {entry[n]['latent_max_abs_diff']:.3g}, "
                f"decode {entry[n]['decode_psnr_8bit_db']:.1f} dB" for n in plans), flush=True)
            report.save()

    return run


def _accuracy(ours: Any, plan: Any, x: torch.Tensor, z_ref: torch.Tensor, ref8: torch.Tensor) -> dict[str, float]:
    """Our bf16 encode of x against diffusers' fp32 latents, and our decode of those latents in 8 bits."""
    z = ours.encode(x, plan=plan).mean.float()
    y8 = _to8(ours.decode(z_ref.to(torch.bfloat16), plan=plan).float())
    mse = (y8 - ref8).square().mean().item()
    return {
        "latent_max_abs_diff": (z - z_ref).abs().max().item(),
        "latent_max_abs": z_ref.abs().max().item(),
        "decode_psnr_8bit_db": 10 * math.log10(255**2 / mse) if mse > 0 else float("inf"),
    }


def _to8(y: torch.Tensor) -> torch.Tensor:
    return ((y.float().clamp(-1, 1) + 1) * 127.5).round()


COMPILE_WORKER = """
import json, statistics, sys, time
start = time.time()
import torch, vaecli
from vaecli.pipeline import Runner, RunOptions
model, device, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
vae = vaecli.load_vae(model, device=device, dtype=torch.bfloat16)
gen = torch.Generator().manual_seed(0)
z = torch.randn(1, vae.config.latent_channels, side // 8, side // 8, generator=gen).to(device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
compiled = Runner(vae, RunOptions(dtype=torch.bfloat16, compile=True))
eager = Runner(vae, RunOptions(dtype=torch.bfloat16))
first = compiled.decode(z)
sync()
ready = time.time() - start  # process start -> first compiled decode done
eager.decode(z)
times = {"compiled": [], "eager": []}
for _ in range(5):
    for name, r in (("compiled", compiled), ("eager", eager)):
        sync(); t = time.perf_counter(); r.decode(z); sync(); times[name].append(time.perf_counter() - t)
print(json.dumps({"ready_s": ready, "events": first.events,
                  **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}}))
"""


def compile_section(args: argparse.Namespace) -> Callable[[Report, dict[str, Any]], None]:
    """--compile in a cold then a warm process (fresh package cache), decode at 1024 bf16: time from process
    start to the first compiled decode, and compiled against eager ms in the same process."""

    def run(report: Report, out: dict[str, Any]) -> None:
        model_dir = Path(tempfile.mkdtemp(prefix="vaecli-report-model-"))
        _, theirs = build_models(args.config, torch.device("cpu"), torch.float32)
        theirs.save_pretrained(model_dir)
        side = 64 if args.quick else 1024
        env = dict(os.environ, VAECLI_CACHE_DIR=tempfile.mkdtemp(prefix="vaecli-report-cache-"), PYTHONPATH=str(ROOT))
        out["op"], out["resolution"], out["runs"] = "decode", side, []
        for name, cap in (("cold", 300), ("warm", 90)):  # cold: up to two package forms built and checked
            limit = min(cap, report.left() - (20 if name == "cold" else 2))  # the last section: the rest
            if limit < 30:
                out["runs"].append({"process": name, "skipped": "time budget"})
                out["status"] = "partial"
                continue
            t = time.monotonic()
            cmd = [sys.executable, "-c", COMPILE_WORKER, str(model_dir), args.device, str(side)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=limit)
            except subprocess.TimeoutExpired:
                out["runs"].append({"process": name, "timed_out_after_s": round(limit)})
                out["status"] = "partial"
                continue
            entry: dict[str, Any] = {"process": name, "wall_s": round(time.monotonic() - t, 1), "rc": proc.returncode}
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            entry.update(json.loads(lines[-1]) if lines else {"stderr_tail": proc.stderr[-2000:]})
            out["runs"].append(entry)
            print(f"   {name}: {json.dumps(entry)[:400]}", flush=True)
            report.save()

    return run


def pipeline_section(args: argparse.Namespace) -> Callable[[Report, dict[str, Any]], None]:
    """Issue 13's rows (scripts/pipeline_throughput.gpu_rows): 512^2 and mixed-size JPEG folders through the
    CLI's pipeline against the model alone, and 8192^2 decode/encode with --tiling auto and off, in what is
    left of the budget (what does not fit is skipped, saying so)."""

    def run(report: Report, out: dict[str, Any]) -> None:
        import pipeline_throughput

        budget = min(PIPELINE_CAP_S, report.left() - (COMPILE_NEED_S if "compile" in args.chosen else 5))
        out.update(pipeline_throughput.gpu_rows(budget_s=max(0.0, budget), device=args.device, quick=args.quick))

    return run


# -- summary and helpers ------------------------------------------------------------------------------------


PIPELINE_CAP_S = 150  # issue 13's rows get at most this, so that the compile section still runs after them
COMPILE_NEED_S = 120
SECTIONS = {  # name -> (section maker, seconds it needs at least to start), in the order they run
    "env": (env_section, 0), "rows": (rows_section, 30), "accuracy": (accuracy_section, 15),
    "tiling": (tiling_section, 40), "pipeline": (pipeline_section, 60), "compile": (compile_section, COMPILE_NEED_S),
}


def summary(report: Report) -> list[str]:
    lines = []
    rows = [r for r in report.doc["sections"].get("rows", {}).get("rows", []) if "impls" in r]
    by_key = {(r["dtype"], r["op"], r["resolution"], r["batch"]): r for r in rows}
    for r in rows:
        cells = "  ".join(f"{n} {v['speedup_vs_diffusers']:5.2f}x" if "error" not in v else f"{n} failed"
                          for n, v in r["impls"].items() if n != "diffusers")
        lines.append(f"{r['dtype']:>4} {r['op']:<6} {r['resolution']:>5} b{r['batch']:<3} diffusers "
                     f"{r['impls']['diffusers']['ms_per_img']:8.2f} ms/img  {cells}")
    quick = report.doc.get("quick")
    for dtype, op, side, batch, need in BARS:
        key = (dtype, op, QUICK_SIDE[side], QUICK_BATCH[batch]) if quick else (dtype, op, side, batch)
        r = by_key.get(key)
        got = r["impls"]["vaecli"].get("speedup_vs_diffusers") if r else None
        verdict = "not measured" if got is None else ("PASS" if got >= need else "FAIL")
        lines.append(f"bar {dtype} {op} {side} b{batch}: default plan >= {need}x diffusers: "
                     f"{'-' if got is None else f'{got:.2f}x'} {verdict}")
    slow = [f"{r['dtype']} {r['op']} {r['resolution']} b{r['batch']}" for r in rows
            if r["impls"]["vaecli"].get("speedup_vs_diffusers", 0.0) < 1.0]
    lines.append("rows where the default plan is slower than diffusers: " + (", ".join(slow) or "none"))
    for name, sec in report.doc["sections"].items():
        lines.append(f"section {name}: {sec.get('status')}" + (f" ({sec.get('reason') or sec.get('error')})"
                                                                if sec.get("status") in ("skipped", "failed") else ""))
    return lines


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, small sizes, no compile section")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per implementation (batch 1)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="rows section precisions, in this order")
    parser.add_argument("--json", type=Path, default=None, help="write the report here (rewritten as it grows)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; --quick: all but compile)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here (use --device cpu --quick for a smoke run)")
    args.config = "tiny" if args.quick else "sd"
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    report = Report(args.json, args.budget)
    report.doc.update(quick=args.quick, device=args.device, config=args.config)
    chosen = set(args.sections.split(",")) if args.sections else set(SECTIONS) - ({"compile"} if args.quick else set())
    if not chosen <= set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(chosen - set(SECTIONS)))}")
    args.chosen = chosen
    for name, (make, need) in SECTIONS.items():
        skip = None
        if name not in chosen:
            quick = args.quick and not args.sections
            skip = "--quick (a CPU compile takes minutes)" if quick else "not asked for (--sections)"
        report.section(name, make(args), need_s=need, skip=skip)
    report.doc["summary"] = summary(report)
    report.save()
    print("\n".join(["== summary"] + report.doc["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
