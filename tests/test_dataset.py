"""Dataset mode: bucket arithmetic (kohya's), crops, and the prepare_dataset driver end to end on a tiny VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_model
from vaecli.batch import Item, resample
from vaecli.dataset import (
    DatasetOptions,
    crop_box,
    make_buckets,
    merge_manifests,
    parse_shard,
    prepare_dataset,
    read_manifest,
    select_bucket,
    shard_items,
)
from vaecli.errors import ConfigError, InputError
from vaecli.io import read_image
from vaecli.latents import kohya_crop_ltrb
from vaecli.models.kl import AutoencoderKL
from vaecli.pipeline import Runner
from vaecli.weights import load_vae, save_vae

# Small buckets so the tiny model encodes in milliseconds: area 48^2, steps of 16, sides 16..96.
SMALL = dict(bucket_resolution=48, bucket_step=16, min_bucket_size=16, max_bucket_size=96)
SIZES = {"wide.png": (60, 40), "sub/tall.png": (40, 80), "square.jpg": (50, 50), "pano.png": (100, 52)}
TIMING = ("encoded_at",)


# ------------------------------------------------------------------------------------------ bucket arithmetic


def test_bucket_list_matches_kohya_for_512():
    # kohya-ss make_bucket_resolutions((512, 512), 256, 1024, 64), worked out by hand from its loop.
    half = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
            (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    expected = sorted(set(half) | {(h, w) for w, h in half})
    assert make_buckets(512, 64, 256, 1024) == expected
    assert make_buckets(512) == expected  # defaults: min = res/2, max = 2 res


@pytest.mark.parametrize("res,step,lo,hi", [(512, 64, 256, 1024), (1024, 64, 512, 2048), (768, 32, 256, 1536)])
def test_buckets_keep_area_steps_and_bounds(res, step, lo, hi):
    buckets = make_buckets(res, step, lo, hi)
    assert (res // step * step, res // step * step) in buckets
    for w, h in buckets:
        assert w * h <= res * res
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
    assert len({w / h for w, h in buckets}) == len(buckets)  # one bucket per aspect ratio


@pytest.mark.parametrize("size", [(1000, 600), (600, 1000), (512, 512), (3000, 800), (333, 777), (2048, 2048)])
def test_select_bucket_nearest_aspect_and_cover(size):
    w, h = size
    buckets = make_buckets(512)
    choice = select_bucket(w, h, buckets, 64, False, 512 * 512)
    err = abs(choice.bucket[0] / choice.bucket[1] - w / h)
    assert err == min(abs(bw / bh - w / h) for bw, bh in buckets)
    (rw, rh), (bw, bh) = choice.resized, choice.bucket
    assert rw >= bw and rh >= bh and (rw == bw or rh == bh)  # covers the bucket, touching one side
    assert abs(rw / rh - w / h) < 0.02


def test_no_upscale_keeps_small_images_and_shrinks_large_ones():
    buckets = make_buckets(512)
    small = select_bucket(100, 70, buckets, 64, True, 512 * 512)
    assert small.resized == (100, 70) and small.bucket == (64, 64)
    large = select_bucket(2000, 1000, buckets, 64, True, 512 * 512)
    (rw, rh), (bw, bh) = large.resized, large.bucket
    assert bw * bh <= 512 * 512 and rw >= bw and rh >= bh and bw % 64 == 0 and bh % 64 == 0
    assert abs(rw / rh - 2.0) < 0.05
    with pytest.raises(InputError, match="no bucket"):
        select_bucket(40, 300, buckets, 64, True, 512 * 512)


def test_crop_box_centre_and_seeded_random():
    assert crop_box((700, 512), (640, 512), False, 0, "a.png") == [30, 0, 670, 512]
    boxes = {tuple(crop_box((700, 530), (640, 512), True, 7, f"{i}.png")) for i in range(20)}
    assert len(boxes) > 1
    for left, top, right, bottom in boxes:
        assert 0 <= left <= 60 and 0 <= top <= 18 and right - left == 640 and bottom - top == 512
    assert crop_box((700, 530), (640, 512), True, 7, "x.png") == crop_box((700, 530), (640, 512), True, 7, "x.png")


def test_kohya_crop_ltrb_convention():
    # kohya stores where the whole image, fitted inside the bucket, lies (SDXL crop conditioning).
    assert kohya_crop_ltrb((512, 512), (1024, 512)) == (0, 128.0, 512, 384.0)
    assert kohya_crop_ltrb((640, 384), (640, 384)) == (0, 0.0, 640, 384.0)


def test_shards_partition_items_deterministically():
    items = [Item(Path(f"{n}.png"), f"{n}.png", None) for n in "edcba"]
    parts = [shard_items(items, i, 2) for i in range(2)]
    assert [it.rel for it in parts[0]] == ["a.png", "c.png", "e.png"]
    assert [it.rel for it in parts[1]] == ["b.png", "d.png"]
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ConfigError):
        parse_shard("4/4")


# ------------------------------------------------------------------------------------------- fixtures


def _tiny_model(folder: Path, seed: int) -> AutoencoderKL:
    save_vae(make_tiny_model(seed), folder)
    return load_vae(folder)



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _tiny_model(root / "a", 0), _tiny_model(root / "b", 1), root / "a"


def _write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + c) + seed) * np.cos(yy / (4 + c)) for c in range(3)], axis=-1)
    pixels = ((base * 0.4 + 0.5 + rng.normal(0, 0.03, base.shape)).clip(0, 1) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    for i, (name, size) in enumerate(SIZES.items()):
        _write_image(root / name, size, i)
    return root


def _prepare(vae, images, out, **kw):
    run_kw = {k: kw.pop(k) for k in ("shard", "progress") if k in kw}
    return prepare_dataset(vae, [images], out, DatasetOptions(**{**SMALL, **kw}), **run_kw)


def _statuses(report) -> dict[str, str]:
    return {Path(r.input).name: r.status for r in report.items}


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# ------------------------------------------------------------------------------------------- prepare


def test_manifest_flip_and_moments(models, images, tmp_path):
    vae = models[0]
    out = tmp_path / "out"
    report = _prepare(vae, images, out, flip=True, moments=True)
    assert report.count("ok") == 4 and report.merged
    records = {r["source"]: r for r in read_manifest(out / "manifest.jsonl")}
    assert sorted(records) == sorted(SIZES)
    rec = records["wide.png"]
    for key in ("source", "source_sha256", "original_size", "bucket", "crop", "latent", "latent_shape",
                "model_sha256", "settings_sha256", "latent_flipped", "moments"):
        assert key in rec
    assert rec["original_size"] == [60, 40] and rec["latent"] == "wide.safetensors"
    bw, bh = rec["bucket"]
    assert rec["latent_shape"] == [4, bh // 8, bw // 8]
    assert rec["model_sha256"] == vae.info.weights_sha256
    left, top, right, bottom = rec["crop"]
    assert (right - left, bottom - top) == (bw, bh)

    # Recompute by hand: read, resize, crop, flip, encode; the stored tensors must match.
    pixels = read_image(images / "wide.png")
    rw, rh = rec["resized_size"]
    crop = resample(pixels, rh, rw)[top:bottom, left:right]
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
    moments = Runner(vae).encode_moments(torch.cat([x, x.flip(-1)])).tensor
    mean, logvar = moments.chunk(2, dim=1)
    spec = vae.config.latent_spec
    from safetensors.torch import load_file

    stored = load_file(str(out / rec["latent"]))
    torch.testing.assert_close(stored["latent"], spec.normalize(mean[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored["latent_flipped"], spec.normalize(mean[1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored["mean"], mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored["logvar"], logvar[0].clamp(-30, 20), atol=1e-5, rtol=1e-5)
    assert "mean_flipped" in stored and "logvar_flipped" in stored


def test_invalidation_and_missing(models, images, tmp_path):
    vae, other, _ = models
    out = tmp_path / "out"
    assert _prepare(vae, images, out).count("ok") == 4
    again = _prepare(vae, images, out)
    assert again.count("skipped") == 4 and again.count("ok") == 0

    _write_image(images / "sub/tall.png", (40, 80), 99)  # edit one image
    edited = _prepare(vae, images, out)
    expected = {"wide.png": "skipped", "tall.png": "ok", "square.jpg": "skipped", "pano.png": "skipped"}
    assert _statuses(edited) == expected

    assert _prepare(vae, images, out, flip=True).count("ok") == 4  # another setting
    assert _prepare(other, images, out, flip=True).count("ok") == 4  # another model
    records = read_manifest(out / "manifest.jsonl")
    assert {r["model_sha256"] for r in records} == {other.info.weights_sha256}

    (images / "square.jpg").unlink()
    gone = _prepare(other, images, out, flip=True)
    assert gone.count("skipped") == 3
    assert gone.missing == [{"source": "square.jpg", "latent": "square.safetensors"}]
    assert gone.to_dict()["missing"] == gone.missing
    assert "square.jpg" not in {r["source"] for r in read_manifest(out / "manifest.jsonl")}


def test_corrupt_image_is_failed_and_the_rest_encoded(models, images, tmp_path):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    report = _prepare(models[0], images, out)
    assert report.count("failed") == 1 and report.count("ok") == 4
    bad = next(r for r in report.items if r.status == "failed")
    assert "broken.png" in bad.input and bad.error
    assert len(read_manifest(out / "manifest.jsonl")) == 4


def test_interrupted_run_resumes_to_the_same_manifest(models, images, tmp_path):
    vae = models[0]
    clean = tmp_path / "clean"
    _prepare(vae, images, clean, batch_size=1)

    class Stop(Exception):
        pass

    def stop_after_two(counts) -> None:
        if counts.done == 2:
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        _prepare(vae, images, out, batch_size=1, progress=stop_after_two)
    assert not (out / "manifest.jsonl").exists()
    resumed = _prepare(vae, images, out, batch_size=1)
    # Writes already queued when the run stopped still complete (each is atomic): at least two are reused.
    assert resumed.count("skipped") >= 2 and resumed.count("skipped") + resumed.count("ok") == 4
    assert _strip(read_manifest(out / "manifest.jsonl")) == _strip(read_manifest(clean / "manifest.jsonl"))


def test_shards_then_merge_equal_one_run(models, images, tmp_path):
    vae = models[0]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _prepare(vae, images, single, flip=True)
    first = _prepare(vae, images, sharded, flip=True, shard=(0, 2))
    assert not first.merged and (sharded / "manifest.shard-0-of-2.jsonl").exists()
    second = _prepare(vae, images, sharded, flip=True, shard=(1, 2))
    assert second.merged  # the last shard to finish merges
    assert _strip(read_manifest(sharded / "manifest.jsonl")) == _strip(read_manifest(single / "manifest.jsonl"))
    assert not list(sharded.glob("manifest.shard-*"))
    # An explicit merge names the shards that are missing.
    _prepare(vae, images, sharded, flip=True, shard=(0, 3))
    with pytest.raises(Exception, match="1/3, 2/3"):
        merge_manifests(sharded, 3)


def test_options_are_checked(models, images, tmp_path):
    with pytest.raises(ConfigError, match="bucket-step"):
        _prepare(models[0], images, tmp_path / "o", **{**SMALL, "bucket_step": 12})
    with pytest.raises(ConfigError, match="moments"):
        _prepare(models[0], images, tmp_path / "o", format="comfyui", moments=True)


def test_sample_random_crop_and_no_upscale_are_deterministic(models, images, tmp_path):
    from safetensors.torch import load_file

    vae = models[0]
    opts = dict(sample=True, seed=5, random_crop=True, crop_seed=3, no_upscale=True)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _prepare(vae, images, a, **opts)
    _prepare(vae, images, b, batch_size=1, **opts)  # other batching, same noise and crops
    _prepare(vae, images, c, **{**opts, "seed": 6})
    ra, rb = read_manifest(a / "manifest.jsonl"), read_manifest(b / "manifest.jsonl")
    assert _strip(ra) == _strip(rb)
    for rec in ra:
        (rw, rh), (bw, _) = rec["resized_size"], rec["bucket"]
        ow, oh = rec["original_size"]
        assert rw <= ow and rh <= oh  # never enlarged
        left, top, right, bottom = rec["crop"]
        assert 0 <= left and right <= rw and 0 <= top and bottom <= rh and right - left == bw
        assert rec["posterior"] == "sample"
        za, zb = (load_file(str(d / rec["latent"]))["latent"] for d in (a, b))
        torch.testing.assert_close(za, zb, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(za, load_file(str(c / rec["latent"]))["latent"])
