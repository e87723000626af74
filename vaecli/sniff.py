"""What a file is from its first bytes, and a reader's complaint as one line of our messages.

Below both images (io.py) and latent containers (latents/): each names the other's files when a user hands
one to the wrong command (`decode photo.jpg`), so the image magic numbers cannot live in io.py.
"""

from __future__ import annotations

_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def image_kind(prefix: bytes) -> str | None:
    """The image format a file's first bytes announce (PNG, JPEG, WebP, GIF, BMP, TIFF), or None."""
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _IMAGE_MAGIC if prefix.startswith(magic)), None)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (its type when it has none): parsers' messages run long."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
