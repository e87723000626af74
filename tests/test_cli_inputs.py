"""Bad and unusual inputs: each fails alone with one actionable line, or is converted properly."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cli_support import make_model, noise_image, run_cli, run_json
from vaecli.errors import InputError
from vaecli.io import read_image


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-vae"))


def png16_rgb(path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------ image modes


def test_sixteen_bit_gray_keeps_precision(tmp_path):
    values = np.array([[0, 257, 1000, 65535]], dtype=np.uint16).repeat(3, axis=0)
    for suffix in ("png", "tif"):
        path = tmp_path / f"g16.{suffix}"
        Image.fromarray(values).save(path)
        assert Image.open(path).mode.startswith("I")
        x = read_image(path)
        assert x.shape == (3, 4, 3) and x.dtype == np.float32
        np.testing.assert_allclose(x[0, :, 0], values[0] / 65535.0, rtol=1e-6)  # not clipped at 255


def test_sixteen_bit_rgb_png_scaled_to_8_bit(tmp_path):
    a = np.zeros((2, 3, 3), dtype=np.uint16)
    a[0, 0] = (65535, 32768, 256)
    png16_rgb(tmp_path / "rgb16.png", a)
    x = read_image(tmp_path / "rgb16.png")
    np.testing.assert_allclose(x[0, 0], [1.0, 128 / 255, 1 / 255], atol=1e-6)


def test_alpha_policies(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[0, 0, 3] = 0  # transparent
    rgba[0, 1, 3] = 255  # opaque
    rgba[1, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    white = read_image(tmp_path / "a.png", "white")
    black = read_image(tmp_path / "a.png", "black")
    drop = read_image(tmp_path / "a.png", "drop")
    np.testing.assert_allclose(white[0, 0], [1, 1, 1])
    np.testing.assert_allclose(black[0, 0], [0, 0, 0])
    np.testing.assert_allclose(drop[0, 0], [1, 0, 0])
    np.testing.assert_allclose(white[0, 1], [1, 0, 0])
    np.testing.assert_allclose(white[1, 0], [1, 127 / 255, 127 / 255], atol=1e-6)


@pytest.mark.parametrize(
    "mode,expect",
    [
        ("L", "gray"),
        ("LA", "white-bg"),
        ("CMYK", "rgb"),
        ("P-transparent", "white-bg"),
        ("I;16", "gray"),
        ("1", "gray"),
    ],
)
def test_modes_become_rgb(tmp_path, mode, expect):
    path = tmp_path / "m.png"
    if mode == "P-transparent":
        img = Image.new("P", (4, 4), 0)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.putpixel((1, 1), 1)
        img.save(path, transparency=0)
    elif mode == "CMYK":
        path = tmp_path / "m.jpg"
        Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(path)  # red
    elif mode == "LA":
        Image.new("LA", (4, 4), (0, 0)).save(path)
    elif mode == "I;16":
        Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, (4, 4), 1 if mode == "1" else 100).save(path)
    x = read_image(path)
    assert x.shape == (4, 4, 3) and 0 <= x.min() and x.max() <= 1
    if expect == "gray":
        assert np.allclose(x[..., 0], x[..., 1]) and np.allclose(x[..., 1], x[..., 2])
    if expect == "white-bg":
        np.testing.assert_allclose(x[0, 0], [1, 1, 1])
    if mode == "P-transparent":
        np.testing.assert_allclose(x[1, 1], [1, 0, 0])
    if mode == "I;16":
        np.testing.assert_allclose(x[0, 0, 0], 30000 / 65535, rtol=1e-6)
    if expect == "rgb":
        assert x[0, 0, 0] > 0.8 and x[0, 0, 1] < 0.2


def test_exif_orientation_applied(model, tmp_path):
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    (tmp_path / "in").mkdir()
    img.save(tmp_path / "in" / "r.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "in" / "r.jpg").shape == (40, 20, 3)
    assert run_cli("encode", tmp_path / "in", "-o", tmp_path / "lat", "--model", model).exit_code == 0
    assert run_cli("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model).exit_code == 0
    assert Image.open(tmp_path / "dec" / "r.png").size == (20, 40)


def test_formats_and_gif_first_frame(model, tmp_path):
    src = tmp_path / "in"
    noise_image(src / "a.bmp", 20, 20)
    noise_image(src / "b.tiff", 20, 20)
    noise_image(src / "c.jpeg", 20, 20)
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(src / "d.gif", save_all=True, append_images=frames[1:])
    np.testing.assert_allclose(read_image(src / "d.gif")[0, 0], [1, 0, 0])
    code, doc, _ = run_json("encode", src, "-o", tmp_path / "lat", "--model", model)
    assert code == 0 and doc["ok"] == 4


# ------------------------------------------------------------------------------------------ broken images


def test_broken_images_fail_alone(model, tmp_path):
    src = tmp_path / "in"
    good = noise_image(src / "good.png", 32, 32)
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("this is not a jpeg")
    data = good.read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    noise_image(src / "cut.jpg", 64, 64, quality=90)
    (src / "cut.jpg").write_bytes((src / "cut.jpg").read_bytes()[:300])
    code, doc, err = run_json("encode", src, "-o", tmp_path / "lat", "--model", model)
    assert code == 1
    status = {i["input"].rsplit("/", 1)[-1]: i for i in doc["items"]}
    assert status["good.png"]["status"] == "ok"
    assert (tmp_path / "lat" / "good.safetensors").is_file()
    for name, words in (
        ("empty.png", "empty file"),
        ("text.jpg", "not an image"),
        ("truncated.png", "truncated"),
        ("cut.jpg", "truncated"),
    ):
        assert status[name]["status"] == "failed", name
        assert words in status[name]["error"], (name, status[name]["error"])
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in err


def test_max_pixels(model, tmp_path):
    src = noise_image(tmp_path / "big.png", 100, 100)
    code, doc, _ = run_json("encode", src, "-o", tmp_path / "lat", "--model", model, "--max-pixels", "5000")
    assert code == 1 and "--max-pixels 10000" in doc["items"][0]["error"]
    code, doc, _ = run_json("encode", src, "-o", tmp_path / "lat", "--model", model, "--max-pixels", "10000")
    assert code == 0
    with pytest.raises(InputError, match="above the limit"):
        read_image(src, max_pixels=100)  # beyond PIL's own bomb threshold (2x) too


def test_unwritable_output(model, tmp_path):
    src = tmp_path / "in"
    noise_image(src / "a.png", 16, 16)
    noise_image(src / "b.png", 16, 16)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    code, doc, err = run_json("encode", src, "-o", blocker, "--model", model)
    assert code == 1 and doc["failed"] == 2 and "cannot create the output folder" in doc["items"][0]["error"]
    out = tmp_path / "out"
    (out / "a.safetensors").mkdir(parents=True)  # one output name taken by a folder
    code, doc, _ = run_json("encode", src, "-o", out, "--model", model)
    assert code == 1 and (doc["ok"], doc["failed"]) == (1, 1)


def test_output_collision(model, tmp_path):
    src = tmp_path / "in"
    noise_image(src / "x.png", 16, 16)
    noise_image(src / "x.jpg", 16, 16)
    code, doc, _ = run_json("encode", src, "-o", tmp_path / "lat", "--model", model)
    assert code == 1 and doc["ok"] == 1 and "rename" in doc["items"][1]["error"]


# ------------------------------------------------------------------------------------------ broken latents


def test_bad_latent_files(model, tmp_path):
    src = noise_image(tmp_path / "img" / "x.png", 16, 16)
    assert run_cli("encode", src, "-o", tmp_path / "good", "--model", model).exit_code == 0
    good = tmp_path / "good" / "x.safetensors"
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    lat = tmp_path / "lat"
    lat.mkdir()
    save_file({"other": torch.zeros(4, 2, 2)}, str(lat / "no_tensor.safetensors"), metadata=meta)
    save_file({"latent": torch.zeros(8, 2, 2)}, str(lat / "channels.safetensors"), metadata=meta)
    save_file({"latent": torch.zeros(2, 2)}, str(lat / "shape.safetensors"), metadata=meta)
    save_file({"a": torch.zeros(4, 2, 2), "b": torch.zeros(4, 2, 2)}, str(lat / "two.safetensors"))
    (lat / "empty.safetensors").write_bytes(b"")
    (lat / "trunc.safetensors").write_bytes(good.read_bytes()[:-40])
    np.save(lat / "ints.npy", np.zeros((4, 2, 2), dtype=np.int32))
    code, doc, err = run_json("decode", lat, "-o", tmp_path / "dec", "--model", model, "--scaling-factor", "1")
    assert code == 1 and doc["failed"] == 7 and doc["ok"] == 0
    errors = {i["input"].rsplit("/", 1)[-1]: i["error"] for i in doc["items"]}
    assert "'latent' tensor" in errors["no_tensor.safetensors"]
    assert "8 channels" in errors["channels.safetensors"]
    assert "shape (2, 2)" in errors["shape.safetensors"]
    assert "2 tensors" in errors["two.safetensors"]
    assert "empty file" in errors["empty.safetensors"]
    assert "safetensors" in errors["trunc.safetensors"]
    assert "dtype int32" in errors["ints.npy"]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 7


def test_debug_shows_traceback_of_model_load(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"junk")
    src = noise_image(tmp_path / "x.png", 8, 8)
    plain = run_cli("encode", src, "-o", tmp_path / "o", "--model", tmp_path / "m.safetensors")
    debug = run_cli("encode", src, "-o", tmp_path / "o", "--model", tmp_path / "m.safetensors", "--debug")
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr


def test_names_with_brackets_are_printed_verbatim(model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "[bold]x[red].png").write_bytes(b"junk")
    result = run_cli("encode", src, "-o", tmp_path / "lat", "--model", model)
    assert result.exit_code == 1 and "[bold]x[red].png" in result.stderr
