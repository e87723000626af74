"""`roundtrip_paths`: encode and decode images in memory and score the reconstructions (PSNR, SSIM, max
abs error), optionally writing them and their error maps, as one Job on the engine."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..discovery import Item
from ..errors import ConfigError, InputError
from ..io import IMAGE_SUFFIXES, decode_image, image_output_state, read_image, to_uint8, write_image
from ..metrics import diff_map, max_abs_error, psnr, ssim
from ..models.kl import AutoencoderKL
from ..pipeline import Pending, RunOptions
from .engine import Loaded, Outputs, Skip
from .options import RoundtripOptions
from .report import Progress, Report
from .reuse import reuse_output, wanted
from .run import Discovery, RunContext, image_names, images_nhwc, note_batch, run_job, stage_images
from .sizes import check_size_policy, prepare_pixels, restore_size
from .sources import image_probe, read_source


def diff_path(target: Path) -> Path:
    """Where roundtrip --diff writes the error map of reconstruction `target` (OUT/<rel>.png)."""
    return target.with_name(target.name[: -len(".png")] + ".diff.png")


@dataclass(frozen=True)
class RoundtripItem:
    """One image on its way through the model and back: what scoring and writing it need."""

    width: int  # the original's size
    height: int
    size: tuple[int, int]  # (height, width) the model sees: the batch key
    ref: np.ndarray  # the 8-bit original the reconstruction is scored against
    source_sha256: str


class RoundtripJob:
    """The roundtrip command's Job: read and prepare an image (or score a current reconstruction), encode
    and decode a batch on the device, score each reconstruction and write it."""

    command = "roundtrip"
    latent_keys = False

    @staticmethod
    def check(vae: AutoencoderKL, options: RoundtripOptions) -> Discovery:
        check_size_policy(options.size_policy)
        if not math.isfinite(options.diff_gain) or options.diff_gain < 0:
            raise ConfigError(f"--diff-gain must be a finite number >= 0, not {options.diff_gain}")
        siblings = (lambda target: (diff_path(target),)) if options.diff else None
        return Discovery(IMAGE_SUFFIXES, image_names("png"), siblings)

    def __init__(self, ctx: RunContext, options: RoundtripOptions) -> None:
        self.ctx, self.options = ctx, options
        self.factor = ctx.vae.config.size_multiple  # FLUX.2: 16, the sizes its pipelines take
        self.settings = {
            "kind": "reconstruction",
            "model_sha256": ctx.info["weights_sha256"],
            "model_identity_sha256": ctx.info["identity_sha256"],
            "size_policy": options.size_policy,
            "alpha": options.alpha,
            "posterior": "sample" if options.sample else "mode",
            "seed": str(options.seed) if options.sample else "",
        }
        self.probe = image_probe(self.factor, options.size_policy, options.pad_to)

    def provenance(self, item: Item, source_sha: str, diff: bool) -> dict[str, str]:
        """What a reconstruction (or, with diff, its error map) records of its making."""
        want = {"source_sha256": source_sha, **self.settings}
        if diff:
            want.update(kind="error-map", diff_gain=repr(float(self.options.diff_gain)))
        return {"vaecli_version": __version__, "source": item.rel, **want}

    def load(self, index: int, item: Item) -> Loaded[RoundtripItem] | Skip:
        o = self.options
        fh, source_sha = read_source(item.input, o.max_pixels)  # the bytes hashed are the bytes decoded
        pixels = decode_image(fh, o.alpha, o.max_pixels, keep_uint8=True)
        h, w = pixels.shape[:2]
        prepared, encoded, undo = prepare_pixels(pixels, self.factor, o.size_policy, o.pad_to)
        ref = reference(pixels, undo)
        loaded = Loaded(index, item, prepared, RoundtripItem(w, h, encoded, ref, source_sha))
        if item.output is None:
            return loaded
        reuse = self._existing_reconstruction(item, self.provenance(item, source_sha, False), ref)
        maps = self.provenance(item, source_sha, True) if o.diff else None
        if isinstance(reuse, np.ndarray):  # current: score it, and write its error map if that is not current
            return self._score_existing(item.output, ref, reuse, maps)
        if maps is not None:  # a file in the way of the error map fails the item before the model runs
            target = diff_path(item.output)
            reuse_output(image_output_state(target), wanted(maps), o.overwrite, target)
        if reuse is not None:
            self.ctx.engine.results[index].notes.append(reuse)
        return loaded

    def _score_existing(self, output: Path, ref: np.ndarray, rec: np.ndarray, maps: dict[str, str] | None) -> Skip:
        """A current reconstruction scored from its file, its error map written unless that is current."""
        note = "scored from the existing reconstruction"
        if maps is not None:
            target = diff_path(output)
            keep, _ = reuse_output(image_output_state(target), wanted(maps), self.options.overwrite, target)
            if not keep:
                write_image(target, diff_map(ref, rec, self.options.diff_gain), provenance=maps)
                note += "; wrote its error map"
        return Skip(scores(ref, rec), note)

    def _existing_reconstruction(self, item: Item, record: dict[str, str], ref: np.ndarray) -> np.ndarray | str | None:
        """The current reconstruction's pixels, or a note on why it is remade (None: nothing there)."""
        assert item.output is not None
        state = image_output_state(item.output)
        skip, note = reuse_output(state, wanted(record), self.options.overwrite, item.output)
        if not skip:
            return note
        try:
            rec = to_uint8(read_image(item.output, "drop", ref.shape[0] * ref.shape[1]))
        except InputError as exc:
            return f"replaced an unreadable reconstruction ({exc})"
        return rec if rec.shape == ref.shape else "replaced a reconstruction of another size"

    def key(self, loaded: Loaded[RoundtripItem]) -> Hashable:
        return loaded.state.size

    def compute(self, batch: list[Loaded[RoundtripItem]]) -> Pending[Outputs]:
        o, runner = self.options, self.ctx.runner
        x, noise = stage_images(runner, batch, batch[0].state.size, o.sample, o.seed)
        pending = runner.submit_roundtrip(x, noise, as_uint8=o.size_policy != "resize")
        return pending.then(lambda results: self._images(batch, *results))

    def _images(self, batch: list[Loaded[RoundtripItem]], enc: Any, dec: Any) -> Outputs:
        engine = self.ctx.engine
        errors = note_batch(engine, batch, enc, "encode")
        errors = [a or b for a, b in zip(errors, note_batch(engine, batch, dec, "decode"), strict=True)]
        images = images_nhwc(dec.tensor)
        return [err if err is not None else images[i] for i, err in enumerate(errors)]

    def save(self, loaded: Loaded[RoundtripItem], image: np.ndarray) -> None:
        e, o = loaded.state, self.options
        rec = to_uint8(restore_size(image, o.size_policy, (e.height, e.width)))
        self.ctx.engine.results[loaded.index].metrics.update(scores(e.ref, rec))
        target = loaded.item.output
        if target is None:
            return
        if o.diff:
            maps = self.provenance(loaded.item, e.source_sha256, True)
            write_image(diff_path(target), diff_map(e.ref, rec, o.diff_gain), provenance=maps)
        write_image(target, rec, provenance=self.provenance(loaded.item, e.source_sha256, False))  # last


def reference(pixels: np.ndarray, undo: dict[str, Any]) -> np.ndarray:
    """The 8-bit original a reconstruction is scored against: the encoded region for crop."""
    if "crop_ltrb" in undo:
        left, top, right, bottom = undo["crop_ltrb"]
        pixels = pixels[top:bottom, left:right]
    return to_uint8(pixels)


def scores(ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(ref, rec), "ssim": ssim(ref, rec), "max_abs_error": max_abs_error(ref, rec)}


def roundtrip_paths(
    vae: AutoencoderKL,
    inputs: Sequence[str | Path],
    out: Path | None = None,
    options: RoundtripOptions = RoundtripOptions(),
    run: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> Report:
    """Encode and decode in memory; PSNR, SSIM and max abs error on 8-bit RGB at the original size.

    With `out`, reconstructions go to `out/<rel>.png` (and error maps to `out/<rel>.diff.png`); an existing
    reconstruction made from the same source bytes, model and settings is skipped and scored from the file.
    """
    return run_job(RoundtripJob, vae, inputs, out, options, run, progress)
