"""Images in and out (orientation, modes, alpha, 16-bit), latent files with metadata, atomic writes.

Pixels are float32 arrays (H, W, 3) in [0, 1] at this module's edge. Only regular files are read (files.py);
declared sizes are checked against the caller's limit before any pixel or tensor is decoded, and a file cut
short is an error (integrity.py). Every file is written to a hidden temporary name in its destination folder
and renamed into place (files.atomic_write). Images we write carry a provenance record (what they were made
from), so a later run can tell a current output from a stale or foreign one.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import struct
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import numpy as np
import torch

from . import safejson
from .errors import InputError
from .files import atomic_write, check_regular, clean_temp_files, is_temp_name, open_regular, sha256_of, temp_path
from .integrity import check_complete

__all__ = ["atomic_write", "clean_temp_files", "is_temp_name", "temp_path", "open_regular", "sha256_of"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
LATENT_SUFFIXES = (".safetensors", ".npy", ".latent", ".npz")  # ours and bare; ComfyUI; kohya
LATENT_OUTPUT_SUFFIXES = (".safetensors", ".npz", ".latent", ".npy")  # names an -o of one latent file
IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # names an -o of one image file
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
ALPHA_POLICIES = ("white", "black", "drop")
DEFAULT_MAX_PIXELS = 8192 * 8192  # larger images need --max-pixels: one would take GBs of activations

LATENT_KEY = "latent"  # the tensor name in our latent files
LATENT_FORMAT = "vaecli.latent"
LATENT_FORMAT_VERSION = "1"
PROVENANCE_KEY = "vaecli"  # PNG text chunk; JPEG comment and WebP XMP hold the same JSON
IMAGE_RECORD = "vaecli.image"  # the "format" of that record
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")  # what we read; no EPS (Ghostscript) or others
_SUPPORTED = "supported: PNG, JPEG, WebP, TIFF, BMP, GIF"


# ------------------------------------------------------------------------------------------------- images


PIXEL_CONVENTIONS = ("vaecli", "kohya")


def read_image(
    path: Path | BinaryIO, alpha: str = "white", max_pixels: int = DEFAULT_MAX_PIXELS, convention: str = "vaecli"
) -> np.ndarray:
    """An image file (or its bytes in a BytesIO, e.g. a shard member) -> float32 (H, W, 3) RGB in [0, 1].

    convention "vaecli": EXIF orientation applied; 16-bit grayscale keeps its precision (divided by 65535,
    never clipped at 255); palette and RGB transparency become alpha; alpha is composited over white or
    black, or dropped (`alpha`). Convention "kohya": as kohya-ss sd-scripts loads images for its latent
    cache (library/train_util.py load_image): the pixels as stored (EXIF orientation ignored) converted by
    Pillow's `convert("RGB")`, which drops alpha (`alpha` is not used).
    Images above `max_pixels` (0: no limit) are refused before their pixels are decoded.
    """
    if not isinstance(path, (str, os.PathLike)):
        return decode_image(path, alpha, max_pixels, convention)
    with open_regular(Path(path)) as fh:
        return decode_image(fh, alpha, max_pixels, convention)


def decode_image(
    fh: BinaryIO, alpha: str = "white", max_pixels: int = DEFAULT_MAX_PIXELS, convention: str = "vaecli",
    keep_uint8: bool = False,
) -> np.ndarray:
    """read_image on an open file or in-memory bytes (e.g. a file whose bytes were just hashed).

    keep_uint8: 8-bit images without transparency come back as uint8 (H, W, 3), a quarter of the bytes;
    value / 255 gives read_image's floats exactly (the batch pipeline converts on the device).
    """
    from PIL import Image, ImageOps

    if convention not in PIXEL_CONVENTIONS:
        raise InputError(f"unknown pixel convention {convention!r}")
    with _open_pil(fh) as img:
        w, h = img.size
        if max_pixels > 0 and w * h > max_pixels:
            raise InputError(_too_large(w, h, max_pixels))
        check_complete(fh, img.format, img)
        try:
            img.seek(0)  # animated GIF/WebP/TIFF: the first frame
            if img.format == "TIFF":
                with native_stderr_captured():  # libtiff prints its complaints itself (we raise ours)
                    img.load()
            else:
                img.load()
            if convention == "kohya":
                rgb = img if img.mode == "RGB" else img.convert("RGB")
                return np.asarray(rgb, dtype=np.float32) / 255.0  # (H, W, 3), as stored
            img = ImageOps.exif_transpose(img)
            return _to_rgb01(img, alpha, keep_uint8)
        except InputError:
            raise
        except Image.DecompressionBombError:  # a frame larger than the first (we never change Pillow's limit)
            raise InputError("an image frame is larger than Pillow's decompression-bomb limit") from None
        except MemoryError:
            raise InputError(f"out of memory while decoding this {w}x{h} image") from None
        except Exception as exc:  # noqa: BLE001 - Pillow reports bad data with many types (OSError, ValueError, ...)
            raise InputError(f"corrupt or truncated image ({type(exc).__name__}: {_first_line(exc)})") from None


# libtiff writes its errors and warnings straight to file descriptor 2 ("PackBitsDecode: Not enough data
# for scanline 0."), beside our one `error:` line for the same file. They are captured around TIFF decodes:
# fd 2 points at a temp file while any decode runs (a count, so that reader threads overlap freely), and
# what landed there is then written back, less libtiff's lines (CamelCase function names: ours are lower
# case, "error: ..."), so nothing another thread printed meanwhile is lost.
_LIBTIFF_LINE = re.compile(rb"^_?[A-Z][A-Za-z0-9_]*: ")
_capture_lock = threading.Lock()
_capture: list[Any] = []  # [count, saved fd 2, temp file] while active


@contextmanager
def native_stderr_captured() -> Iterator[None]:
    """Within this block, lines native code writes to fd 2 that look like libtiff's are dropped."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    with _capture_lock:
        if not _capture:
            try:
                saved = os.dup(2)
                sink = tempfile.TemporaryFile()
                os.dup2(sink.fileno(), 2)
            except OSError:  # no fd 2 (a closed stderr) or no temp space: let libtiff print
                _capture.append(None)
            else:
                _capture.extend([0, saved, sink])
        if _capture[0] is not None:
            _capture[0] += 1
    try:
        yield
    finally:
        with _capture_lock:
            if _capture[0] is None:
                _capture.clear()
            else:
                _capture[0] -= 1
                if _capture[0] == 0:
                    _, saved, sink = _capture
                    _capture.clear()
                    try:
                        sys.stderr.flush()
                    except (OSError, ValueError, AttributeError):
                        pass
                    os.dup2(saved, 2)
                    os.close(saved)
                    _replay(sink)


def _replay(sink: Any) -> None:
    """Write back what was captured, less libtiff's lines."""
    try:
        sink.seek(0)
        kept = b"".join(line for line in sink.read().splitlines(keepends=True) if not _LIBTIFF_LINE.match(line))
        sink.close()
        if kept:
            os.write(2, kept)
    except OSError:
        pass


def image_size(fh: BinaryIO, exif: bool = True) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied; as stored when not `exif`),
    from its header alone.

    For grouping images by size before they are read: EXIF found after the pixel data (possible in PNG)
    is not looked for, since finding it would mean decoding the image.
    """
    from PIL import Image

    with _open_pil(fh) as img:
        w, h = img.size
        orientation = 1
        raw = img.info.get("exif") if exif else None
        if isinstance(raw, bytes) and raw:
            exif = Image.Exif()
            exif.load(raw)
            orientation = exif.get(0x0112, 1)
        elif exif and hasattr(img, "tag_v2"):  # TIFF keeps it among its tags
            orientation = img.tag_v2.get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8: rotated by 90 degrees


def _open_pil(fh: BinaryIO) -> Any:
    """Identify and open (lazily: header only) one of our formats.

    Pillow's plugin factories are called directly, as Image.open does minus its decompression-bomb check:
    we apply our own limit (max_pixels) to the declared size, and never change Pillow's global
    MAX_IMAGE_PIXELS, which stays in force for everything else the host process opens.
    """
    from PIL import BmpImagePlugin, GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin  # noqa: F401

    try:
        from PIL import WebPImagePlugin  # noqa: F401
    except ImportError:  # Pillow built without WebP
        pass
    fh.seek(0)
    prefix = fh.read(16)
    if not prefix:
        raise InputError(f"empty file ({_SUPPORTED})")
    for name in _PIL_FORMATS:
        factory, accept = Image.OPEN.get(name, (None, None))
        if factory is None or (accept is not None and accept(prefix) is not True):
            continue
        fh.seek(0)
        try:
            return factory(fh, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format after all, as Image.open treats it
        except Exception as exc:  # noqa: BLE001 - a header Pillow cannot parse, whatever the exception type
            raise InputError(f"corrupt or truncated image ({_first_line(exc)})") from None
    kind = latent_kind(prefix)
    if kind is not None:
        raise InputError(f"this is {kind}, not an image: decode latent files with `vaecli decode`; encode reads images "
                         f"({_SUPPORTED})")
    raise InputError(f"not an image, or an unsupported format ({_SUPPORTED})")


def _too_large(w: int, h: int, max_pixels: int) -> str:
    return (
        f"image is {w}x{h} = {w * h / 1e6:.1f} MP, above the limit of {max_pixels / 1e6:.1f} MP; "
        f"pass --max-pixels {w * h} (or more) to process it"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _to_rgb01(img: Any, alpha: str, keep_uint8: bool = False) -> np.ndarray:
    """A loaded PIL image in any mode -> float32 (H, W, 3) in [0, 1] (or uint8, see decode_image)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float32)  # (H, W) 16-bit, 32-bit int or float gray
        if not np.isfinite(a).all():
            raise InputError("image holds NaN or Inf pixel values (a floating-point TIFF?)")
        top = float(a.max(initial=0))
        if mode == "F":
            peak = 1.0 if top <= 1.0 else (255.0 if top <= 255.0 else 65535.0)
        else:
            peak = 65535.0 if (mode != "I" or top > 255) else 255.0
        gray = np.clip(a / peak, 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        img = img.convert("RGBA")
    elif mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    if keep_uint8 and not has_alpha:
        return np.array(img)  # (H, W, 3) uint8, writable
    a = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3|4)
    if a.shape[2] == 3:
        return np.ascontiguousarray(a)
    rgb, opacity = a[:, :, :3], a[:, :, 3:4]
    if alpha == "drop":
        return np.ascontiguousarray(rgb)
    background = 1.0 if alpha == "white" else 0.0
    return np.ascontiguousarray(rgb * opacity + background * (1.0 - opacity))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8, rounding to nearest (uint8 is returned as it is)."""
    if pixels.dtype == np.uint8:
        return pixels
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def write_image(
    path: Path, pixels: np.ndarray, fmt: str = "png", quality: int = 95, provenance: Mapping[str, Any] | None = None
) -> None:
    """Float (H, W, 3) in [0, 1] or uint8 -> an 8-bit RGB file, atomically, with an optional provenance record."""
    from PIL import Image, PngImagePlugin

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
    record = {"format": IMAGE_RECORD, **provenance} if provenance is not None else None
    if record is not None:  # the record names the pixels a reader gets, so a file repainted under it is found
        lossless = kind == "PNG" or (kind == "WEBP" and params["lossless"])
        record["pixels_sha256"] = pixels_sha256(data if lossless else _decoded_rgb(img, kind, params))
    text = json.dumps(record, sort_keys=True) if record is not None else None  # ensure_ascii: plain ASCII
    if text is not None:
        if kind == "JPEG":
            params["comment"] = text.encode()
        elif kind == "WEBP":
            params["xmp"] = _XMP.format(html.escape(text, quote=False)).encode()
        elif kind == "PNG":
            info = PngImagePlugin.PngInfo()
            info.add_text(PROVENANCE_KEY, text)
            params["pnginfo"] = info

    atomic_write(path, lambda tmp: img.save(tmp, format=kind, **params))


def pixels_sha256(rgb: np.ndarray) -> str:
    """sha256 of 8-bit (H, W, 3) pixels and their shape: what an image output's record says it holds."""
    import hashlib

    h, w = rgb.shape[:2]
    return hashlib.sha256(f"{h}x{w}x3\0".encode() + np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()


def _decoded_rgb(img: Any, kind: str, params: Mapping[str, Any]) -> np.ndarray:
    """The pixels a lossy file of `img` decodes to (its metadata does not change them): encoded once in memory."""
    import io as _io

    from PIL import Image

    buf = _io.BytesIO()
    img.save(buf, format=kind, **params)
    buf.seek(0)
    with Image.open(buf) as back:
        return np.asarray(back.convert("RGB"))


_XMP = (
    '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
    '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    'xmlns:vaecli="urn:vaecli:provenance:1/"><vaecli:provenance>{}</vaecli:provenance></rdf:Description>'
    '</rdf:RDF></x:xmpmeta><?xpacket end="r"?>'
)
_XMP_VALUE = re.compile(rb"<vaecli:provenance>(.*?)</vaecli:provenance>", re.S)


@dataclass
class OutputState:
    """What is at an output path before a run writes it.

    status: missing, blocked (a folder, FIFO, device: cannot be replaced), incomplete (empty, truncated or
    unreadable: remade), foreign (a complete file without our record: replaced only with --overwrite), ours.
    """

    status: str
    record: dict[str, str] = field(default_factory=dict)  # our provenance (images) or metadata (latents)
    detail: str = ""


def _existing(path: Path) -> OutputState | None:
    """The state of a path that is missing, not a regular file, or a symlink; None for a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return OutputState("missing")
    except OSError as exc:
        return OutputState("blocked", detail=f"cannot inspect it: {exc.strerror or exc}")
    import stat

    if stat.S_ISLNK(st.st_mode):
        return OutputState("foreign", detail="it is a symlink (vaecli never writes one)")
    if not stat.S_ISREG(st.st_mode):
        from .files import file_kind

        return OutputState("blocked", detail=f"it is {file_kind(st.st_mode)}")
    if st.st_size == 0:
        return OutputState("incomplete", detail="empty file")
    return None


def image_output_state(path: Path) -> OutputState:
    """The state of an image output: complete (whole file, structure checked) and carrying our record?"""
    state = _existing(path)
    if state is not None:
        return state
    try:
        with open_regular(path) as fh, _open_pil(fh) as img:
            check_complete(fh, img.format, img)
            raw = img.info.get(PROVENANCE_KEY) or img.info.get("comment") or _xmp_record(img.info.get("xmp"))
            try:
                record = safejson.loads(raw) if raw else None
            except ValueError:
                record = None
            if not isinstance(record, dict) or record.get("format") != IMAGE_RECORD:
                return OutputState("foreign", detail="it has no vaecli provenance record")
            want = record.get("pixels_sha256")
            if want is not None:  # vaecli before 0.1.x wrote none: such records are taken at their word
                try:
                    got = pixels_sha256(np.asarray(img.convert("RGB")))
                except Exception as exc:  # noqa: BLE001 - Pillow reports bad data with many types
                    return OutputState("incomplete", detail=f"its pixels cannot be read ({type(exc).__name__})")
                if got != want:
                    return OutputState("incomplete", detail="its pixels are not those its vaecli record names (the "
                                                            "file was changed after it was written)")
    except InputError as exc:
        return OutputState("incomplete", detail=str(exc))
    return OutputState("ours", {str(k): str(v) for k, v in record.items()})


def _xmp_record(xmp: Any) -> str | None:
    if not isinstance(xmp, (bytes, bytearray)):
        return None
    m = _XMP_VALUE.search(xmp)
    return html.unescape(m.group(1).decode("ascii", "replace")) if m else None


# ------------------------------------------------------------------------------------------------ latents

# safetensors dtypes a latent may have (little-endian in the file), as numpy reads them.
_FLOAT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<i2"}
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 16 << 20  # our headers are a few KB; safetensors itself allows 100 MB


@dataclass
class LatentFile:
    """A latent read from disk: (C, h, w) float32 tensor, our metadata when the file has it, and what its
    container says about it (ComfyUI's version marker; kohya's original_size and crop_ltrb)."""

    tensor: torch.Tensor
    meta: dict[str, str] | None  # None: a latent without vaecli metadata
    container: str = "vaecli"  # vaecli (ours), bare (.safetensors/.npy of unknown origin), comfyui, kohya
    marker: bool = True  # comfyui: latent_format_version_0 present (raw values; absent: scaled by 0.18215)
    original_size: tuple[int, int] | None = None  # kohya [W, H]
    crop_ltrb: tuple[float, float, float, float] | None = None  # kohya


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name, shape and byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def read_safetensors_header(fh: BinaryIO) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check a safetensors header (tensor entries, metadata) without reading tensor data.

    Every entry must have a known dtype, a shape whose byte size matches its range, and lie inside the file:
    a file cut short fails here.
    """
    size = stream_size(fh)
    if size == 0:
        raise InputError("empty file")
    head = fh.read(8)
    if len(head) < 8:
        raise InputError("not a readable safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        raise InputError("not a readable safetensors file (header length beyond the file: cut short?)")
    try:
        header = safejson.loads(fh.read(n))
    except safejson.JSONTooDeep as exc:
        raise InputError(f"not a readable safetensors file (its header is {exc})") from None
    except (ValueError, UnicodeDecodeError):
        raise InputError("not a readable safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError("not a readable safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError("safetensors metadata must map strings to strings")
    entries = {name: _entry(name, info, 8 + n, size) for name, info in header.items()}
    return entries, meta


def _entry(name: str, info: Any, base: int, size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and begin <= end
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"safetensors entry {name!r} is malformed")
    if dtype not in _DTYPE_SIZES:
        raise InputError(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
        raise InputError(f"tensor {name!r}: its byte range does not match its shape {list(shape)} and dtype {dtype}")
    if base + end > size:
        raise InputError(f"not a whole safetensors file: tensor {name!r} ends at byte {base + end} of {size} (cut short?)")
    return TensorEntry(dtype, shape, base + begin, base + end)


def write_latent(path: Path, latent: torch.Tensor, meta: Mapping[str, str]) -> None:
    """Save a (C, h, w) latent as safetensors {'latent': tensor} with string metadata, atomically."""
    from safetensors.torch import save_file

    tensors = {LATENT_KEY: latent.detach().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(meta)))


def latent_output_state(path: Path) -> OutputState:
    """The state of a latent output (.safetensors, ComfyUI .latent or kohya .npz): a whole file that vaecli
    wrote (its metadata as the record), or not. Dataset files are ours by their embedded record."""
    from .exports import COMFYUI_TENSOR, RECORD_KEY, npz_state

    state = _existing(path)
    if state is not None:
        return state
    suffix = path.suffix.lower()
    try:
        with open_regular(path) as fh:
            if suffix == ".npz":
                ours, meta = npz_state(fh)
            else:
                entries, meta = read_safetensors_header(fh)
                if suffix == ".latent":
                    ours = COMFYUI_TENSOR in entries and (meta.get("format") == LATENT_FORMAT or RECORD_KEY in meta)
                else:
                    ours = meta.get("format") == LATENT_FORMAT and LATENT_KEY in entries
    except InputError as exc:
        return OutputState("incomplete", detail=str(exc))
    if not ours:
        return OutputState("foreign", detail="it is not a vaecli latent file")
    return OutputState("ours", dict(meta))


def latent_is_complete(path: Path) -> dict[str, str] | None:
    """The metadata of a whole vaecli latent file at `path`, or None (missing, partial, or foreign)."""
    state = latent_output_state(path)
    return state.record if state.status == "ours" else None


ShapeCheck = Callable[[tuple[int, int, int]], None]  # called with (C, h, w) before tensor data is read


def read_latent(path: Path, check: ShapeCheck | None = None) -> LatentFile:
    """A latent file -> (C, h, w) float32 tensor and metadata.

    Accepted: our files ('latent' + metadata); bare safetensors with exactly one tensor; .npy arrays;
    ComfyUI .latent files ('latent_tensor'); kohya .npz caches ('latents'). Shapes (C, h, w) or
    (1, C, h, w); dtypes fp16, bf16, fp32, fp64. `check` sees the shape (e.g. against a pixel limit)
    before any tensor data is read.
    """
    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        check_regular(path)
        with open_regular(path) as fh:
            _refuse_image(fh)
        raise InputError(f"unsupported latent format {suffix!r} (use {', '.join(LATENT_SUFFIXES)})")
    with open_regular(path) as fh:
        return load_latent(fh, suffix, check)


_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def image_kind(prefix: bytes) -> str | None:
    """The image format a file's first bytes announce (PNG, JPEG, WebP, GIF, BMP, TIFF), or None."""
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _IMAGE_MAGIC if prefix.startswith(magic)), None)


def latent_kind(prefix: bytes) -> str | None:
    """The latent container a file's first bytes announce (safetensors, .npy, .npz), or None."""
    if prefix.startswith(b"\x93NUMPY"):
        return "a .npy array"
    if prefix.startswith(b"PK\x03\x04"):
        return "an .npz (zip) archive"
    if len(prefix) >= 9 and prefix[8:9] == b"{" and 0 < struct.unpack("<Q", prefix[:8])[0] < _MAX_HEADER:
        return "a safetensors file"
    return None


def stream_size(fh: BinaryIO) -> int:
    """Bytes in an open file or an in-memory copy of one (BytesIO has no descriptor); position kept."""
    pos = fh.tell()
    try:
        return fh.seek(0, 2)
    finally:
        fh.seek(pos)


def _refuse_image(fh: BinaryIO) -> None:
    """`decode photo.jpg`: name the mistake instead of a parse error of the wrong format."""
    fh.seek(0)
    kind = image_kind(fh.read(16))
    fh.seek(0)
    if kind is not None:
        raise InputError(f"this is a {kind} image, not a latent file: encode images with `vaecli encode` "
                         f"(decode reads latent files: {', '.join(LATENT_SUFFIXES)})")


def load_latent(fh: BinaryIO, suffix: str, check: ShapeCheck | None = None) -> LatentFile:
    """read_latent on an open file (e.g. one whose bytes were just hashed)."""
    _refuse_image(fh)
    fh.seek(0)
    if suffix == ".npy":
        return LatentFile(_as_chw(torch.from_numpy(read_npy(fh, check))), None, "bare")
    if suffix in (".latent", ".npz"):
        from .exports import read_comfyui, read_kohya

        got = read_comfyui(fh, check) if suffix == ".latent" else read_kohya(fh, check)
        container = "comfyui" if suffix == ".latent" else "kohya"
        return LatentFile(_as_chw(got.tensor), got.meta, container, got.marker, got.original_size, got.crop_ltrb)
    entries, meta = read_safetensors_header(fh)
    ours = meta.get("format") == LATENT_FORMAT
    if ours and LATENT_KEY not in entries:
        raise InputError(f"vaecli latent file without its '{LATENT_KEY}' tensor (found: {sorted(entries)})")
    name = LATENT_KEY if ours else _bare_tensor_name(list(entries))
    tensor = read_tensor(fh, entries[name], name, check)
    return LatentFile(_as_chw(tensor), dict(meta) if ours else None, "vaecli" if ours else "bare")


def read_tensor(fh: BinaryIO, entry: TensorEntry, name: str, check: ShapeCheck | None) -> torch.Tensor:
    """One latent tensor of a safetensors file: float dtype and shape checked before its data is read."""
    if entry.dtype not in _FLOAT_DTYPES:
        raise InputError(f"tensor {name!r} has dtype {entry.dtype}; a latent must be fp16, bf16, fp32 or fp64")
    shape = _check_shape(entry.shape, check)
    fh.seek(entry.begin)
    data = fh.read(entry.end - entry.begin)
    if len(data) < entry.end - entry.begin:
        raise InputError("cut short while reading (the file changed?)")
    array = np.frombuffer(data, dtype=_FLOAT_DTYPES[entry.dtype]).reshape(shape)
    if entry.dtype == "BF16":
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(array.astype(np.float32))


class _Shape(Exception):
    """Carries a latent's shape out of load_latent's check, before any tensor data is read."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape


def latent_shape(fh: BinaryIO, suffix: str) -> tuple[int, int, int]:
    """The (C, h, w) shape of a latent file from its header alone (the same parsing as load_latent)."""

    def stop(shape: tuple[int, int, int]) -> None:
        raise _Shape(shape)

    try:
        load_latent(fh, suffix, stop)
    except _Shape as found:
        return found.shape
    raise InputError("latent file without a shape")  # not reached: load_latent checks the shape first


def read_npy(fh: BinaryIO, check: ShapeCheck | None = None, kind: str = "f", limit: int | None = None) -> np.ndarray:
    """A .npy array, its header checked before its data is read (no pickles, ever).

    kind "f": a latent of floats, shape (C, h, w) or (1, C, h, w) (seen by `check`), returned as float32.
    Other kinds ("iu", "iuf", "U": numpy dtype kinds allowed): a small array of at most `limit` bytes.
    """
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise InputError(f"unsupported .npy version {version[0]}.{version[1]}")
    except InputError:
        raise
    except (ValueError, OSError, struct.error) as exc:
        raise InputError(f"not a readable .npy array ({_first_line(exc)})") from None
    if kind == "f":
        if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
            raise InputError(f".npy array has dtype {dtype}; a latent must be fp16, fp32 or fp64")
        shape = _check_shape(tuple(shape), check)
    elif dtype.kind not in kind or dtype.hasobject:
        raise InputError(f".npy array has dtype {dtype}, not the kind expected here")
    count = math.prod(shape) * dtype.itemsize
    if limit is not None and count > limit:
        raise InputError(f".npy array of {count} bytes is far larger than expected here")
    data = fh.read(count)
    if len(data) < count:
        raise InputError(f".npy array is cut short ({len(data)} of {count} bytes)")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    if kind == "f":
        return np.array(array, dtype=np.float32, order="C")  # a writable copy
    return np.array(array)


def _check_shape(shape: tuple[int, ...], check: ShapeCheck | None) -> tuple[int, ...]:
    if not (len(shape) == 3 or (len(shape) == 4 and shape[0] == 1)):
        raise InputError(f"latent has shape {shape}; expected (C, h, w) or (1, C, h, w)")
    if min(shape) == 0:
        raise InputError(f"latent has an empty shape {shape}")
    if check is not None:
        c, h, w = shape[-3:]
        check((c, h, w))
    return shape


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
    return t


def meta_name(name: str) -> str:
    """A file name as a metadata string: safetensors metadata must be valid UTF-8, file names need not be
    (bytes that are not UTF-8 are written as \\xNN)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def meta_json(meta: Mapping[str, str], key: str) -> Any:
    """One JSON-valued metadata entry, with a clear error when it is missing or garbled."""
    try:
        return safejson.loads(meta[key])
    except KeyError:
        raise InputError(f"latent metadata lacks '{key}'") from None
    except safejson.JSONTooDeep as exc:
        raise InputError(f"latent metadata '{key}' is {exc}") from None
    except ValueError:
        shown = repr(meta[key]) if len(meta[key]) <= 120 else repr(meta[key][:120]) + "..."
        raise InputError(f"latent metadata '{key}' is not valid JSON: {shown}") from None
