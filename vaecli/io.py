"""Images in and out (orientation, modes, alpha, 16-bit), latent files with metadata, atomic writes.

Pixels are float32 arrays (H, W, 3) in [0, 1] at this module's edge. Every file is written to a hidden
temporary name in its destination folder and renamed into place, so a killed run never leaves a partial
output under the real name; `clean_temp_files` removes what such a run left behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch

from .errors import InputError, VaecliError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
LATENT_SUFFIXES = (".safetensors", ".npy")
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
ALPHA_POLICIES = ("white", "black", "drop")
DEFAULT_MAX_PIXELS = 8192 * 8192  # larger images need --max-pixels: one would take GBs of activations

LATENT_KEY = "latent"  # the tensor name in our latent files
LATENT_FORMAT = "vaecli.latent"
LATENT_FORMAT_VERSION = "1"
_TEMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


# ------------------------------------------------------------------------------------------ atomic writes


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process: `.name.tmp-<pid>-<rand>`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` then rename tmp to `path`: readers see the old file, the whole new one, or none."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VaecliError(
            f"cannot create the output folder {path.parent}: {exc.strerror or exc} (a file in the way, or no permission?)"
        ) from None
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise VaecliError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_temp_files(root: Path) -> list[Path]:
    """Delete temporary files left in `root` by runs that died; files of live processes are kept."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, _, names in os.walk(root):
        for name in names:
            m = _TEMP.match(name)
            if m and not _pid_alive(int(m.group(1))):
                path = Path(dirpath) / name
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


def is_temp_name(name: str) -> bool:
    return _TEMP.match(name) is not None


# ------------------------------------------------------------------------------------------------- images


def read_image(path: Path | BinaryIO, alpha: str = "white", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file (or its bytes in a BytesIO, e.g. a shard member) -> float32 (H, W, 3) RGB in [0, 1],
    EXIF orientation applied.

    16-bit grayscale keeps its precision (divided by 65535, never clipped at 255); palette and RGB
    transparency become alpha; alpha is composited over white or black, or dropped (`alpha`).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    # PIL's decompression-bomb guard follows our limit; our own check below gives the actionable message.
    Image.MAX_IMAGE_PIXELS = max_pixels if max_pixels > 0 else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if max_pixels > 0 and w * h > max_pixels:
                    raise InputError(_too_large(w, h, max_pixels))
                img.seek(0)  # animated GIF/WebP/TIFF: the first frame
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb01(img, alpha)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(_too_large(*_size_or_zero(path), max_pixels)) from None
    except FileNotFoundError:
        raise InputError("no such file") from None
    except IsADirectoryError:
        raise InputError("is a folder, not an image") from None
    except PermissionError:
        raise InputError("permission denied: cannot read this file") from None
    except UnidentifiedImageError:
        what = "empty file" if _byte_size(path) == 0 else "not an image, or an unsupported format"
        raise InputError(f"{what} (supported: PNG, JPEG, WebP, TIFF, BMP, GIF)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL reports truncation and bad data so
        raise InputError(f"corrupt or truncated image ({_first_line(exc)})") from None


def _too_large(w: int, h: int, max_pixels: int) -> str:
    return (
        f"image is {w}x{h} = {w * h / 1e6:.1f} MP, above the limit of {max_pixels / 1e6:.1f} MP; "
        f"pass --max-pixels {w * h} (or more) to process it"
    )


def _byte_size(source: Path | BinaryIO) -> int:
    if isinstance(source, Path):
        return source.stat().st_size if source.exists() else 0
    return source.seek(0, os.SEEK_END)


def _size_or_zero(path: Path | BinaryIO) -> tuple[int, int]:
    from PIL import Image

    try:
        Image.MAX_IMAGE_PIXELS = None
        if not isinstance(path, Path):
            path.seek(0)
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - only used to word a message
        return 0, 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _to_rgb01(img: Any, alpha: str) -> np.ndarray:
    """A loaded PIL image in any mode -> float32 (H, W, 3) in [0, 1]."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float32)  # (H, W) 16-bit (or 32-bit int) gray
        peak = 65535.0 if (mode != "I" or a.max(initial=0) > 255) else 255.0
        gray = np.clip(a / peak, 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    if mode == "F":
        a = np.asarray(img).astype(np.float32)
        peak = 1.0 if a.max(initial=0) <= 1.0 else (255.0 if a.max() <= 255.0 else 65535.0)
        gray = np.clip(a / peak, 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        img = img.convert("RGBA")
    elif mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    a = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3|4)
    if a.shape[2] == 3:
        return np.ascontiguousarray(a)
    rgb, opacity = a[:, :, :3], a[:, :, 3:4]
    if alpha == "drop":
        return np.ascontiguousarray(rgb)
    background = 1.0 if alpha == "white" else 0.0
    return np.ascontiguousarray(rgb * opacity + background * (1.0 - opacity))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8, rounding to nearest."""
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray, fmt: str = "png", quality: int = 95) -> None:
    """Float (H, W, 3) in [0, 1] or uint8 -> an 8-bit RGB file, atomically."""
    from PIL import Image

    data = pixels if pixels.dtype == np.uint8 else to_uint8(pixels)
    img = Image.fromarray(data, "RGB")
    kind = IMAGE_FORMATS[fmt]
    params: dict[str, Any] = {}
    if kind == "JPEG":
        params = dict(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif kind == "WEBP":
        params = dict(quality=quality, lossless=quality >= 100)
    elif kind == "PNG":
        params = dict(compress_level=1)  # lossless either way; level 1 writes 3-4x faster than 6 for ~10% more bytes

    atomic_write(path, lambda tmp: img.save(tmp, format=kind, **params))


# ------------------------------------------------------------------------------------------------ latents


@dataclass
class LatentFile:
    """A latent read from disk: (C, h, w) float32 tensor, and our metadata when the file has it."""

    tensor: torch.Tensor
    meta: dict[str, str] | None  # None: a bare tensor without vaecli metadata


def write_latent(path: Path, latent: torch.Tensor, meta: Mapping[str, str]) -> None:
    """Save a (C, h, w) latent as safetensors {'latent': tensor} with string metadata, atomically."""
    from safetensors.torch import save_file

    tensors = {LATENT_KEY: latent.detach().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(meta)))


def latent_is_complete(path: Path) -> dict[str, str] | None:
    """The metadata of a readable vaecli latent file at `path`, or None (missing, partial, or foreign)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != LATENT_FORMAT or LATENT_KEY not in f.keys():
                return None
            f.get_slice(LATENT_KEY).get_shape()
            return meta
    except Exception:  # noqa: BLE001 - any failure means "not a complete output": it is recomputed
        return None


def read_latent(path: Path) -> LatentFile:
    """A latent file -> (C, h, w) float32 tensor and metadata.

    Accepted: our files ('latent' + metadata); bare safetensors with exactly one tensor (or ComfyUI's
    'latent_tensor'); .npy arrays. Shapes (C, h, w) or (1, C, h, w).
    """
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError("no such file")
    if path.is_dir():
        raise InputError("is a folder, not a latent file")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"not a readable .npy array ({_first_line(exc)})") from None
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f".npy array has dtype {array.dtype}; a latent must be floating point")
        return LatentFile(_as_chw(torch.from_numpy(np.ascontiguousarray(array)).float()), None)
    if suffix != ".safetensors":
        raise InputError(f"unsupported latent format {suffix!r} (use .safetensors or .npy)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if meta.get("format") == LATENT_FORMAT:
                if LATENT_KEY not in keys:
                    raise InputError(f"vaecli latent file without its '{LATENT_KEY}' tensor (found: {keys})")
                return LatentFile(_as_chw(f.get_tensor(LATENT_KEY).float()), dict(meta))
            name = _bare_tensor_name(keys)
            return LatentFile(_as_chw(f.get_tensor(name).float()), None)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for truncated/garbled files
        if path.stat().st_size == 0:
            raise InputError("empty file") from None
        raise InputError(f"not a readable safetensors file ({_first_line(exc)})") from None


def _bare_tensor_name(keys: list[str]) -> str:
    if "latent_tensor" in keys:  # ComfyUI SaveLatent
        return "latent_tensor"
    if LATENT_KEY in keys:
        return LATENT_KEY
    tensors = [k for k in keys if k != "latent_format_version_0"]
    if len(tensors) == 1:
        return tensors[0]
    if not tensors:
        raise InputError("the file holds no tensor")
    raise InputError(f"the file holds {len(tensors)} tensors ({', '.join(tensors[:5])}); expected 'latent' or a single one")


def _as_chw(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]  # (1, C, h, w) -> (C, h, w)
    if t.ndim != 3:
        raise InputError(f"latent has shape {tuple(t.shape)}; expected (C, h, w) or (1, C, h, w)")
    if min(t.shape) == 0:
        raise InputError(f"latent has an empty shape {tuple(t.shape)}")
    return t


def meta_json(meta: Mapping[str, str], key: str) -> Any:
    """One JSON-valued metadata entry, with a clear error when it is missing or garbled."""
    try:
        return json.loads(meta[key])
    except KeyError:
        raise InputError(f"latent metadata lacks '{key}'") from None
    except ValueError:
        raise InputError(f"latent metadata '{key}' is not valid JSON: {meta[key]!r}") from None
