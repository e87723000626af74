"""Dataset exports checked the way their readers check them, and the training-side LatentDataset and sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch.utils.data import DataLoader

from test_dataset import SIZES, _prepare, images, models  # noqa: F401 - fixtures
from vaecli.data import BucketBatchSampler, LatentDataset
from vaecli.dataset import read_manifest
from vaecli.latents import kohya_crop_ltrb


def _kohya_cache_is_expected(npz_path: Path, bucket_wh: tuple[int, int], flip_aug: bool) -> bool:
    """What kohya-ss sd-scripts checks before trusting a disk cache (train_util.is_disk_cached_latents_is_expected)."""
    expected = (bucket_wh[1] // 8, bucket_wh[0] // 8)  # bucket is (W, H); latents are (C, H/8, W/8)
    npz = np.load(npz_path)
    if "latents" not in npz or "original_size" not in npz or "crop_ltrb" not in npz:
        return False
    if npz["latents"].shape[1:3] != expected:
        return False
    if flip_aug and ("latents_flipped" not in npz or npz["latents_flipped"].shape[1:3] != expected):
        return False
    return "alpha_mask" not in npz


def _kohya_load(npz_path: Path):
    """kohya's _default_load_latents_from_disk for SD/SDXL (no resolution suffix)."""
    npz = np.load(npz_path)
    flipped = npz["latents_flipped"] if "latents_flipped" in npz else None
    return npz["latents"], npz["original_size"].tolist(), npz["crop_ltrb"].tolist(), flipped


def test_kohya_export_is_what_kohya_reads(models, images, tmp_path):
    vae = models[0]
    out = tmp_path / "kohya"
    report = _prepare(vae, images, out, format="kohya", flip=True, moments=True)
    assert report.count("ok") == 4
    for rec in read_manifest(out / "manifest.jsonl"):
        path = out / rec["latent"]
        assert path.name == Path(rec["source"]).stem + ".npz" and rec["latent"].endswith(".npz")
        assert _kohya_cache_is_expected(path, tuple(rec["bucket"]), flip_aug=True)
        latents, original_size, crop_ltrb, flipped = _kohya_load(path)
        assert latents.dtype == np.float32 and flipped.dtype == np.float32
        assert latents.shape == (4, rec["bucket"][1] // 8, rec["bucket"][0] // 8) == flipped.shape
        assert original_size == list(SIZES[rec["source"]])  # [W, H]
        assert crop_ltrb == list(kohya_crop_ltrb(tuple(rec["bucket"]), tuple(original_size)))
        # Raw latents: kohya multiplies by the scale factor itself; the mode of the posterior is the mean.
        np.testing.assert_array_equal(latents, np.load(path)["mean"])
        assert not rec["normalized"]


def test_kohya_next_to_images(models, images, tmp_path):
    out = tmp_path / "out"
    _prepare(models[0], images, out, format="kohya", kohya_next_to_images=True)
    assert (images / "sub" / "tall.npz").is_file()
    rec = {r["source"]: r for r in read_manifest(out / "manifest.jsonl")}["sub/tall.png"]
    assert (out / rec["latent"]).resolve() == (images / "sub" / "tall.npz").resolve()
    again = _prepare(models[0], images, out, format="kohya", kohya_next_to_images=True)
    assert again.count("skipped") == 4


def test_comfyui_export_is_what_load_latent_reads(models, images, tmp_path):
    vae = models[0]
    out = tmp_path / "comfy"
    _prepare(vae, images, out, format="comfyui", flip=True)
    raw = {}
    for rec in read_manifest(out / "manifest.jsonl"):
        path = out / rec["latent"]
        assert path.suffix == ".latent" and (out / rec["latent_flipped"]).is_file()
        latent = safetensors.torch.load_file(str(path), device="cpu")
        # ComfyUI nodes.py LoadLatent: scale by 1/0.18215 only when the version marker is absent.
        assert "latent_format_version_0" in latent
        multiplier = 1.0 if "latent_format_version_0" in latent else 1.0 / 0.18215
        samples = latent["latent_tensor"].float() * multiplier
        assert samples.shape == (1, 4, rec["bucket"][1] // 8, rec["bucket"][0] // 8)
        assert latent["latent_format_version_0"].numel() == 0
        raw[rec["source"]] = samples[0]
    # The same raw latents as the vaecli format stores before normalization.
    ours = tmp_path / "ours"
    _prepare(vae, images, ours, raw=True)
    for rec in read_manifest(ours / "manifest.jsonl"):
        stored = safetensors.torch.load_file(str(ours / rec["latent"]))["latent"]
        torch.testing.assert_close(raw[rec["source"]], stored)


def test_latent_dataset_and_bucket_sampler(models, images, tmp_path):
    out = tmp_path / "out"
    _prepare(models[0], images, out, flip=True, moments=True)
    plain = LatentDataset(out)
    flipped = LatentDataset(out / "manifest.jsonl", flip=True)
    assert len(plain) == 4
    item, mirror = plain[0], flipped[0]
    assert not item["flipped"] and mirror["flipped"]
    stored = safetensors.torch.load_file(str(out / plain.records[0]["latent"]))
    torch.testing.assert_close(item["latent"], stored["latent"])
    torch.testing.assert_close(mirror["latent"], stored["latent_flipped"])
    assert item["bucket"].tolist() == plain.records[0]["bucket"] and item["source"] == plain.records[0]["source"]

    torch.manual_seed(0)
    sampled = LatentDataset(out, sample=True)[0]["latent"]
    assert sampled.shape == item["latent"].shape and not torch.equal(sampled, item["latent"])

    sampler = BucketBatchSampler(plain, batch_size=2, shuffle=True, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(4)) and len(batches) == len(sampler)
    for batch in DataLoader(plain, batch_sampler=sampler):
        assert len({tuple(b) for b in batch["bucket"].tolist()}) == 1
        assert batch["latent"].shape[0] == len(batch["source"])
    sampler.set_epoch(1)
    assert sorted(i for b in sampler for i in b) == list(range(4))
    halves = [list(BucketBatchSampler(plain, 1, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert not set(map(tuple, halves[0])) & set(map(tuple, halves[1]))


def test_latent_dataset_reads_kohya_and_comfyui(models, images, tmp_path):
    for fmt in ("kohya", "comfyui"):
        out = tmp_path / fmt
        _prepare(models[0], images, out, format=fmt, flip=True)
        ds = LatentDataset(out, flip="random")
        for i in range(len(ds)):
            rec = ds.records[i]
            assert ds[i]["latent"].shape == (4, rec["bucket"][1] // 8, rec["bucket"][0] // 8)
    with pytest.raises(Exception, match="moments"):
        LatentDataset(tmp_path / "kohya", sample=True)
