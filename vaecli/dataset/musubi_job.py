"""encode --dataset --format musubi: each image -> the latent cache musubi-tuner's own cache step would write.

For FLUX.2 and Qwen-Image (and Krea 2) training with kohya-ss/musubi-tuner: one file per image in OUT (its
cache_directory), `{image stem}_{W:04d}x{H:04d}_{arch}.safetensors`, W x H the image as stored. Per image, as
musubi's cache step does (docs/musubi.md): pixels as stored (EXIF orientation ignored, alpha dropped), its
bucket from musubi's BucketSelector (latents/musubi.bucket_resolution), resized to cover the bucket (PIL
LANCZOS when enlarging; musubi shrinks with cv2 INTER_AREA, here PIL's BOX filter, the same area average up
to rounding) and centre-cropped; the posterior mean encoded, then normalized and written by
latents/musubi.write_image_cache. A `vaecli` metadata entry records the source, model and settings, so a
re-run skips the caches that are current. A Job on batch.Engine, run by batch.run_job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..batch import (
    Discovery,
    Item,
    Loaded,
    OutputNames,
    Progress,
    Report,
    RunContext,
    Skip,
    read_source,
    reuse_output,
    run_job,
)
from ..choices import DEFAULTS
from ..devices import DTYPE_NAMES
from ..errors import ConfigError, InputError
from ..io import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, read_image
from ..latents import musubi
from ..models.kl import AutoencoderKL
from ..outputs import OutputState, path_state
from ..pipeline import RunOptions
from .jobs import note_retries

RECORD_KEY = "vaecli"  # our metadata entry in each cache (musubi's trainer reads no metadata)
EXPORT_VERSION = "1"  # bumped when the stored values of an unchanged input change
RESIZE = "musubi: PIL LANCZOS up, PIL BOX down (musubi: cv2 INTER_AREA), centre crop"


@dataclass(frozen=True)
class MusubiOptions:
    """One musubi export: the target architecture and musubi's dataset settings (`resolution` square,
    enable_bucket on, bucket_no_upscale)."""

    arch: str  # musubi's full or short architecture name (latents/musubi.ARCHITECTURES)
    bucket_resolution: int = DEFAULTS.bucket_resolution  # musubi's `resolution` = [R, R]
    no_upscale: bool = False  # musubi's bucket_no_upscale
    overwrite: bool = False
    batch_size: int = DEFAULTS.batch_size
    workers: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS


def export_musubi(vae: AutoencoderKL, inputs: Sequence[str | Path], out: str | Path, options: MusubiOptions,
                  run: RunOptions = RunOptions(), progress: Progress | None = None) -> Report:
    """Write the musubi-tuner latent cache of every image found in `inputs` into the folder `out`."""
    return run_job(MusubiKind(Path(out)), vae, inputs, Path(out), options, run, progress)


def check_target(vae: AutoencoderKL, options: MusubiOptions) -> musubi.Target:
    """The target, after refusing a model whose latents it does not hold (ConfigError before any read)."""
    t = musubi.target(options.arch)
    family = vae.config.family
    if family != t.family:
        fits = ", ".join(r.name for r in musubi.targets_for(family)) or "none"
        raise ConfigError(f"--musubi-arch {t.name} caches {t.family} VAE latents, but this model is {family} "
                          f"({getattr(getattr(vae, 'info', None), 'name', 'unnamed')}); its musubi targets: {fits}")
    if t.name == "qwen_image_edit":
        raise ConfigError("--musubi-arch qwen_image_edit needs control-image latents, which vaecli does not write "
                          "yet: use musubi's qwen_image_cache_latents.py --model_version edit")
    musubi.cache_tensors(torch.zeros(vae.config.latent_channels, 2, 2), t, vae.config.latent_spec)  # its spec
    musubi.bucket_resolution((1, 1), (options.bucket_resolution,) * 2)  # a resolution musubi can bucket
    return t


class MusubiKind:
    """The musubi export as run_job runs it: checks, discovery (every cache at the top of OUT), the Job."""

    command = "encode"
    latent_keys = False

    def __init__(self, out: Path) -> None:
        self.out = out  # musubi's cache_directory

    def check(self, vae: AutoencoderKL, options: MusubiOptions) -> Discovery:
        check_target(vae, options)
        return Discovery(IMAGE_SUFFIXES, OutputNames(musubi.SUFFIX), flat=True)

    def __call__(self, ctx: RunContext, options: MusubiOptions) -> MusubiJob:
        refuse_collisions(ctx.engine.items)
        t = check_target(ctx.vae, options)
        ctx.notes.append(f"musubi-tuner also needs each image's text-encoder cache <stem>_{t.short}_te.safetensors "
                         f"in {self.out} (its own text-encoder cache script writes it); do not run its "
                         "*_cache_latents.py on this folder without --skip_existing (it rewrites these caches)")
        return MusubiJob(ctx, options, t, self.out)


def refuse_collisions(items: Sequence[Item]) -> None:
    """musubi keys an item by its file stem (its latent and text-encoder caches are named by it): two images
    of one stem would share caches. ConfigError before anything is written."""
    seen: dict[str, Item] = {}
    for item in items:
        if item.output is None:
            continue  # an unreadable folder: its own failure
        stem = Path(item.rel).stem
        if stem in seen:
            raise ConfigError(f"{seen[stem].input} and {item.input} would both be musubi's item {stem!r} (caches "
                              f"{stem}_<W>x<H>_<arch>.safetensors and {stem}_<arch>_te.safetensors); rename one")
        seen[stem] = item


@dataclass(frozen=True)
class Pending:
    """One image read and cropped to its bucket: where its cache goes and the record it embeds."""

    stem: str
    size: tuple[int, int]  # (W, H) as stored: the cache name's
    bucket: tuple[int, int]
    record: str  # our metadata entry, JSON


class MusubiJob:
    """Images -> musubi caches in OUT; current ones (same source, model and settings) are skipped."""

    probe: Callable[[Item], Hashable | None] | None = None  # batches form in the prefetch window

    def __init__(self, ctx: RunContext, options: MusubiOptions, target: musubi.Target, out: Path) -> None:
        self.ctx, self.options, self.target, self.out = ctx, options, target, out
        self.settings = {
            "export_version": EXPORT_VERSION,
            "architecture": target.name,
            "resolution": options.bucket_resolution,
            "no_upscale": options.no_upscale,
            "resize": RESIZE,
            "compute_dtype": DTYPE_NAMES[ctx.runner.dtype],
            "model_identity_sha256": ctx.info["identity_sha256"],
        }
        self.settings_sha = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()

    def load(self, index: int, item: Item) -> Loaded[Pending] | Skip:
        data, source_sha = read_source(item.input, self.options.max_pixels)
        pixels = read_image(data, max_pixels=self.options.max_pixels, convention="kohya")  # as musubi reads
        h, w = pixels.shape[:2]
        stem = Path(item.rel).stem
        path = self.out / musubi.cache_name(stem, w, h, self.target)
        record = self.record(item, source_sha)
        want = {k: record[k] for k in ("source_sha256", "model_sha256", "settings_sha256")}
        skip, note = reuse_output(cache_state(path), want, self.options.overwrite, path)
        result = self.ctx.engine.results[index]
        result.output = str(path)
        if skip:
            return Skip()
        if note:
            result.notes.append(note)
        bucket = musubi.bucket_resolution((w, h), (self.options.bucket_resolution,) * 2, True,
                                          self.options.no_upscale)
        crop = resize_to_bucket(pixels, bucket)
        return Loaded(index, item, crop, Pending(stem, (w, h), bucket, json.dumps(record, sort_keys=True)))

    def record(self, item: Item, source_sha: str) -> dict[str, str]:
        return {"vaecli_version": __version__, "source": item.rel, "source_sha256": source_sha,
                "model_sha256": self.ctx.info["weights_sha256"], "model_name": self.ctx.info["name"],
                "settings_sha256": self.settings_sha, "settings": json.dumps(self.settings, sort_keys=True)}

    def key(self, loaded: Loaded[Pending]) -> Hashable:
        return loaded.x.shape

    def compute(self, batch: list[Loaded[Pending]]) -> list[Any]:
        """One model call per batch of equal crops: each row's posterior mean, raw (write normalizes)."""
        x = torch.from_numpy(np.stack([b.x for b in batch])).permute(0, 3, 1, 2)  # (N, 3, H, W) in [0, 1]
        result = self.ctx.runner.encode_moments(x)
        note_retries(self.ctx.engine, [b.index for b in batch], result)
        mean = result.tensor.chunk(2, dim=1)[0]
        return [InputError(result.failed[i]) if i in result.failed else mean[i] for i in range(len(batch))]

    def save(self, loaded: Loaded[Pending], mean: torch.Tensor) -> None:
        s = loaded.state
        musubi.write_image_cache(self.out, s.stem, s.size, mean.float(), self.target,
                                 self.ctx.vae.config.latent_spec, extra={RECORD_KEY: s.record})


def resize_to_bucket(pixels: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """musubi's resize_image_to_bucket on 8-bit pixels: scale to cover the bucket (sides int(s * scale + 0.5)),
    LANCZOS when enlarging, BOX (area average) when shrinking, then the centre crop; float (bh, bw, 3) in [0, 1]."""
    img = np.round(pixels * 255).astype(np.uint8)  # the kohya convention's pixels are 8-bit RGB
    h, w = img.shape[:2]
    bw, bh = bucket
    if (w, h) != (bw, bh):
        scale = max(bw / w, bh / h)
        rw, rh = int(w * scale + 0.5), int(h * scale + 0.5)
        if (rw, rh) != (w, h):
            resample = Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX
            img = np.asarray(Image.fromarray(img).resize((rw, rh), resample))
        left, top = (rw - bw) // 2, (rh - bh) // 2
        img = img[top:top + bh, left:left + bw]
    return np.ascontiguousarray(img, dtype=np.float32) / 255


def cache_state(path: Path) -> OutputState:
    """What is at a cache path: missing, ours (with our record), another's (musubi's own cache), unreadable."""
    state = path_state(path)
    if state is not None:
        return state
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        return OutputState("incomplete", detail=f"not a readable safetensors file ({exc})")
    if RECORD_KEY not in meta:
        return OutputState("foreign", detail="has no vaecli record (musubi's own cache, or another tool's)")
    try:
        record = json.loads(meta[RECORD_KEY])
    except ValueError:
        return OutputState("incomplete", detail="its vaecli record is not JSON")
    if not isinstance(record, dict):
        return OutputState("incomplete", detail="its vaecli record is not an object")
    return OutputState("ours", record={str(k): str(v) for k, v in record.items()})
