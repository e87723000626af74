"""vaecli against diffusers' AutoencoderKL (eager) on identical weights and inputs, in one process.

Calls alternate between implementations (vaecli, diffusers, vaecli via Runner, next round...) so that
load from other processes hits all alike; medians are reported with TFLOP/s, time ratios and output
differences. The first call of each implementation counts FLOPs and gives the outputs compared.

    PYTHONPATH=. python scripts/bench_vs_diffusers.py --device cpu --resolution 256 --iters 3
    PYTHONPATH=. python scripts/bench_vs_diffusers.py --device cuda --dtype bf16 --resolution 512 \
        --resolution 1024 --batch-size 4 --json out.json
    # the device plan against a variant of it, e.g. the CPU plan before 2026-11-27, in the same run:
    PYTHONPATH=. python scripts/bench_vs_diffusers.py --variant before:upsample=subpixel,norm=fp32

Implementations:
  vaecli         model.encode / model.decode with the device's plan (vaecli.plans.plan_for, --kernels),
                 the weights in the plan's layout
  vaecli-runner  vaecli.pipeline.Runner, the CLI's path (same plan): [0,1] pixels in and out, output copied
                 to the CPU in float32 (that copy is part of its time)
  diffusers      diffusers.AutoencoderKL.encode(x).latent_dist / .decode(z).sample
  vaecli[NAME]   as vaecli, with the plan changed by --variant NAME:field=value,... (fields of
                 vaecli.plans.Plan: layout=nchw|nhwc, norm, upsample, wide_from, kernels=norm+upsample)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import vaecli  # noqa: E402
from vaecli.bench import device_name  # noqa: E402
from vaecli.devices import DTYPES  # noqa: E402
from vaecli.pipeline import Runner, RunOptions  # noqa: E402
from vaecli.plans import KERNEL_MODES, Plan, apply_layout, plan_for  # noqa: E402

# Architectures to compare (weights are random: cost does not depend on the values).
CONFIGS: dict[str, dict[str, Any]] = {
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32),
    "tiny": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16),
}


def build_models(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Any]:
    """diffusers' model with seeded random weights, and ours loaded from the folder diffusers saved it to."""
    from diffusers import AutoencoderKL

    cfg = dict(CONFIGS[config])
    levels = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    theirs = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        sample_size=512,
        force_upcast=False,  # SD 1.x/2.x's setting: fp16 runs in fp16 on both sides
        **cfg,
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = vaecli.load_vae(tmp, device=device, dtype=dtype)
    return ours, theirs.to(device=device, dtype=dtype)


def variant(text: str, base: Plan) -> tuple[str, Plan]:
    """'NAME:field=value,...' -> (NAME, base with those fields replaced)."""
    name, _, spec = text.partition(":")
    changes: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        field, _, value = item.partition("=")
        if field == "layout":
            changes[field] = torch.channels_last if value == "nhwc" else torch.contiguous_format
        elif field == "wide_from":
            changes[field] = int(value)
        elif field == "kernels":
            changes[field] = frozenset(filter(None, value.split("+")))
        else:
            changes[field] = value
    return name, dataclasses.replace(base, name=name, **changes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def op_calls(
    op: str, ours: Any, runner: Runner, theirs: Any, batch: int, side: int, device: torch.device, dtype: torch.dtype,
    plan: Plan,
) -> dict[str, Callable[[], torch.Tensor]]:
    """Per implementation, a call running `op` on shared seeded input and returning a comparable tensor.

    Encode returns the posterior mean; decode returns the image mapped to [0, 1] and clamped, which is what
    Runner returns; the mapping is done outside the timed call for the other two implementations.
    """
    gen = torch.Generator().manual_seed(1)
    f = ours.config.downsample_factor
    if op == "encode":
        x = (torch.rand(batch, 3, side, side, generator=gen) * 2 - 1).to(device, dtype)  # (N, 3, H, W) in [-1, 1]
        pixels = (x.float() + 1) / 2  # the same values in [0, 1], for Runner
        return {
            "vaecli": inference(lambda: ours.encode(x, plan=plan).mean),
            "diffusers": inference(lambda: theirs.encode(x).latent_dist.mean),
            "vaecli-runner": lambda: runner.encode(pixels).tensor,
        }
    z = torch.randn(batch, ours.config.latent_channels, side // f, side // f, generator=gen).to(device, dtype)
    return {
        "vaecli": inference(lambda: ours.decode(z, plan=plan)),
        "diffusers": inference(lambda: theirs.decode(z).sample),
        "vaecli-runner": lambda: runner.decode(z).tensor,
    }


def inference(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` under torch.inference_mode, as API users would call a model (Runner manages its own grad mode)."""

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return fn()

    return call


def comparable(op: str, impl: str, out: torch.Tensor) -> torch.Tensor:
    out = out.float().cpu()
    if op == "decode" and impl != "vaecli-runner":
        out = ((out + 1) / 2).clamp(0, 1)  # Runner's output range
    return out


def bench_op(
    calls: dict[str, Callable[[], torch.Tensor]], op: str, device: torch.device, warmup: int, iters: int
) -> dict[str, dict[str, Any]]:
    """Count FLOPs on the first call, warm up, time alternating calls; per implementation stats."""
    impls = list(calls)  # timing order within a round
    stats: dict[str, dict[str, Any]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for impl in impls:
        start = time.perf_counter()
        with FlopCounterMode(display=False) as counter:
            outputs[impl] = comparable(op, impl, calls[impl]())
        sync(device)
        stats[impl] = {"flops": counter.get_total_flops(), "first_call_s": time.perf_counter() - start}
    for _ in range(warmup - 1):
        for impl in impls:
            calls[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    peaks: dict[str, int] = {impl: 0 for impl in impls}
    for _ in range(iters):
        for impl in impls:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            calls[impl]()
            sync(device)
            times[impl].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[impl] = max(peaks[impl], torch.cuda.max_memory_allocated(device))
    ref = outputs["diffusers"]
    for impl in impls:
        stats[impl].update(
            times_s=times[impl],
            median_s=statistics.median(times[impl]),
            min_s=min(times[impl]),  # on a loaded machine noise only adds time: the least-disturbed call
            max_abs_diff_vs_diffusers=(outputs[impl] - ref).abs().max().item(),
            peak_memory_bytes=peaks[impl] if device.type == "cuda" else None,
        )
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--resolution", type=int, action="append", help="image side; repeatable (default 256, 512)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation (>= 1)")
    parser.add_argument("--ops", default="encode,decode", help="comma-separated: encode, decode")
    parser.add_argument("--config", choices=list(CONFIGS), default="sd")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--kernels", choices=KERNEL_MODES, default="auto", help="vaecli's Triton kernels (plans.py)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:field=value,... another plan to time")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)
    resolutions = args.resolution or [256, 512]
    ops = [op for op in args.ops.split(",") if op]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here")
    if args.warmup < 1 or args.iters < 1 or any(op not in ("encode", "decode") for op in ops):
        parser.error("need --warmup >= 1, --iters >= 1 and --ops from encode,decode")
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its advice on casting applies to pretrained fp16 VAEs
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, theirs = build_models(args.config, device, dtype)
    plan = plan_for(device, ours.config, args.kernels)
    apply_layout(ours, plan)
    runner = Runner(ours, RunOptions(dtype=dtype, kernels=args.kernels))
    variants = dict(variant(v, plan) for v in args.variant)
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "config": args.config,
        "dtype": args.dtype,
        "runner_compute_dtype": str(runner.dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "plan": plan.describe(),
        **({"variants": {k: p.describe() for k, p in variants.items()}} if variants else {}),
    }
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    columns = ("res", 5), ("op", -7), ("impl", -14), ("ms/img", 10), ("img/s", 8), ("TFLOP/s", 8), ("/diffusers", 10)
    columns += ("paired", 7), ("max|diff|", 10)
    print(" ".join(f"{name:<{-w}}" if w < 0 else f"{name:>{w}}" for name, w in columns), flush=True)
    rows: list[dict[str, Any]] = []
    for side in resolutions:
        for op in ops:
            calls = op_calls(op, ours, runner, theirs, args.batch_size, side, device, dtype, plan)
            for name, p in variants.items():
                calls[f"vaecli[{name}]"] = op_calls(op, ours, runner, theirs, args.batch_size, side, device, dtype,
                                                    p)["vaecli"]
            stats = bench_op(calls, op, device, args.warmup, args.iters)
            base = stats["diffusers"]["median_s"]
            for impl in calls:
                s = stats[impl]
                row = {
                    "resolution": side,
                    "op": op,
                    "impl": impl,
                    "ms_per_img": s["median_s"] * 1000 / args.batch_size,
                    "img_per_s": args.batch_size / s["median_s"],
                    "tflop_per_s": stats["diffusers"]["flops"] / s["median_s"] / 1e12,
                    "time_ratio_vs_diffusers": s["median_s"] / base,
                    # ratio within each round (calls adjacent in time), robust to slow drifts in machine load
                    "paired_ratio_median": statistics.median(
                        t / d for t, d in zip(s["times_s"], stats["diffusers"]["times_s"], strict=False)
                    ),
                    **s,
                }
                rows.append(row)
                ratio = f"{row['time_ratio_vs_diffusers']:.3f}" if impl != "diffusers" else "-"
                paired = f"{row['paired_ratio_median']:.3f}" if impl != "diffusers" else "-"
                print(
                    f"{side:>5} {op:<7} {impl:<14} {row['ms_per_img']:>10.1f} {row['img_per_s']:>8.3f} "
                    f"{row['tflop_per_s']:>8.4f} {ratio:>10} {paired:>7} {s['max_abs_diff_vs_diffusers']:>10.2e}",
                    flush=True,
                )
            if len({stats[impl]["flops"] for impl in calls}) > 1:
                print(f"  note: FLOP counts differ: { {i: stats[i]['flops'] for i in calls} }", flush=True)
    print(
        "/diffusers: ratio of median times (< 1: vaecli is faster); paired: median of per-round ratios; "
        "TFLOP/s uses diffusers' FLOP count for every implementation"
    )
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
