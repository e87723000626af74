"""Units behind issue 11's guarantees: truncation at every cut point, Pillow's global guard left alone,
provenance per output format, temp names, fsync, interruption, messages."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cli_support import make_model, noise_image, run_json
from vaecli.errors import InputError, Interrupted
from vaecli.io import image_output_state, read_image

FORMATS = [
    ("png", "PNG", {}),
    ("jpg", "JPEG", {"quality": 90}),
    ("jpg", "JPEG", {"quality": 90, "progressive": True}),
    ("webp", "WEBP", {"quality": 90}),
    ("webp", "WEBP", {"lossless": True}),
    ("gif", "GIF", {}),
    ("tif", "TIFF", {}),
    ("tif", "TIFF", {"compression": "tiff_deflate"}),
    ("bmp", "BMP", {}),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-vae"))


def _encoded(fmt: str, save: dict, w: int = 61, h: int = 47) -> bytes:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("load_truncated", [False, True], ids=["pillow-default", "host-sets-LOAD_TRUNCATED_IMAGES"])
@pytest.mark.parametrize("suffix,fmt,save", FORMATS, ids=[f"{f}-{'-'.join(s) or 'plain'}" for _, f, s in FORMATS])
def test_every_cut_point_is_an_error(tmp_path, monkeypatch, suffix, fmt, save, load_truncated):
    """A file cut anywhere fails, whatever the host set in Pillow (the GIF trailer byte alone is no data)."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    data = _encoded(fmt, save)
    path = tmp_path / f"x.{suffix}"
    path.write_bytes(data)
    full = read_image(path)
    assert full.shape == (47, 61, 3)
    cuts = sorted(set(range(1, len(data), max(1, len(data) // 60))) | set(range(max(1, len(data) - 24), len(data))))
    accepted = []
    for cut in cuts:
        path.write_bytes(data[:cut])
        try:
            read_image(path)
            accepted.append(cut)
        except InputError as exc:
            assert "truncated" in str(exc) or "corrupt" in str(exc) or "not an image" in str(exc), str(exc)
    allowed = {len(data) - 1} if fmt == "GIF" else set()  # only the trailer byte 0x3B missing
    assert set(accepted) <= allowed, accepted


def test_short_rows_and_spliced_end_markers(tmp_path):
    """Data that stops early inside a well-formed container: a complete zlib stream with too few rows; a
    JPEG cut short and closed with an end-of-image marker."""
    from hostile_corpus import png_bytes

    rows = b"".join(b"\x00" + bytes(3 * 32) for _ in range(4))
    (tmp_path / "rows.png").write_bytes(png_bytes(32, 32, rows))
    with pytest.raises(InputError, match=r"image data ends early \(388 of 3104 bytes\)"):
        read_image(tmp_path / "rows.png")
    big = _encoded("JPEG", {"quality": 95}, 800, 600)
    (tmp_path / "spliced.jpg").write_bytes(big[:1000] + b"\xff\xd9")
    with pytest.raises(InputError, match=r"its 800x600 frame.s blocks need at the least|too few for its 800x600 frame"):
        read_image(tmp_path / "spliced.jpg")


@pytest.mark.parametrize("w,h", [(8, 8), (1, 1), (13, 5), (3, 17)])
def test_interlaced_png_row_count(tmp_path, w, h):
    """Adam7: exactly the bytes of the seven passes decode; one byte short is truncation."""
    import struct
    import zlib

    from vaecli.integrity import png_data_size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    def png(n: int) -> bytes:
        head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1))
        return b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", zlib.compress(bytes(n))) + chunk(b"IEND", b"")

    size = png_data_size(w, h, 8, 2, 1)
    if (w, h) == (8, 8):
        assert size == 207  # 4 + 4 + 7 + 14 + 26 + 52 + 100
    (tmp_path / "ok.png").write_bytes(png(size))
    assert read_image(tmp_path / "ok.png").shape == (h, w, 3)
    (tmp_path / "short.png").write_bytes(png(size - 1))
    with pytest.raises(InputError, match="ends early"):
        read_image(tmp_path / "short.png")


def test_pillow_guard_is_left_to_the_host(tmp_path, monkeypatch):
    """Our limit decides; Pillow's global MAX_IMAGE_PIXELS is never changed (nor consulted) by vaecli."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a host that set a tiny limit for its own reads
    path = noise_image(tmp_path / "x.png", 50, 50)
    assert read_image(path, max_pixels=0).shape == (50, 50, 3)
    with pytest.raises(InputError, match="--max-pixels 2500"):
        read_image(path, max_pixels=2000)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(Image.DecompressionBombError):  # the host's own reads are still guarded
        Image.open(path)


def test_only_our_formats_are_opened(tmp_path):
    """An EPS (Ghostscript) or PSD named .png is refused, not handed to its Pillow plugin."""
    (tmp_path / "x.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(InputError, match="not an image, or an unsupported format"):
        read_image(tmp_path / "x.png")


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_provenance_per_format(model, tmp_path, fmt):
    src = noise_image(tmp_path / "in" / "x.png", 24, 16)
    assert run_json("encode", src.parent, "-o", tmp_path / "lat", "--model", model)[0] == 0
    args = ("decode", tmp_path / "lat", "-o", tmp_path / "out", "--model", model, "--format", fmt)
    code, first, _ = run_json(*args)
    state = image_output_state(tmp_path / "out" / f"x.{fmt}")
    assert code == 0 and first["ok"] == 1 and state.status == "ours", state
    assert state.record["kind"] == "decode" and len(state.record["source_sha256"]) == 64
    assert run_json(*args)[1]["skipped"] == 1
    if fmt != "png":
        code, third, _ = run_json(*args, "--quality", "80")
        assert third["ok"] == 1 and "quality" in third["items"][0]["notes"][0]


def test_dataset_latents_decode(model, tmp_path):
    """Dataset files (crop in resized coordinates) pass the metadata checks and decode at bucket size."""
    src = tmp_path / "in"
    noise_image(src / "wide.png", 100, 60, seed=1)
    noise_image(src / "tall.png", 50, 90, seed=2)
    code, _, _ = run_json("encode", "--dataset", src, "-o", tmp_path / "ds", "--model", model,
                          "--bucket-resolution", "64", "--bucket-step", "16", "--random-crop", "--flip")
    assert code == 0
    code, doc, err = run_json("decode", tmp_path / "ds", "-o", tmp_path / "dec", "--model", model)
    assert code == 0 and doc["ok"] == 2, err
    manifest = [json.loads(line) for line in (tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()]
    buckets = {Path(r["latent"]).stem: tuple(r["bucket"]) for r in manifest}
    for item in doc["items"]:
        assert Image.open(item["output"]).size == buckets[Path(item["output"]).stem]


def test_temp_names_fit_and_are_recognised(tmp_path):
    from vaecli.files import is_temp_name, name_max, temp_path

    limit = name_max(tmp_path)
    for name in ("a" * limit, "é" * (limit // 2), "x.png"):
        tmp = temp_path(tmp_path / name)
        assert len(os.fsencode(tmp.name)) <= limit and is_temp_name(tmp.name)
        tmp.write_bytes(b"ok")  # the file system accepts it


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    import vaecli.files as files

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real(fd)))
    files.atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"data"))
    import stat

    assert [stat.S_ISREG(m) for m in synced] == [True, False]  # the temp file before the rename, the folder after
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    synced.clear()
    with files.folder_syncs_deferred():  # a run: the folder once, at its end
        for name in ("a", "b", "c"):
            files.atomic_write(tmp_path / name, lambda tmp: tmp.write_bytes(b"data"))
        assert [stat.S_ISREG(m) for m in synced] == [True, True, True]
    assert [stat.S_ISREG(m) for m in synced] == [True, True, True, False]


def test_unwritable_output_fails_every_item_before_the_model_runs(model, tmp_path, monkeypatch):
    import vaecli.discovery as discovery

    def refuse(folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(discovery, "probe_writable", refuse)
    noise_image(tmp_path / "in" / "a.png", 16, 16)
    noise_image(tmp_path / "in" / "b.png", 16, 16)
    code, doc, err = run_json("encode", tmp_path / "in", "-o", tmp_path / "out", "--model", model)
    assert code == 1 and doc["failed"] == 2 and doc["images_per_s"] in (0, 0.0, None)
    assert all("cannot write in the output folder" in i["error"] for i in doc["items"])


def test_interrupt_keeps_finished_items(model, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a run: Interrupted carries the finished items; their files are complete."""
    from vaecli import batch
    from vaecli.latents import latent_is_complete
    from vaecli.pipeline import Runner

    for i in range(6):
        noise_image(tmp_path / "in" / f"{i}.png", 16, 16, seed=i)
    calls = []
    real = Runner.submit_encode

    def submit_encode(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Runner, "submit_encode", submit_encode)
    from vaecli.weights import load_vae

    with pytest.raises(Interrupted) as info:
        batch.encode_paths(load_vae(model), [tmp_path / "in"], tmp_path / "out", batch.EncodeOptions(batch_size=1))
    done = [r for r in info.value.results if r.status == "ok"]
    assert len(done) == 2 and all(latent_is_complete(tmp_path / "out" / f"{i}.safetensors") for i in (0, 1))
    assert not (tmp_path / "out" / "2.safetensors").exists()


def test_non_finite_output_messages(model):
    """NaN input is named as such; a NaN output from finite input blames the weights."""
    from vaecli.pipeline import Runner
    from vaecli.weights import load_vae

    vae = load_vae(model)
    x = torch.rand(2, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    result = Runner(vae).encode(x)
    assert "input holds NaN" in result.failed[0] and 1 not in result.failed
    with torch.no_grad():
        for p in vae.parameters():
            p.fill_(float("nan"))
    broken = Runner(vae).encode(torch.rand(1, 3, 16, 16))
    assert "weights are probably broken" in broken.failed[0]


def test_printable_escapes_what_could_forge_lines():
    from vaecli.cli import printable

    assert printable("plain name.png") == "plain name.png"
    assert printable("a\nerror: b") == "a\\nerror: b"
    assert printable("\x1b[31mred\u202e") == "\\x1b[31mred\\u202e"
    assert printable(os.fsdecode(b"bad\xff")) == "bad\\xff"


@pytest.mark.parametrize("layout", ["tar", "parquet"])
def test_shard_writers_fsync_before_and_after_their_rename(layout, tmp_path, monkeypatch):
    """Output shards are published as atomic_write publishes a file: data fsynced, renamed, folder fsynced."""
    import stat

    import vaecli.files as files
    from vaecli.dataset.formats import open_sink

    if layout == "parquet":
        pytest.importorskip("pyarrow")
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync",
                        lambda fd: (events.append("file" if stat.S_ISREG(os.fstat(fd).st_mode) else "folder"),
                                    real_fsync(fd)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    target = tmp_path / f"00000.{layout}"
    sink = open_sink(layout, target, None)
    sink.publish()
    assert events == ["file", "rename", "folder"] and target.is_file()
    assert not [p for p in tmp_path.iterdir() if p != target]  # no temp file left
