"""Latent caches that kohya-ss/musubi-tuner reads as its own, for FLUX.2 and Qwen-Image (and Krea 2).

What musubi-tuner writes and reads (read at commit 30c658c4f4b0bf05038b3346eff9670259b10fc7; docs/musubi.md
has the citations line by line):

- One safetensors file per image, named `{image stem}_{W:04d}x{H:04d}_{arch}.safetensors` where W x H is the
  image's size as loaded (before bucketing) and `arch` musubi's short architecture name (`f2d`, `qi`, ...).
  Its trainer finds caches by globbing `*_{arch}.safetensors` in the cache folder, parses W x H from the
  second last `_` token and takes everything before it as the item key; the text-encoder cache
  `{item key}_{arch}_te.safetensors` must lie beside it, or the item is skipped.
- Tensors: FLUX.2 `latents_{h}x{w}_{dtype}` of shape (128, h, w) -- the 32-channel VAE mean, patchified 2x2
  and batch-normalized with the weights' running statistics, i.e. what the transformer sees. Qwen-Image
  `latents_{F}x{h}x{w}_{dtype}` of shape (16, F=1, h, w) -- the VAE mode, (z - mean) / std per channel; the
  frame axis stays. Edit models add `latents_control_{i}_{...}_{dtype}`, one per control image.
  `{dtype}` is torch's dtype name (`float32`, `bfloat16`). The loader strips the dtype, then the shape token,
  and stacks the rest by name; its training loop uses the latents as they are (no scaling at training time).
- Metadata {architecture: full name, width, height, format_version: "1.0.1"}; the trainer reads none of it.

Everything here is pure: names, tensors and metadata are computed from their arguments; the only I/O is
`write_cache` (atomic) and `read_cache`. No model code: the caller passes the family's LatentSpec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LatentSpec
from ..errors import ConfigError, InputError
from ..files import atomic_write, check_regular
from ..models.qwenimage_config import QWEN_LATENTS_MEAN, QWEN_LATENTS_STD

FORMAT_VERSION = "1.0.1"  # musubi's save_latent_cache_common writes this and checks nothing on load
SUFFIX = ".safetensors"
BUCKET_STEPS = 16  # musubi's BucketSelector: every FLUX.2 and Qwen-Image bucket side is a multiple of 16
MUSUBI_KEYS = ("architecture", "width", "height", "format_version")  # the metadata musubi writes for an image
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # names as torch's
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                       "F8_E4M3": "float8_e4m3fn"}  # header names -> torch's, for messages
# latents_[control_{i}_]{d1}x{d2}[x{d3}]_{dtype}: what the loader strips down to "latents" / "latents_control_i".
_KEY = re.compile(r"latents(?:_control_(0|[1-9][0-9]*))?_([0-9]+(?:x[0-9]+)+)_([a-z0-9_]+)")
_NAME_SIZE = re.compile(r"([0-9]+)x([0-9]+)")


@dataclass(frozen=True)
class Target:
    """One musubi-tuner training architecture whose latent cache vaecli can write."""

    name: str  # musubi's full architecture name (ARCHITECTURE_*_FULL), our key
    short: str  # the token in cache file names (ARCHITECTURE_*), what its dataset globs for
    metadata_name: str  # the "architecture" metadata its writer stores (Qwen-Image-Edit's is "qwen_image")
    family: str  # vaecli's VAE family (families.py) whose latents these are
    channels: int  # channels of the stored latent (after patchify)
    frame_axis: bool  # stored (C, 1, h, w) rather than (C, h, w)
    cell: int  # image pixels per stored latent cell along a side
    dtype: torch.dtype  # what musubi's own cache step stores (the VAE's dtype)
    musubi_step: str  # musubi's command that would write the same file, for messages and docs


def _flux2(name: str, short: str, version: str) -> Target:
    # flux_2_cache_latents.py loads the AE in float32 unless --vae_dtype says otherwise.
    return Target(name, short, name, "flux2", 128, False, 16, torch.float32,
                  f"flux_2_cache_latents.py --model_version {version}")


def _qwen(name: str, short: str, metadata_name: str, step: str) -> Target:
    # Qwen-Image's VAE runs in its weights' dtype (musubi refuses --vae_dtype): bf16 for the released file.
    return Target(name, short, metadata_name, "qwenimage", 16, True, 8, torch.bfloat16, step)


ARCHITECTURES: dict[str, Target] = {t.name: t for t in (
    _flux2("flux_2_dev", "f2d", "dev"),
    _flux2("flux_2_klein_4b", "f2k4b", "klein-4b"),  # also klein-base-4b: same architecture names
    _flux2("flux_2_klein_9b", "f2k9b", "klein-9b"),  # also klein-base-9b
    _qwen("qwen_image", "qi", "qwen_image", "qwen_image_cache_latents.py"),
    _qwen("qwen_image_edit", "qie", "qwen_image", "qwen_image_cache_latents.py --model_version edit"),
    _qwen("krea2", "kr2", "krea2", "krea2_cache_latents.py"),  # Krea 2 trains on Qwen-Image VAE latents
)}


def target(name: str | Target) -> Target:
    """The row for musubi's full or short architecture name (`flux_2_dev` or `f2d`)."""
    if isinstance(name, Target):
        return name
    for row in ARCHITECTURES.values():
        if name in (row.name, row.short):
            return row
    raise ConfigError(f"unknown musubi-tuner architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")


def targets_for(family: str) -> tuple[Target, ...]:
    """The architectures whose caches hold latents of a vaecli family (`flux2`, `qwenimage`)."""
    return tuple(t for t in ARCHITECTURES.values() if t.family == family)


# -------------------------------------------------------------------------------------------------- names


def cache_name(image_stem: str, width: int, height: int, arch: str | Target) -> str:
    """The file name musubi gives the cache of an image of width x height (as loaded, before bucketing)."""
    t = target(arch)
    if not image_stem or "/" in image_stem or "\\" in image_stem:
        raise InputError(f"image stem {image_stem!r} must be a non-empty file name without folders")
    if not (_positive_int(width) and _positive_int(height)):
        raise InputError(f"image size must be positive integers, not {width!r} x {height!r}")
    return f"{image_stem}_{width:04d}x{height:04d}_{t.short}{SUFFIX}"


@dataclass(frozen=True)
class CacheName:
    """What musubi's dataset reads from a cache file's name (ImageDataset.prepare_for_training)."""

    item_key: str  # the image stem; its text-encoder cache is {item_key}_{short}_te.safetensors
    width: int
    height: int
    target: Target


def parse_cache_name(name: str) -> CacheName:
    """Split a cache file name as musubi does: arch token last, WxH second last, the item key before."""
    tokens = name.split("_")
    short = tokens[-1][: -len(SUFFIX)] if tokens[-1].endswith(SUFFIX) else None
    row = next((t for t in ARCHITECTURES.values() if t.short == short), None)
    size = _NAME_SIZE.fullmatch(tokens[-2]) if len(tokens) >= 3 else None
    if row is None or size is None or not "_".join(tokens[:-2]):
        shorts = ", ".join(sorted(t.short for t in ARCHITECTURES.values()))
        raise InputError(f"{name!r} is not a musubi-tuner latent cache name: expected <image stem>_<W>x<H>_<arch>"
                         f"{SUFFIX} with arch one of {shorts} (musubi's trainer never finds other names)")
    return CacheName("_".join(tokens[:-2]), int(size[1]), int(size[2]), row)


def text_encoder_cache_name(item_key: str, arch: str | Target) -> str:
    """The text-encoder cache musubi needs beside each latent cache (vaecli does not write it)."""
    return f"{item_key}_{target(arch).short}_te{SUFFIX}"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ------------------------------------------------------------------------------------------------ buckets


def bucket_resolution(image_size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool = True,
                      no_upscale: bool = False, steps: int = BUCKET_STEPS) -> tuple[int, int]:
    """(width, height) of the bucket musubi's BucketSelector puts an image of `image_size` (W, H) in.

    Its trainer recomputes this from the size in the cache name and batches items by it, so a cache whose
    latent is not this bucket's size would be stacked with latents of another shape.
    """
    (w, h), (rw, rh) = image_size, resolution
    if not all(_positive_int(v) for v in (w, h, rw, rh, steps)):
        raise InputError(f"image size {image_size!r} and resolution {resolution!r} must be positive integers")
    if not enable_bucket:
        return rw, rh  # one bucket: the resolution itself (musubi ignores no_upscale then)
    if no_upscale and w * h <= rw * rh:
        bucket = (w - w % steps, h - h % steps)  # keep the image's size, rounded down to the step
        if 0 in bucket:
            raise InputError(f"an image of {w}x{h} is smaller than one {steps}-pixel bucket step")
        return bucket
    ratio = w / h
    # min() keeps the first of equal errors in sorted order, as numpy's argmin in musubi.
    return min(_buckets(rw * rh, steps), key=lambda b: abs(b[0] / b[1] - ratio))


def _buckets(area: int, steps: int) -> list[tuple[int, int]]:
    """musubi's bucket list for an area: widths from half the square side up, each with the largest height
    (a multiple of `steps`) that keeps the area, and both orientations; sorted."""
    side = int(math.sqrt(area))
    smallest = (side // 2) - (side // 2) % steps
    if smallest == 0:
        raise ConfigError(f"resolution area {area} is too small for {steps}-pixel buckets")
    found = set()
    for bw in range(smallest, side + steps, steps):
        bh = (area // bw) - (area // bw) % steps
        found |= {(bw, bh), (bh, bw)}
    return sorted(found)


# ------------------------------------------------------------------------------------------------ tensors


def latent_key(shape: Sequence[int], dtype: torch.dtype, control: int | None = None) -> str:
    """The tensor name of a stored latent: its shape without the channel axis, then torch's dtype name."""
    dims = "x".join(str(d) for d in shape[1:])
    prefix = "latents" if control is None else f"latents_control_{control}"
    return f"{prefix}_{dims}_{_dtype_name(dtype)}"


def cache_tensors(latent_chw: torch.Tensor, arch: str | Target, spec: LatentSpec, dtype: torch.dtype | None = None,
                  controls: Sequence[torch.Tensor] = ()) -> dict[str, torch.Tensor]:
    """musubi's tensors for one image from vaecli's raw VAE latent (C, h, w) and its family's LatentSpec.

    The latent is normalized as the training loop wants it (FLUX.2: patchify + batch norm; Qwen-Image:
    per-channel mean/std), shaped as musubi stores it and cast to `dtype` (default: musubi's own).
    `controls` are raw latents of an edit model's control images, in order.
    """
    t = target(arch)
    _check_spec(spec, t)
    dtype = dtype or t.dtype
    stored = _stored(latent_chw, t, spec, dtype, "latent")
    tensors = {latent_key(stored.shape, dtype): stored}
    for i, control in enumerate(controls):
        c = _stored(control, t, spec, dtype, f"control latent {i}")
        tensors[latent_key(c.shape, dtype, control=i)] = c
    return tensors


def _stored(raw: torch.Tensor, t: Target, spec: LatentSpec, dtype: torch.dtype, what: str) -> torch.Tensor:
    if not isinstance(raw, torch.Tensor) or raw.dim() != 3:
        raise InputError(f"{what} must be a raw VAE latent of shape (C, h, w), not {getattr(raw, 'shape', raw)!r}")
    z = spec.normalize(raw.detach().to("cpu", torch.float32))  # (C', h', w'): FLUX.2 C'=4C, h'=h/2, w'=w/2
    if z.shape[0] != t.channels:
        raise InputError(f"{what} has {z.shape[0]} channels once normalized; musubi's {t.name} trains on "
                         f"{t.channels} (is this a {t.family} VAE's latent?)")
    if not torch.isfinite(z).all():
        raise InputError(f"{what} holds NaN or Inf; musubi would train on zeros there: re-encode the image")
    z = z[:, None] if t.frame_axis else z  # (C, 1, h, w) for Qwen-Image: its VAE keeps the frame axis
    return z.to(_check_dtype(dtype)).contiguous()


def _check_spec(spec: LatentSpec, t: Target) -> None:
    """Refuse a normalization musubi would not apply: the one mistake a shape check cannot see."""
    if not isinstance(spec, LatentSpec):
        raise ConfigError(f"spec must be a LatentSpec (the VAE's config.latent_spec), not {type(spec).__name__}")
    if t.family == "flux2" and (spec.patch_size != 2 or spec.latents_mean is None):
        raise ConfigError(f"{t.name} caches hold FLUX.2 latents patchified 2x2 and batch-normalized: pass a FLUX.2 "
                          "VAE's config.latent_spec, not " + spec.describe())
    if t.family == "qwenimage" and (spec.patch_size != 1 or spec.scaling_factor != 1.0
                                    or spec.latents_mean != QWEN_LATENTS_MEAN or spec.latents_std != QWEN_LATENTS_STD):
        # qwen_image_utils.load_vae normalizes with the released statistics whatever the weights' config says.
        raise ConfigError(f"{t.name} caches hold Qwen-Image latents normalized with the released latents_mean/std "
                          "(musubi hard-codes them): pass a Qwen-Image VAE's config.latent_spec, not "
                          + spec.describe())


def raw_latent(stored: torch.Tensor, arch: str | Target, spec: LatentSpec) -> torch.Tensor:
    """The inverse of cache_tensors for one stored latent: vaecli's raw float32 (C, h, w), ready to decode."""
    t = target(arch)
    _check_spec(spec, t)
    z = stored.detach().to("cpu", torch.float32)
    if t.frame_axis:
        z = z[:, 0]  # (C, 1, h, w) -> (C, h, w)
    return spec.denormalize(z)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(_check_dtype(dtype)).split(".")[-1]  # torch's own name, as musubi's dtype_to_str


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in DTYPES.values():
        raise ConfigError(f"a musubi latent cache is stored as {', '.join(DTYPES)}, not {dtype}")
    return dtype


# ----------------------------------------------------------------------------------------------- metadata


def cache_metadata(arch: str | Target, width: int, height: int,
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """musubi's metadata for an image of width x height (as loaded), plus `extra` keys of our own."""
    t = target(arch)
    if not (_positive_int(width) and _positive_int(height)):
        raise InputError(f"image size must be positive integers, not {width!r} x {height!r}")
    meta = {"architecture": t.metadata_name, "width": str(width), "height": str(height),
            "format_version": FORMAT_VERSION}
    for key, value in (extra or {}).items():
        if key in meta or key == "frame_count" or not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"extra metadata {key!r} must be a string to string pair that is not musubi's own")
        meta[key] = value
    return meta


# ------------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class _Entry:
    """One tensor name as musubi's loader sees it."""

    key: str
    control: int | None  # None: the target latent
    dims: tuple[int, ...]  # from the name: the shape without channels
    dtype: str  # from the name


def _entries(keys: Sequence[str]) -> list[_Entry]:
    entries = []
    for key in keys:
        m = _KEY.fullmatch(key)
        if m is None:
            raise InputError(f"tensor {key!r} is not one musubi's latent cache holds (latents_<shape>_<dtype>, "
                             "latents_control_<i>_<shape>_<dtype>)")
        control = int(m[1]) if m[1] is not None else None
        entries.append(_Entry(key, control, tuple(int(d) for d in m[2].split("x")), m[3]))
    return entries


def _check(name: CacheName, shapes: Mapping[str, tuple[tuple[int, ...], str]], meta: Mapping[str, str]) -> None:
    """Refuse what musubi's trainer would misread or never find: the checks of read and write alike.

    `shapes` maps each tensor name to its actual (shape, torch dtype name).
    """
    t = name.target
    entries = _entries(list(shapes))
    targets = [e for e in entries if e.control is None]
    controls = sorted(e.control for e in entries if e.control is not None)
    if len(targets) != 1:
        raise InputError(f"a musubi cache holds one target latent (latents_<shape>_<dtype>), not {len(targets)}")
    if controls != list(range(len(controls))):
        raise InputError(f"control latents must be numbered 0, 1, ... once each, not {controls}")
    for e in entries:
        _check_entry(e, *shapes[e.key], t)
    _check_metadata(name, meta)


def _check_entry(e: _Entry, shape: tuple[int, ...], dtype: str, t: Target) -> None:
    rank = 4 if t.frame_axis else 3
    layout = "(C, 1, h, w)" if t.frame_axis else "(C, h, w)"
    if len(shape) != rank or shape[0] != t.channels or (t.frame_axis and shape[1] != 1):
        raise InputError(f"tensor {e.key!r} has shape {list(shape)}; {t.name} caches hold {layout} with C = "
                         f"{t.channels}" + (" (one frame: Qwen-Image-Layered caches are not supported)"
                                            if t.frame_axis else ""))
    if e.dims != tuple(shape[1:]):
        raise InputError(f"tensor {e.key!r} names shape {'x'.join(map(str, e.dims))} but holds {list(shape)}")
    if e.dtype not in DTYPES or e.dtype != dtype:
        raise InputError(f"tensor {e.key!r} names dtype {e.dtype} but holds {dtype} (stored dtypes: "
                         f"{', '.join(DTYPES)})")
    if any(side * t.cell % BUCKET_STEPS for side in shape[-2:]):
        raise InputError(f"tensor {e.key!r} covers {shape[-1] * t.cell}x{shape[-2] * t.cell} pixels; musubi's "
                         f"buckets are multiples of {BUCKET_STEPS} on each side")


def _check_metadata(name: CacheName, meta: Mapping[str, str]) -> None:
    t = name.target
    missing = [k for k in MUSUBI_KEYS if k not in meta]
    if missing:
        raise InputError(f"metadata lacks {', '.join(missing)}: not a latent cache musubi-tuner wrote "
                         f"(write it with vaecli or `{t.musubi_step}`)")
    if meta["architecture"] != t.metadata_name:
        raise InputError(f"metadata architecture is {meta['architecture']!r} but the name says {t.short} "
                         f"({t.metadata_name!r}): a cache of another model, or renamed")
    if (meta["width"], meta["height"]) != (str(name.width), str(name.height)):
        raise InputError(f"metadata size {meta['width']}x{meta['height']} differs from the name's "
                         f"{name.width}x{name.height}: renamed, or written for another image")
    if meta["format_version"] != FORMAT_VERSION:
        raise InputError(f"format_version {meta['format_version']!r}; this vaecli reads and writes {FORMAT_VERSION}")
    if "frame_count" in meta:
        raise InputError("metadata has a frame_count: a video cache, not an image's")


# ------------------------------------------------------------------------------------------------ files


def write_cache(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write one cache atomically (temp file + rename), after the checks read_cache makes: never a file
    musubi would misread. `path`'s name must be `cache_name(...)`'s: the trainer finds nothing else."""
    path = Path(path)
    name = parse_cache_name(path.name)
    shapes = {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in tensors.items()}
    _check(name, shapes, metadata)
    if not all(bool(torch.isfinite(v).all()) for v in tensors.values()):
        raise InputError("a latent holds NaN or Inf; musubi would train on zeros there: re-encode the image")
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=dict(metadata)))


def write_image_cache(folder: str | Path, image_stem: str, image_size: tuple[int, int], latent_chw: torch.Tensor,
                      arch: str | Target, spec: LatentSpec, dtype: torch.dtype | None = None,
                      controls: Sequence[torch.Tensor] = (), extra: Mapping[str, str] | None = None) -> Path:
    """The cache of one image in `folder` (musubi's cache_directory; the image folder by default) from its
    raw VAE latent: cache_name + cache_tensors + cache_metadata + write_cache. Returns the path written."""
    width, height = image_size
    path = Path(folder) / cache_name(image_stem, width, height, arch)
    tensors = cache_tensors(latent_chw, arch, spec, dtype, controls)
    write_cache(path, tensors, cache_metadata(arch, width, height, extra))
    return path


@dataclass(frozen=True)
class Cache:
    """One cache file as read: its name's parts, tensors as stored, metadata."""

    name: CacheName
    latent: torch.Tensor  # as stored: FLUX.2 (128, h, w), Qwen-Image (16, 1, h, w), normalized
    controls: tuple[torch.Tensor, ...]  # control latents in index order, as stored
    metadata: dict[str, str]


def read_cache(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The stored (normalized) latent and the metadata of one cache; InputError naming what is wrong."""
    cache = load_cache(path)
    return cache.latent, cache.metadata


def load_cache(path: str | Path) -> Cache:
    """Everything in one cache, after musubi's checks (and ours) on its name, header and metadata."""
    path = Path(path)
    try:
        return _load(path)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _load(path: Path) -> Cache:
    name = parse_cache_name(path.name)
    check_regular(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            shapes = {}
            names = fh.keys()  # a list, not a dict view
            for key in names:
                view = fh.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype())
                shapes[key] = (tuple(view.get_shape()), dtype)
            _check(name, shapes, meta)  # before any tensor data is read
            tensors = {key: fh.get_tensor(key) for key in shapes}
    except (SafetensorError, OSError) as exc:
        raise InputError(f"not a readable safetensors file ({exc})") from None
    entries = _entries(list(tensors))
    if not all(bool(torch.isfinite(v).all()) for v in tensors.values()):
        raise InputError("a latent holds NaN or Inf: re-encode the image")
    latent = next(tensors[e.key] for e in entries if e.control is None)
    controls = tuple(tensors[e.key] for e in sorted((e for e in entries if e.control is not None),
                                                    key=lambda e: e.control or 0))
    return Cache(name, latent, controls, meta)
