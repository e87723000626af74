"""The embedded default model: SD layout, shipped config, and real reconstruction quality on a bundled photo."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vaecli
from vaecli import AutoencoderKL, VAEConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chelsea.jpg"  # 451x300, held out from training


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return vaecli.load_vae()


def _sd_layout(cfg: VAEConfig) -> VAEConfig:
    """SD's VAE architecture (channels, 2 layers per block) with this config's depth and latent channels."""
    return cfg.replace(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)


def test_config_is_sd_layout(vae: AutoencoderKL) -> None:
    cfg = vae.config
    assert cfg.latent_channels == 4
    assert cfg.downsample_factor == 8
    assert len(cfg.block_out_channels) == 4
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    assert cfg.shift_factor is None and cfg.latents_mean is None
    assert not cfg.force_upcast
    assert cfg.sample_size == 512
    assert vae.info is not None and vae.info.config_source == "config.json"


def test_keys_are_a_subset_of_sd_vae_keys(vae: AutoencoderKL) -> None:
    with torch.device("meta"):
        sd = AutoencoderKL(_sd_layout(vae.config))
    ours, theirs = set(vae.state_dict()), set(sd.state_dict())
    assert ours <= theirs, sorted(ours - theirs)[:5]
    for key in ("quant_conv.weight", "post_quant_conv.weight", "encoder.mid_block.attentions.0.to_q.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight", "decoder.up_blocks.3.resnets.0.conv1.weight"):
        assert key in ours


def test_weights_are_stored_in_fp16() -> None:
    from safetensors import safe_open

    path = Path(vaecli.__file__).parent / "default_model" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


def _load_example() -> tuple[np.ndarray, torch.Tensor]:
    rgb = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    h, w = rgb.shape[:2]
    assert h % 8 and w % 8, "the example should exercise padding"
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)
    return rgb, F.pad(x, (0, (-w) % 8, 0, (-h) % 8), mode="replicate")  # (1, 3, H', W'), multiples of 8


def test_roundtrip_psnr_on_held_out_photo(vae: AutoencoderKL) -> None:
    rgb, x = _load_example()
    h, w = rgb.shape[:2]
    with torch.no_grad():
        y = vae.decode(vae.encode(x).mode())[0, :, :h, :w]  # (3, H, W)
    out = ((y.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy()
    mse = np.mean((out - rgb.astype(np.float64)) ** 2)
    psnr = 10 * math.log10(255**2 / mse)
    assert psnr >= 25.0, f"PSNR {psnr:.2f} dB"


def test_scaling_factor_normalizes_latents(vae: AutoencoderKL) -> None:
    _, x = _load_example()
    with torch.no_grad():
        z = vae.encode(x).mode()
    ratio = vae.config.scaling_factor * z.std().item()  # 1 when the example's latents match the training stats
    assert 0.5 <= ratio <= 2.0, ratio
