"""The per-image steps every dataset pipeline shares (folders, shards, Ray actors): place, encode, record.

`DatasetEncoder` holds what one run fixes (model, runner, buckets, settings and their hash) and turns
pixels into a bucket-sized crop, a batch of crops into the tensors stored per image, and those into the
manifest record and file metadata. Pipelines differ only in where images come from and where results go.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import __version__, families
from ..batch import model_summary, posterior_noise, resample
from ..devices import DTYPE_NAMES, DTYPES
from ..errors import InputError
from ..latents import LATENT_FORMAT, LATENT_FORMAT_VERSION, meta_name
from ..models.kl import AutoencoderKL
from ..pipeline import BatchResult, Runner, RunOptions
from .buckets import BucketChoice, crop_box, make_buckets, select_bucket
from .options import DATASET_VERSION, LOGVAR_RANGE, RESAMPLE, DatasetOptions


def settings_sha256(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Placement:
    """Where one image went: its size, bucket, the size it was resized to and the crop window in it."""

    original: tuple[int, int]  # (W, H) after EXIF orientation
    choice: BucketChoice
    crop: list[int]  # [left, top, right, bottom] in resized pixels


class DatasetEncoder:
    """The fixed parts of one run and the per-image steps (see the module docstring)."""

    def __init__(self, vae: AutoencoderKL, options: DatasetOptions, run: RunOptions) -> None:
        self.options = options
        self.factor = vae.config.downsample_factor
        self.runner = Runner(vae, run)
        self.info = model_summary(vae)
        self.container = options.container()
        # ComfyUI's Qwen-Image latents keep the video VAE's frame axis: written as (C, 1, h, w)
        self.frames = self.container.frame_axis and families.of_config(vae.config).frame_axis
        # what the container holds: ours normalized (unless --raw), kohya raw, ComfyUI as its VAE node
        # writes (raw, or FLUX.2's normalized patchified form): Container.store_spec
        self.spec = None if options.raw else self.container.store_spec(vae.config.latent_spec)
        self.normalized = self.spec is not None
        self.store_dtype = DTYPES[options.latent_dtype]
        lo, hi = options.bucket_bounds()
        self.buckets = make_buckets(options.bucket_resolution, options.bucket_step, lo, hi)
        self.max_area = options.bucket_resolution**2
        self.settings = self._settings(lo, hi)
        self.settings_sha = settings_sha256(self.settings)
        self.model_sha = self.info["weights_sha256"]

    def _settings(self, lo: int, hi: int) -> dict[str, Any]:
        """Every setting that changes the stored values (hashed into settings_sha256)."""
        o = self.options
        return {
            "dataset_version": DATASET_VERSION,
            # the model's config too (weights are model_sha256): a config-only change re-encodes
            "model_identity_sha256": self.info["identity_sha256"],
            "bucket_resolution": o.bucket_resolution,
            "bucket_step": o.bucket_step,
            "min_bucket_size": lo,
            "max_bucket_size": hi,
            "no_upscale": o.no_upscale,
            "resample": RESAMPLE,
            "random_crop": o.random_crop,
            "crop_seed": o.crop_seed if o.random_crop else None,
            "flip": o.flip,
            "moments": o.moments,
            "format": o.format,
            "latent_spec": self.spec.to_dict() if self.spec is not None else None,
            "posterior": "sample" if o.sample else "mode",
            "seed": o.seed if o.sample else None,
            "latent_dtype": o.latent_dtype,
            "alpha": o.alpha_policy(),
            "compute_dtype": DTYPE_NAMES[self.runner.dtype],
            **self.container.settings(),  # kohya's pixels: stored orientation, Pillow's RGB conversion
        }

    def place(self, pixels: np.ndarray, key: str) -> tuple[np.ndarray, Placement]:
        """(bucket-sized crop (bh, bw, 3), placement) of float (H, W, 3) pixels; key seeds a random crop."""
        o = self.options
        h, w = pixels.shape[:2]
        choice = select_bucket(w, h, self.buckets, o.bucket_step, o.no_upscale, self.max_area)
        rw, rh = choice.resized
        resized = resample(pixels, rh, rw) if (rw, rh) != (w, h) else pixels
        box = crop_box(choice.resized, choice.bucket, o.random_crop, o.crop_seed, key)
        left, top, right, bottom = box
        crop = np.ascontiguousarray(resized[top:bottom, left:right])  # (bh, bw, 3)
        return crop, Placement((w, h), choice, box)

    def encode(self, crops: Sequence[np.ndarray], keys: Sequence[str]) -> tuple[list[Any], BatchResult]:
        """Tensors to store per crop (or an exception for a failed one), and the model call's result.

        Rows of the result beyond len(crops) are the flipped copies (result.failed and retries index rows).
        """
        o = self.options
        n = len(crops)
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
        if o.flip:
            x = torch.cat([x, x.flip(-1)])  # (2N, 3, H, W): originals, then their mirror images
        result = self.runner.encode_moments(x)
        mean, logvar = result.tensor.chunk(2, dim=1)  # (M, 2c, h, w) -> 2 x (M, c, h, w)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        z = mean
        if o.sample:
            shape = tuple(mean.shape[1:])
            rows = list(keys) + ([k + "\0flip" for k in keys] if o.flip else [])
            noise = torch.stack([posterior_noise(o.seed, k, shape) for k in rows])
            z = mean + torch.exp(0.5 * logvar) * noise
        if self.spec is not None:
            z = self.spec.normalize(z)
        failed = {i % n: InputError(msg) for i, msg in result.failed.items()}
        return [failed[j] if j in failed else self._stored(j, n, z, mean, logvar) for j in range(n)], result

    def _stored(self, j: int, n: int, z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> Any:
        """Row j's tensors in the stored dtype (flipped rows at j + n), or an error when they overflow."""
        o = self.options
        t = {"latent": z[j]}
        if o.flip:
            t["latent_flipped"] = z[n + j]
        if o.moments:
            t["mean"], t["logvar"] = mean[j], logvar[j]
            if o.flip:
                t["mean_flipped"], t["logvar_flipped"] = mean[n + j], logvar[n + j]
        t = {k: v.to(self.store_dtype) for k, v in t.items()}
        if not all(torch.isfinite(v).all() for v in t.values()):
            return InputError(f"latent overflows {o.latent_dtype}; use --latent-dtype fp32 or bf16")
        return t

    def record(
        self,
        source: str,
        source_path: str,
        source_sha256: str,
        placement: Placement,
        tensors: dict[str, torch.Tensor],
        latent: str,
        flipped_file: str | None = None,
    ) -> dict[str, Any]:
        """The manifest record of one image. latent: where its file is; flipped_file: a separate file of
        the flipped latent (ComfyUI), else the flipped latent is in `latent`'s file."""
        o = self.options
        choice = placement.choice
        record: dict[str, Any] = {
            "source": source,
            "source_path": source_path,
            "source_sha256": source_sha256,
            "original_size": list(placement.original),
            "resized_size": list(choice.resized),
            "bucket": list(choice.bucket),
            "crop": placement.crop,
            "format": o.format,
            "latent": latent,
            "latent_shape": list(tensors["latent"].shape),
            "latent_flipped": (flipped_file or latent) if o.flip else None,
            "moments": latent if o.moments else None,
            "latent_dtype": o.latent_dtype,
            "normalized": self.normalized,
            "latent_spec": self.settings["latent_spec"],
            "posterior": self.settings["posterior"],
            "model_sha256": self.model_sha,
            "model_name": self.info["name"],
            "settings_sha256": self.settings_sha,
            "encoded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record.update(self.container.record_fields(choice.bucket, placement.original))  # kohya: its crop value
        return record

    def file_meta(self, record: dict[str, Any]) -> dict[str, str]:
        """Metadata of a vaecli-format file, in the conventions of `vaecli encode` (so `vaecli decode` reads it)."""
        settings = self.settings
        bw, bh = record["bucket"]
        ow, oh = record["original_size"]
        return {
            "format": LATENT_FORMAT,
            "format_version": LATENT_FORMAT_VERSION,
            "vaecli_version": __version__,
            "model_name": self.info["name"],
            "model_sha256": self.model_sha,
            "latent_spec": json.dumps(settings["latent_spec"]) if settings["latent_spec"] is not None else "none",
            "posterior": settings["posterior"],
            "seed": str(settings["seed"]) if settings["seed"] is not None else "",
            "seed_key": meta_name(record["source"]) if settings["seed"] is not None else "",
            "size_policy": "crop",  # decode keeps the encoded (bucket) size: the cut-away pixels are gone
            "latent_dtype": settings["latent_dtype"],
            "alpha": settings["alpha"],
            "compute_dtype": DTYPE_NAMES[self.runner.dtype],
            "downsample_factor": str(self.factor),
            "original_width": str(ow),
            "original_height": str(oh),
            "encoded_width": str(bw),
            "encoded_height": str(bh),
            "size_params": json.dumps({"resized_size": record["resized_size"], "crop_ltrb": record["crop"]}),
            "source": meta_name(record["source"]),
            "source_sha256": record["source_sha256"],
            "settings_sha256": record["settings_sha256"],
        }
