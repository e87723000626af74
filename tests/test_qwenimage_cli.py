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
