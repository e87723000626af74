"""A corpus of hostile inputs, one row per case, generated at test time (nothing binary is checked in).

Each Case builds its files in an empty folder (the working directory of the run), names the command,
and states what must hold afterwards: the exit code, a message (regex on stderr), the files that must and
must not exist. The runner (test_hostile.py) also checks, for every case: no input file changed (bytes,
mtime, mode: everything under `in/` and every path in `protect`), stdout is exactly one JSON document
(--json is added), no traceback or raw Python error on stderr, one `error:` line per failed item, and the
run ends within `timeout` seconds.

To add a case: write a builder `def build_x(root: Path, ctx: Ctx) -> None` that creates `in/...` (and
anything else), and append a Case. `{model}` in args is the tiny test model; paths are relative to the
case folder. `isolate=True` runs it in a subprocess (needed for signals, memory ceilings, umask).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from cli_support import noise_image


@dataclass
class Ctx:
    """What builders may use: the tiny model and a way to run the CLI (in-process) while building."""

    model: str
    model_sha256: str
    run: Callable[..., int]  # run(*args) -> exit code


@dataclass
class Case:
    name: str
    klass: str  # the class of issue 11 it belongs to
    build: Callable[[Path, Ctx], None]
    args: tuple[str, ...]
    code: int
    message: str = ""  # regex that must match stderr ("" = no check)
    exists: tuple[str, ...] = ()  # glob patterns that must match
    absent: tuple[str, ...] = ()  # glob patterns that must not match (hidden temp files included)
    protect: tuple[str, ...] = ()  # more files (globs) that must be left unchanged, beside everything under in/
    isolate: bool = False
    max_rss_mb: int = 0  # with isolate: ceiling on the run's peak resident memory
    timeout: float = 60.0
    check: Callable[[Path, dict[str, Any], str], None] | None = None  # extra assertions (root, json doc, stderr)
    signal_after: str = ""  # with isolate: send `signum` once this glob matches (or after 20 s)
    signal_at: float = 0.0  # with isolate: send `signum` this many seconds after the start (0: never)
    signum: int = 2  # the signal sent: SIGINT (Ctrl-C); SIGTERM 15, SIGHUP 1
    umask: int | None = None  # the run's umask
    env: dict[str, str] = field(default_factory=dict)  # with isolate
    # with isolate: "closed" (`>&-`), "full" (`> /dev/full`), "head:N" (`| head -c N`); no document read
    stdout: str = ""
    json: bool = True  # add --json (False: the human output; no document read)


# ------------------------------------------------------------------------------------------- file makers


def img(root: Path, rel: str, w: int = 24, h: int = 24, seed: int = 0, **save: Any) -> Path:
    return noise_image(root / rel, w, h, seed=seed, **save)


def png_bytes(w: int, h: int, raw: bytes, iend: bool = True, idat: bool = True) -> bytes:
    """A hand-made 8-bit RGB PNG around the filtered rows `raw` (which may hold fewer rows than declared)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    if idat:
        data += chunk(b"IDAT", zlib.compress(raw))
    return data + (chunk(b"IEND", b"") if iend else b"")


def encoded(fmt: str, w: int = 96, h: int = 64, **save: Any) -> bytes:
    """A smooth random image in `fmt`, as bytes."""
    import io

    rng = np.random.default_rng(7)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    if fmt == "GIF":
        small = small.convert("P")
    buf = io.BytesIO()
    small.save(buf, fmt, **save)
    return buf.getvalue()


def our_latent(path: Path, ctx: Ctx, h: int = 3, w: int = 3, values: torch.Tensor | None = None, **meta: str) -> Path:
    """A vaecli latent file for the tiny model (4 channels): pad policy, original size h*8 x w*8 unless overridden."""
    z = torch.randn(4, h, w, generator=torch.Generator().manual_seed(0)) if values is None else values
    base = {
        "format": "vaecli.latent",
        "format_version": "1",
        "model_name": ctx.model,
        "model_sha256": ctx.model_sha256,
        "latent_spec": json.dumps({"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None,
                                   "latents_std": None}),
        "size_policy": "pad",
        "original_width": str(w * 8),
        "original_height": str(h * 8),
        "encoded_width": str(w * 8),
        "encoded_height": str(h * 8),
        "size_params": json.dumps({"pad_right": 0, "pad_bottom": 0, "mode": "replicate"}),
    }
    base.update(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent": z}, str(path), metadata=base)
    return path


# ------------------------------------------------------------------------------------------------ builders


def two_images(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png", seed=1)
    img(root, "in/sub/b.png", seed=2)


def encoded_folder(root: Path, ctx: Ctx) -> None:
    """in/ holds images; lat/ their latents (the layout of `encode in -o lat`)."""
    two_images(root, ctx)
    assert ctx.run("encode", "in", "-o", "lat", "--model", ctx.model) == 0


def symlinked_out(root: Path, ctx: Ctx) -> None:
    two_images(root, ctx)
    (root / "link").symlink_to(root / "in", target_is_directory=True)


def link_into_out(root: Path, ctx: Ctx) -> None:
    img(root, "out/x.png")
    img(root, "in/a.png")
    (root / "in" / "link.png").symlink_to(root / "out" / "x.png")


def hard_link_output(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png")
    (root / "out").mkdir()
    os.link(root / "in" / "a.png", root / "out" / "a.png")


def diff_name_clash(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png", seed=1)
    img(root, "in/a.diff.png", seed=2)


def flipped_name_clash(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png", 64, 64, seed=1)
    img(root, "in/a.flipped.png", 64, 64, seed=2)


def same_stem_two_folders(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png", seed=1)
    img(root, "in/sub/a.png", seed=2)


def metadata(**meta: str) -> Callable[[Path, Ctx], None]:
    def build(root: Path, ctx: Ctx) -> None:
        our_latent(root / "in" / "z.safetensors", ctx, **meta)

    return build


def crop_meta(root: Path, ctx: Ctx) -> None:
    our_latent(
        root / "in" / "z.safetensors", ctx, size_policy="crop", original_width="30", original_height="30",
        size_params=json.dumps({"crop_ltrb": [0, 0, 8, 8]}),
    )


def bomb_png(root: Path, ctx: Ctx) -> None:
    (root / "in").mkdir()
    (root / "in" / "bomb.png").write_bytes(png_bytes(8192, 8192, b"\x00" * 100))


def huge_declared(root: Path, ctx: Ctx) -> None:
    """Small files whose headers declare enormous images."""
    (root / "in").mkdir()
    gif = bytearray(encoded("GIF", 16, 16))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen
    (root / "in" / "screen.gif").write_bytes(bytes(gif))
    jpg = bytearray(encoded("JPEG", 16, 16))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    (root / "in" / "big.jpg").write_bytes(bytes(jpg))
    (root / "in" / "wide.png").write_bytes(png_bytes(100000, 1000, b"\x00" * 10))
    (root / "in" / "bomb.png").write_bytes(png_bytes(8192, 8192, b"\x00" * 100))  # within the default limit


def fifo_in_folder(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png")
    os.mkfifo(root / "in" / "pipe.png")


def fifo_latent(root: Path, ctx: Ctx) -> None:
    (root / "in").mkdir()
    os.mkfifo(root / "in" / "pipe.safetensors")
    os.mkfifo(root / "in" / "pipe.npy")


def fifo_at_output(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png")
    (root / "out").mkdir()
    os.mkfifo(root / "out" / "a.safetensors")


def special_files(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png")
    (root / "in" / "dangling.png").symlink_to(root / "nowhere.png")
    (root / "in" / "dev.png").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.relpath(root / "in" / "sock.png"))  # relative: AF_UNIX paths are limited to ~108 bytes
    sock.close()


def symlinks(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png")
    img(root, "elsewhere/b.png", seed=3)
    img(root, "elsewhere/dir/c.png", seed=4)
    (root / "in" / "b.png").symlink_to(root / "elsewhere" / "b.png")
    (root / "in" / "dir").symlink_to(root / "elsewhere" / "dir", target_is_directory=True)
    (root / "in" / "loop").symlink_to(root / "in", target_is_directory=True)


def many_images(root: Path, ctx: Ctx) -> None:
    for i in range(40):
        img(root, f"in/{i:02d}.png", 192, 192, seed=i)


def truncated_images(root: Path, ctx: Ctx) -> None:
    (root / "in").mkdir()
    rows = b"".join(b"\x00" + bytes([128] * 3 * 64) for _ in range(5))  # 5 of 64 rows, in a complete zlib stream
    files = {
        "short_rows.png": png_bytes(64, 64, rows),
        "no_iend.png": encoded("PNG")[:-12],
        "no_idat.png": png_bytes(64, 64, b"", idat=False),
        "cut_jpeg.jpg": encoded("JPEG", quality=90)[:-300],
        "no_eoi.jpg": encoded("JPEG", quality=90)[:-2],
        "cut_then_eoi.jpg": encoded("JPEG", 512, 512, quality=90)[:700] + b"\xff\xd9",
        "cut_webp.webp": encoded("WEBP")[:-40],
        "cut_gif.gif": encoded("GIF")[:-60],
        "cut_tiff.tif": encoded("TIFF")[:-100],
        "cut_bmp.bmp": encoded("BMP")[:-100],
    }
    for name, data in files.items():
        (root / "in" / name).write_bytes(data)
    img(root, "in/good.png")


def decoded_then_source_changed(root: Path, ctx: Ctx) -> None:
    encoded_folder(root, ctx)
    assert ctx.run("decode", "lat", "-o", "out", "--model", ctx.model) == 0
    img(root, "in/a.png", seed=99)  # the image changes, so does its latent
    assert ctx.run("encode", "in", "-o", "lat", "--model", ctx.model) == 0


def decoded_then_damaged(root: Path, ctx: Ctx) -> None:
    encoded_folder(root, ctx)
    assert ctx.run("decode", "lat", "-o", "out", "--model", ctx.model) == 0
    (root / "out" / "a.png").write_bytes(b"")
    data = (root / "out" / "sub" / "b.png").read_bytes()
    (root / "out" / "sub" / "b.png").write_bytes(data[: len(data) // 2])


def foreign_output(root: Path, ctx: Ctx) -> None:
    encoded_folder(root, ctx)
    img(root, "out/a.png", seed=5)  # the user's own picture where decode would write


def roundtrip_then_source_changed(root: Path, ctx: Ctx) -> None:
    two_images(root, ctx)
    assert ctx.run("roundtrip", "in", "-o", "out", "--model", ctx.model) == 0
    img(root, "in/a.png", seed=42)


def roundtrip_without_diff(root: Path, ctx: Ctx) -> None:
    two_images(root, ctx)
    assert ctx.run("roundtrip", "in", "-o", "out", "--model", ctx.model) == 0


def foreign_latent_output(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png")
    (root / "out").mkdir()
    save_file({"weights": torch.zeros(3)}, str(root / "out" / "a.safetensors"))


def bad_dtypes(root: Path, ctx: Ctx) -> None:
    z = torch.randn(4, 3, 3)
    d = root / "in"
    our_latent(d / "int8.safetensors", ctx, values=(z * 10).to(torch.int8))
    our_latent(d / "bool.safetensors", ctx, values=z > 0)
    our_latent(d / "uint8.safetensors", ctx, values=(z.abs() * 50).to(torch.uint8))
    save_file({"x": torch.complex(z, z)}, str(d / "complex.safetensors"))
    np.save(d / "ints.npy", np.zeros((4, 3, 3), np.int8))
    np.save(d / "cplx.npy", np.zeros((4, 3, 3), np.complex64))
    np.save(d / "bools.npy", np.zeros((4, 3, 3), bool))
    nan = z.clone()
    nan[0, 0, 0] = float("nan")
    np.save(d / "nan.npy", nan.numpy())
    our_latent(d / "inf.safetensors", ctx, values=torch.full((4, 3, 3), float("inf")))
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 100000, 100000), }"
    header += " " * (118 - len(header)) + "\n"
    (d / "huge.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64))


def nan_tiff(root: Path, ctx: Ctx) -> None:
    a = np.full((16, 16), 0.5, np.float32)
    a[3, 3] = np.nan
    (root / "in").mkdir()
    Image.fromarray(a, "F").save(root / "in" / "nan.tif")
    img(root, "in/ok.png")


def stale_temp_files(root: Path, ctx: Ctx) -> None:
    """Temp files of: a dead process of this host (removed), a live one of another container (kept),
    a day-old one of another host (removed)."""
    img(root, "in/a.png")
    from vaecli.files import temp_path

    (root / "out").mkdir()
    host = temp_path(root / "out" / "x").name.split(".tmp-")[1].split("-")[0]
    (root / "out" / f".a.safetensors.tmp-{host}-999999999-1-0123abcd").write_text("dead")
    (root / "out" / ".b.safetensors.tmp-0badf00d-1-1-0123abcd").write_text("in flight elsewhere")
    old = root / "out" / ".c.safetensors.tmp-0badf00d-2-1-0123abcd"
    old.write_text("abandoned elsewhere")
    day = time.time() - 2 * 86400
    os.utime(old, (day, day))


def hostile_names(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png")
    (root / "in" / "x\nerror: forged.png").write_bytes(b"not an image")
    (root / "in" / "\x1b[31mred\x1b[0m.png").write_bytes(b"not an image")
    (root / os.fsdecode(b"in/bad\xffbyte.png")).write_bytes(b"not an image")


def long_names(root: Path, ctx: Ctx) -> None:
    from vaecli.files import name_max

    limit = name_max(root)  # 255 on most file systems
    img(root, "in/" + "n" * (limit - 15) + ".png")  # output limit - 3 bytes: fits, its temp name is shortened
    img(root, "in/" + "m" * (limit - 8) + ".png", seed=2)  # output limit + 4 bytes: too long


def out_is_a_file(root: Path, ctx: Ctx) -> None:
    two_images(root, ctx)
    (root / "out").write_text("a file where the output folder should be")


# ----------------------------------------------------------------------------------------------- checks


def hostile_model(config: dict[str, Any] | None = None, damage: str = "") -> Callable[[Path, Ctx], None]:
    """A copy of the tiny model in `m/` with config.json fields replaced (raw JSON text, so NaN and strings
    go through as a file would hold them) or a weight damaged, beside two images in `in/`."""

    def build(root: Path, ctx: Ctx) -> None:
        import shutil

        from safetensors.torch import load_file

        shutil.copytree(ctx.model, root / "m")
        if config:
            cfg = json.loads((root / "m" / "config.json").read_text())
            cfg.update(config)
            (root / "m" / "config.json").write_text(json.dumps(cfg, allow_nan=True))
        if damage:
            path = root / "m" / "diffusion_pytorch_model.safetensors"
            state = load_file(str(path))
            key = "decoder.conv_out.weight"
            state[key] = state[key].fill_(float("nan")) if damage == "nan" else state[key].to(torch.int8)
            save_file(state, str(path))
        two_images(root, ctx)

    return build


def _notes(doc: dict[str, Any]) -> str:
    return json.dumps([i.get("notes", []) for i in doc.get("items", [])] + [doc.get("notes", [])])


def check_second_run_skips(root: Path, doc: dict[str, Any], err: str) -> None:
    assert doc["skipped"] == 0 and doc["ok"] == 2
    assert not (root / "in" / "recon" / "recon").exists()


def check_stale_note(root: Path, doc: dict[str, Any], err: str) -> None:
    assert (doc["ok"], doc["skipped"]) == (1, 1) and "stale" in _notes(doc)


def check_damaged_remade(root: Path, doc: dict[str, Any], err: str) -> None:
    assert doc["ok"] == 2 and "incomplete" in _notes(doc)
    for rel in ("out/a.png", "out/sub/b.png"):
        assert Image.open(root / rel).size == (24, 24)


def check_foreign_kept(root: Path, doc: dict[str, Any], err: str) -> None:
    assert (doc["ok"], doc["failed"]) == (1, 1)


def check_diff_added(root: Path, doc: dict[str, Any], err: str) -> None:
    assert doc["skipped"] == 2 and "error map" in _notes(doc)


def check_symlinks(root: Path, doc: dict[str, Any], err: str) -> None:
    notes = _notes(doc)
    assert doc["ok"] == 2 and "symlink" in notes and "not followed" in notes


def check_escaped(root: Path, doc: dict[str, Any], err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == doc["failed"] == 3, lines
    assert all(line.startswith("error: in/") for line in lines), lines
    assert "\x1b" not in err and "\\x1b" in err and "\\n" in err and "\\xff" in err


def check_interrupted(root: Path, doc: dict[str, Any], err: str) -> None:
    assert doc.get("interrupted") is True and doc["pending"] > 0
    from vaecli.latents import latent_is_complete

    finals = [p for p in (root / "out").iterdir() if not p.name.startswith(".")]
    assert len(finals) >= doc["ok"] > 0
    assert all(latent_is_complete(p) for p in finals)


def _errors(doc: dict[str, Any]) -> dict[str, str]:
    return {Path(i["input"]).name: i.get("error", "") for i in doc["items"]}


def check_special(root: Path, doc: dict[str, Any], err: str) -> None:
    errors = _errors(doc)
    assert "character device" in errors["dev.png"] and "socket" in errors["sock.png"]
    assert "broken symlink" in errors["dangling.png"] and doc["ok"] == 1


def check_truncated(root: Path, doc: dict[str, Any], err: str) -> None:
    errors = _errors(doc)
    assert doc["ok"] == 1 and doc["failed"] == len(errors) - 1 == 10
    for name, error in errors.items():
        assert name == "good.png" or "truncated" in error or "corrupt" in error, (name, error)


def check_declared(root: Path, doc: dict[str, Any], err: str) -> None:
    errors = _errors(doc)
    assert "above the limit" in errors["screen.gif"] and "above the limit" in errors["big.jpg"]
    assert "above the limit" in errors["wide.png"] and "truncated" in errors["bomb.png"]


def check_dtypes(root: Path, doc: dict[str, Any], err: str) -> None:
    errors = _errors(doc)
    expect = {
        "int8.safetensors": "dtype I8", "bool.safetensors": "dtype BOOL", "uint8.safetensors": "dtype U8",
        "complex.safetensors": "dtype C64", "ints.npy": "dtype int8", "cplx.npy": "dtype complex64",
        "bools.npy": "dtype bool", "nan.npy": "NaN or Inf", "inf.safetensors": "NaN or Inf",
        "huge.npy": "above the limit",
    }
    assert set(errors) == set(expect)
    for name, words in expect.items():
        assert words in errors[name], (name, errors[name])


def check_modes(root: Path, doc: dict[str, Any], err: str) -> None:
    for path in (root / "out").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o664, (path, oct(path.stat().st_mode))


# ------------------------------------------------------------------------- issue 11 leftovers (issue 14)

KOHYA = ("--dataset", "--format", "kohya", "--bucket-resolution", "32", "--bucket-step", "8", "--min-bucket-size", "16",
         "--max-bucket-size", "64")


def kohya_cache_beside_image(root: Path, ctx: Ctx) -> None:
    """in/a.npz is kohya's own cache of in/a.png (no vaecli marker): --kohya-next-to-images must keep it."""
    two_images(root, ctx)
    np.savez(root / "in" / "a.npz", latents=np.zeros((4, 3, 3), np.float32), original_size=np.array((24, 24)),
             crop_ltrb=np.array((0.0, 0.0, 24.0, 24.0)))


def same_stem_beside(root: Path, ctx: Ctx) -> None:
    img(root, "in/x.png", seed=1)
    img(root, "in/x.jpg", seed=2)


def non_utf8_name_then_gone(root: Path, ctx: Ctx) -> None:
    """A dataset made with --random-crop from an image whose name is not UTF-8; the image then vanishes, so
    the sharded rerun must decide which shard reports it (a hash of its name)."""
    img(root, "in/a.png", seed=1)
    odd = root / "in" / os.fsdecode(b"caf\xe9-\xff.png")
    img(root, os.path.relpath(odd, root), seed=2)
    assert ctx.run("encode", "in", "-o", "out", "--dataset", "--random-crop", *KOHYA[3:], "--model", ctx.model) == 0
    odd.unlink()


def check_symlink_note(root: Path, doc: dict[str, Any], stderr: str) -> None:
    assert any("not followed" in n and "dir" in n for n in doc["notes"]), doc["notes"]


def fifo_in_model_folder(name: str) -> Callable[[Path, Ctx], None]:
    """A copy of the tiny model in m/ whose `name` is a FIFO (a blocking read would hang forever)."""

    def build(root: Path, ctx: Ctx) -> None:
        import shutil

        shutil.copytree(ctx.model, root / "m")
        (root / "m" / name).unlink()
        os.mkfifo(root / "m" / name)
        two_images(root, ctx)

    return build


M = ("--model", "{model}")

CASES: list[Case] = [
    # issue 11 leftovers: foreign caches beside images, names that are not UTF-8, notes in dataset mode,
    # special files inside a model folder
    Case("kohya_cache_beside_image_kept", "stale", kohya_cache_beside_image,
         ("encode", "in", "-o", "out", *KOHYA, "--kohya-next-to-images", *M), 1,
         r"in/a\.npz already exists and it is not a vaecli latent file; pass --overwrite", exists=("in/sub/b.npz",)),
    Case("kohya_beside_same_stem", "claims", same_stem_beside,
         ("encode", "in", "-o", "out", *KOHYA, "--kohya-next-to-images", *M), 1, r"x\.npz is also (an|the) output of"),
    Case("dataset_non_utf8_names", "messages", non_utf8_name_then_gone,
         ("encode", "in", "-o", "out", "--dataset", "--random-crop", *KOHYA[3:], "--shard", "0/2", *M), 0,
         protect=("out/*",)),
    Case("dataset_symlinked_folder_noted", "special files", symlinks, ("encode", "--dataset", "in", "-o", "out", *M), 0,
         check=check_symlink_note),
    Case("fifo_weights_in_model_folder", "special files", fifo_in_model_folder("diffusion_pytorch_model.safetensors"),
         ("info", "m"), 2, r"m/diffusion_pytorch_model\.safetensors is a FIFO", timeout=30),
    Case("fifo_config_in_model_folder", "special files", fifo_in_model_folder("config.json"),
         ("encode", "in", "-o", "out", "--model", "m"), 2, r"m/config\.json is a FIFO", timeout=30, absent=("out",)),
    # 1. data loss: output folder = input folder, one inside the other, any spelling
    Case("roundtrip_into_input", "overlap", two_images, ("roundtrip", "in", "-o", "in", "--overwrite", *M), 2,
         "output folder in is the input folder"),
    Case("roundtrip_into_input_respelled", "overlap", two_images,
         ("roundtrip", "in", "-o", "./in/../in/", "--diff", *M), 2, "is the input folder", absent=("in/*.diff.png",)),
    Case("roundtrip_into_symlink_of_input", "overlap", symlinked_out,
         ("roundtrip", "in", "-o", "link", "--overwrite", *M), 2, "is the input folder"),
    Case("decode_into_latent_folder", "overlap", encoded_folder, ("decode", "lat", "-o", "lat", "--overwrite", *M), 2,
         "is the input folder", protect=("lat/**/*",), absent=("lat/*.png",)),
    Case("encode_into_input_folder", "overlap", two_images, ("encode", "in", "-o", "in", *M), 2,
         "is the input folder", absent=("in/*.safetensors",)),
    Case("encode_input_inside_output", "overlap", two_images, ("encode", "in/sub", "-o", "in", *M), 2,
         "lies inside the output folder", absent=("in/*.safetensors",)),
    Case("roundtrip_file_inside_output", "overlap", two_images,
         ("roundtrip", "in/a.png", "-o", "in", "--overwrite", *M), 2, "lies inside the output folder"),
    Case("dataset_into_input_folder", "overlap", two_images, ("encode", "--dataset", "in", "-o", "in", *M), 2,
         "is the input folder", absent=("in/manifest.jsonl",)),
    Case("output_inside_input_is_left_out", "overlap", two_images,
         ("roundtrip", "in", "-o", "in/recon", "--diff", *M), 0, exists=("in/recon/a.png", "in/recon/sub/b.diff.png"),
         absent=("in/recon/recon",), check=check_second_run_skips),
    Case("symlink_into_output", "overlap", link_into_out, ("roundtrip", "in", "-o", "out", "--overwrite", *M), 1,
         r"in/link\.png: is a symlink into the output folder", protect=("out/x.png",)),
    Case("output_is_a_hard_link_of_input", "overlap", hard_link_output,
         ("roundtrip", "in", "-o", "out", "--overwrite", *M), 1, r"is the input file in/a\.png",
         protect=("out/a.png",)),
    # 2. two inputs, one output (side files included)
    Case("diff_map_claimed_twice", "claims", diff_name_clash, ("roundtrip", "in", "-o", "out", "--diff", *M), 1,
         r"in/a\.png: its output out/a\.diff\.png is also an output of in/a\.diff\.png",
         exists=("out/a.diff.png", "out/a.diff.diff.png"), absent=("out/a.png",)),
    Case("same_stem_two_suffixes", "claims", lambda r, c: (img(r, "in/x.png"), img(r, "in/x.jpg", seed=3)),
         ("encode", "in", "-o", "out", *M), 1, "is also an output of"),
    Case("same_name_named_twice", "claims", same_stem_two_folders,
         ("encode", "in/a.png", "in/sub/a.png", "-o", "out", *M), 1, "is also an output of"),
    Case("dataset_flipped_file_claimed_twice", "claims", flipped_name_clash,
         ("encode", "--dataset", "in", "-o", "out", "--format", "comfyui", "--flip", "--bucket-resolution", "64",
          "--bucket-step", "64", *M), 1, r"out/a\.flipped\.latent is also an output of"),
    # 3. sizes from latent metadata
    Case("metadata_resize_12000", "metadata sizes",
         metadata(size_policy="resize", original_width="12000", original_height="12000"),
         ("decode", "in", "-o", "out", *M), 1, r"original was 12000x12000 \(resize\), which does not give",
         absent=("out/*",), isolate=True, max_rss_mb=1500),
    Case("metadata_negative_size", "metadata sizes", metadata(original_width="-24"), ("decode", "in", "-o", "out", *M),
         1, "'original_width' must be a positive whole number", absent=("out/*",)),
    Case("metadata_size_not_a_number", "metadata sizes", metadata(original_height="2.4e1"),
         ("decode", "in", "-o", "out", *M), 1, "'original_height' must be a positive whole number", absent=("out/*",)),
    Case("metadata_pad_size_inconsistent", "metadata sizes", metadata(original_width="40"),
         ("decode", "in", "-o", "out", *M), 1, "does not give the latent's", absent=("out/*",)),
    Case("metadata_encoded_size_inconsistent", "metadata sizes", metadata(encoded_width="2400"),
         ("decode", "in", "-o", "out", *M), 1, "'encoded_width' is 2400", absent=("out/*",)),
    Case("metadata_unknown_policy", "metadata sizes", metadata(size_policy="stretch"),
         ("decode", "in", "-o", "out", *M), 1, "unknown size policy", absent=("out/*",)),
    Case("metadata_crop_box_inconsistent", "metadata sizes", crop_meta, ("decode", "in", "-o", "out", *M), 1,
         "crop_ltrb", absent=("out/*",)),
    Case("metadata_size_above_max_pixels", "metadata sizes", metadata(),
         ("decode", "in", "-o", "out", "--max-pixels", "500", *M), 1, "above the limit", absent=("out/*",)),
    # 4. declared image sizes
    Case("png_bomb_175_bytes", "declared sizes", bomb_png, ("encode", "in", "-o", "out", *M), 1,
         "truncated image", absent=("out/*",)),
    Case("declared_sizes_above_max_pixels", "declared sizes", huge_declared, ("encode", "in", "-o", "out", *M), 1,
         "above the limit", absent=("out/*",), isolate=True, max_rss_mb=1500, check=check_declared),
    Case("image_above_max_pixels", "declared sizes", lambda r, c: img(r, "in/a.png", 100, 100),
         ("roundtrip", "in", "-o", "out", "--max-pixels", "5000", *M), 1, "--max-pixels 10000", absent=("out/*",)),
    # 6. special files, hangs, Ctrl-C
    Case("fifo_among_images", "special files", fifo_in_folder, ("encode", "in", "-o", "out", *M), 1,
         r"in/pipe\.png: is a FIFO \(named pipe\), not a regular file", exists=("out/a.safetensors",), timeout=30),
    Case("fifo_named_directly", "special files", fifo_in_folder, ("roundtrip", "in/pipe.png", *M), 1, "FIFO",
         timeout=30),
    Case("fifo_latents", "special files", fifo_latent, ("decode", "in", "-o", "out", "--scaling-factor", "1", *M), 1,
         "FIFO", absent=("out/*",), timeout=30),
    Case("fifo_at_output_path", "special files", fifo_at_output, ("encode", "in", "-o", "out", *M), 1,
         r"out/a\.safetensors is a FIFO", timeout=30),
    Case("device_socket_dangling", "special files", special_files, ("encode", "in", "-o", "out", *M), 1,
         "broken symlink", exists=("out/a.safetensors",), timeout=30, check=check_special),
    Case("fifo_as_model", "special files", lambda r, c: os.mkfifo(r / "model.safetensors"),
         ("info", "model.safetensors"), 2, "FIFO", timeout=30),
    Case("symlink_policy", "special files", symlinks, ("encode", "in", "-o", "out", *M), 0,
         exists=("out/a.safetensors", "out/b.safetensors"), absent=("out/dir", "out/loop"), check=check_symlinks,
         protect=("elsewhere/**/*",)),
    # Both runs hold a read that never returns (a stalled mount) at a later image, so they cannot finish first.
    Case("ctrl_c_during_run", "special files", many_images, ("encode", "in", "-o", "out", "-b", "1", *M), 130,
         "interrupted:", isolate=True, signal_after="out/05.safetensors", check=check_interrupted,
         env={"VAECLI_TEST_BLOCK_READ": "35.png"}),
    Case("ctrl_c_while_a_read_blocks", "special files", many_images, ("encode", "in", "-o", "out", "-b", "1", *M), 130,
         "interrupted:", isolate=True, signal_after="out/04.safetensors", check=check_interrupted,
         env={"VAECLI_TEST_BLOCK_READ": "05.png"}),
    # 7. truncated images
    Case("truncated_images", "truncated", truncated_images, ("encode", "in", "-o", "out", *M), 1,
         "truncated image", exists=("out/good.safetensors",), check=check_truncated,
         absent=tuple(f"out/{n}.safetensors" for n in ("short_rows", "no_iend", "no_idat", "cut_jpeg", "no_eoi",
                                                       "cut_then_eoi"))),
    # 8. stale outputs
    Case("decode_source_changed", "stale", decoded_then_source_changed, ("decode", "lat", "-o", "out", *M), 0,
         check=check_stale_note),
    Case("decode_damaged_outputs", "stale", decoded_then_damaged, ("decode", "lat", "-o", "out", *M), 0,
         check=check_damaged_remade),
    Case("decode_foreign_output_kept", "stale", foreign_output, ("decode", "lat", "-o", "out", *M), 1,
         r"out/a\.png already exists and it has no vaecli provenance record; pass --overwrite",
         protect=("out/a.png",), check=check_foreign_kept),
    Case("roundtrip_source_changed", "stale", roundtrip_then_source_changed, ("roundtrip", "in", "-o", "out", *M), 0,
         check=check_stale_note),
    Case("roundtrip_diff_added_later", "stale", roundtrip_without_diff, ("roundtrip", "in", "-o", "out", "--diff", *M),
         0, exists=("out/a.diff.png", "out/sub/b.diff.png"), check=check_diff_added),
    Case("encode_foreign_file_kept", "stale", foreign_latent_output, ("encode", "in", "-o", "out", *M), 1,
         "is not a vaecli latent file; pass --overwrite", protect=("out/a.safetensors",)),
    # 9. values
    Case("latent_dtypes_and_values", "values", bad_dtypes, ("decode", "in", "-o", "out", "--scaling-factor", "1", *M),
         1, "dtype I8; a latent must be", absent=("out/*",), check=check_dtypes),
    Case("nan_pixels", "values", nan_tiff, ("encode", "in", "-o", "out", *M), 1,
         r"in/nan\.tif: image holds NaN or Inf pixel values", exists=("out/ok.safetensors",)),
    Case("metadata_scaling_factor_zero", "values", metadata(latent_spec=json.dumps({"scaling_factor": 0})),
         ("decode", "in", "-o", "out", *M), 1, "scaling_factor must be a finite non-zero number", absent=("out/*",)),
    Case("metadata_scaling_factor_nan", "values",
         metadata(latent_spec='{"scaling_factor": NaN, "shift_factor": Infinity}'),
         ("decode", "in", "-o", "out", *M), 1, "scaling_factor must be a finite non-zero number", absent=("out/*",)),
    Case("metadata_latents_std_zero", "values",
         metadata(latent_spec=json.dumps({"scaling_factor": 1, "latents_mean": [0, 0, 0, 0],
                                          "latents_std": [1, 0, 1, 1]})),
         ("decode", "in", "-o", "out", *M), 1, "latents_std must be positive", absent=("out/*",)),
    Case("metadata_latent_spec_string", "values", metadata(latent_spec='{"scaling_factor": "0.18"}'),
         ("decode", "in", "-o", "out", *M), 1, "scaling_factor must be", absent=("out/*",)),
    Case("scaling_factor_flag_nan", "values", metadata(), ("decode", "in", "-o", "out", "--scaling-factor", "nan", *M),
         2, "--scaling-factor must be a finite, non-zero number", absent=("out",)),
    # 5 and 9. model configs and weights: refused before any model is built or any file written
    Case("config_layers_per_block_1e9", "model config", hostile_model({"layers_per_block": 1_000_000_000}),
         ("info", "m"), 2, r"layers_per_block must be an integer in \[1, 64\], not 1000000000", timeout=30),
    Case("config_layers_per_block_1e9_encode", "model config", hostile_model({"layers_per_block": 1_000_000_000}),
         ("encode", "in", "-o", "out", "--model", "m"), 2, "layers_per_block must be an integer", absent=("out/*",),
         timeout=30),
    Case("config_force_upcast_no", "model config", hostile_model({"force_upcast": "no"}),
         ("encode", "in", "-o", "out", "--model", "m", "--dtype", "fp16"), 2,
         "force_upcast must be true or false, not 'no'", absent=("out/*",)),
    Case("config_scaling_factor_zero", "model config", hostile_model({"scaling_factor": 0}),
         ("encode", "in", "-o", "out", "--model", "m"), 2, "scaling_factor must be a finite non-zero number, not 0",
         absent=("out/*",)),
    Case("config_nan_and_strings", "model config",
         hostile_model({"shift_factor": float("nan"), "latent_channels": "4"}),
         ("roundtrip", "in", "--model", "m"), 2, r"latent_channels must be an integer in \[1, 1024\], not '4'.*"
         r"shift_factor must be a finite number or null, not nan"),
    Case("config_not_these_weights", "model config", hostile_model({"layers_per_block": 3}),
         ("decode", "in/a.png", "-o", "out", "--model", "m", "--scaling-factor", "1"), 2,  # named: an item
         "the config does not describe these weights: layers_per_block 3 in the config, 1 in the weights",
         absent=("out/*",)),
    Case("weights_with_nan", "model config", hostile_model(damage="nan"), ("encode", "in", "-o", "out", "--model", "m"),
         2, r"1 tensor\(s\) hold NaN or Inf values \(a damaged file\?\): decoder\.conv_out\.weight", absent=("out/*",)),
    Case("weights_quantized", "model config", hostile_model(damage="int8"), ("roundtrip", "in", "--model", "m"), 2,
         r"are not floating point \(quantized weights are not supported\)"),
    # 10. temp files of other runs
    Case("temp_files_of_other_runs", "temp files", stale_temp_files, ("encode", "in", "-o", "out", *M), 0,
         exists=("out/a.safetensors", "out/.b.safetensors.tmp-0badf00d-1-1-0123abcd"),
         absent=("out/.a.safetensors.tmp-*", "out/.c.safetensors.tmp-*")),
    # 11. messages
    Case("hostile_file_names", "messages", hostile_names, ("encode", "in", "-o", "out", *M), 1, check=check_escaped),
    Case("names_near_the_limit", "messages", long_names, ("encode", "in", "-o", "out", *M), 1,
         "longer than the file system allows", exists=("out/nnnn*.safetensors",), absent=("out/mmm*", "out/.*")),
    Case("output_folder_is_a_file", "messages", out_is_a_file, ("encode", "in", "-o", "out", *M), 1,
         "cannot create the output folder out"),
    Case("unknown_option", "messages", two_images, ("encode", "in", "-o", "out", "--bogus", *M), 2,
         "No such option: --bogus", absent=("out",)),
    Case("missing_argument", "messages", two_images, ("decode", *M), 2, "Missing argument"),
    Case("bad_option_value", "messages", two_images, ("encode", "in", "-o", "out", "--batch-size", "x", *M), 2,
         "neither a positive integer nor 'auto'", absent=("out",)),
    Case("outputs_follow_umask", "messages", two_images, ("roundtrip", "in", "-o", "out", "--diff", *M), 0,
         umask=0o002, check=check_modes, exists=("out/a.png",)),
    Case("latents_follow_umask", "messages", two_images, ("encode", "in", "-o", "out", *M), 0,
         umask=0o002, check=check_modes, exists=("out/a.safetensors",)),
]


# ---------------------------------------------------------------------------------- issue 23 (round 2)


def no_inputs_broken_model(root: Path, ctx: Ctx) -> None:
    """in/ holds no file any command reads (a text file, a hidden image), and m/ is a model that cannot
    load: a run that loaded the model before looking for inputs would say so instead of "no inputs"."""
    (root / "in" / "sub").mkdir(parents=True)
    (root / "in" / "notes.txt").write_text("not an image")
    img(root, "in/.hidden.png")
    (root / "m").mkdir()
    (root / "m" / "config.json").write_text("{ this is not json")
    (root / "m" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")


NO_MODEL = ("--model", "m")

CASES += [
    # 8. "no inputs found" writes nothing and loads no model
    Case("no_inputs_encode", "no inputs", no_inputs_broken_model, ("encode", "in", "-o", "out", *NO_MODEL), 2,
         "no inputs found", absent=("out",)),
    Case("no_inputs_decode", "no inputs", no_inputs_broken_model, ("decode", "in", "-o", "out/deeper", *NO_MODEL), 2,
         "no inputs found", absent=("out",)),
    Case("no_inputs_roundtrip", "no inputs", no_inputs_broken_model,
         ("roundtrip", "in", "-o", "out", "--diff", *NO_MODEL), 2, "no inputs found", absent=("out",)),
    Case("no_inputs_dataset", "no inputs", no_inputs_broken_model,
         ("encode", "in", "in/sub", "-o", "out", "--dataset", *NO_MODEL), 2, "no inputs found", absent=("out",)),
]


def check_signalled(name: str) -> Callable[[Path, dict[str, Any], str], None]:
    def check(root: Path, doc: dict[str, Any], err: str) -> None:
        check_interrupted(root, doc, err)
        assert doc["error"] == f"interrupted ({name})", doc["error"]
        assert not [p for p in (root / "out").iterdir() if ".tmp-" in p.name]

    return check


def check_early(root: Path, doc: dict[str, Any], err: str) -> None:
    assert doc.get("interrupted") is True and doc["error"].startswith("interrupted ("), doc


CASES += [
    # 10. SIGTERM and SIGHUP end a run as Ctrl-C does: writes settled, temp files removed, the document, 128+N
    Case("sigterm_during_run", "signals", many_images, ("encode", "in", "-o", "out", "-b", "1", *M), 143,
         "interrupted:", isolate=True, signal_after="out/05.safetensors", signum=15,
         check=check_signalled("SIGTERM"), env={"VAECLI_TEST_BLOCK_READ": "35.png"}, absent=("out/.*",)),
    Case("sighup_while_a_read_blocks", "signals", many_images, ("encode", "in", "-o", "out", "-b", "1", *M), 129,
         "interrupted:", isolate=True, signal_after="out/04.safetensors", signum=1,
         check=check_signalled("SIGHUP"), env={"VAECLI_TEST_BLOCK_READ": "05.png"}, absent=("out/.*",)),
    # A write stalls with its temp file in place: the grace period ends, the temp file is removed.
    Case("sigterm_while_a_write_stalls", "signals", many_images, ("encode", "in", "-o", "out", "-b", "1", *M), 143,
         "interrupted:", isolate=True, signal_after="out/.06.safetensors.tmp-*", signum=15,
         check=check_signalled("SIGTERM"), env={"VAECLI_TEST_BLOCK_WRITE": "06.safetensors",
                                                "VAECLI_TEST_BLOCK_READ": "35.png"}, absent=("out/.*",)),
    Case("ctrl_c_while_a_write_stalls", "signals", many_images, ("roundtrip", "in", "-o", "out", "-b", "1", *M), 130,
         "interrupted:", isolate=True, signal_after="out/.06.png.tmp-*",
         env={"VAECLI_TEST_BLOCK_WRITE": "06.png", "VAECLI_TEST_BLOCK_READ": "35.png"}, absent=("out/.*",)),
    # 11. a signal while the CLI is still importing (typer, Rich, torch): the document, 128+N, no traceback
    Case("ctrl_c_during_startup", "signals", two_images, ("encode", "in", "-o", "out", *M), 130, "^interrupted:",
         isolate=True, signal_at=0.25, check=check_early, absent=("out",)),
    Case("sigterm_during_startup", "signals", two_images, ("roundtrip", "in", "-o", "out", *M), 143, "^interrupted:",
         isolate=True, signal_at=0.6, signum=15, check=check_early, absent=("out",)),
    # 40 images: the run cannot be over at 1.2 s, whether torch is still importing or the first items run
    Case("ctrl_c_while_torch_imports", "signals", many_images, ("encode", "in", "-o", "out", "-b", "1", *M), 130,
         "interrupted:", isolate=True, signal_at=1.2, check=check_early, absent=("out/.*",)),
]


def cafe_images(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png", seed=1)
    img(root, "in/café.png", seed=2)
    (root / "in" / "crème.png").write_bytes(b"not an image")


def check_quiet(root: Path, doc: dict[str, Any], err: str) -> None:
    assert err.strip() == "", err


def check_escaped_name(root: Path, doc: dict[str, Any], err: str) -> None:
    assert r"in/cr\xe8me.png" in err or r"in/cr\u00e8me.png" in err, err


CASES += [
    # 12. stdout closed, full, or cut short; a stdout that cannot encode a file name
    Case("stdout_closed_info_json", "streams", two_images, ("info", "{model}"), 1,
         r"^error: cannot write the JSON document to stdout \(stdout is closed\)", isolate=True, stdout="closed"),
    Case("stdout_full_info_json", "streams", two_images, ("info", "{model}"), 1,
         r"^error: cannot write the JSON document to stdout \(No space left on device\)", isolate=True, stdout="full"),
    Case("stdout_full_info_human", "streams", two_images, ("info", "{model}"), 1,
         r"^error: cannot write the output to stdout", isolate=True, stdout="full", json=False),
    Case("stdout_full_after_the_work", "streams", two_images, ("encode", "in", "-o", "out", *M), 1,
         r"^error: cannot write the JSON document to stdout", isolate=True, stdout="full",
         exists=("out/a.safetensors", "out/sub/b.safetensors"), absent=("out/.*",)),
    Case("stdout_reader_gone_human", "streams", two_images, ("roundtrip", "in", *M), 141, isolate=True,
         stdout="head:0", json=False, check=check_quiet),
    Case("stdout_reader_gone_json", "streams", two_images, ("encode", "in", "-o", "out", *M), 141, isolate=True,
         stdout="head:0", check=check_quiet, exists=("out/a.safetensors",)),
    Case("ascii_stdout_human", "streams", cafe_images, ("roundtrip", "in", "-o", "out", *M), 1, isolate=True,
         json=False, env={"PYTHONIOENCODING": "ascii"}, check=check_escaped_name, exists=("out/café.png",)),
    Case("ascii_stdout_json", "streams", cafe_images, ("encode", "in", "-o", "out", *M), 1, isolate=True,
         env={"PYTHONIOENCODING": "ascii"}, check=check_escaped_name, exists=("out/café.safetensors",)),
]


DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads


def deep_latent_header(root: Path, ctx: Ctx) -> None:
    """A latent whose safetensors header nests 100000 levels, and one whose latent_spec entry does."""
    (root / "in").mkdir()
    header = json.dumps({"latent": {"dtype": "F32", "shape": [4, 3, 3], "data_offsets": [0, 144]}})
    header = header[:-1] + ', "junk": ' + DEEP + "}"
    (root / "in" / "deep.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(144))
    our_latent(root / "in" / "spec.safetensors", ctx, latent_spec=DEEP)


def check_deep_latents(root: Path, doc: dict[str, Any], err: str) -> None:
    errors = _errors(doc)
    assert "nested more than 64 levels" in errors["deep.safetensors"], errors
    assert "'latent_spec' is JSON nested more than 64 levels" in errors["spec.safetensors"], errors


def deep_png_record(root: Path, ctx: Ctx) -> None:
    """decode's output out/a.png exists with a `vaecli` text record nested 100000 levels."""
    from PIL import PngImagePlugin

    encoded_folder(root, ctx)
    info = PngImagePlugin.PngInfo()
    info.add_text("vaecli", DEEP)
    (root / "out").mkdir()
    Image.new("RGB", (24, 24)).save(root / "out" / "a.png", pnginfo=info)


def deep_config(root: Path, ctx: Ctx) -> None:
    hostile_model()(root, ctx)
    (root / "m" / "config.json").write_text('{"latent_channels": 4, "junk": ' + DEEP + "}")


def huge_int_config(root: Path, ctx: Ctx) -> None:
    hostile_model()(root, ctx)
    cfg = json.loads((root / "m" / "config.json").read_text())
    text = json.dumps(cfg).replace('"scaling_factor": 0.18215', '"scaling_factor": 1' + "0" * 400)
    assert "0" * 400 in text
    (root / "m" / "config.json").write_text(text)


def dataset_then_deep_manifest_line(root: Path, ctx: Ctx) -> None:
    """A dataset whose manifest.jsonl gets a line nested 100000 levels deep, and whose latent for a.png is
    replaced by a file with such a header (garbage at an output path)."""
    two_images(root, ctx)
    assert ctx.run("encode", "in", "-o", "out", "--dataset", *KOHYA[3:], "--model", ctx.model) == 0
    with open(root / "out" / "manifest.jsonl", "a") as fh:
        fh.write(DEEP + "\n")
    latent = next((root / "out").rglob("a.safetensors"))
    header = '{"junk": ' + DEEP + "}"
    latent.write_bytes(struct.pack("<Q", len(header)) + header.encode())


def check_manifest_line(root: Path, doc: dict[str, Any], err: str) -> None:
    status = {Path(i["input"]).name: i["status"] for i in doc["items"]}
    assert status["a.png"] == "ok" and status["b.png"] in ("ok", "skipped"), status  # a: its garbage file remade
    assert any("manifest.jsonl: line(s) 3 unreadable" in n for n in doc["notes"]), doc["notes"]
    lines = (root / "out" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["source"] for line in lines)


CASES += [
    # 13. hostile file contents get a named reason, never "unexpected error"
    Case("deep_json_latent_headers", "file contents", deep_latent_header, ("decode", "in", "-o", "out", *M), 1,
         "nested more than 64 levels", check=check_deep_latents, absent=("out/*",)),
    Case("deep_json_png_record", "file contents", deep_png_record, ("decode", "lat", "-o", "out", *M), 1,
         r"out/a\.png already exists and it has no vaecli provenance record; pass --overwrite",
         protect=("out/a.png",), exists=("out/sub/b.png",)),
    Case("deep_json_png_record_overwrite", "file contents", deep_png_record,
         ("decode", "lat", "-o", "out", "--overwrite", *M), 0, exists=("out/a.png", "out/sub/b.png")),
    Case("deep_json_config", "file contents", deep_config, ("info", "m"), 2,
         r"m: its config\.json is nested too deeply"),
    Case("huge_int_scaling_factor_config", "file contents", huge_int_config,
         ("encode", "in", "-o", "out", "--model", "m"),
         2, r"m: its config\.json holds a number too large to use", absent=("out",)),
    Case("huge_int_scaling_factor_latent", "file contents",
         metadata(latent_spec='{"scaling_factor": 1' + "0" * 400 + "}"),
         ("decode", "in", "-o", "out", *M), 1, "scaling_factor must be a finite non-zero number", absent=("out/*",)),
    Case("deep_json_manifest_line", "file contents", dataset_then_deep_manifest_line,
         ("encode", "in", "-o", "out", "--dataset", *KOHYA[3:], "--overwrite", *M), 0, check=check_manifest_line),
    Case("deep_json_manifest_line_kept_output", "file contents", dataset_then_deep_manifest_line,
         ("encode", "in", "-o", "out", "--dataset", *KOHYA[3:], *M), 0, check=check_manifest_line),
    Case("enospc_in_safetensors_writer", "file contents", two_images, ("encode", "in", "-o", "out", *M), 1,
         r"in/a\.png: cannot write .*a\.safetensors: No space left on device \(the disk is full",
         isolate=True, env={"VAECLI_TEST_ENOSPC": "a.safetensors"}, exists=("out/sub/b.safetensors",),
         absent=("out/a.safetensors", "out/.*")),
]


def _tiff_with_short_strip(compression: str) -> bytes:
    """A TIFF (compressed by libtiff) whose StripByteCounts says 3 bytes: libtiff itself complains on stderr."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        buf, "TIFF", compression=compression)
    data = bytearray(buf.getvalue())
    (ifd,) = struct.unpack("<I", data[4:8])
    (n,) = struct.unpack("<H", data[ifd : ifd + 2])
    for i in range(n):
        e = ifd + 2 + 12 * i
        tag, kind, count = struct.unpack("<HHI", data[e : e + 8])
        if tag == 279 and count == 1:  # StripByteCounts, one strip
            data[e + 8 : e + 12] = struct.pack("<I", 3) if kind == 4 else struct.pack("<HH", 3, 0)
    return bytes(data)


def libtiff_complaints(root: Path, ctx: Ctx) -> None:
    (root / "in").mkdir()
    (root / "in" / "packbits.tif").write_bytes(_tiff_with_short_strip("packbits"))
    (root / "in" / "lzw.tif").write_bytes(_tiff_with_short_strip("tiff_lzw"))
    (root / "in" / "deflate.tif").write_bytes(_tiff_with_short_strip("tiff_adobe_deflate"))
    img(root, "in/good.png")


def check_tiff_lines(root: Path, doc: dict[str, Any], err: str) -> None:
    assert doc["failed"] == 3 and doc["ok"] == 1, doc
    assert "Decode" not in err and "TIFF" not in err, err  # libtiff's own lines are gone, ours stay


CASES += [
    # 15. libtiff's own stderr lines; batch sizes past any bound
    Case("libtiff_lines_captured", "streams", libtiff_complaints, ("encode", "in", "-o", "out", *M), 1,
         r"error: in/packbits\.tif: ", isolate=True, check=check_tiff_lines, exists=("out/good.safetensors",)),
    Case("bench_batch_size_huge", "messages", two_images, ("bench", "-r", "16", "-b", "99999999999999999999", *M), 2,
         r"99999999999999999999 is more than 4096 images per model call"),
    Case("encode_batch_size_huge", "messages", two_images, ("encode", "in", "-o", "out", "-b", "1e30", *M), 2,
         "neither a positive integer", absent=("out",)),
]


def file_and_folder_of_one_name(root: Path, ctx: Ctx) -> None:
    img(root, "in/a.png", seed=1)
    img(root, "in/a.safetensors/x.png", seed=2)
    img(root, "in/b.jpg", seed=3, format="JPEG")
    img(root, "in/b.png/y.png", seed=4)


def symlink_in_output_into_inputs(root: Path, ctx: Ctx) -> None:
    """out/sub is a symlink to in/sub: writing out/sub/b.png would write into the input folder."""
    two_images(root, ctx)
    (root / "out").mkdir()
    (root / "out" / "sub").symlink_to(root / "in" / "sub", target_is_directory=True)


def symlink_in_output_elsewhere(root: Path, ctx: Ctx) -> None:
    """out/sub/deep is a symlink to a folder outside everything; out itself may be a symlink (the root)."""
    img(root, "in/a.png", seed=1)
    img(root, "in/sub/deep/b.png", seed=2)
    (root / "elsewhere").mkdir()
    (root / "real_out" / "sub").mkdir(parents=True)
    (root / "real_out" / "sub" / "deep").symlink_to(root / "elsewhere", target_is_directory=True)
    (root / "out").symlink_to(root / "real_out", target_is_directory=True)


CASES += [
    # 6. one name claimed as an output file and as an output folder: the second fails before any work
    Case("output_file_and_folder_of_one_name", "claims", file_and_folder_of_one_name,
         ("encode", "in", "-o", "out", *M), 1,
         r"in/a\.safetensors/x\.png: its output out/a\.safetensors/x\.safetensors needs a folder out/a\.safetensors, "
         r"which is the output file of in/a\.png", exists=("out/a.safetensors", "out/b.safetensors"),
         absent=("out/a.safetensors/*",)),
    Case("output_file_and_folder_roundtrip", "claims", file_and_folder_of_one_name,
         ("roundtrip", "in", "-o", "out", *M), 1,
         r"in/b\.png/y\.png: its output out/b\.png/y\.png needs a folder out/b\.png, which is the output file of "
         r"in/b\.jpg", exists=("out/b.png", "out/a.png")),
    Case("output_folder_is_an_existing_file", "claims",
         lambda r, c: (two_images(r, c), (r / "out").mkdir(), (r / "out" / "sub").write_text("mine")),
         ("encode", "in", "-o", "out", *M), 1, r"needs a folder out/sub, but out/sub is a file",
         protect=("out/sub",), exists=("out/a.safetensors",)),
    # 7. a symlinked folder inside the output folder is never written through
    Case("symlink_in_output_into_inputs", "overlap", symlink_in_output_into_inputs,
         ("roundtrip", "in", "-o", "out", *M),
         1, r"in/sub/b\.png: its output out/sub/b\.png needs a folder out/sub, but out/sub is a symlink",
         exists=("out/a.png",), absent=("in/sub/b.png.*", "in/sub/.*")),
    Case("symlink_in_output_into_inputs_encode", "overlap", symlink_in_output_into_inputs,
         ("encode", "in", "-o", "out", "--overwrite", *M), 1, r"out/sub is a symlink",
         absent=("in/sub/b.safetensors",)),
    Case("symlink_in_output_into_inputs_dataset", "overlap", symlink_in_output_into_inputs,
         ("encode", "in", "-o", "out", "--dataset", *KOHYA[3:], *M), 1, r"out/sub is a symlink",
         absent=("in/sub/b.safetensors",)),
    Case("symlink_deep_in_output", "overlap", symlink_in_output_elsewhere, ("encode", "in", "-o", "out", *M), 1,
         r"out/sub/deep is a symlink", exists=("real_out/a.safetensors",), absent=("elsewhere/*",)),
]


def made_with_other_config(command: tuple[str, ...]) -> Callable[[Path, Ctx], None]:
    """Outputs made with the tiny model; m/ holds the same weights with another config (norm_num_groups 4
    instead of 8: no tensor changes, the computation does)."""

    def build(root: Path, ctx: Ctx) -> None:
        hostile_model({"norm_num_groups": 4})(root, ctx)
        if command[0] == "decode":
            assert ctx.run("encode", "in", "-o", "lat", "--model", ctx.model) == 0
        assert ctx.run(*command, "--model", ctx.model) == 0

    return build


def check_remade(root: Path, doc: dict[str, Any], err: str) -> None:
    assert doc["skipped"] == 0 and doc["ok"] == 2, doc
    notes = _notes(doc)
    assert "model config or weights" in notes or "re-encoded: changed settings_sha256" in notes, notes


CASES += [
    # 1. a model is its weights and its config: a config-only change remakes every output
    Case("config_change_remakes_roundtrip", "stale", made_with_other_config(("roundtrip", "in", "-o", "out")),
         ("roundtrip", "in", "-o", "out", "--model", "m"), 0, check=check_remade),
    Case("config_change_remakes_encode", "stale", made_with_other_config(("encode", "in", "-o", "out", "--raw")),
         ("encode", "in", "-o", "out", "--raw", "--model", "m"), 0, check=check_remade),
    Case("config_change_remakes_decode", "stale", made_with_other_config(("decode", "lat", "-o", "out")),
         ("decode", "lat", "-o", "out", "--model", "m"), 0, check=check_remade),
    Case("config_change_remakes_dataset", "stale", made_with_other_config(("encode", "in", "-o", "out", "--dataset",
                                                                           *KOHYA[3:])),
         ("encode", "in", "-o", "out", "--dataset", *KOHYA[3:], "--model", "m"), 0, check=check_remade),
]


def image_rewritten_while_read(root: Path, ctx: Ctx) -> None:
    """src/a.png is rewritten in place (another image) the moment its bytes have been read to the end
    (VAECLI_TEST_SWAP_AFTER_READ; outside in/, which the runner checks is never changed)."""
    img(root, "src/a.png", 32, 32, seed=1)
    img(root, "swap/new.png", 32, 32, seed=77)
    (root / "orig").mkdir()
    (root / "orig" / "a.png").write_bytes((root / "src" / "a.png").read_bytes())


def check_hash_is_of_decoded_bytes(root: Path, doc: dict[str, Any], err: str) -> None:
    """The latent holds the pixels of the bytes its source_sha256 names (the original), so the rerun, which
    finds the new image, remakes it."""
    import hashlib

    assert (root / "src" / "a.png").read_bytes() == (root / "swap" / "new.png").read_bytes()  # it was rewritten

    from safetensors import safe_open

    with safe_open(str(root / "out" / "a.safetensors"), "pt") as f:
        meta, z = f.metadata(), f.get_tensor("latent")
    assert meta["source_sha256"] == hashlib.sha256((root / "orig" / "a.png").read_bytes()).hexdigest()
    from vaecli.batch import encode_paths
    from vaecli.weights import load_vae

    vae = load_vae(meta["model_name"])
    encode_paths(vae, [root / "orig" / "a.png"], root / "ref")
    with safe_open(str(root / "ref" / "a.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("latent"), z), "the latent is not of the bytes its hash names"


CASES += [
    # 2. the bytes hashed are the bytes decoded, even when the file is rewritten while it is read
    Case("image_rewritten_while_read", "stale", image_rewritten_while_read, ("encode", "src", "-o", "out", *M), 0,
         isolate=True, env={"VAECLI_TEST_SWAP_AFTER_READ": "src/a.png:swap/new.png"},
         check=check_hash_is_of_decoded_bytes),
]


def repaint_keeping_record(path: Path) -> None:
    """New pixels in an output, its vaecli record (text chunk, JPEG comment) kept as it was."""
    from PIL import PngImagePlugin

    with Image.open(path) as im:
        fmt, info = im.format, dict(im.info)
        size = im.size
    new = Image.fromarray(np.random.default_rng(123).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if fmt == "PNG":
        png = PngImagePlugin.PngInfo()
        png.add_text("vaecli", info["vaecli"])
        new.save(path, pnginfo=png)
    else:
        new.save(path, format=fmt, comment=info["comment"], quality=95)


def roundtrip_then_repainted(root: Path, ctx: Ctx) -> None:
    two_images(root, ctx)
    assert ctx.run("roundtrip", "in", "-o", "out", "--model", ctx.model) == 0
    repaint_keeping_record(root / "out" / "a.png")


def decode_then_repainted(fmt: str) -> Callable[[Path, Ctx], None]:
    def build(root: Path, ctx: Ctx) -> None:
        encoded_folder(root, ctx)
        assert ctx.run("decode", "lat", "-o", "out", "--format", fmt, "--model", ctx.model) == 0
        repaint_keeping_record(root / "out" / f"a.{fmt}")

    return build


def check_repainted_remade(root: Path, doc: dict[str, Any], err: str) -> None:
    status = {Path(i["input"]).name: i for i in doc["items"]}
    a = status["a.png"] if "a.png" in status else status["a.safetensors"]
    assert a["status"] == "ok" and "pixels are not those its vaecli record names" in json.dumps(a["notes"]), a
    assert a.get("psnr", 0) < 100
    assert doc["skipped"] == 1  # the untouched output is still reused


CASES += [
    # 3. a reused output's record is tied to its pixels
    Case("roundtrip_output_repainted", "stale", roundtrip_then_repainted, ("roundtrip", "in", "-o", "out", *M), 0,
         check=check_repainted_remade),
    Case("decode_output_repainted", "stale", decode_then_repainted("png"), ("decode", "lat", "-o", "out", *M), 0,
         check=check_repainted_remade),
    Case("decode_jpeg_output_repainted", "stale", decode_then_repainted("jpg"),
         ("decode", "lat", "-o", "out", "--format", "jpg", *M), 0, check=check_repainted_remade),
]


def _first_scan_end(data: bytes) -> int:
    """Where the first scan's entropy-coded data of a JPEG ends (the next marker)."""
    import re

    sos = data.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    return re.compile(rb"\xff[^\x00\xd0-\xd7\xff]").search(data, start).start()


def _quarter_strip(data: bytes) -> bytes:
    """An uncompressed one-strip TIFF whose StripByteCounts covers a quarter of its rows."""
    data = bytearray(data)
    (ifd,) = struct.unpack("<I", data[4:8])
    (n,) = struct.unpack("<H", data[ifd : ifd + 2])
    for i in range(n):
        e = ifd + 2 + 12 * i
        tag, kind, count = struct.unpack("<HHI", data[e : e + 8])
        if tag == 279 and count == 1:
            value = struct.unpack_from("<I" if kind == 4 else "<H", data, e + 8)[0]
            data[e + 8 : e + 12] = struct.pack("<I", value // 4) if kind == 4 else struct.pack("<HH", value // 4, 0)
    return bytes(data)


def truncated_round_2(root: Path, ctx: Ctx) -> None:
    import io

    def jpeg(arr: np.ndarray, **save: Any) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", **save)
        return buf.getvalue()

    def tiff(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "TIFF")
        return buf.getvalue()

    (root / "in").mkdir()
    flat = np.full((256, 256, 3), 128, np.uint8)
    photo = np.asarray(Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8))
                       .resize((256, 256), Image.BILINEAR))
    prog = jpeg(photo, quality=90, progressive=True)
    flat_prog = jpeg(flat, quality=90, progressive=True)
    base = jpeg(flat, quality=90)
    gray, full_chroma = jpeg(flat[..., 0], quality=95), jpeg(flat, quality=95, subsampling=0)
    files = {
        "prog_after_dc.jpg": prog[: _first_scan_end(prog)] + b"\xff\xd9",
        "flat_prog_after_dc.jpg": flat_prog[: _first_scan_end(flat_prog)] + b"\xff\xd9",
        "flat_cut40.jpg": base[: len(base) * 2 // 5] + b"\xff\xd9",
        "flat_gray_cut40.jpg": gray[: len(gray) * 2 // 5] + b"\xff\xd9",
        "flat444_cut40.jpg": full_chroma[: len(full_chroma) * 2 // 5] + b"\xff\xd9",
        "quarter_rgb.tif": _quarter_strip(tiff(Image.fromarray(photo))),
        "quarter_float.tif": _quarter_strip(tiff(Image.fromarray(photo[..., 0].astype(np.float32) / 255, "F"))),
        # whole files of the same kinds: never refused
        "good_prog.jpg": prog,
        "good_flat.jpg": base,
        "good_flat_optimized.jpg": jpeg(flat, quality=90, optimize=True),
        "good_rgb.tif": tiff(Image.fromarray(photo)),
    }
    for name, data in files.items():
        (root / "in" / name).write_bytes(data)


def check_truncated_round_2(root: Path, doc: dict[str, Any], err: str) -> None:
    errors = _errors(doc)
    for name, error in errors.items():
        if name.startswith("good_"):
            assert not error, (name, error)
        else:
            assert "truncated image" in error, (name, error)
    assert doc["ok"] == 4 and doc["failed"] == 7, doc


CASES += [
    # 4. truncated images that decode without complaint: cut after the first progressive scan, a flat
    # baseline cut at 40% (both closed with EOI), an uncompressed TIFF strip holding a quarter of its rows
    Case("truncated_round_2", "truncated", truncated_round_2, ("encode", "in", "-o", "out", *M), 1, "truncated image",
         check=check_truncated_round_2, exists=("out/good_prog.safetensors", "out/good_rgb.safetensors"),
         absent=("out/prog_after_dc.safetensors", "out/flat_cut40.safetensors", "out/quarter_rgb.safetensors")),
]


def _tar(path: Path, members: list[tuple[str, bytes]], compress: str = "") -> None:
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:" + compress) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png_of(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tar_bombs(root: Path, ctx: Ctx) -> None:
    """gzip.tar: gzip data under a .tar name (64 MiB of zeros inside); big.tar: a plain tar whose sample 000
    has a 20 MiB side member and sample 002 a 17 MiB image member, beside a good sample 001."""
    _tar(root / "in" / "gzip.tar", [("000.png", _png_of(1)), ("000.json", bytes(64 << 20))], compress="gz")
    junk = _png_of(3) + bytes(17 << 20)  # an image member past the limit --max-pixels 5000 gives (16 MiB + 40 KB)
    _tar(root / "in" / "big.tar", [("000.png", _png_of(1)), ("000.bin", bytes(20 << 20)), ("001.png", _png_of(2)),
                                   ("001.txt", b"a caption"), ("002.png", junk)])


def check_tar_bombs(root: Path, doc: dict[str, Any], err: str) -> None:
    errors = json.dumps([i.get("error", "") for i in doc["items"]])
    assert "gzip-compressed data, not a tar archive" in errors, errors
    assert "000.bin declares 20,971,520 bytes, above the limit of 16,777,216 for side data" in errors, errors
    assert "002.png declares" in errors and "for an image (--max-pixels sets it)" in errors, errors
    assert doc["ok"] == 1 and doc["shards_failed"] == 1 and doc["shards_ok"] == 1, doc
    assert (root / "out" / "big.tar").stat().st_size < 1 << 20  # nothing unbounded was copied


CASES += [
    # 9. bombs inside tar shards: compressed data under .tar refused, members bounded before they are read
    Case("tar_shard_bombs", "declared sizes", tar_bombs,
         ("encode", "in/gzip.tar", "in/big.tar", "-o", "out", "--dataset", "--max-pixels", "5000", *KOHYA[3:], *M), 1,
         "gzip-compressed", isolate=True, max_rss_mb=900, check=check_tar_bombs, absent=("out/gzip.tar", "out/.*tmp*"),
         timeout=120),
]


def folder_past_path_max(root: Path, ctx: Ctx) -> None:
    """in/ holds a.png, sub/b.png and a chain of folders whose path grows past PATH_MAX (4096 on Linux), an
    image at its bottom: made level by level through directory descriptors, as no path can name it."""
    two_images(root, ctx)
    fd = os.open(root / "in", os.O_RDONLY)
    try:
        for i in range(25):  # 25 x 203 bytes
            name = f"{i:02d}" + "d" * 200
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        out = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, (root / "in" / "a.png").read_bytes())
        os.close(out)
    finally:
        os.close(fd)


CASES += [
    # 14. a folder nested past PATH_MAX is one failed item; the rest runs
    Case("folder_past_path_max", "special files", folder_past_path_max, ("encode", "in", "-o", "out", *M), 1,
         r"cannot read this folder: its path is longer than the system allows \(PATH_MAX\)",
         exists=("out/a.safetensors", "out/sub/b.safetensors")),
    Case("folder_past_path_max_roundtrip", "special files", folder_past_path_max, ("roundtrip", "in", *M), 1,
         r"\(PATH_MAX\)"),
    Case("folder_past_path_max_dataset", "special files", folder_past_path_max,
         ("encode", "in", "-o", "out", "--dataset", *KOHYA[3:], *M), 1, r"\(PATH_MAX\)"),
]


def case_and_unicode_twins(root: Path, ctx: Ctx) -> None:
    """in/A.png and in/a.png; café.png in NFC and in NFD (distinct names here, ext4); a folder vol/ that
    the run sees as a case- and normalization-insensitive volume (VAECLI_TEST_FOLDING_FS)."""
    import unicodedata

    img(root, "in/A.png", seed=1)
    img(root, "in/a.png", seed=2)
    img(root, "in/" + unicodedata.normalize("NFC", "café.png"), seed=3)
    img(root, "in/" + unicodedata.normalize("NFD", "café.png"), seed=4)
    (root / "vol").mkdir()


def check_two_claims_failed(root: Path, doc: dict[str, Any], err: str) -> None:
    assert doc["ok"] == 2 and doc["failed"] == 2, doc
    assert err.count("is also an output of") == 2, err


def check_kept_apart(root: Path, doc: dict[str, Any], err: str) -> None:
    from vaecli.discovery import name_folding

    assert name_folding(root / "out") == (False, False)  # the probe on this (ext4) file system, for real
    assert doc["ok"] == 4 and len(list((root / "out").iterdir())) == 4


FOLDING = {"VAECLI_TEST_FOLDING_FS": "vol"}

CASES += [
    # 5. names that a case- or normalization-insensitive volume folds together are one claim. CI has no such
    # file system (no FAT or casefold ext4 mount here): the probe's answer is simulated for folders named
    # vol (VAECLI_TEST_FOLDING_FS); the claim keys, and finding the file system of an output folder that
    # does not exist yet (its nearest existing parent), are the real code.
    Case("folding_fs_output_not_yet_there", "claims", case_and_unicode_twins, ("encode", "in", "-o", "vol/new/out", *M),
         1, "is also an output of", isolate=True, env=FOLDING, check=check_two_claims_failed),
    Case("folding_fs_output_is_the_volume", "claims", case_and_unicode_twins, ("roundtrip", "in", "-o", "vol", *M),
         1, "is also an output of", isolate=True, env=FOLDING, check=check_two_claims_failed),
    Case("case_sensitive_fs_keeps_twins_apart", "claims", case_and_unicode_twins, ("encode", "in", "-o", "out", *M), 0,
         check=check_kept_apart),
]
