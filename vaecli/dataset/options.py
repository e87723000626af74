"""What a dataset run writes: DatasetOptions (one CLI flag per field), their checks, and fixed constants."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import ENGINES as ENGINES  # re-exported: core.py and tests/test_cli_choices.py read it here
from ..choices import LAYOUTS
from ..devices import DTYPES
from ..errors import ConfigError
from ..io import DEFAULT_MAX_PIXELS
from ..latents import FORMATS, Container, alpha_for, by_format, find_format

MANIFEST = "manifest.jsonl"
DATASET_VERSION = 1  # bump when the meaning of a manifest field or of a setting changes
RESAMPLE = "bicubic-antialias"
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclass(frozen=True)
class DatasetOptions:
    """What `prepare_dataset` writes; every field has a CLI flag of the same name (dashes for underscores)."""

    bucket_resolution: int = 512  # side of the square whose area every bucket shares (SD 1.x; SDXL: 1024)
    bucket_step: int = 64  # bucket sides are multiples of this (a multiple of the VAE's factor, 8)
    min_bucket_size: int | None = None  # shortest bucket side; None: resolution // 2 (kohya format: 256)
    max_bucket_size: int | None = None  # longest bucket side; None: resolution * 2 (kohya format: 1024)
    no_upscale: bool = False  # never enlarge: a small image gets a bucket that fits inside it (kohya's)
    random_crop: bool = False  # crop at a random offset (from crop_seed and the path) instead of the centre
    crop_seed: int = 0
    flip: bool = False  # also store the latent of the horizontally flipped crop
    moments: bool = False  # also store the posterior mean and logvar (raw), for sampling at training time
    format: str = "vaecli"  # vaecli (safetensors + metadata), kohya (.npz), comfyui (.latent)
    kohya_next_to_images: bool = False  # kohya format: write <image stem>.npz beside each image, not under OUT
    raw: bool = False  # vaecli format: store raw latents instead of normalized ones (kohya/comfyui: always raw)
    sample: bool = False  # store a posterior sample (noise from seed and path) instead of the mode
    seed: int = 0
    latent_dtype: str = "fp32"  # vaecli format only; kohya and comfyui files are float32
    alpha: str | None = None  # transparent pixels: white or black background, or drop; None: white (kohya: its own)
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 4  # images of one bucket per model call; 0: sized from free memory
    workers: int = 0  # reader threads; 0 = min(4, CPUs)
    overwrite: bool = False  # re-encode even when an up-to-date latent exists
    layout: str | None = None  # folder (a file per image), tar or parquet shards; None: folder or tar by input
    image_column: str | None = None  # shards: the tar suffix or parquet column holding the image; None: found
    flat: bool = False  # folder layout: every file at the top of OUT, named by the image's file name (ComfyUI)

    def container(self) -> Container:
        """The latent container of --format (ConfigError for an unknown one: check_options reports it first)."""
        return by_format(self.format)

    def alpha_policy(self) -> str:
        """The alpha policy applied: the container's own (kohya drops alpha), else alpha or white."""
        return alpha_for(self.format, self.alpha)

    def pixel_convention(self) -> str:
        """How image files become pixels: the container's convention (kohya's: stored orientation), else ours."""
        return self.container().pixels

    def bucket_bounds(self) -> tuple[int, int]:
        """(min, max) bucket side after defaults, kept on the step grid: half and twice the resolution, or the
        defaults of the container's trainer (kohya's sd-scripts), so that it finds the buckets it computes."""
        step = max(1, self.bucket_step)
        lo, hi = self.min_bucket_size, self.max_bucket_size
        container = find_format(self.format)  # bounds are asked before check_options reports an unknown format
        if container is not None and container.bucket_defaults is not None:
            # sd-scripts' min_bucket_reso / max_bucket_reso defaults, rounded to the step as
            # adjust_min_max_bucket_reso_by_steps does (down for the minimum, up for the maximum).
            low, high = container.bucket_defaults
            if lo is None:
                lo = low - low % step
            if hi is None:
                hi = high + (step - high % step) % step
            return lo, hi
        if lo is None:
            lo = -(-self.bucket_resolution // 2 // step) * step  # rounded up to the step
        if hi is None:
            hi = self.bucket_resolution * 2 // step * step
        return lo, hi


def check_options(options: DatasetOptions, factor: int) -> None:
    """Raise one ConfigError listing every inconsistent option."""
    o = options
    lo, hi = o.bucket_bounds()
    problems = []
    container = find_format(o.format)  # None: unknown, reported here with every other problem
    if container is None:
        problems.append(f"unknown --format {o.format!r}; choose one of {', '.join(FORMATS)}")
    if o.bucket_step < 1 or o.bucket_step % factor:
        problems.append(f"--bucket-step {o.bucket_step} must be a positive multiple of the VAE's factor {factor}")
    if o.bucket_resolution < o.bucket_step:
        problems.append(f"--bucket-resolution {o.bucket_resolution} is smaller than --bucket-step {o.bucket_step}")
    if not (o.bucket_step <= lo <= o.bucket_resolution <= hi):
        why = ""
        defaults = container.bucket_defaults if container is not None else None
        if defaults is not None and (o.min_bucket_size is None or o.max_bucket_size is None):
            why = (f" (--format {o.format} defaults to sd-scripts' min_bucket_reso {defaults[0]} and max_bucket_reso "
                   f"{defaults[1]}; give --min-bucket-size/--max-bucket-size as you pass them to kohya)")
        problems.append(f"bucket sizes must satisfy bucket-step <= min ({lo}) <= resolution <= max ({hi}){why}")
    if o.bucket_step >= 1 and (lo % o.bucket_step or hi % o.bucket_step):
        problems.append(
            f"--min-bucket-size {lo} and --max-bucket-size {hi} must be multiples of --bucket-step {o.bucket_step}"
        )
    if o.latent_dtype not in DTYPES:
        problems.append(f"unknown latent dtype {o.latent_dtype!r}; choose one of {', '.join(DTYPES)}")
    elif container is not None and (dtype_problem := container.dtype_problem(o.latent_dtype)) is not None:
        problems.append(dtype_problem)
    if container is not None and o.moments and not container.moments:
        problems.append("--moments needs --format vaecli or kohya (a ComfyUI .latent holds one tensor)")
    try:
        o.alpha_policy()
    except ConfigError as exc:
        problems.append(str(exc))
    if o.flat and o.kohya_next_to_images:
        problems.append("--flat names files under OUT; --kohya-next-to-images writes them beside the images")
    if o.kohya_next_to_images and (container is None or not container.next_to_images):
        problems.append("--kohya-next-to-images needs --format kohya")
    if o.layout is not None and o.layout not in LAYOUTS:
        problems.append(f"unknown --layout {o.layout!r}; choose one of {', '.join(LAYOUTS)}")
    if o.layout in ("tar", "parquet") and (container is None or not container.shards):
        problems.append(
            f"--layout {o.layout} stores vaecli latents; drop --format {o.format} (its readers read folders)"
        )
    if o.batch_size < 0:
        problems.append("--batch-size must be at least 1 (or 0 / auto: sized from free memory)")
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class EngineOptions:
    """How the work is spread over processes and machines (what is written does not depend on it)."""

    engine: str = "local"  # local: this process (--shard i/n and torchrun split the work); ray: a Ray cluster
    address: str | None = None  # Ray cluster (host:6379, ray://host:10001); None: RAY_ADDRESS, else a new local one
    workers: int = 0  # Ray: VAE actors; 0: one per GPU of the cluster (device cuda) or per CPU
    device: str = "auto"  # Ray: where each actor runs the VAE: cpu, cuda (one GPU per actor) or auto
