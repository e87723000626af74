"""`encode_paths`: image files and folders -> latent files with metadata (ours, kohya's .npz or ComfyUI's
.latent), as one Job on the engine."""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__, families
from ..devices import DTYPE_NAMES, DTYPES
from ..discovery import Item
from ..errors import ConfigError, InputError
from ..io import IMAGE_SUFFIXES, decode_image
from ..latents import LATENT_FORMAT, LATENT_FORMAT_VERSION, by_format, latent_output_state, meta_name
from ..models.kl import AutoencoderKL
from ..pipeline import Pending, RunOptions
from .engine import Loaded, Outputs, Skip
from .options import EncodeOptions
from .report import Progress, Report
from .reuse import reuse_output
from .run import Discovery, RunContext, latent_names, note_batch, run_job, stage_images
from .sizes import check_size_policy, prepare_pixels
from .sources import image_probe, read_source


@dataclass(frozen=True)
class EncodeItem:
    """One image on its way to a latent file: what its metadata records."""

    width: int  # the original's size (as displayed, or as stored for kohya)
    height: int
    size: tuple[int, int]  # (height, width) the model sees: the batch key
    undo: dict[str, Any]  # how the size policy is undone (recorded as size_params)
    source_sha256: str


class EncodeJob:
    """The encode command's Job: read and prepare an image, encode a batch, write each latent."""

    command = "encode"
    latent_keys = False

    @staticmethod
    def check(vae: AutoencoderKL, options: EncodeOptions) -> Discovery:
        check_size_policy(options.size_policy)
        if options.latent_dtype not in DTYPES:
            raise ConfigError(f"unknown latent dtype {options.latent_dtype!r}; choose one of {', '.join(DTYPES)}")
        container = by_format(options.format)
        container.check_model(vae.config)
        problem = container.dtype_problem(options.latent_dtype)
        if problem is not None:
            raise ConfigError(problem)
        container.alpha_policy(options.alpha)  # refuses an alpha policy the container does not take
        return Discovery(IMAGE_SUFFIXES, latent_names(container.suffix), flat=options.flat)

    def __init__(self, ctx: RunContext, options: EncodeOptions) -> None:
        self.ctx, self.options = ctx, options
        config = ctx.vae.config
        self.container = container = by_format(options.format)
        self.alpha = container.alpha_policy(options.alpha)
        self.factor = config.size_multiple  # image sides: the downsample factor, times FLUX.2's patch
        # what the container stores: ours the model's normalization (unless raw), kohya raw, ComfyUI as its VAE node
        self.spec = None if options.raw else container.store_spec(config.latent_spec)
        self.store_dtype = DTYPES[options.latent_dtype]
        # ComfyUI's Qwen-Image latents keep the video VAE's frame axis: (C, h, w) -> (C, 1, h, w) when written
        self.frames = container.frame_axis and families.of_config(config).frame_axis
        self.settings = {
            "model_sha256": ctx.info["weights_sha256"],
            "model_identity_sha256": ctx.info["identity_sha256"],
            "latent_spec": json.dumps(self.spec.to_dict()) if self.spec is not None else "none",
            "posterior": "sample" if options.sample else "mode",
            "seed": str(options.seed) if options.sample else "",
            "size_policy": options.size_policy,
            "latent_dtype": options.latent_dtype,
            "alpha": self.alpha,
            **container.settings(),  # kohya's pixels: stored orientation, Pillow's RGB conversion
        }
        self.probe = image_probe(self.factor, options.size_policy, exif=container.exif)  # kohya: as stored
        if container.note:
            ctx.notes.append(container.note)

    def load(self, index: int, item: Item) -> Loaded[EncodeItem] | Skip:
        o = self.options
        assert item.output is not None
        fh, source_sha = read_source(item.input, o.max_pixels)  # the bytes hashed are the bytes decoded
        want = {"source_sha256": source_sha, **self.settings}
        skip, note = reuse_output(latent_output_state(item.output), want, o.overwrite, item.output)
        if skip:
            return Skip()
        pixels = decode_image(fh, self.alpha, o.max_pixels, self.container.pixels, keep_uint8=True)
        h, w = pixels.shape[:2]
        prepared, encoded, undo = prepare_pixels(pixels, self.factor, o.size_policy)
        if note:
            self.ctx.engine.results[index].notes.append(note)
        return Loaded(index, item, prepared, EncodeItem(w, h, encoded, undo, source_sha))

    def key(self, loaded: Loaded[EncodeItem]) -> Hashable:
        return loaded.state.size

    def compute(self, batch: list[Loaded[EncodeItem]]) -> Pending[Outputs]:
        o, runner = self.options, self.ctx.runner
        x, noise = stage_images(runner, batch, batch[0].state.size, o.sample, o.seed)
        return runner.submit_encode(x, self.spec, noise).then(lambda result: self._latents(batch, result))

    def _latents(self, batch: list[Loaded[EncodeItem]], result: Any) -> Outputs:
        """Each row's latent in the stored dtype, or why the item failed."""
        outs: Outputs = []
        for i, err in enumerate(note_batch(self.ctx.engine, batch, result, "encode")):
            z = result.tensor[i].to(self.store_dtype) if err is None else None
            if z is not None and not torch.isfinite(z).all():
                err = InputError(f"latent overflows {self.options.latent_dtype}; use --latent-dtype fp32 or bf16")
            outs.append(err if err is not None else z)
        return outs

    def save(self, loaded: Loaded[EncodeItem], z: torch.Tensor) -> None:
        target = loaded.item.output
        assert target is not None
        write = self.container.write
        assert write is not None  # by_format: a container that writes
        write(target, z.unsqueeze(1) if self.frames else z, self._meta(loaded.item, loaded.state))

    def _meta(self, item: Item, e: EncodeItem) -> dict[str, str]:
        """The metadata one latent file records: the run's settings, and this image's sizes and source."""
        config = self.ctx.vae.config
        return {
            "format": LATENT_FORMAT,
            "format_version": LATENT_FORMAT_VERSION,
            "vaecli_version": __version__,
            "model_name": self.ctx.info["name"],
            **self.settings,
            "seed_key": meta_name(item.rel) if self.options.sample else "",
            "compute_dtype": DTYPE_NAMES[self.ctx.runner.dtype],
            "downsample_factor": str(config.downsample_factor),
            **({"size_multiple": str(self.factor)} if self.factor != config.downsample_factor else {}),
            "original_width": str(e.width),
            "original_height": str(e.height),
            "encoded_width": str(e.size[1]),
            "encoded_height": str(e.size[0]),
            "size_params": json.dumps(e.undo),
            "source": meta_name(item.rel),
            "source_sha256": e.source_sha256,
        }


def encode_paths(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: Path,
    options: EncodeOptions = EncodeOptions(),
    run: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> Report:
    """Encode image files and folders into `out/<rel>.safetensors` latent files with metadata.

    An existing complete output made from the same source bytes with the same settings is skipped; a
    stale one (source edited, other model or settings) is recomputed, as is every output with overwrite.
    A file at an output path that is not a vaecli latent is replaced only with overwrite.
    """
    return run_job(EncodeJob, vae, inputs, out, options, run, progress)
