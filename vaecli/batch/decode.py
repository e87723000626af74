"""`decode_paths`: latent files and folders (ours, .npy, kohya's .npz, ComfyUI's .latent) -> images at their
original size, as one Job on the engine."""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import LatentSpec
from ..discovery import Item
from ..errors import ConfigError, InputError
from ..io import image_output_state, write_image
from ..latents import LATENT_SUFFIXES, LatentFile, load_latent, stored_spec
from ..models.kl import AutoencoderKL
from ..pipeline import Pending, RunOptions
from .engine import Loaded, Outputs, Skip
from .latent_meta import check_meta_header, preview_latents
from .options import DecodeOptions
from .report import Progress, Report
from .reuse import reuse_output
from .run import Discovery, RunContext, image_names, images_nhwc, note_batch, run_job
from .sizes import decoded_size, restore_size
from .sources import latent_probe, read_source


@dataclass(frozen=True)
class DecodeItem:
    """One latent on its way to an image file."""

    size: tuple[int, int]  # (height, width) of the image written
    policy: str  # the size policy undone to reach it (crop: the decoded image as it is)
    provenance: dict[str, str]  # what the image file records of its making


class DecodeJob:
    """The decode command's Job: read and check a latent and undo its normalization, decode a batch, write
    each image at its original size."""

    command = "decode"
    latent_keys = True
    probe = staticmethod(latent_probe)

    @staticmethod
    def check(vae: AutoencoderKL, options: DecodeOptions) -> Discovery:
        for name in ("scaling_factor", "shift_factor"):
            value = getattr(options, name)
            if value is not None and (not math.isfinite(value) or (name == "scaling_factor" and value == 0)):
                nonzero = ", non-zero" if name == "scaling_factor" else ""
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite{nonzero} number")
        return Discovery(LATENT_SUFFIXES, image_names(options.format))

    def __init__(self, ctx: RunContext, options: DecodeOptions) -> None:
        self.ctx, self.options = ctx, options
        config = ctx.vae.config
        self.factor = config.downsample_factor
        self.channels = config.latent_channels
        self.model_spec = config.latent_spec
        # A tiny autoencoder previews the diffusion latents of a full VAE of its latent space (files of another
        # model by design); FLUX.2's come patchified, TAEF2 takes them unpatchified.
        self.preview = getattr(config, "deterministic", False)
        self.patch = 2 if self.preview else self.model_spec.patch_size
        # FLUX.2's normalized latents are patchified: C*p*p channels, cells of factor*p pixels; raw ones are not
        self.accepted = sorted({self.channels, self.channels * self.patch * self.patch})
        self.override = options.scaling_factor is not None or options.shift_factor is not None
        scale = options.scaling_factor if options.scaling_factor is not None else 1.0
        self.flag_spec = LatentSpec(scale, options.shift_factor)
        self.settings = {
            "kind": "decode",
            "model_sha256": ctx.info["weights_sha256"],
            "model_identity_sha256": ctx.info["identity_sha256"],
            "image_format": options.format,
            "quality": str(options.quality) if options.format != "png" else "",
            "normalization": json.dumps(self.flag_spec.to_dict()) if self.override else "metadata",
        }

    def cell(self, c: int) -> int:
        """Pixels per latent cell for a latent of c channels (patchified FLUX.2 latents: factor * patch)."""
        patched = self.patch > 1 and c == self.channels * self.patch * self.patch
        return self.factor * self.patch if patched else self.factor

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        """A latent's (C, h, w), from its header, before its values are read: channels and decoded size."""
        c, h, w = shape
        if c not in self.accepted:
            many = len(self.accepted) > 1
            expect = " or ".join(map(str, self.accepted)) + (" (normalized, patchified)" if many else "")
            raise InputError(
                f"latent has {c} channels but the model expects {expect}; it was made for another kind of VAE "
                "(pass its --model)"
            )
        f, limit = self.cell(c), self.options.max_pixels
        if limit > 0 and h * w * f * f > limit:
            raise InputError(
                f"decodes to {w * f}x{h * f} pixels, above the limit of {limit / 1e6:.1f} MP; "
                f"pass --max-pixels {h * w * f * f} to decode it"
            )

    def load(self, index: int, item: Item) -> Loaded[DecodeItem] | Skip:
        o = self.options
        assert item.output is not None
        fh, source_sha = read_source(item.input, o.max_pixels)  # the bytes hashed are the bytes decoded
        want = {"source_sha256": source_sha, **self.settings}
        skip, note = reuse_output(image_output_state(item.output), want, o.overwrite, item.output)
        if skip:
            return Skip()
        lf = load_latent(fh, item.input.suffix.lower(), self.check_shape)
        c, h, w = lf.tensor.shape
        if lf.meta is not None:
            check_meta_header(lf.meta, self.ctx.info, o.force or self.preview)
            size = decoded_size(lf.meta, h, w, self.cell(c), o.max_pixels)
            policy = lf.meta.get("size_policy", "pad")
        else:  # the latent's own size: a bucket (kohya, ComfyUI) or whatever a bare tensor holds
            size, policy = (h * self.cell(c), w * self.cell(c)), "crop"
        z = self._raw_latents(lf, c)
        record = self.ctx.engine.results[index].notes
        if self.override and lf.meta is not None:
            record.append("normalization from --scaling-factor/--shift-factor, not metadata")
        if note:
            record.append(note)
        provenance = {"vaecli_version": __version__, "source": item.rel, **want}
        return Loaded(index, item, z, DecodeItem(size, policy, provenance))

    def _raw_latents(self, lf: LatentFile, c: int) -> torch.Tensor:
        """The file's latents with their normalization undone (what the decoder takes), checked finite."""
        spec = self.flag_spec if self.override else stored_spec(lf, c, self.model_spec)
        if not torch.isfinite(lf.tensor).all():
            raise InputError("latent holds NaN or Inf values")
        if (spec.patch_size if spec is not None else 1) * self.factor != self.cell(c):
            raise InputError(f"latent of {c} channels does not fit its recorded normalization "
                             f"({spec.describe() if spec is not None else 'raw'}) for this model")
        if self.preview:
            z = self.model_spec.denormalize(preview_latents(lf.tensor, spec, self.ctx.vae))
        else:
            z = spec.denormalize(lf.tensor) if spec is not None else lf.tensor
        if not torch.isfinite(z).all():
            raise InputError("latent overflows when its normalization is undone (values far out of range)")
        return z

    def key(self, loaded: Loaded[DecodeItem]) -> Hashable:
        return tuple(loaded.x.shape)

    def compute(self, batch: list[Loaded[DecodeItem]]) -> Pending[Outputs]:
        as_uint8 = all(b.state.policy != "resize" for b in batch)  # resize resamples floats
        z = torch.stack([torch.as_tensor(b.x) for b in batch])  # (N, C, h, w) raw
        return self.ctx.runner.submit_decode(z, None, as_uint8).then(lambda result: self._images(batch, result))

    def _images(self, batch: list[Loaded[DecodeItem]], result: Any) -> Outputs:
        errors = note_batch(self.ctx.engine, batch, result, "decode")
        images = images_nhwc(result.tensor)
        return [err if err is not None else images[i] for i, err in enumerate(errors)]

    def save(self, loaded: Loaded[DecodeItem], image: np.ndarray) -> None:
        e, o = loaded.state, self.options
        assert loaded.item.output is not None
        write_image(loaded.item.output, restore_size(image, e.policy, e.size), o.format, o.quality, e.provenance)


def decode_paths(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: Path,
    options: DecodeOptions = DecodeOptions(),
    run: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> Report:
    """Decode latent files and folders into `out/<rel>.<format>` images at their original size.

    Our files carry their normalization and size policy (both checked against the latent); bare tensors need
    scaling_factor/shift_factor. A latent of another model (weights sha256) fails unless `force`. An
    existing output made from the same latent bytes, model and settings is skipped; a stale one is remade.
    """
    return run_job(DecodeJob, vae, inputs, out, options, run, progress)
