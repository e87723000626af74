"""Is an image file complete? Container-level checks per format, independent of Pillow's global
`ImageFile.LOAD_TRUNCATED_IMAGES` (which a host process may have switched on).

Pillow fills what is missing with black or grey in some cases even with that flag off: a PNG whose zlib
stream ends (cleanly) before the declared rows, a JPEG cut short and closed with an end-of-image marker.
Each check reads the file's structure (chunks, markers, blocks, strip offsets), never decodes pixels, and
raises InputError naming what is missing. Only the PNG check inflates data (to count the rows present),
with bounded memory.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .errors import InputError

_BLOCK = 1 << 20


def check_complete(fh: BinaryIO, fmt: str | None, img: Any) -> None:
    """Raise InputError when the open file `fh` (Pillow format name `fmt`, opened image `img`) is cut short.

    Restores the file position. Formats without a check here pass.
    """
    check = _CHECKS.get(fmt or "")
    if check is None:
        return
    pos = fh.tell()
    try:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(0)
        check(fh, size, img)
    except InputError:
        raise
    except (struct.error, ValueError, IndexError) as exc:
        raise _corrupt(f"{fmt} structure unreadable ({exc})") from None
    finally:
        fh.seek(pos)


def _truncated(what: str) -> InputError:
    return InputError(f"truncated image: {what}")


def _corrupt(what: str) -> InputError:
    return InputError(f"corrupt image: {what}")


def _read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    data = fh.read(n)
    if len(data) < n:
        raise _truncated(what)
    return data


# ---------------------------------------------------------------------------------------------- PNG

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_data_size(width: int, height: int, depth: int, colour: int, interlace: int) -> int:
    """Bytes of filtered image data (one filter byte per row) a PNG of this header must inflate to."""
    bits = _PNG_CHANNELS[colour] * depth

    def rows(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w and h else 0

    if not interlace:
        return rows(width, height)
    return sum(
        rows(max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)) for x0, y0, dx, dy in _ADAM7
    )


def _png(fh: BinaryIO, size: int, img: Any) -> None:
    """Every chunk whole with a valid CRC, IDAT present and consecutive, its zlib stream ends with exactly
    the rows the header declares, and IEND follows."""
    fh.seek(8)
    expected = None
    inflater = zlib.decompressobj()
    produced = 0
    state = "before"  # before / in / after the IDAT run
    while True:
        head = _read_exact(fh, 8, "the PNG ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", head)
        if length > size:
            raise _truncated(f"PNG chunk {kind!r} is cut short")
        body = _read_exact(fh, length, f"PNG chunk {kind!r} is cut short")
        (crc,) = struct.unpack(">I", _read_exact(fh, 4, f"PNG chunk {kind!r} is cut short"))
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise _corrupt(f"PNG chunk {kind!r} fails its CRC check")
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            if colour not in _PNG_CHANNELS:
                raise _corrupt(f"PNG colour type {colour}")
            expected = png_data_size(width, height, depth, colour, interlace)
        elif kind == b"IDAT":
            if state == "after" or expected is None:
                raise _corrupt("PNG image data (IDAT) is not one consecutive run after IHDR")
            state = "in"
            produced += _inflate_count(inflater, body, expected - produced)
        elif kind == b"IEND":
            break
        elif state == "in":
            state = "after"
    if state == "before":
        raise _truncated("the PNG has no image data (no IDAT chunk)")
    assert expected is not None  # an IDAT was read, and one is accepted only after IHDR set the size
    if not inflater.eof or produced < expected:
        raise _truncated(f"the PNG's image data ends early ({produced} of {expected} bytes)")


def _inflate_count(inflater: Any, data: bytes, room: int) -> int:
    """Feed `data` to the inflater; count the output without keeping it (at most _BLOCK bytes at a time)."""
    count = 0
    while data and not inflater.eof:
        try:
            out = inflater.decompress(data, _BLOCK)
        except zlib.error as exc:
            raise _corrupt(f"PNG image data does not inflate ({exc})") from None
        count += len(out)
        if count > room:
            raise _corrupt("PNG image data holds more rows than its header declares")
        data = inflater.unconsumed_tail
    return count


# --------------------------------------------------------------------------------------------- JPEG

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HUFFMAN_SOF = {0xC0, 0xC1, 0xC2, 0xC5, 0xC6}  # lossy Huffman-coded: at least one bit per 8x8 block
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker: not a stuffed 0xFF00, a restart, or fill


@dataclass
class _JpegRead:
    """What a walk over a JPEG's segments found."""

    frame: tuple[int, int, int, list[tuple[int, int]]] | None = None  # (SOF marker, width, height, sampling)
    ids: list[int] = field(default_factory=list)  # component ids, in frame order
    shortest: dict[tuple[int, int], int] = field(default_factory=dict)  # (0 DC / 1 AC, table) -> shortest code
    scan_bytes: int = 0
    scans: int = 0
    short_scan: str | None = None  # why a sequential scan holds too few bits
    delivered: dict[int, set[int]] = field(default_factory=dict)  # progressive: component -> coefficients done


def _jpeg(fh: BinaryIO, size: int, img: Any) -> None:
    """Segments whole, at least one frame and scan, the scans' data closed by a marker, EOI reached; and,
    against a file cut short and closed with an end-of-image marker:
    - sequential Huffman coding: every 8x8 block costs at least its shortest DC code plus its shortest AC
      code (the file's own tables), so each scan must hold at least that many bits for its blocks (a flat
      image, which compresses to about that minimum, cut at 40% fails it);
    - progressive: the scans together must deliver every coefficient (0..63) of every component to its
      last bit (Al 0): a file cut after its first (DC) scan has none of the AC coefficients;
    - any other Huffman frame: at least one bit of scan data per block."""
    if fh.read(2) != b"\xff\xd8":
        raise _corrupt("JPEG without a start-of-image marker")
    read = _JpegRead()
    while (marker := _next_marker(fh)) != 0xD9:
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # standalone markers
        (length,) = struct.unpack(">H", _read_exact(fh, 2, "a JPEG segment is cut short"))
        if length < 2:
            raise _corrupt(f"JPEG segment 0xFF{marker:02X} with length {length}")
        _jpeg_segment(fh, marker, _read_exact(fh, length - 2, "a JPEG segment is cut short"), read)
    _check_jpeg_totals(read)


def _next_marker(fh: BinaryIO) -> int:
    """The next marker's code, skipping stray bytes between segments (libjpeg skips them too) and fill bytes."""
    byte = fh.read(1)
    while byte and byte != b"\xff":
        byte = fh.read(1)
    while byte == b"\xff":
        byte = fh.read(1)
    if not byte:
        raise _truncated("the JPEG ends before its end-of-image marker (EOI)")
    return byte[0]


def _jpeg_segment(fh: BinaryIO, marker: int, body: bytes, read: _JpegRead) -> None:
    """Note what one segment says: a frame header, Huffman tables, or a scan (whose data is skipped here)."""
    if marker in _SOF:
        _, height, width, count = struct.unpack(">BHHB", body[:6])
        comps = [(body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count)]
        read.ids = [body[6 + 3 * i] for i in range(count)]
        read.frame = (marker, width, height, comps)
    if marker == 0xC4:
        _huffman_tables(body, read.shortest)
    if marker == 0xDA:
        read.scans += 1
        length = _skip_scan(fh)
        read.scan_bytes += length
        frame = read.frame
        if frame is not None and frame[0] in (0xC0, 0xC1) and read.short_scan is None:
            read.short_scan = _short_sequential_scan(body, frame, read.ids, read.shortest, length)
        if frame is not None and frame[0] in (0xC2, 0xC6):
            _note_progressive(body, read.delivered)


def _check_jpeg_totals(read: _JpegRead) -> None:
    """After EOI: a frame and a scan were there, and the scans held enough data for the frame."""
    if read.frame is None or read.scans == 0:
        raise _corrupt("JPEG without a frame or scan")
    marker, width, height, comps = read.frame
    if read.short_scan is not None:
        raise _truncated(f"{read.short_scan} (cut short and closed with an end marker?)")
    if marker in (0xC2, 0xC6) and height:
        missing = [c for c in read.ids if len(read.delivered.get(c, ())) < 64]
        if missing:
            have = min(len(read.delivered.get(c, ())) for c in missing)
            raise _truncated(
                f"the progressive JPEG's scans deliver {have} of the 64 coefficients of a component to their "
                "last bit (cut short after its first scans and closed with an end marker?)"
            )
    if marker in _HUFFMAN_SOF and height:
        hmax, vmax = max(h for h, _ in comps), max(v for _, v in comps)
        blocks = sum(_ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8) for h, v in comps)
        if read.scan_bytes * 8 < blocks:
            raise _truncated(
                f"the JPEG holds {read.scan_bytes} bytes of scan data, too few for its {width}x{height} frame "
                "(cut short and closed with an end marker?)"
            )


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _huffman_tables(body: bytes, shortest: dict[tuple[int, int], int]) -> None:
    """Record the shortest code length of each Huffman table a DHT segment defines (or redefines)."""
    pos = 0
    while pos + 17 <= len(body):
        kind, table = body[pos] >> 4, body[pos] & 15
        counts = body[pos + 1 : pos + 17]
        shortest[(kind, table)] = next((n + 1 for n, c in enumerate(counts) if c), 16)
        pos += 17 + sum(counts)


def _short_sequential_scan(
    sos: bytes, frame: tuple[int, int, int, list[tuple[int, int]]], ids: list[int],
    shortest: dict[tuple[int, int], int], scan_bytes: int,
) -> str | None:
    """Why a baseline/extended sequential scan of `scan_bytes` bytes cannot hold all its blocks, or None:
    each block takes at least the shortest code of its DC table and of its AC table."""
    _, width, height, comps = frame
    count = sos[0]
    hmax, vmax = max(h for h, _ in comps), max(v for _, v in comps)
    need = 0
    for i in range(count):
        cid, tables = sos[1 + 2 * i], sos[2 + 2 * i]
        if cid not in ids:
            return None  # a malformed scan: libjpeg reports it
        h, v = comps[ids.index(cid)]
        if count == 1:  # non-interleaved: the component's own blocks
            blocks = _ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8)
        else:  # interleaved: whole MCUs, h x v blocks of this component in each
            blocks = _ceil(width, 8 * hmax) * _ceil(height, 8 * vmax) * h * v
        dc, ac = shortest.get((0, tables >> 4)), shortest.get((1, tables & 15))
        if dc is None or ac is None:
            return None
        need += blocks * (dc + ac)
    if scan_bytes * 8 < need:
        return (f"a JPEG scan holds {scan_bytes} bytes, fewer than the {_ceil(need, 8)} its {width}x{height} "
                "frame's blocks need at the least")
    return None


def _note_progressive(sos: bytes, delivered: dict[int, set[int]]) -> None:
    """Add the coefficients a progressive scan delivers to their last bit (Al 0) to each of its components."""
    count = sos[0]
    ss, se, approx = sos[1 + 2 * count], sos[2 + 2 * count], sos[3 + 2 * count]
    if approx & 15 != 0 or se > 63 or ss > se:
        return
    for i in range(count):
        delivered.setdefault(sos[1 + 2 * i], set()).update(range(ss, se + 1))


def _skip_scan(fh: BinaryIO) -> int:
    """Advance past one scan's entropy-coded data to the marker that ends it; returns the data's length."""
    start = fh.tell()
    carry = b""
    while True:
        block = fh.read(_BLOCK)
        if not block:
            raise _truncated("the JPEG's scan data is cut short (no end-of-image marker)")
        data = carry + block
        m = _SCAN_END.search(data)
        if m is not None:
            end = fh.tell() - len(data) + m.start()
            fh.seek(end)
            return end - start
        carry = data[-1:] if data.endswith(b"\xff") else b""  # a marker may straddle the block boundary


# --------------------------------------------------------------------------------- WebP, GIF, TIFF, BMP


def _webp(fh: BinaryIO, size: int, img: Any) -> None:
    """The RIFF container's declared length is present, and every chunk in it is whole."""
    riff, length, webp = struct.unpack("<4sI4s", _read_exact(fh, 12, "the WebP header is cut short"))
    if riff != b"RIFF" or webp != b"WEBP":
        raise _corrupt("WebP without a RIFF/WEBP header")
    end = 8 + length
    if end > size:
        raise _truncated(f"the WebP file has {size} of the {end} bytes its header declares")
    pos = 12
    while pos + 8 <= end:
        fh.seek(pos)
        _, chunk = struct.unpack("<4sI", fh.read(8))
        pos += 8 + chunk + (chunk & 1)
        if pos - (chunk & 1) > end:
            raise _truncated("a WebP chunk is cut short")


def _gif(fh: BinaryIO, size: int, img: Any) -> None:
    """The blocks up to and including the first image's data are whole (terminated sub-block chains)."""
    head = _read_exact(fh, 13, "the GIF header is cut short")
    packed = head[10]
    if packed & 0x80:
        fh.seek(3 * (2 << (packed & 7)), 1)  # global colour table
    while True:
        kind = _read_exact(fh, 1, "the GIF ends before its first image")[0]
        if kind == 0x21:  # extension: label, then sub-blocks
            _read_exact(fh, 1, "a GIF extension is cut short")
            _skip_sub_blocks(fh)
        elif kind == 0x2C:  # image descriptor, local colour table, LZW code size, data sub-blocks
            desc = _read_exact(fh, 9, "the GIF image descriptor is cut short")
            if desc[8] & 0x80:
                fh.seek(3 * (2 << (desc[8] & 7)), 1)
            _read_exact(fh, 1, "the GIF image data is cut short")
            _skip_sub_blocks(fh)
            return
        else:
            raise _corrupt(f"GIF block type 0x{kind:02x} before the first image")


def _skip_sub_blocks(fh: BinaryIO) -> None:
    while True:
        n = _read_exact(fh, 1, "GIF data is cut short")[0]
        if n == 0:
            return
        if len(fh.read(n)) < n:
            raise _truncated("GIF data is cut short")


def _tiff(fh: BinaryIO, size: int, img: Any) -> None:
    """Every strip or tile of the first page lies inside the file; uncompressed strips hold all their rows
    (Pillow decodes a strip whose byte count covers a quarter of its rows as black below them)."""
    tags = getattr(img, "tag_v2", {})
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets is None or counts is None:
            continue
        offsets = offsets if isinstance(offsets, (tuple, list)) else (offsets,)
        counts = counts if isinstance(counts, (tuple, list)) else (counts,)
        end = max((int(o) + int(c) for o, c in zip(offsets, counts, strict=False)), default=0)
        if end > size:
            raise _truncated(f"the TIFF has {size} of the {end} bytes its image data needs")
        if offsets_tag == 273 and tags.get(259, 1) == 1:  # uncompressed strips
            _tiff_strip_rows(tags, [int(c) for c in counts])


def _tiff_strip_rows(tags: Any, counts: list[int]) -> None:
    """Each uncompressed strip's byte count covers its rows: RowsPerStrip (the last strip: the rest) times
    the bytes of one row of samples (per plane when planar)."""
    width, height = int(tags.get(256, 0) or 0), int(tags.get(257, 0) or 0)
    bits = tags.get(258, (1,))
    bits = [int(b) for b in (bits if isinstance(bits, (tuple, list)) else (bits,))]
    samples = int(tags.get(277, len(bits)) or 1)
    per_strip = min(int(tags.get(278, height) or height), height) or height
    if not (width and height and per_strip):
        return
    planar = int(tags.get(284, 1) or 1) == 2
    planes = samples if planar else 1
    row_bits = width * (bits[0] if planar else sum(bits) if len(bits) == samples else bits[0] * samples)
    row_bytes = _ceil(row_bits, 8)
    strips = _ceil(height, per_strip)
    if len(counts) < strips * planes:
        raise _truncated(f"the TIFF lists {len(counts)} of the {strips * planes} strips its {height} rows need")
    for i, count in enumerate(counts[: strips * planes]):
        rows = min(per_strip, height - (i % strips) * per_strip)
        if count < rows * row_bytes:
            raise _truncated(
                f"the TIFF's strip {i} holds {count} of the {rows * row_bytes} bytes its {rows} rows need"
            )


def _bmp(fh: BinaryIO, size: int, img: Any) -> None:
    """The pixel array (uncompressed) or the declared image size (RLE) lies inside the file."""
    head = _read_exact(fh, 38 if size >= 38 else 26, "the BMP header is cut short")
    offset, header_size = struct.unpack_from("<II", head, 10)
    if header_size < 40:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height, _, bits = struct.unpack_from("<HHHH", head, 18)
        compression, image_size = 0, 0
    else:
        width, height, _, bits, compression, image_size = struct.unpack_from("<iiHHII", head, 18)
    if compression in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS: rows of fixed stride
        need = offset + (abs(width) * bits + 31) // 32 * 4 * abs(height)
    else:
        need = offset + image_size
    if need > size:
        raise _truncated(f"the BMP has {size} of the {need} bytes its pixels need")


_CHECKS = {"PNG": _png, "JPEG": _jpeg, "MPO": _jpeg, "WEBP": _webp, "GIF": _gif, "TIFF": _tiff, "BMP": _bmp}
