"""musubi-tuner latent caches (vaecli/latents/musubi.py): files its trainer reads as its own.

The reader below re-implements, in a few lines, what kohya-ss/musubi-tuner does with a cache file (read at
commit 30c658c4f4b0bf05038b3346eff9670259b10fc7): our files must come through it as the exact tensors its
own cache step would have stored.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vaecli.config import Flux2Config, LatentSpec
from vaecli.errors import ConfigError, InputError
from vaecli.latents import musubi
from vaecli.models.qwenimage_config import QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, QwenImageConfig

TORCH_DTYPE_NAMES = ("float8_e4m3fn", "bfloat16", "float32", "float16", "float64")  # longest first, as theirs


def musubi_find(folder: Path, short: str) -> list[tuple[str, tuple[int, int], Path]]:
    """src/musubi_tuner/dataset/image_video_dataset.py ImageDataset.prepare_for_training: glob
    `*_{arch}.safetensors`, split the name on "_", W x H from the second last token, the item key before."""
    found = []
    for path in sorted(folder.glob(f"*_{short}.safetensors")):
        tokens = path.name.split("_")
        width, height = map(int, tokens[-2].split("x"))
        found.append(("_".join(tokens[:-2]), (width, height), path))
    return found


def musubi_item(path: Path) -> dict[str, torch.Tensor]:
    """src/musubi_tuner/dataset/bucket.py BucketBatchManager.__getitem__ for one item: load_file, strip the
    dtype suffix (utils/model_utils.py remove_dtype_suffix), then for latents_* the shape token."""
    out = {}
    for key, value in load_file(str(path)).items():
        name = next((key[: -len(d) - 1] for d in TORCH_DTYPE_NAMES if key.endswith("_" + d)), key)
        if name.startswith("latents_"):
            name = name.rsplit("_", 1)[0]
        out[name] = value
    return out


def flux2_spec(seed: int = 0) -> LatentSpec:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(128, generator=g) * 0.5
    var = torch.rand(128, generator=g) + 0.5
    std = torch.sqrt(var + 1e-4)
    return Flux2Config(bn_mean=tuple(mean.tolist()), bn_std=tuple(std.tolist())).latent_spec


def flux2_theirs(raw: torch.Tensor, spec: LatentSpec) -> torch.Tensor:
    """flux_2/flux2_models.py AutoEncoder.encode after the encoder: rearrange "c (i pi) (j pj) -> (c pi pj) i j",
    then BatchNorm2d(affine=False, eps=1e-4) in eval mode."""
    c, h, w = raw.shape
    x = raw.reshape(c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3).reshape(1, c * 4, h // 2, w // 2)
    mean = torch.tensor(spec.latents_mean)
    var = torch.tensor(spec.latents_std) ** 2 - 1e-4
    return F.batch_norm(x, mean, var, training=False, eps=1e-4)[0]


def qwen_theirs(raw: torch.Tensor) -> torch.Tensor:
    """qwen_image/qwen_image_autoencoder_kl.py encode_pixels_to_latents: (mode - mean) * (1 / std), (C, 1, h, w)."""
    mean = torch.tensor(QWEN_LATENTS_MEAN).view(16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(QWEN_LATENTS_STD).view(16, 1, 1, 1)
    return (raw[:, None] - mean) * inv_std


QWEN = QwenImageConfig().latent_spec


@pytest.mark.parametrize("arch", ["flux_2_dev", "flux_2_klein_4b", "flux_2_klein_9b"])
def test_flux2_cache_loads_through_musubi_reader(tmp_path: Path, arch: str) -> None:
    raw, spec = torch.randn(32, 12, 20), flux2_spec()
    path = musubi.write_image_cache(tmp_path, "my_cat_01", (190, 321), raw, arch, spec)
    [(key, size, found)] = musubi_find(tmp_path, musubi.target(arch).short)
    assert (key, size, found) == ("my_cat_01", (190, 321), path)
    item = musubi_item(path)
    assert list(item) == ["latents"]
    assert item["latents"].dtype == torch.float32 and item["latents"].shape == (128, 6, 10)
    torch.testing.assert_close(item["latents"], flux2_theirs(raw, spec), rtol=1e-6, atol=1e-6)
    with safe_open(str(path), framework="pt") as fh:
        assert list(fh.keys()) == ["latents_6x10_float32"]  # flux_2: HxW, no frame count
        assert fh.metadata() == {"architecture": arch, "width": "190", "height": "321", "format_version": "1.0.1"}


@pytest.mark.parametrize("arch,meta_arch", [("qwen_image", "qwen_image"), ("qwen_image_edit", "qwen_image"),
                                            ("krea2", "krea2")])
def test_qwen_cache_loads_through_musubi_reader(tmp_path: Path, arch: str, meta_arch: str) -> None:
    raw = torch.randn(16, 10, 14)
    path = musubi.write_image_cache(tmp_path, "a_b", (112, 80), raw, arch, QWEN)
    assert path.name == f"a_b_0112x0080_{musubi.target(arch).short}.safetensors"
    [(key, size, _)] = musubi_find(tmp_path, musubi.target(arch).short)
    assert (key, size) == ("a_b", (112, 80))
    item = musubi_item(path)
    assert item["latents"].dtype == torch.bfloat16 and item["latents"].shape == (16, 1, 10, 14)  # frame axis kept
    assert torch.equal(item["latents"], qwen_theirs(raw).to(torch.bfloat16))  # the same bits musubi stores
    with safe_open(str(path), framework="pt") as fh:
        assert list(fh.keys()) == ["latents_1x10x14_bfloat16"]
        assert fh.metadata()["architecture"] == meta_arch


def test_edit_controls_and_batch_stacking(tmp_path: Path) -> None:
    """Qwen-Image-Edit: control latents under latents_control_{i}; two items stack as the collator does."""
    controls = [torch.randn(16, 6, 8), torch.randn(16, 10, 14)]
    for stem in ("x", "y"):
        musubi.write_image_cache(tmp_path, stem, (112, 80), torch.randn(16, 10, 14), "qie", QWEN, controls=controls)
    items = [musubi_item(p) for _, _, p in musubi_find(tmp_path, "qie")]
    assert sorted(items[0]) == ["latents", "latents_control_0", "latents_control_1"]
    assert torch.stack([i["latents"] for i in items]).shape == (2, 16, 1, 10, 14)
    assert torch.equal(items[0]["latents_control_1"], qwen_theirs(controls[1]).to(torch.bfloat16))
    cache = musubi.load_cache(tmp_path / "x_0112x0080_qie.safetensors")
    assert [tuple(c.shape) for c in cache.controls] == [(16, 1, 6, 8), (16, 1, 10, 14)]
    assert "latents_control_0_1x6x8_bfloat16" in load_file(str(tmp_path / "x_0112x0080_qie.safetensors"))


def test_round_trip_to_raw_latents(tmp_path: Path) -> None:
    raw, spec = torch.randn(32, 8, 16), flux2_spec(1)
    path = musubi.write_image_cache(tmp_path, "img", (128, 64), raw, "f2d", spec)
    stored, meta = musubi.read_cache(path)
    torch.testing.assert_close(musubi.raw_latent(stored, "f2d", spec), raw, rtol=1e-5, atol=1e-5)
    assert meta["width"] == "128"
    raw_q = torch.randn(16, 8, 8)
    path = musubi.write_image_cache(tmp_path, "img", (64, 64), raw_q, "qi", QWEN, dtype=torch.float32)
    stored, _ = musubi.read_cache(path)
    assert stored.dtype == torch.float32
    torch.testing.assert_close(musubi.raw_latent(stored, "qi", QWEN), raw_q, rtol=1e-5, atol=1e-5)


def test_musubi_written_file_reads(tmp_path: Path) -> None:
    """A file laid out as musubi's save_latent_cache_qwen_image writes it (dataset/cache_io.py) reads back."""
    latent = qwen_theirs(torch.randn(16, 4, 6)).to(torch.bfloat16).contiguous()
    path = tmp_path / "photo_0048x0032_qi.safetensors"
    save_file({"latents_1x4x6_bfloat16": latent}, str(path),
              metadata={"architecture": "qwen_image", "width": "48", "height": "32", "format_version": "1.0.1"})
    stored, meta = musubi.read_cache(path)
    assert torch.equal(stored, latent) and meta["architecture"] == "qwen_image"


@pytest.mark.parametrize("stem,size,arch,name", [
    ("img", (512, 768), "qi", "img_0512x0768_qi.safetensors"),
    ("img", (64, 10000), "f2d", "img_0064x10000_f2d.safetensors"),  # {:04d} grows past four digits
    ("a_b_c", (1, 2), "f2k4b", "a_b_c_0001x0002_f2k4b.safetensors"),
    ("x.y", (1328, 1328), "qwen_image_edit", "x.y_1328x1328_qie.safetensors"),
])
def test_names(stem: str, size: tuple[int, int], arch: str, name: str) -> None:
    assert musubi.cache_name(stem, *size, arch) == name
    parsed = musubi.parse_cache_name(name)
    assert (parsed.item_key, parsed.width, parsed.height, parsed.target) == (stem, *size, musubi.target(arch))
    assert musubi.text_encoder_cache_name(stem, arch) == f"{stem}_{musubi.target(arch).short}_te.safetensors"


@pytest.mark.parametrize("bad", ["img_qi.safetensors", "img_512x768_xx.safetensors", "img_0512x0768_qi.npz",
                                 "_0512x0768_qi.safetensors", "img_0512_qi.safetensors", "img_qi_te.safetensors"])
def test_bad_names_refused(bad: str) -> None:
    with pytest.raises(InputError, match="not a musubi-tuner latent cache name"):
        musubi.parse_cache_name(bad)


def test_bad_arguments_refused() -> None:
    with pytest.raises(ConfigError, match="unknown musubi-tuner architecture"):
        musubi.target("qwen_image_layered")
    with pytest.raises(InputError):
        musubi.cache_name("a/b", 64, 64, "qi")
    with pytest.raises(InputError):
        musubi.cache_name("a", 0, 64, "qi")
    with pytest.raises(ConfigError, match="not musubi's own"):
        musubi.cache_metadata("qi", 64, 64, {"width": "1"})
    assert musubi.cache_metadata("qi", 64, 64, {"vaecli": "{}"})["vaecli"] == "{}"
    assert {t.name for t in musubi.targets_for("qwenimage")} == {"qwen_image", "qwen_image_edit", "krea2"}


def test_wrong_normalization_refused() -> None:
    """The silent mistake: raw or wrongly normalized latents with the right shape."""
    with pytest.raises(ConfigError, match="released latents_mean/std"):
        musubi.cache_tensors(torch.randn(16, 4, 4), "qi", LatentSpec.identity())
    with pytest.raises(ConfigError, match="patchified 2x2"):
        musubi.cache_tensors(torch.randn(128, 4, 4), "f2d", LatentSpec.identity())
    with pytest.raises(InputError, match="channels"):  # a FLUX.2-style spec on a 16-channel latent
        musubi.cache_tensors(torch.randn(8, 4, 4), "f2d", LatentSpec(1.0, None, (0.0,) * 32, (1.0,) * 32, 2))
    with pytest.raises(InputError, match="NaN"):
        musubi.cache_tensors(torch.full((16, 4, 4), math.nan), "qi", QWEN)
    with pytest.raises(ConfigError, match="stored as"):
        musubi.cache_tensors(torch.randn(16, 4, 4), "qi", QWEN, dtype=torch.float64)


def _good(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return musubi.cache_tensors(torch.randn(16, 4, 6), "qi", QWEN), musubi.cache_metadata("qi", 48, 32)


@pytest.mark.parametrize("change,match", [
    (lambda t, m: m.update(architecture="krea2"), "another model"),
    (lambda t, m: m.update(width="50"), "differs from the name"),
    (lambda t, m: m.pop("format_version"), "lacks format_version"),
    (lambda t, m: m.update(format_version="2.0"), "format_version"),
    (lambda t, m: m.update(frame_count="4"), "video"),
    (lambda t, m: t.update({"latents_1x4x6_float16": t.pop("latents_1x4x6_bfloat16")}), "names dtype"),
    (lambda t, m: t.update({"latents_1x4x7_bfloat16": t.pop("latents_1x4x6_bfloat16")}), "names shape"),
    (lambda t, m: t.update({"latents_2x4x6_bfloat16": t.pop("latents_1x4x6_bfloat16").repeat(1, 2, 1, 1)}),
     "one frame"),
    (lambda t, m: t.update({"latents_4x6_bfloat16": t.pop("latents_1x4x6_bfloat16")[:, 0]}), "shape"),
    (lambda t, m: t.update(extra=torch.zeros(1)), "not one musubi"),
    (lambda t, m: t.update({"latents_control_1_1x4x6_bfloat16": torch.zeros(16, 1, 4, 6, dtype=torch.bfloat16)}),
     "numbered 0"),
    (lambda t, m: t.clear(), "one target latent"),
])
def test_wrong_files_refused(tmp_path: Path, change, match: str) -> None:
    tensors, meta = _good(tmp_path)
    change(tensors, meta)
    path = tmp_path / "img_0048x0032_qi.safetensors"
    with pytest.raises(InputError, match=match):  # never written ...
        musubi.write_cache(path, tensors, meta)
    assert not path.exists()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    with pytest.raises(InputError, match=match) as info:  # ... and refused when found, with the file named
        musubi.read_cache(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "img_0048x0032_qi.safetensors"
    with pytest.raises(InputError, match="no such file"):
        musubi.read_cache(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        musubi.read_cache(path)
    (tmp_path / "d_0048x0032_qi.safetensors").mkdir()
    with pytest.raises(InputError, match="folder"):
        musubi.read_cache(tmp_path / "d_0048x0032_qi.safetensors")
    with pytest.raises(InputError, match="cache name"):
        musubi.write_cache(tmp_path / "img.safetensors", *_good(tmp_path))


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    tensors, meta = _good(tmp_path)
    path = tmp_path / "sub" / "img_0048x0032_qi.safetensors"
    musubi.write_cache(path, tensors, meta)
    first = path.read_bytes()
    bad = dict(meta, width="1")
    with pytest.raises(InputError):
        musubi.write_cache(path, tensors, bad)
    assert path.read_bytes() == first  # a refused write leaves the old file
    musubi.write_cache(path, musubi.cache_tensors(torch.randn(16, 4, 6), "qi", QWEN), meta)
    assert path.read_bytes() != first and os.listdir(path.parent) == [path.name]  # no temp file left behind


@pytest.mark.parametrize("size,resolution,enable,no_upscale,bucket", [
    # Values from musubi's own dataset/bucket.py BucketSelector.get_bucket_resolution at the commit above.
    ((1024, 1024), (960, 544), True, False, (720, 720)),
    ((1920, 1080), (960, 544), True, False, (960, 544)),
    ((600, 800), (1024, 1024), True, False, (880, 1184)),
    ((3000, 1000), (1328, 1328), True, False, (2288, 768)),
    ((500, 333), (1024, 1024), True, True, (496, 320)),  # small enough: kept, floored to 16
    ((3000, 1000), (1024, 1024), False, True, (1024, 1024)),  # one bucket: the resolution
])
def test_buckets(size, resolution, enable, no_upscale, bucket) -> None:
    assert musubi.bucket_resolution(size, resolution, enable, no_upscale) == bucket
