"""Reconstruction quality (PSNR, SSIM on 8-bit RGB) of a VAE on a folder of images, beside bicubic x8 down-up.

    python scripts/eval_default.py                   # the embedded default model on the held-out photos
    python scripts/eval_default.py examples/         # ... on the images of a folder
    python scripts/eval_default.py --model DIR --bench

Images of any size are replicate-padded to a multiple of 8 before encoding and cropped after decoding; the
posterior mode is decoded in fp32. --bench also times a 512x512 encode+decode after warm-up.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaecli import AutoencoderKL, load_vae  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W, 3) uint8 arrays (scikit-image defaults: 7x7 uniform window, per channel)."""
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


@torch.no_grad()
def roundtrip(model: AutoencoderKL, rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> encode (posterior mode) -> decode -> (H, W, 3) uint8, any H and W."""
    h, w = rgb.shape[:2]
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)
    f = model.config.downsample_factor
    x = F.pad(x, (0, (-w) % f, 0, (-h) % f), mode="replicate")  # (1, 3, H', W'), multiples of f
    y = model.decode(model.encode(x).mode())[:, :, :h, :w].float()  # (1, 3, H, W)
    return ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def bicubic_x8(rgb: np.ndarray) -> np.ndarray:
    """Bicubic downscale by 8 (to the same grid as the latents) and back up: the scale of an 8x bottleneck."""
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb)
    small = img.resize((math.ceil(w / 8), math.ceil(h / 8)), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def images_of(folder: Path | None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8 array) for every image in `folder`, or the held-out set of scripts/train_default.py."""
    if folder is None:
        import train_default

        return [(p.name, arr) for p, arr in train_default.heldout_images()]
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            out.append((path.name, np.asarray(Image.open(path).convert("RGB"))))
    return out


@torch.no_grad()
def bench_512(model: AutoencoderKL, repeats: int = 5) -> float:
    """Best-of wall time of a 512x512 encode + decode, after one warm-up."""
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    model.decode(model.encode(x).mode())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.decode(model.encode(x).mode())
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, nargs="?", default=None, help="images to evaluate (default: held-out set)")
    ap.add_argument("--model", default=None, help="model folder or file (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", action="store_true", help="also time a 512x512 roundtrip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_vae(args.model)
    rows = []
    print(f"{'image':<22} {'size':>9} {'PSNR':>7} {'SSIM':>7} {'bicubic x8 PSNR':>16} {'SSIM':>7}")
    for name, rgb in images_of(args.folder):
        rec = roundtrip(model, rgb)
        bic = bicubic_x8(rgb)
        row = (psnr(rgb, rec), ssim(rgb, rec), psnr(rgb, bic), ssim(rgb, bic))
        rows.append(row)
        h, w = rgb.shape[:2]
        print(f"{name:<22} {f'{w}x{h}':>9} {row[0]:7.2f} {row[1]:7.4f} {row[2]:16.2f} {row[3]:7.4f}", flush=True)
    if rows:
        m = np.mean(np.array(rows), axis=0)
        print(f"{'mean':<22} {'':>9} {m[0]:7.2f} {m[1]:7.4f} {m[2]:16.2f} {m[3]:7.4f}")
    if args.bench:
        print(f"512x512 roundtrip (fp32, {args.threads} threads, channels_last): {bench_512(model):.3f} s")


if __name__ == "__main__":
    main()
