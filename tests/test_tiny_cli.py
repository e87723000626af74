"""Tiny autoencoders through load_vae and the CLI: previews of full-VAE latent files (SD and FLUX.2),
refusals of other latent spaces, the point posterior, tiling, info and bench."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vaecli
from cli_support import make_model, run_cli, run_json
from test_flux2 import CONFIGS as FLUX2_CONFIGS
from test_flux2 import make_flux2
from vaecli.tiny_weights import diffusers_to_original

PHOTO = "examples/coffee.jpg"


def make_tiny(folder, latent_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
                            latent_channels=latent_channels).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return model


def psnr8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture
def photo(tmp_path):
    from pathlib import Path

    root = tmp_path / "in"
    root.mkdir()
    src = Path(__file__).resolve().parents[1] / PHOTO
    Image.open(src).convert("RGB").resize((128, 96), Image.BICUBIC).save(root / "a.png")
    return root


def test_taesd_preview_of_sd_latent_files_equals_diffusers(photo, tmp_path):
    full = make_model(tmp_path / "sd", scaling_factor=0.18215)
    ref = make_tiny(tmp_path / "taesd")
    assert run_json("encode", photo, "-o", tmp_path / "z", "-m", full)[0] == 0
    code, doc, _ = run_json("decode", tmp_path / "z", "-o", tmp_path / "prev", "-m", tmp_path / "taesd")
    assert code == 0 and doc["ok"] == 1
    stored = load_file(str(tmp_path / "z" / "a.safetensors"))["latent"]  # z * 0.18215: SD's diffusion latents
    with torch.no_grad():
        theirs = to_uint8(ref.decode(stored[None]).sample)
    mine = np.asarray(Image.open(tmp_path / "prev" / "a.png"))
    assert mine.shape == theirs.shape == (96, 128, 3)
    assert psnr8(mine, theirs) >= 40.0


def test_taef2_style_preview_of_flux2_files_unpatchifies(photo, tmp_path):
    make_flux2(**FLUX2_CONFIGS["asymmetric-decoder"]).save_pretrained(tmp_path / "flux2")  # 8 latent channels
    ref = make_tiny(tmp_path / "taef", latent_channels=8)
    assert run_json("encode", photo, "-o", tmp_path / "z", "-m", tmp_path / "flux2")[0] == 0
    stored = load_file(str(tmp_path / "z" / "a.safetensors"))["latent"]
    assert stored.shape == (32, 6, 8)  # normalized and patchified
    code, doc, _ = run_json("decode", tmp_path / "z", "-o", tmp_path / "prev", "-m", tmp_path / "taef",
                            "--family", "flux2")
    assert code == 0 and doc["ok"] == 1
    unpatched = stored.reshape(8, 2, 2, 6, 8).permute(0, 3, 1, 4, 2).reshape(8, 12, 16)
    with torch.no_grad():
        theirs = to_uint8(ref.decode(unpatched[None]).sample)
    assert psnr8(np.asarray(Image.open(tmp_path / "prev" / "a.png")), theirs) >= 40.0


def test_previews_refuse_other_latent_spaces(photo, tmp_path):
    full = make_model(tmp_path / "sd", scaling_factor=0.18215)
    make_tiny(tmp_path / "taesd")
    make_tiny(tmp_path / "taesd3", latent_channels=16)
    assert run_json("encode", photo, "-o", tmp_path / "z", "-m", full)[0] == 0
    assert run_json("encode", photo, "-o", tmp_path / "raw", "-m", full, "--raw")[0] == 0
    code, doc, _ = run_json("decode", tmp_path / "raw", "-o", tmp_path / "p1", "-m", tmp_path / "taesd")
    assert code == 1 and "raw latents: a tiny autoencoder decodes" in doc["items"][0]["error"]
    code, doc, _ = run_json("decode", tmp_path / "z", "-o", tmp_path / "p2", "-m", tmp_path / "taesd",
                            "--family", "sdxl")
    assert code == 1 and "latent space mismatch" in doc["items"][0]["error"] and "sdxl" in doc["items"][0]["error"]
    code, doc, _ = run_json("decode", tmp_path / "z", "-o", tmp_path / "p3", "-m", tmp_path / "taesd3")
    assert code == 1 and "4 channels" in doc["items"][0]["error"]
    code, doc, _ = run_json("decode", tmp_path / "z", "-o", tmp_path / "p4", "-m", tmp_path / "taesd", "--family", "sd")
    assert code == 0 and doc["ok"] == 1


def test_original_pair_loads_as_the_folder(tmp_path):
    from safetensors.torch import save_file

    make_tiny(tmp_path / "taesd")
    folder = vaecli.load_vae(tmp_path / "taesd")
    halves = diffusers_to_original(load_file(str(tmp_path / "taesd" / "diffusion_pytorch_model.safetensors")))
    (tmp_path / "vae_approx").mkdir()
    for half, state in halves.items():
        target = tmp_path / "vae_approx" / f"taesd_{half}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    for source in (tmp_path / "vae_approx", tmp_path / "vae_approx" / "taesd_decoder.safetensors"):
        pair = vaecli.load_vae(source)
        assert type(pair).__name__ == "AutoencoderTiny" and pair.info.weights_sha256 == folder.info.weights_sha256
    code, doc, _ = run_json("info", tmp_path / "vae_approx")
    assert code == 0 and doc["class_name"] == "AutoencoderTiny" and doc["family"] == "tiny"
    assert doc["layout"] == "taesd" and doc["notes"]  # what the shapes could not say is listed


def test_point_posterior_and_tiling(photo, tmp_path):
    make_tiny(tmp_path / "taesd")
    assert run_json("encode", photo, "-o", tmp_path / "mode", "-m", tmp_path / "taesd")[0] == 0
    assert run_json("encode", photo, "-o", tmp_path / "sample", "-m", tmp_path / "taesd", "--sample")[0] == 0
    a = load_file(str(tmp_path / "mode" / "a.safetensors"))["latent"]
    b = load_file(str(tmp_path / "sample" / "a.safetensors"))["latent"]
    assert torch.equal(a, b)  # sample = mode: the tiny encoder is deterministic
    code, doc, _ = run_json("decode", tmp_path / "mode", "-o", tmp_path / "tiled", "-m", tmp_path / "taesd",
                            "--tiling", "on", "--tile-size", "64", "--tile-overlap", "32")
    assert code == 0 and doc["tiles"] > 1
    assert run_json("decode", tmp_path / "mode", "-o", tmp_path / "whole", "-m", tmp_path / "taesd")[0] == 0
    tiled = np.asarray(Image.open(tmp_path / "tiled" / "a.png"))
    whole = np.asarray(Image.open(tmp_path / "whole" / "a.png"))
    assert psnr8(tiled, whole) >= 35.0  # no statistics to share: overlap and ramps only


def test_bench_runs_a_tiny_model(tmp_path):
    make_tiny(tmp_path / "taesd")
    code, doc, _ = run_json("bench", "-m", tmp_path / "taesd", "-r", "32", "--iters", "1", "--warmup", "0")
    assert code == 0 and {r["op"] for r in doc["results"]} == {"encode", "decode"}
    assert all(r["ms_per_img"] > 0 for r in doc["results"])
    human = run_cli("info", tmp_path / "taesd")
    assert "tiny autoencoder" in human.stdout and "AutoencoderTiny" in human.stdout


def test_bench_versus_the_full_model(tmp_path):
    make_tiny(tmp_path / "taesd")
    full = make_model(tmp_path / "full")
    code, doc, _ = run_json("bench", "-m", tmp_path / "taesd", "--versus", full, "-r", "32", "--iters", "1",
                            "--warmup", "0")
    assert code == 0 and doc["versus"]["model"] == full and len(doc["versus"]["results"]) == 2
    for r in doc["results"]:
        other = next(o for o in doc["versus"]["results"] if o["op"] == r["op"])
        assert r["versus_ms_per_img"] == other["ms_per_img"]
        assert r["speedup_vs"] == round(other["ms_per_img"] / r["ms_per_img"], 3)
    human = run_cli("bench", "-m", tmp_path / "taesd", "--versus", full, "-r", "32", "--iters", "1", "--warmup", "0")
    assert human.exit_code == 0 and "x the speed" in human.stdout
