"""vaecli's Qwen-Image VAE against diffusers' AutoencoderKLQwenImage (eager, T=1) on identical weights and
inputs, in one process, on the CPU in fp32.

Calls alternate between the two implementations (ours, diffusers, next round...) so that load from other
processes hits both alike; the table shows medians, the time ratio and the largest output difference.
The weights are random (cost does not depend on their values) in the released architecture: base_dim 96,
z_dim 16, dim_mult 1,2,4,4, num_res_blocks 2.

    PYTHONPATH=. python scripts/bench_qwenimage.py --resolution 256 --resolution 512 --iters 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vaecli.models.qwenimage import AutoencoderKLQwenImage, QwenImageConfig  # noqa: E402


def build_models(seed: int = 0) -> tuple[AutoencoderKLQwenImage, torch.nn.Module]:
    """diffusers' model with seeded random weights (its own init) and ours with the same state dict."""
    from diffusers import AutoencoderKLQwenImage as Reference

    torch.manual_seed(seed)
    theirs = Reference().eval()  # diffusers' defaults are the released config
    ours = AutoencoderKLQwenImage(QwenImageConfig.from_dict(dict(theirs.config))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def median_seconds(
    fns: dict[str, Callable[[], torch.Tensor]], iters: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median wall time of each function over `iters` alternating rounds, after one untimed warm-up call each
    (whose output is returned for comparison)."""
    outputs = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, action="append", help="image side (repeatable; default 256 and 512)")
    parser.add_argument("--iters", type=int, default=3, help="timed rounds per case (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, theirs = build_models()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, fp32, "
          f"batch 1, {args.iters} timed rounds (median) after one warm-up each")
    print(f"{'op':<7}{'res':>6}{'vaecli s':>11}{'diffusers s':>13}{'ratio':>8}{'max |diff|':>12}")
    with torch.no_grad():
        for res in args.resolution or [256, 512]:
            torch.manual_seed(1)
            x = torch.rand(1, 3, res, res) * 2 - 1
            z = theirs.encode(x[:, :, None]).latent_dist.mean  # (1, 16, 1, res/8, res/8)
            cases = {
                "encode": {"vaecli": lambda x=x: ours.encode(x).mean,
                           "diffusers": lambda x=x: theirs.encode(x[:, :, None]).latent_dist.mean[:, :, 0]},
                "decode": {"vaecli": lambda z=z: ours.decode(z[:, :, 0]),
                           "diffusers": lambda z=z: theirs.decode(z).sample[:, :, 0]},
            }
            for op, fns in cases.items():
                med, out = median_seconds(fns, args.iters)
                diff = float((out["vaecli"] - out["diffusers"]).abs().max())
                ratio = med["diffusers"] / med["vaecli"]
                print(f"{op:<7}{res:>6}{med['vaecli']:>11.2f}{med['diffusers']:>13.2f}{ratio:>7.2f}x{diff:>12.2e}",
                      flush=True)
    print("ratio: diffusers' time / vaecli's (above 1: vaecli is faster)")


if __name__ == "__main__":
    main()
