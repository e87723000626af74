"""Images in and out (orientation, modes, alpha, 16-bit), with the provenance record of the images we write.

Pixels are float32 arrays (H, W, 3) in [0, 1] at this module's edge. Only regular files are read (files.py);
declared sizes are checked against the caller's limit before any pixel is decoded, and a file cut short is an
error (integrity.py). Every file is written to a hidden temporary name in its destination folder
and renamed into place (files.atomic_write). Images we write carry a provenance record (what they were made
from), so a later run can tell a current output from a stale or foreign one.
"""

from __future__ import annotations

import html
import json
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import choices, safejson
from .choices import DEFAULTS
from .errors import InputError
from .files import atomic_write, open_regular
from .integrity import check_complete
from .latents import latent_kind
from .outputs import OutputState, path_state
from .sniff import first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # names an -o of one image file
# the --image-format names (vaecli.choices) and their Pillow writers
IMAGE_FORMATS = dict(zip(choices.IMAGE_FORMATS, ("PNG", "JPEG", "WEBP"), strict=True))
DEFAULT_MAX_PIXELS = DEFAULTS.max_pixels  # larger images need --max-pixels: one would take GBs of activations

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
            raise InputError(f"corrupt or truncated image ({type(exc).__name__}: {first_line(exc)})") from None


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
            tags = Image.Exif()
            tags.load(raw)
            orientation = tags.get(0x0112, 1)
        elif exif and hasattr(img, "tag_v2"):  # TIFF keeps it among its tags
            orientation = img.tag_v2.get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8: rotated by 90 degrees


def _open_pil(fh: BinaryIO) -> Any:
    """Identify and open (lazily: header only) one of our formats.

    Pillow's plugin factories are called directly, as Image.open does minus its decompression-bomb check:
    we apply our own limit (max_pixels) to the declared size, and never change Pillow's global
    MAX_IMAGE_PIXELS, which stays in force for everything else the host process opens.
    """
    # imported plugins register their factories in Image.OPEN
    from PIL import (  # noqa: F401
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
    )

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
            raise InputError(f"corrupt or truncated image ({first_line(exc)})") from None
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


def image_output_state(path: Path) -> OutputState:
    """The state of an image output: complete (whole file, structure checked) and carrying our record?"""
    state = path_state(path)
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

