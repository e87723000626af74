"""Folder throughput end to end against the model alone, on the same images, in one process.

    python scripts/pipeline_throughput.py --device cpu --same 48 --size 256 --mixed 48 --batch-size 4
    python scripts/pipeline_throughput.py --device cuda --dtype bf16 --model SD_VAE --same 500 --size 512 \
        --mixed 500 --min-side 256 --max-side 1024 --batch-size 16

Two generated folders of photo-like JPEGs (crops of the bundled examples with noise): `same` (all SIZE x
SIZE) and `mixed` (each side drawn from [min-side, max-side], not multiples of 8). For each folder and
operation (encode, decode, roundtrip):

- model only: the images already decoded, padded and in memory, grouped by size and run through the same
  Runner at the same batch size (decode: the latents already in memory);
- end to end: `encode_paths` / `decode_paths` / `roundtrip_paths` on the folder, writing files, with the
  model already loaded (process start is measured separately, below).

Runs alternate (model only, end to end) `--repeats` times; medians and the ratio are printed and written as
JSON (`--json-out`). Bars (issue 13): same-size >= 90%, mixed >= 70% of the model-only rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vaecli.batch import (  # noqa: E402
    DecodeOptions,
    EncodeOptions,
    RoundtripOptions,
    apply_size_policy,
    decode_paths,
    encode_paths,
    open_model,
    roundtrip_paths,
)
from vaecli.io import read_image, read_latent  # noqa: E402
from vaecli.pipeline import DTYPES, RunOptions, Runner  # noqa: E402


def make_folder(folder: Path, sizes: list[tuple[int, int]], seed: int) -> None:
    """Photo-like JPEGs: random crops of the bundled examples, resized, with a little noise."""
    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((ROOT / "examples").glob("*.jpg"))]
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        src = sources[i % len(sources)]
        ch, cw = rng.integers(src.shape[0] // 2, src.shape[0] + 1), rng.integers(src.shape[1] // 2, src.shape[1] + 1)
        top, left = rng.integers(0, src.shape[0] - ch + 1), rng.integers(0, src.shape[1] - cw + 1)
        img = Image.fromarray(src[top : top + ch, left : left + cw]).resize((w, h), Image.BICUBIC)
        a = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def groups(tensors: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Same-shape tensors stacked into batches of at most `batch`, as the pipeline batches them."""
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for t in tensors:
        by_shape.setdefault(tuple(t.shape), []).append(t)
    out = []
    for same in by_shape.values():
        for i in range(0, len(same), batch):
            out.append(torch.stack(same[i : i + batch]))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, vae: Any, folder: Path, work: Path) -> dict[str, Any]:
    device = next(vae.parameters()).device
    run = RunOptions(dtype=DTYPES[args.dtype], tiling="off")
    runner = Runner(vae, run)
    factor = vae.config.downsample_factor
    files = sorted(folder.glob("*.jpg"))
    pixels = [torch.from_numpy(apply_size_policy(read_image(p), factor, "pad")[0]) for p in files]  # (H, W, 3)
    # (N, H, W, 3) -> (N, 3, H, W) as the pipeline hands batches to the Runner (channels-last in memory)
    image_batches = [b.permute(0, 3, 1, 2) for b in groups(pixels, args.batch_size)]
    latent_dir = work / "latents"
    encode_paths(vae, [folder], latent_dir, EncodeOptions(batch_size=args.batch_size), run)
    latents = [read_latent(p).tensor for p in sorted(latent_dir.glob("*.safetensors"))]
    spec = vae.config.latent_spec
    latent_batches = groups(latents, args.batch_size)

    def model_only(op: str) -> None:
        if op in ("encode", "roundtrip"):
            for b in image_batches:
                z = runner.encode(b).tensor
                if op == "roundtrip":
                    runner.decode(z)
        else:
            for b in latent_batches:
                runner.decode(b, spec)

    def end_to_end(op: str) -> None:
        out = work / f"out-{op}"
        shutil.rmtree(out, ignore_errors=True)
        if op == "encode":
            report = encode_paths(vae, [folder], out, EncodeOptions(batch_size=args.batch_size), run)
        elif op == "decode":
            report = decode_paths(vae, [latent_dir], out, DecodeOptions(batch_size=args.batch_size), run)
        else:
            report = roundtrip_paths(vae, [folder], out, RoundtripOptions(batch_size=args.batch_size), run)
        assert report.count("ok") == len(files), report.to_dict()

    rows = {}
    for op in args.ops:
        model_only(op)  # warm-up (kernel selection, allocator)
        mo, e2e = [], []
        for _ in range(args.repeats):
            mo.append(timed(lambda: model_only(op), device))
            e2e.append(timed(lambda: end_to_end(op), device))
        m, e = statistics.median(mo), statistics.median(e2e)
        rows[op] = {"images": len(files), "model_only_img_s": len(files) / m, "end_to_end_img_s": len(files) / e,
                    "ratio": m / e, "model_only_s": mo, "end_to_end_s": e2e}
        print(f"  {op:9s} model only {len(files) / m:8.2f} img/s   end to end {len(files) / e:8.2f} img/s   "
              f"ratio {m / e:.3f}", flush=True)
    return rows


def process_start(args: argparse.Namespace) -> dict[str, float]:
    """Seconds from `python -m vaecli` to a loaded model, outside the timed runs above."""
    code = ("import time, sys; t = time.perf_counter(); from vaecli.batch import open_model; "
            f"open_model({args.model!r}, None, {args.device!r}); print(time.perf_counter() - t)")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return {"process_total_s": time.perf_counter() - start, "import_and_load_s": float(r.stdout.strip())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="weights (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--same", type=int, default=48, help="images in the same-size folder (0: skip)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--mixed", type=int, default=48, help="images in the mixed-size folder (0: skip)")
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--ops", nargs="+", default=["encode", "decode", "roundtrip"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    vae = open_model(args.model, None, args.device)
    rng = np.random.default_rng(0)
    sets = {
        "same": [(args.size, args.size)] * args.same,
        "mixed": [tuple(int(v) for v in rng.integers(args.min_side, args.max_side + 1, 2)) for _ in range(args.mixed)],
    }
    result: dict[str, Any] = {"device": str(next(vae.parameters()).device), "dtype": args.dtype,
                              "batch_size": args.batch_size, "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sizes in sets.items():
            if not sizes:
                continue
            folder = Path(tmp) / name
            make_folder(folder, sizes, seed=len(name))
            print(f"{name}: {len(sizes)} JPEGs", flush=True)
            result[name] = measure(args, vae, folder, Path(tmp) / f"work-{name}")
    result["process_start"] = process_start(args)
    print(f"process start (import + model load, not in the rates above): {result['process_start']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
