"""The values each choice of the CLI takes, and the defaults the CLI and the core share: one copy, torch-free.

The core imports its tuples and defaults from here (devices.DTYPES, plans.KERNEL_MODES, batch.SIZE_POLICIES,
RunOptions, io.IMAGE_FORMATS, ...), so a new value is added in one place; latent formats are the table's
(latents/table.py) and tests/test_cli_choices.py checks CACHE_FORMATS against it. This module imports
nothing of vaecli: `vaecli --help` and the core both load it for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEVICES = ("auto", "cpu", "cuda", "mps")  # pipeline.resolve_device (which also takes cuda:N)
DTYPES = ("fp32", "fp16", "bf16")  # pipeline.DTYPES
FAMILIES = ("sd", "sdxl", "sd3", "flux", "flux2")  # config.FAMILY_PRESETS, then FLUX.2 (normalized by its weights)
TILING_MODES = ("auto", "on", "off")  # bench.TILING_MODES; RunOptions.tiling
KERNEL_MODES = ("auto", "on", "off")  # plans.KERNEL_MODES
SIZE_POLICIES = ("pad", "crop", "resize")  # batch.SIZE_POLICIES
ALPHA_POLICIES = ("white", "black", "drop")  # io.decode_image's `alpha`
CACHE_FORMATS = ("vaecli", "kohya", "comfyui")  # latents.FORMATS: the writable rows of latents/table.py
# --format values that only a dataset run writes, outside the container table: musubi names its files per
# target architecture and image size (latents/musubi.py), which a Container row's one suffix cannot say
DATASET_ONLY_FORMATS = ("musubi",)
ENCODE_FORMATS = CACHE_FORMATS + DATASET_ONLY_FORMATS  # encode's --format
MUSUBI_ARCHITECTURES = ("flux_2_dev", "flux_2_klein_4b", "flux_2_klein_9b", "qwen_image", "qwen_image_edit",
                        "krea2")  # latents/musubi.ARCHITECTURES: --musubi-arch
LAYOUTS = ("folder", "tar", "parquet")  # dataset/options.LAYOUTS
ENGINES = ("local", "ray")  # dataset/options.ENGINES
IMAGE_FORMATS = ("png", "jpg", "webp")  # io.IMAGE_FORMATS


@dataclass(frozen=True)
class Defaults:
    """What an option is when it is not given; the CLI's flags and the core's option dataclasses alike."""

    device: str = "auto"
    dtype: str = "fp32"  # compute precision
    # auto: tiled when an untiled run would not fit
    tiling: str = "auto"
    tile_size: int = 512  # tile side in image pixels
    tile_overlap: int = 64
    kernels: str = "auto"  # as plans.TABLE says for the device
    batch_size: int = 4  # images of one size per model call
    seed: int = 0  # of --sample: noise per image from (seed, relative path)
    size_policy: str = "pad"  # undone exactly
    alpha: str = "white"  # what an absent --alpha means (kohya: its own, latents.alpha_for)
    latent_dtype: str = "fp32"
    cache_format: str = "vaecli"
    image_format: str = "png"
    quality: int = 95  # JPEG/WebP (WebP 100: lossless)
    diff_gain: float = 8.0  # roundtrip error map: |error| x gain, in 8-bit levels
    max_pixels: int = 8192 * 8192  # io.DEFAULT_MAX_PIXELS: larger images are refused
    # --dataset: bucket_resolution and bucket_step are kohya's command-line defaults (SD 1.x)
    bucket_resolution: int = 512
    bucket_step: int = 64
    crop_seed: int = 0
    engine: str = "local"
    ray_workers: int = 0  # one VAE actor per GPU (or CPU) of the cluster
    # bench: bench.run_bench's own defaults (one image per call, untiled: what a model costs)
    bench_resolution: int = 512
    bench_batch_size: int = 1
    bench_tiling: str = "off"
    bench_warmup: int = 1
    bench_iters: int = 3


DEFAULTS = Defaults()


def _choice(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose members are `values` (name == value), as Typer lists choices: <a|b|c>."""
    return Enum(name, [(v, v) for v in values], type=str, module=__name__)  # type: ignore[return-value]


Device = _choice("Device", DEVICES)
DType = _choice("DType", DTYPES)
Family = _choice("Family", FAMILIES)
Tiling = _choice("Tiling", TILING_MODES)
Kernels = _choice("Kernels", KERNEL_MODES)
SizePolicy = _choice("SizePolicy", SIZE_POLICIES)
Alpha = _choice("Alpha", ALPHA_POLICIES)
CacheFormat = _choice("CacheFormat", CACHE_FORMATS)
EncodeFormat = _choice("EncodeFormat", ENCODE_FORMATS)
MusubiArch = _choice("MusubiArch", MUSUBI_ARCHITECTURES)
Layout = _choice("Layout", LAYOUTS)
Engine = _choice("Engine", ENGINES)
ImageFormat = _choice("ImageFormat", IMAGE_FORMATS)
