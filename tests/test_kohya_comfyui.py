"""Our kohya and ComfyUI files checked against what their readers do, and decoded back by `vaecli decode`.

The kohya side below is written by us from reading kohya-ss/sd-scripts at two commits, whose code agrees on
everything used here:
  main  48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16)
  v0.9.1 8f4ee8fc343b047965cd8976fca65c3a35b7593a (2025-03-21)
Files: library/train_util.py (load_image, BucketManager.select_bucket / get_crop_ltrb,
is_disk_cached_latents_is_expected: the v0.9.1 cache check, and get_image_size: imagesize, which reads the
stored size and ignores EXIF orientation), library/model_util.py (make_bucket_resolutions),
library/strategy_base.py (main: _default_is_disk_cached_latents_expected, _default_load_latents_from_disk),
library/config_util.py (dataset TOML fallbacks and defaults).
The ComfyUI side is nodes.py LoadLatent at comfyanonymous/ComfyUI e60e19b175f93f2c8fac037063de9f13259be9d4.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from cli_support import make_model, noise_image, run_cli, run_json
from vaecli import load_vae
from vaecli.dataset import read_manifest
from vaecli.io import read_image

KOHYA_MAIN = "48d368fa557731ad0488c07304dfeba8c07910eb"
KOHYA_V091 = "8f4ee8fc343b047965cd8976fca65c3a35b7593a"
COMFYUI = "e60e19b175f93f2c8fac037063de9f13259be9d4"
# kohya: --resolution 64 --min/max_bucket_reso --bucket_reso_steps
BUCKETS = dict(resolution=64, min_size=32, max_size=128, step=8)
FLAGS = ("--bucket-resolution", "64", "--min-bucket-size", "32", "--max-bucket-size", "128", "--bucket-step", "8")


# ------------------------------------------------------------------ kohya sd-scripts, as we read its code


def kohya_bucket_resos(max_reso, min_size, max_size, divisible):
    """model_util.make_bucket_resolutions."""
    max_area = max_reso[0] * max_reso[1]
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def kohya_select_bucket(resos, image_width, image_height):
    """BucketManager.select_bucket without no_upscale: returns (bucket (W, H), resized_size)."""
    aspect_ratio = image_width / image_height
    reso = (image_width, image_height)
    if reso not in set(resos):
        ar_errors = np.array([w / h for w, h in resos]) - aspect_ratio
        reso = resos[np.abs(ar_errors).argmin()]
    scale = reso[1] / image_height if aspect_ratio > reso[0] / reso[1] else reso[0] / image_width
    return reso, (int(image_width * scale + 0.5), int(image_height * scale + 0.5))


def kohya_crop_ltrb(bucket_reso, image_size):
    """BucketManager.get_crop_ltrb."""
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_width, resized_height = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        resized_width, resized_height = bucket_reso[0], bucket_reso[0] / image_ar
    crop_left = (bucket_reso[0] - resized_width) // 2
    crop_top = (bucket_reso[1] - resized_height) // 2
    return crop_left, crop_top, crop_left + resized_width, crop_top + resized_height


def kohya_image_size(path):
    """get_image_size: imagesize.get reads the size stored in the header (no EXIF orientation); so does PIL."""
    with Image.open(path) as img:
        return img.size


def kohya_load_image(path):
    """train_util.load_image(path, alpha=False)."""
    with Image.open(path) as image:
        if not image.mode == "RGB":
            image = image.convert("RGB")
        return np.array(image, np.uint8)


def kohya_v091_cache_ok(reso, npz_path, flip_aug, alpha_mask):
    """v0.9.1 is_disk_cached_latents_is_expected (False: kohya re-caches and overwrites the file)."""
    expected_latents_size = (reso[1] // 8, reso[0] // 8)
    npz = np.load(npz_path)
    if "latents" not in npz or "original_size" not in npz or "crop_ltrb" not in npz:
        return False
    if npz["latents"].shape[1:3] != expected_latents_size:
        return False
    if flip_aug and ("latents_flipped" not in npz or npz["latents_flipped"].shape[1:3] != expected_latents_size):
        return False
    return "alpha_mask" in npz if alpha_mask else "alpha_mask" not in npz


def kohya_main_cache_ok(npz_path, flip_aug, apply_alpha_mask):
    """main's strategy_base._default_is_disk_cached_latents_expected for SD/SDXL (no shape check: a wrong
    shape is accepted here and fails later in torch.stack)."""
    npz = np.load(npz_path)
    return ("latents" in npz and (not flip_aug or "latents_flipped" in npz)
            and (not apply_alpha_mask or "alpha_mask" in npz))


def kohya_main_load(npz_path):
    """main's _default_load_latents_from_disk with latents_stride None (SD/SDXL)."""
    npz = np.load(npz_path)
    flipped = npz["latents_flipped"] if "latents_flipped" in npz else None
    return npz["latents"], npz["original_size"].tolist(), npz["crop_ltrb"].tolist(), flipped


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-vae"))


def exif_rotated_jpeg(path: Path, w: int, h: int, orientation: int = 6) -> Path:
    """A JPEG stored w x h whose EXIF says to show it rotated (6: 90 degrees clockwise)."""
    noise_image(path, w, h)
    img = Image.open(path)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Rotated, transparent and odd-aspect images, and other modes kohya converts its own way."""
    root = tmp_path_factory.mktemp("images")
    exif_rotated_jpeg(root / "rotated.jpg", 96, 56)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = np.arange(64, dtype=np.uint8)[None] * 4  # colour under transparent pixels too
    rgba[..., 1], rgba[..., 2] = 200, np.arange(64, dtype=np.uint8)[:, None] * 3
    rgba[:, :32, 3] = 0
    rgba[:, 32:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "transparent.png")
    noise_image(root / "sub" / "odd.png", 150, 37)
    pal = Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64) % 16, "L").convert("P")
    pal.info["transparency"] = 3
    pal.save(root / "palette.png", transparency=3)
    noise_image(root / "gray-alpha.png", 40, 40, mode="LA")
    Image.fromarray(np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50).save(root / "deep.png")  # I;16
    return root


def _encode(model: str, inputs, out: Path, *extra: str) -> dict:
    code, doc, err = run_json("encode", *inputs, "-o", out, "--model", model, *extra)
    assert code == 0, err
    return doc


# --------------------------------------------------------------------------------------------- kohya


def test_kohya_pixels_are_what_kohya_loads(images):
    for path in sorted(p for p in images.rglob("*") if p.is_file()):
        ours = read_image(path, convention="kohya")
        theirs = kohya_load_image(path).astype(np.float32) / 255.0
        assert ours.shape == theirs.shape, path.name
        np.testing.assert_array_equal(ours, theirs, err_msg=path.name)


def test_kohya_cache_matches_kohyas_buckets_keys_and_dtypes(model, images, tmp_path):
    out = tmp_path / "cache"
    _encode(model, [images], out, "--dataset", "--format", "kohya", "--flip", *FLAGS)
    resos = kohya_bucket_resos((BUCKETS["resolution"],) * 2, BUCKETS["min_size"], BUCKETS["max_size"], BUCKETS["step"])
    records = {r["source"]: r for r in read_manifest(out / "manifest.jsonl")}
    assert len(records) == 6
    vae = load_vae(model)
    for source, rec in records.items():
        stored = kohya_image_size(images / source)
        bucket, resized = kohya_select_bucket(resos, *stored)
        npz_path = out / rec["latent"]
        assert rec["bucket"] == list(bucket) and rec["resized_size"] == list(resized), source
        assert kohya_v091_cache_ok(bucket, npz_path, flip_aug=True, alpha_mask=False), source
        assert kohya_main_cache_ok(npz_path, flip_aug=True, apply_alpha_mask=False), source
        latents, original_size, crop_ltrb, flipped = kohya_main_load(npz_path)
        assert latents.dtype == np.float32 and flipped.dtype == np.float32
        assert latents.shape == flipped.shape == (4, bucket[1] // 8, bucket[0] // 8), source
        assert np.load(npz_path)["original_size"].dtype == np.int64 and original_size == list(stored)
        assert np.load(npz_path)["crop_ltrb"].dtype == np.float64
        assert crop_ltrb == list(kohya_crop_ltrb(bucket, stored)), source
        assert "alpha_mask" not in np.load(npz_path)
    # The EXIF-rotated JPEG: kohya's bucket is that of the stored 96x56 pixels (landscape), not the shown 56x96.
    assert records["rotated.jpg"]["bucket"][0] > records["rotated.jpg"]["bucket"][1]
    # The transparent PNG is a bucket itself (no resize, no crop): its latent is the model's encoding of
    # exactly kohya's pixels (RGB kept under transparent pixels, alpha dropped).
    rec = records["transparent.png"]
    assert rec["bucket"] == [64, 64] and rec["crop"] == [0, 0, 64, 64]
    x = torch.from_numpy(kohya_load_image(images / "transparent.png")).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        want = vae.encode(x).mean[0]
    torch.testing.assert_close(torch.from_numpy(np.load(out / rec["latent"])["latents"]), want, atol=2e-5, rtol=1e-4)


def test_kohya_refuses_a_different_alpha_policy(model, images, tmp_path):
    for extra in (("--dataset",), ()):
        r = run_cli("encode", images / "transparent.png", "-o", tmp_path / "o", "--model", model, "--format", "kohya",
                    "--alpha", "white", *extra)
        assert r.exit_code == 2 and "--format kohya drops alpha, as kohya sd-scripts does" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_kohya_config_gives_the_same_cache_as_the_flags(model, images, tmp_path):
    config = _toml(tmp_path / "dataset.toml", f"""
[general]
enable_bucket = true
flip_aug = true

[[datasets]]
resolution = [64, 64]
min_bucket_reso = 36
max_bucket_reso = 128
bucket_reso_steps = 8

  [[datasets.subsets]]
  image_dir = "{images}"
  num_repeats = 2

[[datasets]]
resolution = 1024

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'elsewhere'}"
""")
    by_flags, by_config = tmp_path / "flags", tmp_path / "config"
    _encode(model, [images], by_flags, "--dataset", "--format", "kohya", "--flip", *FLAGS)
    _encode(model, [images], by_config, "--kohya-config", config)  # 36 rounds down to 32, as kohya does
    a, b = read_manifest(by_flags / "manifest.jsonl"), read_manifest(by_config / "manifest.jsonl")
    strip = ("encoded_at", "source_path", "latent")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in a]
            == [{k: v for k, v in r.items() if k not in strip} for r in b])
    r = run_cli("encode", images, "-o", tmp_path / "x", "--model", model, "--kohya-config", config, "--bucket-step",
                "16")
    assert r.exit_code == 2 and "--bucket-step 16 contradicts bucket_reso_steps = 8" in r.stderr, r.stderr


def test_kohya_config_without_buckets_and_refusals(model, images, tmp_path):
    one = _toml(tmp_path / "one.toml", f'[[datasets]]\nresolution = 48\n[[datasets.subsets]]\nimage_dir = "{images}"\n')
    out = tmp_path / "one"
    _encode(model, [images / "sub"], out, "--kohya-config", one)  # enable_bucket defaults to false in kohya
    rec = read_manifest(out / "manifest.jsonl")[0]
    assert rec["bucket"] == [48, 48] and np.load(out / rec["latent"])["latents"].shape == (4, 6, 6)
    for body, message in (
        ('[[datasets]]\nresolution = 64\nalpha_mask = true\n', "alpha_mask = true: not supported"),
        ('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "x"\nrandom_crop = true\n',
         "random_crop = true: not supported"),
        ('[[datasets]]\nresolution = [64, 32]\n', "only square resolutions"),
        ('[[datasets]]\nenable_bucket = true\nresolution = 64\nmin_bucket_reso = 128\n',
         "kohya needs min_bucket_reso 128 <= resolution 64"),
        ('[general]\nresolution = 64\n', "no [[datasets]]"),
        ('[[datasets]\n', "not valid TOML"),
    ):
        r = run_cli("encode", images, "-o", tmp_path / "x", "--model", model, "--kohya-config",
                    _toml(tmp_path / "bad.toml", body))
        assert r.exit_code == 2 and message in r.stderr, (body, r.stderr)
    r = run_cli("encode", images, "-o", tmp_path / "x", "--model", model, "--kohya-config", one, "--format", "comfyui")
    assert r.exit_code == 2 and "drop --format comfyui" in r.stderr


def test_kohya_next_to_images_keeps_a_foreign_npz(model, tmp_path):
    src = tmp_path / "in"
    noise_image(src / "a.png", 32, 32)
    noise_image(src / "b.png", 32, 32)
    theirs = src / "a.npz"
    np.savez(theirs, latents=np.zeros((4, 4, 4), np.float32), original_size=np.array((32, 32)),
             crop_ltrb=np.array((0.0, 0, 32, 32.0)))  # kohya's own cache (no vaecli marker)
    before = theirs.read_bytes()
    args = ("encode", src, "-o", tmp_path / "out", "--dataset", "--format", "kohya", "--kohya-next-to-images",
            "--model", model, *FLAGS)
    code, doc, err = run_json(*args)
    assert code == 1 and theirs.read_bytes() == before
    assert "already exists and it is not a vaecli latent file; pass --overwrite" in err
    assert (src / "b.npz").is_file() and doc["ok"] == 1
    code, doc, _ = run_json(*args)  # our own b.npz is ours: reused
    assert code == 1 and doc["skipped"] == 1 and theirs.read_bytes() == before
    code, doc, _ = run_json(*args, "--overwrite")
    assert code == 0 and theirs.read_bytes() != before


# ------------------------------------------------------------------------------------------- ComfyUI


def comfyui_list_latents(input_dir: Path) -> list[str]:
    """LoadLatent.INPUT_TYPES: only top-level files of the input folder ending in .latent."""
    return sorted(f for f in os.listdir(input_dir)
                  if os.path.isfile(os.path.join(input_dir, f)) and f.endswith(".latent"))


def comfyui_load(path: Path) -> torch.Tensor:
    """LoadLatent.load."""
    latent = safetensors.torch.load_file(str(path), device="cpu")
    multiplier = 1.0
    if "latent_format_version_0" not in latent:
        multiplier = 1.0 / 0.18215
    return latent["latent_tensor"].float() * multiplier


def test_comfyui_flat_export_is_what_load_latent_lists_and_reads(model, images, tmp_path):
    inputs = [images / "sub" / "odd.png", images / "transparent.png"]
    _encode(model, [images / "sub", images / "transparent.png"], tmp_path / "comfy", "--format", "comfyui", "--flat")
    assert comfyui_list_latents(tmp_path / "comfy") == ["odd.latent", "transparent.latent"]
    _encode(model, inputs, tmp_path / "raw", "--raw")
    for name in ("odd", "transparent"):
        keys = safetensors.torch.load_file(str(tmp_path / "comfy" / f"{name}.latent")).keys()
        assert sorted(keys) == ["latent_format_version_0", "latent_tensor"]
        samples = comfyui_load(tmp_path / "comfy" / f"{name}.latent")
        ours = safetensors.torch.load_file(str(tmp_path / "raw" / f"{name}.safetensors"))["latent"]
        assert samples.dtype == torch.float32 and samples.shape == (1, *ours.shape)
        torch.testing.assert_close(samples[0], ours, atol=0, rtol=0)  # raw latents, as LATENT holds them


def test_flat_names_claimed_once(model, tmp_path):
    noise_image(tmp_path / "in" / "a" / "x.png", 16, 16)
    noise_image(tmp_path / "in" / "b" / "x.png", 16, 16, seed=1)
    code, doc, err = run_json("encode", tmp_path / "in", "-o", tmp_path / "o", "--format", "comfyui", "--flat",
                              "--model", model)
    assert code == 1 and (doc["ok"], doc["failed"]) == (1, 1)
    assert "x.latent is also an output of" in err and os.listdir(tmp_path / "o") == ["x.latent"]


# -------------------------------------------------------------------------------------------- decode


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_decode_reads_our_exports_back_at_their_original_size(model, images, tmp_path):
    odd = images / "sub" / "odd.png"  # 150x37: padded to 152x40 when encoded, cropped back on decode
    _encode(model, [odd], tmp_path / "raw", "--raw")
    _encode(model, [odd], tmp_path / "comfy", "--format", "comfyui")
    _encode(model, [odd], tmp_path / "kohya", "--format", "kohya")
    code, doc, err = run_json("decode", tmp_path / "comfy", tmp_path / "kohya" / "odd.npz", "-o", tmp_path / "dec",
                              "--model", model)
    assert code == 1 and doc["ok"] == 1  # both want dec/odd.png: the second is refused (claims)
    for folder in ("raw", "comfy", "kohya"):
        code, _, err = run_json("decode", tmp_path / folder, "-o", tmp_path / f"dec-{folder}", "--model", model)
        assert code == 0, err
        assert Image.open(tmp_path / f"dec-{folder}" / "odd.png").size == (150, 37)
    np.testing.assert_array_equal(_png(tmp_path / "dec-comfy" / "odd.png"), _png(tmp_path / "dec-raw" / "odd.png"))
    # kohya's pixels of an RGB PNG are ours: the same image comes back
    np.testing.assert_array_equal(_png(tmp_path / "dec-kohya" / "odd.png"), _png(tmp_path / "dec-raw" / "odd.png"))


def test_decode_reads_dataset_caches_at_their_bucket_size(model, images, tmp_path):
    for fmt in ("kohya", "comfyui"):
        out = tmp_path / fmt
        _encode(model, [images], out, "--dataset", "--format", fmt, *FLAGS)
        code, doc, err = run_json("decode", out, "-o", tmp_path / f"dec-{fmt}", "--model", model)
        assert code == 0 and doc["ok"] == 6, err
        for rec in read_manifest(out / "manifest.jsonl"):
            png = tmp_path / f"dec-{fmt}" / Path(rec["latent"]).with_suffix(".png")
            assert list(Image.open(png).size) == rec["bucket"]
    other = make_model(tmp_path / "other", seed=1)
    code, doc, err = run_json("decode", tmp_path / "kohya", "-o", tmp_path / "dec-other", "--model", other)
    assert code == 1 and doc["failed"] == 6 and "made by another model" in err


def test_decode_reads_files_kohya_and_comfyui_wrote(model, tmp_path):
    torch.manual_seed(0)
    z = torch.randn(4, 5, 7)  # raw latents, bucket 56x40
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "bare.npy", z.numpy())
    # kohya's save_latents_to_disk
    np.savez(src / "kohya.npz", latents=z.numpy(), original_size=np.array((100, 70)),
             crop_ltrb=np.array(kohya_crop_ltrb((56, 40), (100, 70))))
    # ComfyUI SaveLatent, and a file of its first format (no marker: SD-scaled values)
    safetensors.torch.save_file({"latent_tensor": z[None], "latent_format_version_0": torch.tensor([])},
                                src / "comfy.latent")
    safetensors.torch.save_file({"latent_tensor": z[None] * 0.18215}, src / "legacy.latent")
    code, doc, err = run_json("decode", src, "-o", tmp_path / "dec", "--model", model, "--scaling-factor", "1")
    assert code == 0, err  # --scaling-factor 1 says the bare .npy is raw; it overrides the others' rules too
    code, doc, err = run_json("decode", src / "kohya.npz", src / "comfy.latent", src / "legacy.latent", "-o",
                              tmp_path / "dec2", "--model", model)
    assert code == 0 and doc["ok"] == 3, err  # their own conventions: no flag needed
    want = _png(tmp_path / "dec" / "bare.png")
    assert want.shape == (40, 56, 3)
    for name in ("kohya", "comfy"):
        np.testing.assert_array_equal(_png(tmp_path / "dec2" / f"{name}.png"), want)
    legacy = _png(tmp_path / "dec2" / "legacy.png").astype(int)
    assert np.abs(legacy - want).max() <= 1  # z * 0.18215 / 0.18215 in float32


def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def test_decode_checks_what_kohya_and_comfyui_files_hold(model, images, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    z = np.zeros((4, 5, 7), np.float32)
    _npz(src / "negative.npz", latents=z, original_size=np.array((-100, 70)), crop_ltrb=np.array((0.0, 0, 56, 40)))
    _npz(src / "outside.npz", latents=z, original_size=np.array((100, 70)), crop_ltrb=np.array((0.0, 0, 560, 40)))
    _npz(src / "nokeys.npz", latents=z)
    _npz(src / "ints.npz", latents=z.astype(np.int32), original_size=np.array((100, 70)),
         crop_ltrb=np.array((0, 0, 56, 40)))
    safetensors.torch.save_file({"latent_tensor": torch.zeros(2, 4, 5, 7), "latent_format_version_0": torch.tensor([])},
                                src / "batch.latent")
    # a kohya export of ours whose metadata was altered to claim a 12000x12000 original (resize policy)
    _encode(model, [images / "sub" / "odd.png"], tmp_path / "k", "--format", "kohya")
    with np.load(tmp_path / "k" / "odd.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["vaecli_meta"]))
    meta.update(size_policy="resize", original_width="12000", original_height="12000")
    arrays["vaecli_meta"] = np.array(json.dumps(meta))
    _npz(src / "forged.npz", **arrays)
    # a latent whose .npy header declares a huge shape, with no data behind it: refused from the header
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (4, 30000, 30000)})
    with zipfile.ZipFile(src / "huge.npz", "w") as zf:
        zf.writestr("latents.npy", header.getvalue())  # magic and header, no data
        zf.writestr("original_size.npy", _npy(np.array((1, 1))))
        zf.writestr("crop_ltrb.npy", _npy(np.array((0.0, 0, 1, 1))))
    code, doc, err = run_json("decode", src, "-o", tmp_path / "dec", "--model", model)
    assert code == 1 and doc["ok"] == 0
    errors = {Path(i["input"]).name: i["error"] for i in doc["items"]}
    assert "original_size must be two positive whole numbers" in errors["negative.npz"]
    assert "does not lie within the latent's 56x40 pixels" in errors["outside.npz"]
    assert "not a kohya latent cache: it lacks original_size, crop_ltrb" in errors["nokeys.npz"]
    assert "a latent must be fp16, fp32 or fp64" in errors["ints.npz"]
    assert "holds a batch of 2 latents" in errors["batch.latent"]
    assert "original was 12000x12000" in errors["forged.npz"] or "above the limit" in errors["forged.npz"]
    assert "above the limit" in errors["huge.npz"] and "--max-pixels" in errors["huge.npz"]
    assert not list((tmp_path / "dec").glob("*.png"))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
