"""Make a small img2dataset-style shard set for tests and benchmarks.

    python scripts/make_shards.py OUT --images 300 --shards 5 [--min-side 40 --max-side 300] [--seed 0]

Writes OUT/tar/{00000..0000N}.tar (members <key>.jpg, <key>.json, <key>.txt per sample, keys as
img2dataset makes them: shard number then index, 9 digits), the same samples as OUT/parquet/*.parquet
(columns key, jpg, caption, width, height; needs pyarrow) and OUT/folder/<key>.jpg (the images, for the
folder pipeline). Odd sizes; one sample of the first shard holds a corrupt JPEG and one has no image (its
json and txt only), as real crawls do.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A smooth random JPEG (blocks of noise, bilinearly enlarged), so the model sees photo-like content."""
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def samples(images: int, shards: int, min_side: int, max_side: int, seed: int) -> list[list[dict]]:
    """Per shard, its samples: key, jpg bytes (None: missing), caption, width, height."""
    rng = np.random.default_rng(seed)
    per = -(-images // shards)
    out: list[list[dict]] = []
    for s in range(shards):
        rows = []
        for i in range(min(per, images - s * per)):
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
            rows.append({"key": f"{s:05d}{i:04d}", "jpg": image_bytes(rng, w, h), "caption": f"sample {s}-{i}",
                         "width": w, "height": h})
        out.append(rows)
    first = out[0]
    if len(first) >= 3:
        first[1]["jpg"] = first[1]["jpg"][:40] + b"\x00garbage" * 8  # a corrupt (truncated) JPEG
        first[2]["jpg"] = None  # a failed download: json and txt, no image
    return out


def write_tar(path: Path, rows: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for r in rows:
            meta = {"key": r["key"], "status": "success" if r["jpg"] else "failed_to_download",
                    "width": r["width"], "height": r["height"], "caption": r["caption"]}
            members = [(".jpg", r["jpg"]), (".json", json.dumps(meta).encode()), (".txt", r["caption"].encode())]
            for suffix, data in members:
                if data is None:
                    continue
                info = tarfile.TarInfo(r["key"] + suffix)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "key": [r["key"] for r in rows],
        "jpg": pa.array([r["jpg"] for r in rows], pa.binary()),
        "caption": [r["caption"] for r in rows],
        "width": [r["width"] for r in rows],
        "height": [r["height"] for r in rows],
    })
    pq.write_table(table, path)


def make_shards(out: Path, images: int = 300, shards: int = 5, min_side: int = 40, max_side: int = 300,
                seed: int = 0, parquet: bool = True) -> list[list[dict]]:
    out = Path(out)
    for sub in ("tar", "folder") + (("parquet",) if parquet else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    data = samples(images, shards, min_side, max_side, seed)
    for s, rows in enumerate(data):
        write_tar(out / "tar" / f"{s:05d}.tar", rows)
        if parquet:
            write_parquet(out / "parquet" / f"{s:05d}.parquet", rows)
        for r in rows:
            if r["jpg"] is not None:
                (out / "folder" / f"{r['key']}.jpg").write_bytes(r["jpg"])
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--min-side", type=int, default=40)
    p.add_argument("--max-side", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-parquet", action="store_true")
    a = p.parse_args()
    data = make_shards(a.out, a.images, a.shards, a.min_side, a.max_side, a.seed, not a.no_parquet)
    print(f"{sum(len(r) for r in data)} samples in {len(data)} shards under {a.out}")


if __name__ == "__main__":
    main()
