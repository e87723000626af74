"""Folder throughput end to end against the model alone, on the same images, in one process; large images.

    python scripts/pipeline_throughput.py --device cpu --same 48 --size 256 --mixed 48 --batch-size 4
    python scripts/pipeline_throughput.py --device cuda --budget 300 --json-out gpu_pipeline.json
        (the GPU rows of issue 13: an SD-sized model with random weights, bf16, 500 JPEGs at 512x512 and
        500 mixed-size ones, 8192x8192 decode and encode with --tiling auto and off; see gpu_rows)

Two generated folders of photo-like JPEGs (crops of the bundled examples with noise): `same` (all SIZE x
SIZE) and `mixed` (each side drawn from [min-side, max-side], not multiples of 8). For each folder and
operation (encode, decode, roundtrip):

- model only: the images already decoded, padded and in memory, grouped by size and run through the same
  Runner at the same batch size (decode: the latents already in memory);
- end to end: `encode_paths` / `decode_paths` / `roundtrip_paths` on the folder, writing files, with the
  model already loaded (process start is measured separately, below). The report's share of time the
  model was busy is printed beside it.

Runs alternate (model only, end to end) `--repeats` times; medians and the ratio are printed and written as
JSON (`--json-out`). Bars (issue 13): same-size >= 90%, mixed >= 70% of the model-only rate.
`--pad-to N` adds a mixed-folder roundtrip whose sizes are padded up to multiples of N (RoundtripOptions.
pad_to: more images share a batch, more pixels to compute), end to end against the plain one.
`--big SIDE` runs decode and encode of one SIDE x SIDE image with --tiling auto and off, each in a fresh
process through the CLI, with a time limit: wall time, peak memory, what the run reported (events, tiles).
`--budget S` stops starting measurements that would not finish within S seconds (each says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vaecli import AutoencoderKL, VAEConfig, save_vae  # noqa: E402
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
from vaecli.devices import DTYPES  # noqa: E402
from vaecli.io import read_image  # noqa: E402
from vaecli.latents import read_latent  # noqa: E402
from vaecli.pipeline import Runner, RunOptions  # noqa: E402

SD_SIZED = VAEConfig(  # the SD 1.x/2.x VAE's architecture (diffusers' AutoencoderKL of stable-diffusion-v1-5)
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32, sample_size=512,
)
TINY = VAEConfig(  # tests' tiny model: large-image rows on a CPU in seconds
    block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, force_upcast=False,
)


@dataclass
class Settings:
    model: str | None = None  # weights (None: the embedded model)
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 4
    same: int = 48  # images in the same-size folder (0: skip)
    size: int = 256
    mixed: int = 48  # images in the mixed-size folder (0: skip)
    min_side: int = 256
    max_side: int = 1024
    ops: list[str] = field(default_factory=lambda: ["encode", "decode", "roundtrip"])
    mixed_ops: list[str] | None = None  # ops for the mixed folder (None: ops)
    repeats: int = 3
    pad_to: int = 0
    big: int = 0  # side of the large-image rows (0: skip)
    big_model: str | None = None  # weights for them (None: model)
    big_timeout: float = 300.0
    budget: float = 0.0  # seconds (0: no limit)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return float("inf") if not self.seconds else self.seconds - (time.monotonic() - self.start)

    def allows(self, need_s: float) -> bool:
        return need_s <= self.left()


# -- inputs ------------------------------------------------------------------------------------------------


def make_folder(folder: Path, sizes: list[tuple[int, int]], seed: int) -> None:
    """Photo-like JPEGs: random crops of the bundled examples, resized, with a little noise."""
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((ROOT / "examples").glob("*.jpg"))]
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        rng = np.random.default_rng((seed, i))
        w, h = sizes[i]
        src = sources[i % len(sources)]
        ch, cw = rng.integers(src.shape[0] // 2, src.shape[0] + 1), rng.integers(src.shape[1] // 2, src.shape[1] + 1)
        top, left = rng.integers(0, src.shape[0] - ch + 1), rng.integers(0, src.shape[1] - cw + 1)
        img = Image.fromarray(src[top : top + ch, left : left + cw]).resize((w, h), Image.BICUBIC)
        a = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(sizes))))


def random_model(config: VAEConfig, folder: Path, seed: int = 0) -> str:
    """A model of `config` with random weights, saved as a diffusers folder (no download)."""
    torch.manual_seed(seed)
    save_vae(AutoencoderKL(config), folder)
    return str(folder)


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


# -- folders: end to end against the model alone ------------------------------------------------------------


def measure(s: Settings, vae: Any, folder: Path, work: Path, ops: list[str], budget: Budget) -> dict[str, Any]:
    device = next(vae.parameters()).device
    run = RunOptions(dtype=DTYPES[s.dtype], tiling="off")
    runner = Runner(vae, run)
    factor = vae.config.downsample_factor
    files = sorted(folder.glob("*.jpg"))
    pixels = [torch.from_numpy(apply_size_policy(read_image(p), factor, "pad")[0]) for p in files]  # (H, W, 3)
    # (N, H, W, 3) -> (N, 3, H, W) as the pipeline hands batches to the Runner (channels-last in memory);
    # on a GPU the batches start there, as the model alone would see them.
    image_batches = [b.permute(0, 3, 1, 2).to(device) for b in groups(pixels, s.batch_size)]
    latent_dir = work / "latents"
    encode_paths(vae, [folder], latent_dir, EncodeOptions(batch_size=s.batch_size), run)
    latents = [read_latent(p).tensor for p in sorted(latent_dir.glob("*.safetensors"))]
    spec = vae.config.latent_spec
    latent_batches = [b.to(device) for b in groups(latents, s.batch_size)]
    n = len(files)

    def model_only(op: str) -> None:
        if op in ("encode", "roundtrip"):
            for b in image_batches:
                z = runner.encode(b).tensor
                if op == "roundtrip":
                    runner.decode(z)
        else:
            for b in latent_batches:
                runner.decode(b, spec)

    def end_to_end(op: str, pad_to: int = 0) -> dict[str, Any]:
        out = work / f"out-{op}"
        shutil.rmtree(out, ignore_errors=True)
        if op == "encode":
            report = encode_paths(vae, [folder], out, EncodeOptions(batch_size=s.batch_size), run)
        elif op == "decode":
            report = decode_paths(vae, [latent_dir], out, DecodeOptions(batch_size=s.batch_size), run)
        else:
            options = RoundtripOptions(batch_size=s.batch_size, pad_to=pad_to)
            report = roundtrip_paths(vae, [folder], out, options, run)
        doc = report.to_dict()
        assert doc["ok"] == n, doc
        return {"busy_share": doc.get("device_busy_share"), "events": sorted(set(doc["events"]))}

    rows: dict[str, Any] = {}
    for op in ops:
        first = timed(lambda op=op: model_only(op), device)  # warm-up (kernel selection, allocator), and a cost guess
        mo: list[float] = []
        e2e: list[float] = []
        busy: list[float] = []
        for _ in range(s.repeats):
            if mo and not budget.allows(2.5 * first):
                break
            mo.append(timed(lambda op=op: model_only(op), device))
            info: dict[str, Any] = {}
            e2e.append(timed(lambda info=info, op=op: info.update(end_to_end(op)), device))
            busy.append(info.get("busy_share") or 0.0)
        m, e = statistics.median(mo), statistics.median(e2e)
        rows[op] = {"images": n, "model_only_img_s": n / m, "end_to_end_img_s": n / e, "ratio": m / e,
                    "model_busy_share": statistics.median(busy), "model_only_s": mo, "end_to_end_s": e2e,
                    "warmup_s": first}
        print(f"  {op:9s} model only {n / m:8.2f} img/s   end to end {n / e:8.2f} img/s   ratio {m / e:.3f}   "
              f"model busy {statistics.median(busy):.0%}   ({len(mo)} rounds)", flush=True)
        if not budget.allows(4 * first):
            rows["stopped"] = f"budget: {budget.left():.0f} s left"
            break
    if s.pad_to and "roundtrip" in ops and budget.allows(6 * rows.get("roundtrip", {}).get("warmup_s", 0)):
        rows["roundtrip_pad_to"] = pad_to_row(s, end_to_end, device, n)
    return rows


def pad_to_row(s: Settings, end_to_end: Callable[..., dict[str, Any]], device: torch.device, n: int) -> dict[str, Any]:
    """Roundtrip end to end with sizes padded up to multiples of pad_to, alternating with the plain one."""
    plain, padded = [], []
    for _ in range(max(1, min(s.repeats, 2))):
        plain.append(timed(lambda: end_to_end("roundtrip"), device))
        padded.append(timed(lambda: end_to_end("roundtrip", s.pad_to), device))
    p, q = statistics.median(plain), statistics.median(padded)
    print(f"  roundtrip padded to multiples of {s.pad_to}: {n / q:.2f} img/s against {n / p:.2f} img/s "
          f"(x{p / q:.3f})", flush=True)
    return {"pad_to": s.pad_to, "plain_img_s": n / p, "padded_img_s": n / q, "speedup": p / q, "plain_s": plain,
            "padded_s": padded}


# -- one large image, in a fresh process ------------------------------------------------------------------

BIG_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from vaecli.cli import main
    args, out = json.loads(sys.argv[1]), sys.argv[2]
    start = time.perf_counter()
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    row = {"exit": code, "wall_s": time.perf_counter() - start,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        row["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    with open(out, "w") as fh:
        json.dump(row, fh)
    """
)


def big_rows(s: Settings, model: str, work: Path, budget: Budget) -> list[dict[str, Any]]:
    """Decode and encode of one s.big x s.big image, --tiling auto and off, each through the CLI in a fresh
    process (clean peak memory), killed after s.big_timeout; plus a tiled decode at half the side, the
    reference of the 4.5x bar (issue 13: 8192 at most 4.5x the 4096 time)."""
    side = s.big
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in (side, side // 2):
        np.save(work / f"z{n}.npy", rng.standard_normal((4, n // 8, n // 8), dtype=np.float32))
    small = rng.integers(0, 256, (side // 64, side // 64, 3), dtype=np.uint8)
    Image.fromarray(small).resize((side, side), Image.BILINEAR).save(work / f"x{side}.jpg", quality=90)
    common = ["--device", s.device, "--dtype", s.dtype, "--max-pixels", "0", "--json", "--quiet"]
    common += ["--model", model] if model else []
    jobs = [("decode", side, "off"), ("decode", side, "auto"), ("decode", side // 2, "on"),
            ("encode", side, "off"), ("encode", side, "auto")]
    rows = []
    for op, n, tiling in jobs:
        if not budget.allows(min(s.big_timeout, 60.0)):
            rows.append({"op": op, "side": n, "tiling": tiling, "skipped": f"budget: {budget.left():.0f} s left"})
            continue
        src = work / (f"z{n}.npy" if op == "decode" else f"x{n}.jpg")
        out = work / f"out-{op}-{n}-{tiling}"
        shutil.rmtree(out, ignore_errors=True)
        args = [op, str(src), "-o", str(out), "--tiling", tiling, *common]
        if op == "decode":
            args += ["--scaling-factor", "1"]
        rows.append(_big_row(args, op, n, tiling, min(s.big_timeout, max(budget.left(), 1.0)), work))
        r = rows[-1]
        print(f"  {op} {n}x{n} --tiling {tiling}: " + (f"{r['wall_s']:.1f} s, exit {r['exit']}, "
              f"peak {_peak(r) / 2**30:.1f} GiB, tiles {r.get('tiles')}, events {r.get('events')}"
              if "wall_s" in r else r.get("error", "?")), flush=True)
    by = {(r["op"], r["side"], r["tiling"]): r for r in rows}
    ref, big = by.get(("decode", side // 2, "on"), {}), by.get(("decode", side, "auto"), {})
    if ref.get("wall_s") and big.get("wall_s"):
        rows.append({"decode_time_ratio": big["wall_s"] / ref["wall_s"], "of": f"{side} auto / {side // 2} tiled"})
    return rows


def _big_row(args: list[str], op: str, side: int, tiling: str, timeout: float, work: Path) -> dict[str, Any]:
    stats = work / "stats.json"
    stats.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    row: dict[str, Any] = {"op": op, "side": side, "tiling": tiling}
    try:
        proc = subprocess.run([sys.executable, "-c", BIG_CHILD, json.dumps(args), str(stats)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=work)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"did not finish within {timeout:.0f} s"}
    if not stats.exists():
        return {**row, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    row.update(json.loads(stats.read_text()))
    try:
        doc = json.loads(proc.stdout)
        row.update(tiles=doc.get("tiles"), events=doc.get("events"), elapsed_s=doc.get("elapsed_s"),
                   model_busy_share=doc.get("device_busy_share"))
    except ValueError:
        row["stdout"] = proc.stdout[-300:]
    return row


def _peak(row: dict[str, Any]) -> float:
    return row.get("peak_cuda_allocated_bytes") or row.get("peak_rss_bytes") or 0


# -- the run ------------------------------------------------------------------------------------------------


def process_start(model: str | None, device: str) -> dict[str, float]:
    """Seconds from a fresh interpreter to a loaded model, outside the timed runs."""
    code = ("import time, sys; t = time.perf_counter(); from vaecli.batch import open_model; "
            f"open_model({model!r}, None, {device!r}); print(time.perf_counter() - t)")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return {"process_total_s": time.perf_counter() - start, "import_and_load_s": float(r.stdout.strip())}


def run(s: Settings) -> dict[str, Any]:
    budget = Budget(s.budget)
    result: dict[str, Any] = {"settings": asdict(s), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        vae = open_model(s.model, None, s.device)
        on_cuda = vae.device.type == "cuda"
        result["device"] = torch.cuda.get_device_name() if on_cuda else f"cpu ({os.cpu_count()} cores)"
        rng = np.random.default_rng(0)
        sets = {
            "same": [(s.size, s.size)] * s.same,
            "mixed": [tuple(int(v) for v in rng.integers(s.min_side, s.max_side + 1, 2)) for _ in range(s.mixed)],
        }
        for name, sizes in sets.items():
            if not sizes:
                continue
            if not budget.allows(30):
                result[name] = {"skipped": f"budget: {budget.left():.0f} s left"}
                continue
            folder = Path(tmp) / name
            make_folder(folder, sizes, seed=len(name))
            print(f"{name}: {len(sizes)} JPEGs, batch {s.batch_size}, {s.dtype}, {result['device']}", flush=True)
            ops = s.ops if name == "same" or s.mixed_ops is None else s.mixed_ops
            pad = replace(s, pad_to=s.pad_to if name == "mixed" else 0)
            result[name] = measure(pad, vae, folder, Path(tmp) / f"work-{name}", ops, budget)
        del vae
        if s.big:
            print(f"large images ({s.big}x{s.big}), each in a fresh process:", flush=True)
            result["big"] = big_rows(s, s.big_model or s.model or "", Path(tmp) / "big", budget)
        result["process_start"] = process_start(s.model, s.device)
    result["load_average_after"] = os.getloadavg()
    print(f"process start (import + model load, not in the rates above): {result['process_start']}")
    return result


def gpu_rows(budget_s: float = 300.0, device: str = "cuda", json_out: Path | None = None,
             quick: bool = False) -> dict[str, Any]:
    """Issue 13's GPU rows in one bounded run: an SD-sized model with random weights in bf16; 500 JPEGs at
    512x512 (batch 16: roundtrip, encode, decode) and 500 of mixed sizes in 256..1024 (roundtrip, encode;
    with padding to multiples of 128 measured against none) end to end against the model alone; 8192x8192
    decode and encode with --tiling auto and off (and 4096 tiled decode, the reference of the 4.5x bar).
    Measurements that would not fit in budget_s are skipped and say so. For scripts/gpu_report.py.
    quick: the tests' tiny model and a few small images (a smoke test of this function, on any device)."""
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(TINY if quick else SD_SIZED, Path(tmp) / "model")
        s = Settings(model=model, device=device, dtype="bf16", batch_size=16, same=500, size=512, mixed=500,
                     min_side=256, max_side=1024, ops=["roundtrip", "encode", "decode"],
                     mixed_ops=["roundtrip", "encode"], repeats=2, pad_to=128, big=8192, big_timeout=150.0,
                     budget=budget_s)
        if quick:
            s = replace(s, dtype="fp32", batch_size=2, same=4, size=32, mixed=3, min_side=24, max_side=48,
                        ops=["roundtrip"], mixed_ops=["roundtrip"], repeats=1, pad_to=16, big=64)
        result = run(s)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Settings()
    parser.add_argument("--model", default=None,
                        help="weights (default: the embedded model; sd-sized: random SD-sized)")
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--same", type=int, default=d.same, help="images in the same-size folder (0: skip)")
    parser.add_argument("--size", type=int, default=d.size)
    parser.add_argument("--mixed", type=int, default=d.mixed, help="images in the mixed-size folder (0: skip)")
    parser.add_argument("--min-side", type=int, default=d.min_side)
    parser.add_argument("--max-side", type=int, default=d.max_side)
    parser.add_argument("--ops", nargs="+", default=d.ops)
    parser.add_argument("--mixed-ops", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument("--pad-to", type=int, default=0, help="also: mixed roundtrip padded to multiples of N")
    parser.add_argument("--big", type=int, default=0, help="also: decode/encode of one BIG x BIG image, auto/off")
    parser.add_argument("--big-model", default=None, help="model for --big (tiny: the tests' tiny model)")
    parser.add_argument("--big-timeout", type=float, default=d.big_timeout)
    parser.add_argument("--budget", type=float, default=0.0, help="seconds; 0: no limit")
    parser.add_argument("--gpu-rows", action="store_true", help="issue 13's GPU rows (gpu_rows()); other flags ignored")
    parser.add_argument("--quick", action="store_true", help="with --gpu-rows: tiny model, a few small images")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.gpu_rows:
        gpu_rows(args.budget or 300.0, args.device, args.json_out, args.quick)
        return
    with tempfile.TemporaryDirectory() as tmp:
        named = {"sd-sized": SD_SIZED, "tiny": TINY}
        model = random_model(named[args.model], Path(tmp) / args.model) if args.model in named else args.model
        big = random_model(named[args.big_model], Path(tmp) / "big") if args.big_model in named else args.big_model
        s = Settings(
            model=model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, same=args.same,
            size=args.size, mixed=args.mixed, min_side=args.min_side, max_side=args.max_side, ops=args.ops,
            mixed_ops=args.mixed_ops, repeats=args.repeats, pad_to=args.pad_to, big=args.big, big_model=big,
            big_timeout=args.big_timeout, budget=args.budget,
        )
        result = run(s)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
