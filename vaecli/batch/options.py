"""What each command writes: one frozen dataclass of options per command (the fields are its CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import DEFAULTS as D  # the CLI's defaults: one copy


@dataclass(frozen=True)
class EncodeOptions:
    """What `encode_paths` writes; every field has a CLI flag of the same name."""

    batch_size: int = D.batch_size  # images of one size per model call
    raw: bool = False  # store raw VAE latents instead of the model's normalized diffusion latents
    sample: bool = False  # sample the posterior (mean + std * noise) instead of taking its mode
    seed: int = D.seed  # with sample: noise per image from a generator seeded by (seed, relative path)
    size_policy: str = D.size_policy  # sides not divisible by the downsample factor: pad, crop or resize
    latent_dtype: str = D.latent_dtype  # precision of the stored tensor
    alpha: str | None = None  # transparent pixels: white or black background, or drop; None: white (kohya: its own)
    max_pixels: int = D.max_pixels  # larger images are refused
    overwrite: bool = False  # recompute outputs that exist
    workers: int = 0  # reader threads; 0: as io_threads says for the device
    format: str = D.cache_format  # vaecli (.safetensors), kohya (.npz, kohya's pixel conventions) or comfyui (.latent)
    flat: bool = False  # every output at the top of the output folder, named by the input's file name


@dataclass(frozen=True)
class DecodeOptions:
    """What `decode_paths` writes."""

    batch_size: int = D.batch_size
    format: str = D.image_format  # png, jpg or webp
    quality: int = D.quality  # jpg/webp quality (webp 100 = lossless)
    force: bool = False  # decode latents made by another model
    scaling_factor: float | None = None  # for latents without our metadata (overrides it when given)
    shift_factor: float | None = None
    max_pixels: int = D.max_pixels
    overwrite: bool = False
    workers: int = 0


@dataclass(frozen=True)
class RoundtripOptions:
    """What `roundtrip_paths` measures and writes."""

    batch_size: int = D.batch_size
    sample: bool = False
    seed: int = D.seed
    size_policy: str = D.size_policy
    alpha: str = D.alpha
    max_pixels: int = D.max_pixels
    diff: bool = False  # also write an amplified error map OUT/<rel>.diff.png
    diff_gain: float = D.diff_gain  # error map = |original - reconstruction| * gain, in 8-bit levels
    overwrite: bool = False
    workers: int = 0
    # With size_policy pad: pad sides up to a multiple of this (0: of the downsample factor only), so that
    # images of nearby sizes share a batch; cropped back exactly, values near the padded edges change a
    # little. No CLI flag: scripts/pipeline_throughput.py --pad-to measures whether it pays.
    pad_to: int = 0
