"""The conversion commands: encode (images to latents; --dataset hands over to dataset_mode), decode, roundtrip.

Each parses, builds the core's options (settings.py), loads the model, calls one core function and renders
its report. The core is imported inside the commands: help and usage errors never load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..choices import DATASET_ONLY_FORMATS, DEFAULTS, DType, EncodeFormat, ImageFormat
from ..discovery import output_path
from ..errors import VaecliError
from ..files import is_url, shard_kind
from .app import command, guard
from .dataset_mode import DatasetFlags, encode_dataset
from .options import (
    OUTPUT,
    InputsArg,
    ModelFlags,
    PixelFlags,
    ReportFlags,
    RunFlags,
    SampleFlags,
    WriteFlags,
    expand_groups,
)
from .rendering import finish, progress, roundtrip_table
from .settings import (
    LatentOutput,
    decode_options,
    encode_options,
    load_model,
    refuse_torchrun,
    roundtrip_options,
    run_options,
)

EncodeInputsArg = Annotated[list[str], typer.Argument(
    metavar="INPUT", help="Files or folders (searched recursively); with --dataset also shards: .tar/.parquet files "
    "or URLs (s3://, gs://, hf://), brace lists like 'data/{00000..00099}.tar', globs.", show_default=False)]
EncodeOutOpt = Annotated[Path, typer.Option(
    "--out", "-o", metavar="PATH", parser=output_path, help="Output folder for <rel>.safetensors latents.",
    show_default=False)]
RawOpt = Annotated[bool, typer.Option(
    "--raw", help="Store raw VAE latents, not the model's normalized ones.", rich_help_panel=OUTPUT)]
LatentDTypeOpt = Annotated[DType, typer.Option(
    "--latent-dtype", help="Precision of the stored latents.", rich_help_panel=OUTPUT)]
CacheFormatOpt = Annotated[EncodeFormat | None, typer.Option(
    "--format", help="Latent files: vaecli (.safetensors + metadata), kohya (.npz for sd-scripts, its pixel "
    "conventions), comfyui (.latent for Load Latent), musubi (--dataset only: musubi-tuner's latent caches, "
    "see --musubi-arch).", show_default=DEFAULTS.cache_format, rich_help_panel=OUTPUT)]
FlatOpt = Annotated[bool, typer.Option(
    "--flat", help="Every output at the top of OUT, named by the image's file name (ComfyUI lists only those); "
    "two images of one name: the second fails.", rich_help_panel=OUTPUT)]


@command("Images to latent files; with --dataset a training cache.")
@expand_groups
def encode(
    inputs: EncodeInputsArg,
    out: EncodeOutOpt,
    *,
    model: ModelFlags,
    run: RunFlags,
    sample: SampleFlags,
    raw: RawOpt = False,
    latent_dtype: LatentDTypeOpt = DType[DEFAULTS.latent_dtype],
    pixels: PixelFlags,
    write: WriteFlags,
    dataset: DatasetFlags,
    cache_format: CacheFormatOpt = None,
    flat: FlatOpt = False,
    report: ReportFlags,
) -> None:
    """Encode images (files or folders) to latent files OUT/<rel>.safetensors with metadata.

    With --dataset: prepare a latent cache for training (buckets, crops, flips, OUT/manifest.jsonl), reusing
    latents whose source, model and settings are unchanged; runs sharded under torchrun or with --shard.
    """
    from ..batch import check_layout, encode_paths, latent_names
    from ..discovery import check_inputs_exist, require_inputs
    from ..io import IMAGE_SUFFIXES
    from ..latents import by_format

    with guard(report.as_json, report.debug, "encode"):
        options_run = run_options(run)
        # Before the model loads: a missing path or an overlapping layout is refused at once (shards: later).
        local = [i for i in inputs if not (is_url(i) or shard_kind(i))]
        check_inputs_exist(local)
        as_dataset = dataset.dataset or dataset.kohya_config is not None
        fmt = _cache_format(cache_format, dataset.kohya_config is not None, as_dataset)
        check_layout(inputs, out, None if as_dataset else latent_names(by_format(fmt).suffix))
        if len(local) == len(inputs):
            require_inputs(inputs, IMAGE_SUFFIXES, out)  # exit 2 before the model loads or anything is written
        latents = LatentOutput(raw, latent_dtype.value, fmt, flat)
        if as_dataset:
            encode_dataset(inputs, out, model, run, options_run, sample, latents, pixels, write, dataset, report)
            return
        refuse_torchrun("encode without --dataset")
        given = dataset.given()
        if given:
            raise VaecliError(f"{', '.join(given)} only {'apply' if len(given) > 1 else 'applies'} with --dataset")
        options = encode_options(run, sample, pixels, write, latents)
        vae = load_model(model, run.device, report.as_json, report.debug, kernels=run.kernels.value)
        with progress("encode", report.quiet, report.debug) as live:
            result = encode_paths(vae, [Path(i) for i in inputs], out, options, options_run, live)
        finish(result, report.as_json, report.debug, live=live)


def _cache_format(given: EncodeFormat | None, kohya_config: bool, as_dataset: bool) -> str:
    """--format's value; --kohya-config makes a kohya cache (another --format given with it is refused); a
    dataset-only format (musubi) needs --dataset."""
    if given is not None and given.value in DATASET_ONLY_FORMATS and not as_dataset:
        raise VaecliError(f"--format {given.value} writes a training cache: add --dataset")
    if not kohya_config:
        return (given or EncodeFormat[DEFAULTS.cache_format]).value
    if given not in (None, EncodeFormat.kohya):
        raise VaecliError(f"--kohya-config makes a kohya cache; drop --format {given.value}")
    return EncodeFormat.kohya.value


DecodeOutOpt = Annotated[Path, typer.Option(
    "--out", "-o", metavar="PATH", parser=output_path, help="Output folder for <rel>.<format> images.",
    show_default=False)]
ImageFormatOpt = Annotated[ImageFormat, typer.Option("--format", help="Image format written.", rich_help_panel=OUTPUT)]
QualityOpt = Annotated[int, typer.Option(
    "--quality", metavar="Q", min=1, max=100, help="JPEG/WebP quality (WebP 100: lossless).", rich_help_panel=OUTPUT)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Decode latents made by another model.")]
ScalingOpt = Annotated[float | None, typer.Option(
    "--scaling-factor", metavar="X", help="Normalization of latents without vaecli metadata (overrides metadata).")]
ShiftOpt = Annotated[float | None, typer.Option(
    "--shift-factor", metavar="X", help="Shift of such latents (SD3/Flux).")]


@command("Latent files back to images at their original size.")
@expand_groups
def decode(
    inputs: InputsArg,
    out: DecodeOutOpt,
    *,
    model: ModelFlags,
    run: RunFlags,
    image_format: ImageFormatOpt = ImageFormat[DEFAULTS.image_format],
    quality: QualityOpt = DEFAULTS.quality,
    force: ForceOpt = False,
    scaling_factor: ScalingOpt = None,
    shift_factor: ShiftOpt = None,
    write: WriteFlags,
    report: ReportFlags,
) -> None:
    """Decode latent files (ours, bare .safetensors or .npy) to images at their original size."""
    from ..batch import check_layout, decode_paths, image_names
    from ..discovery import check_inputs_exist, require_inputs
    from ..latents import LATENT_SUFFIXES

    with guard(report.as_json, report.debug, "decode"):
        refuse_torchrun("decode")
        options = decode_options(run, write, image_format.value, quality, force, scaling_factor, shift_factor)
        options_run = run_options(run)
        check_inputs_exist(inputs)
        check_layout(inputs, out, image_names(image_format.value))
        require_inputs(inputs, LATENT_SUFFIXES, out)
        vae = load_model(model, run.device, report.as_json, report.debug, kernels=run.kernels.value)
        with progress("decode", report.quiet, report.debug) as live:
            result = decode_paths(vae, inputs, out, options, options_run, live)
        finish(result, report.as_json, report.debug, live=live)


RoundtripOutOpt = Annotated[Path | None, typer.Option(
    "--out", "-o", metavar="PATH", parser=output_path, help="Write reconstructions to OUT/<rel>.png.",
    show_default=False)]
DiffOpt = Annotated[bool, typer.Option(
    "--diff", help="Also write OUT/<rel>.diff.png, |error| x --diff-gain.", rich_help_panel=OUTPUT)]
DiffGainOpt = Annotated[float, typer.Option(
    "--diff-gain", metavar="GAIN", min=0.0, help="Amplification of the error map.", rich_help_panel=OUTPUT)]


@command("Encode and decode; PSNR, SSIM and max error per image.")
@expand_groups
def roundtrip(
    inputs: InputsArg,
    out: RoundtripOutOpt = None,
    *,
    model: ModelFlags,
    run: RunFlags,
    sample: SampleFlags,
    pixels: PixelFlags,
    diff: DiffOpt = False,
    diff_gain: DiffGainOpt = DEFAULTS.diff_gain,
    write: WriteFlags,
    report: ReportFlags,
) -> None:
    """Encode and decode in memory; per-image PSNR, SSIM and max abs error (8-bit RGB, original size)."""
    from ..batch import check_layout, image_names, roundtrip_paths
    from ..discovery import check_inputs_exist, require_inputs
    from ..io import IMAGE_SUFFIXES

    with guard(report.as_json, report.debug, "roundtrip"):
        refuse_torchrun("roundtrip")
        if diff and out is None:
            raise VaecliError("--diff needs -o/--out: the error maps are written beside the reconstructions")
        options = roundtrip_options(run, sample, pixels, write, diff, diff_gain)
        options_run = run_options(run)
        check_inputs_exist(inputs)
        check_layout(inputs, out, image_names("png"))
        require_inputs(inputs, IMAGE_SUFFIXES, out)
        vae = load_model(model, run.device, report.as_json, report.debug, kernels=run.kernels.value)
        with progress("roundtrip", report.quiet, report.debug) as live:
            result = roundtrip_paths(vae, inputs, out, options, options_run, live)
        finish(result, report.as_json, report.debug, roundtrip_table(result) if result.items else None, live)
