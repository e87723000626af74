"""Reconstruction quality (PSNR, SSIM on 8-bit RGB) of a VAE, beside bicubic x8 down-up, per kind of image.

    python scripts/eval_default.py                    # the embedded model on the mixed validation set, per kind
    python scripts/eval_default.py examples/          # ... on the images of a folder
    python scripts/eval_default.py --model DIR --bench --hue

The validation set is the `val` role of scripts/default_data.py's listing (--data: its cache folder; build it
first). Images of any size are replicate-padded to a multiple of 8 before encoding and cropped after
decoding; the posterior mode is decoded in fp32. --hue reports the per-channel mean error on flat patches of
saturated greens and teals (rendered here, never trained on) and on the green-dominated validation photos.
--bench also times a 512x512 encode+decode after warm-up.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vaecli import AutoencoderKL, load_vae  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Saturated greens and teals (sRGB): pure and web greens, foliage greens, teal, turquoise, aquamarine.
GREENS_TEALS = ((0, 255, 0), (0, 200, 80), (30, 160, 40), (0, 128, 0), (50, 205, 50), (34, 139, 34),
                (0, 128, 128), (0, 180, 170), (0, 200, 200), (64, 224, 208), (0, 150, 136), (0, 255, 200))
GREEN_PHOTOS = ("mate-LadyBird", "mate-RainDrops", "noisy-0-mate-GreenMeadow", "oldscan-2-mate-Garden")
PATCH = 64  # side of each flat colour patch; errors are read in its central half


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


def images_of(folder: Path | None, data: Path) -> list[tuple[str, str, np.ndarray]]:
    """(name, kind, RGB uint8 array) for every image in `folder` (kind ""), or of the validation set."""
    if folder is None:
        import default_data

        return [(e.name, e.kind, np.asarray(Image.open(e.path).convert("RGB")))
                for e in default_data.read_listing(data, "val")]
    return [(p.name, "", np.asarray(Image.open(p).convert("RGB")))
            for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def quality(model: AutoencoderKL, images: list[tuple[str, str, np.ndarray]]) -> dict[str, dict]:
    """Per image: kind, size, PSNR and SSIM of the model and of bicubic x8, and the reconstruction."""
    out = {}
    print(f"{'image':<32} {'kind':<7} {'size':>9} {'PSNR':>7} {'SSIM':>7} {'bicubic x8 PSNR':>16} {'SSIM':>7}")
    for name, kind, rgb in images:
        rec, bic = roundtrip(model, rgb), bicubic_x8(rgb)
        row = {"kind": kind, "size": f"{rgb.shape[1]}x{rgb.shape[0]}", "psnr": psnr(rgb, rec), "ssim": ssim(rgb, rec),
               "bic_psnr": psnr(rgb, bic), "bic_ssim": ssim(rgb, bic), "rgb": rgb, "rec": rec}
        out[name] = row
        print(f"{name:<32} {kind:<7} {row['size']:>9} {row['psnr']:7.2f} {row['ssim']:7.4f} "
              f"{row['bic_psnr']:16.2f} {row['bic_ssim']:7.4f}", flush=True)
    return out


def summary(rows: dict[str, dict]) -> None:
    """Means per kind and over all images, and the mean of the per-kind means."""
    keys = ("psnr", "ssim", "bic_psnr", "bic_ssim")
    kinds = sorted({r["kind"] for r in rows.values()})
    per_kind = []
    print(f"\n{'group':<12} {'n':>3} {'PSNR':>7} {'SSIM':>7} {'bicubic x8 PSNR':>16} {'SSIM':>7} "
          f"{'PSNR - bicubic':>15}")
    for group in [*kinds, "all"]:
        sel = [r for r in rows.values() if group in ("all", r["kind"])]
        m = [float(np.mean([r[k] for r in sel])) for k in keys]
        if group != "all":
            per_kind.append(m)
        print(f"{group or 'images':<12} {len(sel):>3} {m[0]:7.2f} {m[1]:7.4f} {m[2]:16.2f} {m[3]:7.4f} "
              f"{m[0] - m[2]:15.2f}")
    if len(kinds) > 1:
        m = np.mean(per_kind, axis=0)
        print(f"{'kind mean':<12} {'':>3} {m[0]:7.2f} {m[1]:7.4f} {m[2]:16.2f} {m[3]:7.4f} {m[0] - m[2]:15.2f}")


def hue(model: AutoencoderKL, rows: dict[str, dict]) -> None:
    """Per-channel mean error (output - input, 8-bit levels) on green/teal patches and green photos."""
    patches = np.zeros((PATCH * 3, PATCH * 4, 3), np.uint8)  # (H, W, 3): a 3x4 grid of flat patches
    for i, c in enumerate(GREENS_TEALS):
        patches[(i // 4) * PATCH:(i // 4 + 1) * PATCH, (i % 4) * PATCH:(i % 4 + 1) * PATCH] = c
    rec = roundtrip(model, patches).astype(np.float64)
    print(f"\n{'colour (R, G, B)':<18} {'mean error R':>12} {'G':>7} {'B':>7}")
    errs = []
    q = PATCH // 4
    for i, c in enumerate(GREENS_TEALS):
        y0, x0 = (i // 4) * PATCH + q, (i % 4) * PATCH + q
        e = rec[y0:y0 + 2 * q, x0:x0 + 2 * q].reshape(-1, 3).mean(0) - np.array(c)
        errs.append(e)
        print(f"{str(c):<18} {e[0]:12.1f} {e[1]:7.1f} {e[2]:7.1f}")
    a = np.abs(np.array(errs))
    print(f"{'mean |error|':<18} {a[:, 0].mean():12.1f} {a[:, 1].mean():7.1f} {a[:, 2].mean():7.1f}"
          f"   (all channels {a.mean():.1f}, worst {a.max():.1f})")
    for name in GREEN_PHOTOS:
        if name in rows:
            r = rows[name]
            e = r["rec"].reshape(-1, 3).astype(np.float64).mean(0) - r["rgb"].reshape(-1, 3).mean(0)
            print(f"{name:<32} mean error R {e[0]:+.2f} G {e[1]:+.2f} B {e[2]:+.2f}")


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
    ap.add_argument("folder", type=Path, nargs="?", default=None, help="images to evaluate (default: validation set)")
    ap.add_argument("--data", type=Path, default=Path.home() / ".cache" / "vaecli-default-data",
                    help="cache folder of scripts/default_data.py")
    ap.add_argument("--model", default=None, help="model folder or file (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hue", action="store_true", help="also the per-channel error on saturated greens and teals")
    ap.add_argument("--bench", action="store_true", help="also time a 512x512 roundtrip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_vae(args.model)
    rows = quality(model, images_of(args.folder, args.data))
    if rows:
        summary(rows)
    if args.hue:
        hue(model, rows)
    if args.bench:
        print(f"\n512x512 roundtrip (fp32, {args.threads} threads, channels_last): {bench_512(model):.3f} s")


if __name__ == "__main__":
    main()
