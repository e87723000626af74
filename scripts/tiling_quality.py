"""Tiled vs untiled on a real photo: vaecli's whole-image-statistics tiling against diffusers' per-tile
tiling (the seed's method), same weights, same image. Prints PSNR of each tiled result against untiled.

    python scripts/tiling_quality.py --image photo.jpg [--model FOLDER] [--size 2048] [--tile-size 512]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import vaecli
from vaecli.tiling import tiled_decode, tiled_encode_moments


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two [-1, 1] images after 8-bit quantisation, as a user would compare saved files."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = (qa - qb).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def load(path: str, size: int) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = size / min(w, h)  # cover size x size, then centre-crop
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--tile-overlap", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    vae = vaecli.load_vae(args.model)
    x = load(args.image, args.size)
    rows: dict[str, float] = {}

    t = time.perf_counter()
    moments = vae.encode_moments(x)
    rows["untiled_encode_s"] = time.perf_counter() - t
    z = moments[:, : vae.config.latent_channels]
    t = time.perf_counter()
    ref = vae.decode(z)
    rows["untiled_decode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tiled_m, rep_e = tiled_encode_moments(vae, x, args.tile_size, args.tile_overlap)
    rows["tiled_encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tiled_y, rep_d = tiled_decode(vae, z, args.tile_size, args.tile_overlap)
    rows["tiled_decode_s"] = time.perf_counter() - t
    rows["vaecli_decode_psnr"] = psnr(tiled_y, ref)
    rows["vaecli_encode_psnr"] = psnr(vae.decode(tiled_m[:, : vae.config.latent_channels]), ref)
    rows["tiles_encode"], rows["tiles_decode"] = rep_e.tiles, rep_d.tiles

    try:
        from diffusers import AutoencoderKL
    except ImportError:
        AutoencoderKL = None
    if AutoencoderKL is not None:
        with tempfile.TemporaryDirectory() as tmp:
            vaecli.save_vae(vae, tmp)
            d = AutoencoderKL.from_pretrained(tmp).eval()
        d.enable_tiling()
        d.tile_sample_min_size = args.tile_size
        d.tile_latent_min_size = args.tile_size // vae.config.downsample_factor
        d.tile_overlap_factor = args.tile_overlap / args.tile_size
        d_y = d.decode(z).sample
        rows["diffusers_tiled_decode_psnr"] = psnr(d_y, ref)
        d_z = d.encode(x).latent_dist.mode()
        rows["diffusers_tiled_encode_psnr"] = psnr(vae.decode(d_z), ref)

    for k, v in rows.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"image": args.image, "size": args.size, "tile_size": args.tile_size,
                       "tile_overlap": args.tile_overlap, **rows}, fh, indent=2)


if __name__ == "__main__":
    main()
