"""encode --dataset: its options (buckets, crops, shards, engines) and the run that prepares a training cache.

vaecli.dataset is imported only inside encode_dataset, so a plain encode (and every --help) never loads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from ..choices import DEFAULTS, MUSUBI_ARCHITECTURES, Device, Engine, Layout, MusubiArch
from ..errors import ConfigError
from .options import (
    DATASET,
    SHARDS,
    FlagGroup,
    ModelFlags,
    PixelFlags,
    ReportFlags,
    RunFlags,
    SampleFlags,
    WriteFlags,
    flag_name,
)
from .output import secondary_rank
from .rendering import dataset_summary, finish, progress
from .settings import LatentOutput, load_model

DatasetOpt = Annotated[bool, typer.Option(
    "--dataset", help="Prepare a training cache: aspect buckets, crops, manifest.jsonl, invalidation.",
    rich_help_panel=DATASET)]
BucketResolutionOpt = Annotated[int | None, typer.Option(
    "--bucket-resolution", metavar="PIXELS", min=8, help="Side of the square bucket whose area all buckets share "
    "(SD 1.x: 512, SDXL: 1024).", show_default=str(DEFAULTS.bucket_resolution), rich_help_panel=DATASET)]
BucketStepOpt = Annotated[int | None, typer.Option(
    "--bucket-step", metavar="PIXELS", min=8, help="Bucket sides are multiples of this.",
    show_default=str(DEFAULTS.bucket_step), rich_help_panel=DATASET)]
MinBucketOpt = Annotated[int | None, typer.Option(
    "--min-bucket-size", metavar="PIXELS", help="Shortest bucket side.",
    show_default="resolution/2; --format kohya: 256, as sd-scripts", rich_help_panel=DATASET)]
MaxBucketOpt = Annotated[int | None, typer.Option(
    "--max-bucket-size", metavar="PIXELS", help="Longest bucket side.",
    show_default="resolution*2; --format kohya: 1024, as sd-scripts", rich_help_panel=DATASET)]
NoUpscaleOpt = Annotated[bool, typer.Option(
    "--no-upscale", help="Never enlarge: small images get a bucket that fits inside them.", rich_help_panel=DATASET)]
RandomCropOpt = Annotated[bool, typer.Option(
    "--random-crop", help="Crop at a random offset (from --crop-seed and the path) instead of the centre.",
    rich_help_panel=DATASET)]
CropSeedOpt = Annotated[int, typer.Option(
    "--crop-seed", metavar="N", help="Seed of --random-crop.", rich_help_panel=DATASET)]
FlipOpt = Annotated[bool, typer.Option(
    "--flip", help="Also store the latent of the horizontally flipped image (latent_flipped).",
    rich_help_panel=DATASET)]
MomentsOpt = Annotated[bool, typer.Option(
    "--moments", help="Also store the posterior mean and logvar, to sample at training time.",
    rich_help_panel=DATASET)]
NextToImagesOpt = Annotated[bool, typer.Option(
    "--kohya-next-to-images", help="kohya format: write <stem>.npz beside each image instead of under OUT.",
    rich_help_panel=DATASET)]
KohyaConfigOpt = Annotated[Path | None, typer.Option(
    "--kohya-config", metavar="TOML", help="Bucket settings (resolution, buckets, flip_aug) from kohya's dataset "
    "config; implies --dataset --format kohya.", rich_help_panel=DATASET)]
ShardOpt = Annotated[str | None, typer.Option(
    "--shard", metavar="I/N", help="Take shard i of n (i/n, 0-based), e.g. for Slurm arrays; under torchrun "
    "RANK/WORLD_SIZE are used.", rich_help_panel=DATASET)]
LayoutOpt = Annotated[Layout | None, typer.Option(
    "--layout", help="folder: a file per image (image inputs); tar (WebDataset) or parquet: one latent shard per "
    "input shard.", show_default="by input", rich_help_panel=SHARDS)]
ImageColumnOpt = Annotated[str | None, typer.Option(
    "--image-column", metavar="NAME", help="Shards: the tar member suffix (jpg) or parquet column (image) holding "
    "the image.", show_default="found", rich_help_panel=SHARDS)]
EngineOpt = Annotated[Engine, typer.Option(
    "--engine", help="local: this process (with --shard or torchrun); ray: a Ray cluster, the VAE as an actor pool "
    "(pip install 'vaecli[ray]').", rich_help_panel=SHARDS)]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", metavar="ADDR", help="Ray cluster to join (host:6379 or ray://host:10001).",
    show_default="RAY_ADDRESS, else a new local one", rich_help_panel=SHARDS)]
MusubiArchOpt = Annotated[MusubiArch | None, typer.Option(
    "--musubi-arch", metavar="ARCH", help="--format musubi: the musubi-tuner architecture whose latent caches OUT (its "
    f"cache_directory) gets: {', '.join(MUSUBI_ARCHITECTURES)} (qwen_image_edit: not yet, it needs control "
    "images); --bucket-resolution is its resolution.",
    show_default=False, rich_help_panel=DATASET)]
RayWorkersOpt = Annotated[int, typer.Option(
    "--ray-workers", metavar="N", min=0, help="Ray VAE actors; 0: one per GPU (--device cuda) or per CPU of the "
    "cluster.", rich_help_panel=SHARDS)]


@dataclass(frozen=True)
class DatasetFlags(FlagGroup):
    """encode --dataset: buckets, crops, manifest, shards and engines (refused without --dataset)."""

    dataset: DatasetOpt = False
    bucket_resolution: BucketResolutionOpt = None  # None: DEFAULTS', or the --kohya-config's
    bucket_step: BucketStepOpt = None
    min_bucket_size: MinBucketOpt = None
    max_bucket_size: MaxBucketOpt = None
    no_upscale: NoUpscaleOpt = False
    random_crop: RandomCropOpt = False
    crop_seed: CropSeedOpt = DEFAULTS.crop_seed
    flip: FlipOpt = False
    moments: MomentsOpt = False
    kohya_next_to_images: NextToImagesOpt = False
    kohya_config: KohyaConfigOpt = None
    shard: ShardOpt = None
    layout: LayoutOpt = None
    image_column: ImageColumnOpt = None
    engine: EngineOpt = Engine[DEFAULTS.engine]
    address: AddressOpt = None
    ray_workers: RayWorkersOpt = DEFAULTS.ray_workers
    musubi_arch: MusubiArchOpt = None

    def given(self) -> list[str]:
        """The dataset-only flags given other than at their defaults (refused without --dataset)."""
        unset = DatasetFlags()
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("dataset", "kohya_config")]
        return [flag_name(name) for name in names if getattr(self, name) != getattr(unset, name)]


def bucket_fields(flags: DatasetFlags, inputs: list[str]) -> dict[str, Any]:
    """DatasetOptions' bucket fields: from our flags, or kohya's dataset config with our flags standing for
    kohya's command line (filling what the config leaves out)."""
    if flags.kohya_config is None:
        return dict(bucket_resolution=flags.bucket_resolution or DEFAULTS.bucket_resolution,
                    bucket_step=flags.bucket_step or DEFAULTS.bucket_step, min_bucket_size=flags.min_bucket_size,
                    max_bucket_size=flags.max_bucket_size, no_upscale=flags.no_upscale, flip=flags.flip)
    from ..dataset.kohya_config import read_kohya_config

    kohya = {"resolution": flags.bucket_resolution, "bucket_reso_steps": flags.bucket_step,
             "min_bucket_reso": flags.min_bucket_size, "max_bucket_reso": flags.max_bucket_size,
             "bucket_no_upscale": flags.no_upscale or None, "flip_aug": flags.flip or None}
    return read_kohya_config(flags.kohya_config, inputs, kohya).as_options()


def dataset_options(
    flags: DatasetFlags, inputs: list[str], run: RunFlags, sample: SampleFlags, latents: LatentOutput,
    pixels: PixelFlags, write: WriteFlags,
) -> Any:
    """The DatasetOptions of the flags given (size_policy does not apply: buckets decide the size)."""
    from ..dataset import DatasetOptions

    return DatasetOptions(
        **bucket_fields(flags, inputs), random_crop=flags.random_crop, crop_seed=flags.crop_seed,
        moments=flags.moments, format=latents.format, kohya_next_to_images=flags.kohya_next_to_images,
        raw=latents.raw, sample=sample.sampled, seed=sample.noise_seed, latent_dtype=latents.latent_dtype,
        alpha=pixels.alpha.value if pixels.alpha else None, max_pixels=write.max_pixels, batch_size=run.batch_size,
        overwrite=write.overwrite, layout=flags.layout.value if flags.layout else None,
        image_column=flags.image_column, flat=latents.flat,
    )


def engine_options(flags: DatasetFlags, run: RunFlags) -> Any:
    """How the run is spread: this process, or a Ray cluster's actors (each on --device)."""
    from ..dataset import EngineOptions

    return EngineOptions(flags.engine.value, flags.address, flags.ray_workers, run.device.value)


def encode_dataset(
    inputs: list[str], out: Path, model: ModelFlags, run: RunFlags, options_run: Any, sample: SampleFlags,
    latents: LatentOutput, pixels: PixelFlags, write: WriteFlags, flags: DatasetFlags, report: ReportFlags,
) -> None:
    """encode --dataset: prepare_dataset over this process, its torchrun rank or --shard, or a Ray cluster."""
    if latents.format == "musubi" or flags.musubi_arch is not None:
        encode_musubi(inputs, out, model, run, options_run, sample, latents, write, flags, report)
        return
    from ..dataset import bind_local_device, parse_shard, prepare_dataset

    options = dataset_options(flags, inputs, run, sample, latents, pixels, write)
    part = parse_shard(flags.shard) if flags.shard else None
    spread = engine_options(flags, run)
    bind_local_device()  # under torchrun with CUDA: this rank's GPU
    # With Ray the driver only holds the weights for the actors; each actor picks its own device. Here the
    # weights are laid out for this device's plan once, so the Runner runs them without a second copy.
    ray = flags.engine == Engine.ray
    vae = load_model(model, Device.cpu if ray else run.device, report.as_json, report.debug,
                     kernels=None if ray else run.kernels.value)
    with progress("dataset", report.quiet, report.debug) as live:
        result = prepare_dataset(vae, inputs, out, options, options_run, shard=part, progress=live, engine=spread)
    if not report.as_json and not secondary_rank():
        dataset_summary(result)
    finish(result, report.as_json, report.debug, live=live)


def musubi_refusals(flags: DatasetFlags, sample: SampleFlags, latents: LatentOutput) -> list[str]:
    """The flags a musubi cache cannot honour: musubi's own cache step has none of them."""
    unset = DatasetFlags()
    refused = {
        "--flip": flags.flip, "--moments": flags.moments, "--sample/--seed": sample.sampled,
        "--random-crop": flags.random_crop, "--kohya-next-to-images": flags.kohya_next_to_images,
        f"--layout {flags.layout.value if flags.layout else ''}": flags.layout not in (None, Layout.folder),
        f"--latent-dtype {latents.latent_dtype}": latents.latent_dtype != DEFAULTS.latent_dtype,
        "--raw": latents.raw, "--bucket-step": flags.bucket_step is not None,
        "--min-bucket-size": flags.min_bucket_size is not None, "--max-bucket-size": flags.max_bucket_size is not None,
        "--shard": flags.shard is not None, f"--engine {flags.engine.value}": flags.engine != unset.engine,
        "--kohya-config": flags.kohya_config is not None,
    }
    return [name for name, given in refused.items() if given]


def encode_musubi(
    inputs: list[str], out: Path, model: ModelFlags, run: RunFlags, options_run: Any, sample: SampleFlags,
    latents: LatentOutput, write: WriteFlags, flags: DatasetFlags, report: ReportFlags,
) -> None:
    """encode --dataset --format musubi: musubi-tuner's latent caches in OUT (refusals before the model loads)."""
    if latents.format != "musubi":
        raise ConfigError(f"--musubi-arch applies with --format musubi, not --format {latents.format}")
    if flags.musubi_arch is None:
        raise ConfigError(f"--format musubi needs --musubi-arch: one of {', '.join(MUSUBI_ARCHITECTURES)}")
    refused = musubi_refusals(flags, sample, latents)
    if refused:
        raise ConfigError(f"--format musubi writes what musubi-tuner's own cache step does (centre crop, the "
                          f"posterior mean, its dtype): drop {', '.join(refused)}")
    from ..dataset import MusubiOptions, export_musubi

    options = MusubiOptions(flags.musubi_arch.value, flags.bucket_resolution or DEFAULTS.bucket_resolution,
                            flags.no_upscale, write.overwrite, run.batch_size, max_pixels=write.max_pixels)
    vae = load_model(model, run.device, report.as_json, report.debug, kernels=run.kernels.value)
    with progress("encode", report.quiet, report.debug) as live:
        result = export_musubi(vae, inputs, out, options, options_run, live)
    finish(result, report.as_json, report.debug, live=live)
