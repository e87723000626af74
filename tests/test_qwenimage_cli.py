"""The Qwen-Image VAE through load_vae and the CLI: identified by its class (never read as AutoencoderKL),
a photo's round trip equal to diffusers', latent files normalized as the Qwen-Image pipelines do."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import vaecli
from cli_support import run_json

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "coffee.jpg"


def make_qwen(folder: Path, **config):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    model = AutoencoderKLQwenImage(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return model


def test_the_issue_example_is_identified_and_noted(tmp_path):
    make_qwen(tmp_path / "qwen", base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    code, doc, _ = run_json("info", tmp_path / "qwen")
    assert code == 0 and doc["class_name"] == "AutoencoderKLQwenImage" and doc["family"] == "qwenimage"
    assert any("16 released values for z_dim 4" in n for n in doc["notes"])


def test_cli_roundtrip_equals_diffusers_and_files_hold_pipeline_latents(tmp_path):
    z = 16
    mean = [0.1 * i - 0.7 for i in range(z)]
    std = [1.0 + 0.1 * i for i in range(z)]
    ref = make_qwen(tmp_path / "qwen", base_dim=16, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                    latents_mean=mean, latents_std=std)
    src = tmp_path / "in" / "photo.png"
    src.parent.mkdir()
    Image.open(PHOTO).convert("RGB").resize((128, 96), Image.BICUBIC).save(src)
    code, doc, _ = run_json("roundtrip", src.parent, "-o", tmp_path / "rec", "-m", tmp_path / "qwen")
    assert code == 0 and doc["ok"] == 1
    x = torch.from_numpy(np.asarray(Image.open(src)).copy()).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        theirs = ref.decode(dist.mean).sample[:, :, 0]
    theirs8 = ((theirs[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    mine = np.asarray(Image.open(tmp_path / "rec" / "photo.png")).astype(np.float64)
    mse = float(((mine - theirs8) ** 2).mean())
    assert (math.inf if mse == 0 else 10 * math.log10(255**2 / mse)) >= 45.0
    assert run_json("encode", src.parent, "-o", tmp_path / "z", "-m", tmp_path / "qwen")[0] == 0
    stored = load_file(str(tmp_path / "z" / "photo.safetensors"))["latent"]
    m, s = torch.tensor(mean).view(z, 1, 1), torch.tensor(std).view(z, 1, 1)
    torch.testing.assert_close(stored, (dist.mode()[0, :, 0] - m) / s, atol=1e-4, rtol=1e-4)
    vae = vaecli.load_vae(tmp_path / "qwen")
    assert type(vae).__name__ == "AutoencoderKLQwenImage"


def test_tiled_1024_decode_matches_untiled():
    """RMS norms are per position: only the mid block (attention) is global, and it runs untiled at 1/8
    resolution; the convolutional paths run in tiles (CLI defaults: 512 px tiles, 64 px overlap)."""
    from vaecli.models.qwenimage import AutoencoderKLQwenImage, QwenImageConfig
    from vaecli.tiling import tiled_decode, tiled_encode_moments

    torch.manual_seed(0)
    cfg = QwenImageConfig(base_dim=16, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.0,) * 4,
                          latents_std=(1.0,) * 4)
    model = AutoencoderKLQwenImage(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    img = Image.open(PHOTO).convert("RGB").resize((1024, 1024), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        moments = model.encode_moments(x)
        z = moments[:, :4]
        whole = model.decode(z)
        tiled, report = tiled_decode(model, z, 512, 64)
        tiled_moments, enc_report = tiled_encode_moments(model, x, 512, 64)
    assert report.tiles > 1 and enc_report.tiles > 1
    qa, qb = ((tiled + 1) * 127.5).round(), ((whole + 1) * 127.5).round()
    mse = (qa - qb).double().pow(2).mean().item()
    assert 10 * math.log10(255**2 / mse) >= 40.0
    assert (tiled_moments[:, :4] - z).abs().max() < 0.05


def test_comfyui_latents_keep_the_frame_axis_and_decode_back(tmp_path):
    """--format comfyui holds what ComfyUI's VAE Encode outputs for Qwen-Image: raw latents with the video
    VAE's frame axis, (1, z, 1, h, w) (ComfyUI issue #9218); decode reads them back to the same image as our
    own files, and the dataset export stores the same form."""
    ref = make_qwen(tmp_path / "qwen", base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    src = tmp_path / "in" / "photo.png"
    src.parent.mkdir()
    Image.open(PHOTO).convert("RGB").resize((64, 48), Image.BICUBIC).save(src)
    model = tmp_path / "qwen"
    assert run_json("encode", src.parent, "-o", tmp_path / "c", "-m", model, "--format", "comfyui")[0] == 0
    saved = load_file(str(tmp_path / "c" / "photo.latent"))
    x = torch.from_numpy(np.asarray(Image.open(src)).copy()).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean  # (1, 16, 1, 6, 8)
    assert saved["latent_tensor"].shape == (1, 16, 1, 6, 8) and "latent_format_version_0" in saved
    torch.testing.assert_close(saved["latent_tensor"], mean, atol=1e-4, rtol=1e-4)
    assert run_json("encode", src.parent, "-o", tmp_path / "z", "-m", model)[0] == 0
    for name, folder in (("c", tmp_path / "c"), ("z", tmp_path / "z")):
        assert run_json("decode", folder, "-o", tmp_path / f"img-{name}", "-m", model)[0] == 0
    ours = np.asarray(Image.open(tmp_path / "img-z" / "photo.png")).astype(np.int16)
    theirs = np.asarray(Image.open(tmp_path / "img-c" / "photo.png")).astype(np.int16)
    assert np.abs(ours - theirs).max() <= 1  # the same latents, stored raw instead of normalized
    code, doc, _ = run_json("encode", src.parent, "-o", tmp_path / "d", "-m", model, "--dataset", "--format",
                            "comfyui", "--bucket-resolution", "64", "--bucket-step", "16")
    assert code == 0 and doc["ok"] == 1
    (item,) = (tmp_path / "d").rglob("*.latent")
    assert load_file(str(item))["latent_tensor"].shape[:3] == (1, 16, 1)
