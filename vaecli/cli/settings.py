"""From parsed options to the core's: RunOptions, EncodeOptions, DecodeOptions, RoundtripOptions, the model.

The core is imported inside each function, so that help and usage errors answer without loading torch.
"""

from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass
from typing import Any

from ..choices import DEFAULTS, Device
from ..errors import VaecliError
from .options import BenchFlags, ModelFlags, PixelFlags, RunFlags, SampleFlags, WriteFlags
from .rendering import usage


def run_options(run: RunFlags) -> Any:
    """The RunOptions of the run flags (an overlap as large as the tile is refused here)."""
    from ..devices import DTYPES
    from ..pipeline import RunOptions

    if run.tile_overlap >= run.tile_size:
        raise VaecliError(f"--tile-overlap {run.tile_overlap} must be smaller than --tile-size {run.tile_size}")
    return RunOptions(DTYPES[run.dtype.value], run.upcast, run.tiling.value, run.tile_size, run.tile_overlap,
                      run.slicing, compile=run.compile_model, kernels=run.kernels.value)


@dataclass(frozen=True)
class LatentOutput:
    """encode's own choices of what is stored (also in dataset mode): --raw, --latent-dtype, --format, --flat."""

    raw: bool = False
    latent_dtype: str = DEFAULTS.latent_dtype
    format: str = DEFAULTS.cache_format
    flat: bool = False


def encode_options(run: RunFlags, sample: SampleFlags, pixels: PixelFlags, write: WriteFlags,
                   latents: LatentOutput) -> Any:
    from ..batch import EncodeOptions

    return EncodeOptions(
        batch_size=run.batch_size, raw=latents.raw, sample=sample.sampled, seed=sample.noise_seed,
        size_policy=pixels.size_policy.value, latent_dtype=latents.latent_dtype,
        alpha=pixels.alpha.value if pixels.alpha else None, max_pixels=write.max_pixels, overwrite=write.overwrite,
        format=latents.format, flat=latents.flat,
    )


def decode_options(
    run: RunFlags, write: WriteFlags, image_format: str, quality: int, force: bool, scaling_factor: float | None,
    shift_factor: float | None,
) -> Any:
    from ..batch import DecodeOptions

    if scaling_factor is not None and (not math.isfinite(scaling_factor) or scaling_factor == 0):
        raise VaecliError(f"--scaling-factor must be a finite, non-zero number, not {scaling_factor}")
    if shift_factor is not None and not math.isfinite(shift_factor):
        raise VaecliError(f"--shift-factor must be a finite number, not {shift_factor}")
    return DecodeOptions(
        batch_size=run.batch_size, format=image_format, quality=quality, force=force, scaling_factor=scaling_factor,
        shift_factor=shift_factor, max_pixels=write.max_pixels, overwrite=write.overwrite,
    )


def roundtrip_options(
    run: RunFlags, sample: SampleFlags, pixels: PixelFlags, write: WriteFlags, diff: bool, diff_gain: float,
) -> Any:
    from ..batch import RoundtripOptions

    if not math.isfinite(diff_gain):
        raise VaecliError(f"--diff-gain must be a finite number, not {diff_gain}")
    return RoundtripOptions(
        batch_size=run.batch_size, sample=sample.sampled, seed=sample.noise_seed, size_policy=pixels.size_policy.value,
        alpha=pixels.alpha.value if pixels.alpha else DEFAULTS.alpha, max_pixels=write.max_pixels, diff=diff,
        diff_gain=diff_gain, overwrite=write.overwrite,
    )


def bench_settings(run: BenchFlags, resolutions: list[int], warmup: int, iters: int) -> dict[str, Any]:
    """run_bench's settings (all but the model), the device resolved: the same for the --versus model."""
    from ..devices import resolve_device

    return dict(resolutions=list(resolutions), batch_size=run.batch_size, dtype=run.dtype.value,
                tiling=run.tiling.value, device=resolve_device(run.device.value), warmup=warmup, iters=iters,
                tile_size=run.tile_size, tile_overlap=run.tile_overlap, compile=run.compile_model,
                kernels=run.kernels.value)


def load_model(choice: ModelFlags, device: Device, as_json: bool, debug: bool, kernels: str | None = None) -> Any:
    """The model of the --model flags on `device`; any failure is a usage error of one line (exit 2). With
    `kernels`, its weights are laid out for that plan here: the model is the CLI's own, so the Runner then
    runs it as it is instead of a laid-out copy (one copy of the weights on the device)."""
    from ..batch import open_model
    from ..devices import resolve_device

    choice.check()
    resolve_device(device.value)  # an unavailable device is its own usage error, not a load failure
    model = choice.model
    try:
        vae = open_model(
            model, choice.family.value if choice.family else None, device.value,
            subfolder=choice.subfolder, revision=choice.revision, variant=choice.variant,
        )
    except Exception as exc:  # noqa: BLE001 - any load failure is a usage error with one line
        if debug:
            traceback.print_exc()
        name = model or "the embedded default model"
        msg = str(exc) if isinstance(exc, VaecliError) else f"{type(exc).__name__}: {exc}"
        if model is None and not isinstance(exc, VaecliError):
            msg += " (is the default model installed? pass --model)"
        raise usage(f"cannot load the model: {msg if name in msg else f'{name}: {msg}'}", as_json) from None
    if kernels is not None:
        from ..plans import apply_layout, plan_for

        apply_layout(vae, plan_for(next(vae.parameters()).device, vae.config, kernels))
    return vae


def refuse_torchrun(command: str) -> None:
    """Only encode --dataset splits its work over torchrun's processes; anything else would run whole in
    every process, each writing the same outputs."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise VaecliError(f"{command} does not split its work over torchrun's processes (only encode --dataset "
                          "does); run it as a single process")
