"""What each command writes: one frozen dataclass of options per command (the fields are its CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass

from ..io import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class EncodeOptions:
    """What `encode_paths` writes; every field has a CLI flag of the same name."""

    batch_size: int = 4  # images of one size per model call
    raw: bool = False  # store raw VAE latents instead of the model's normalized diffusion latents
    sample: bool = False  # sample the posterior (mean + std * noise) instead of taking its mode
    seed: int = 0  # with sample: noise per image from a generator seeded by (seed, relative path)
    size_policy: str = "pad"  # sides not divisible by the downsample factor: pad, crop or resize
    latent_dtype: str = "fp32"  # precision of the stored tensor
    alpha: str | None = None  # transparent pixels: white or black background, or drop; None: white (kohya: its own)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused
    overwrite: bool = False  # recompute outputs that exist
    workers: int = 0  # reader threads; 0: as io_threads says for the device
    format: str = "vaecli"  # vaecli (.safetensors), kohya (.npz, kohya's pixel conventions) or comfyui (.latent)
    flat: bool = False  # every output at the top of the output folder, named by the input's file name


@dataclass(frozen=True)
class DecodeOptions:
    """What `decode_paths` writes."""

    batch_size: int = 4
    format: str = "png"  # png, jpg or webp
    quality: int = 95  # jpg/webp quality (webp 100 = lossless)
    force: bool = False  # decode latents made by another model
    scaling_factor: float | None = None  # for latents without our metadata (overrides it when given)
    shift_factor: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    workers: int = 0


@dataclass(frozen=True)
class RoundtripOptions:
    """What `roundtrip_paths` measures and writes."""

    batch_size: int = 4
    sample: bool = False
    seed: int = 0
    size_policy: str = "pad"
    alpha: str = "white"
    max_pixels: int = DEFAULT_MAX_PIXELS
    diff: bool = False  # also write an amplified error map OUT/<rel>.diff.png
    diff_gain: float = 8.0  # error map = |original - reconstruction| * gain, in 8-bit levels
    overwrite: bool = False
    workers: int = 0
    # With size_policy pad: pad sides up to a multiple of this (0: of the downsample factor only), so that
    # images of nearby sizes share a batch; cropped back exactly, values near the padded edges change a
    # little. No CLI flag: scripts/pipeline_throughput.py --pad-to measures whether it pays.
    pad_to: int = 0
