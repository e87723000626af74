"""Hostile or broken model configs and tensors: refused with a message naming the field, before any model
is built, never coerced (e.g. "no" is not true) and never failing later with a raw TypeError."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import vaecli
from cli_support import run_module
from vaecli.config import LatentSpec, VAEConfig
from vaecli.errors import ConfigError, InputError

GOOD = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)

# (field changes, the words the message must hold)
BAD_CONFIGS = [
    ({"layers_per_block": 1_000_000_000}, r"layers_per_block must be an integer in \[1, 64\]"),
    ({"layers_per_block": 0}, r"layers_per_block must be an integer in \[1, 64\]"),
    ({"layers_per_block": 2.0}, r"layers_per_block must be an integer"),
    ({"layers_per_block": True}, r"layers_per_block must be an integer"),
    ({"layers_per_block": "2"}, r"layers_per_block must be an integer"),
    ({"latent_channels": -4}, r"latent_channels must be an integer"),
    ({"in_channels": None}, r"in_channels must be an integer"),
    ({"block_out_channels": [16, 10**9]}, r"block_out_channels must hold integers in \[1, 16384\]"),
    ({"block_out_channels": [16] * 9, "down_block_types": ["DownEncoderBlock2D"] * 9,
      "up_block_types": ["UpDecoderBlock2D"] * 9}, r"block_out_channels must be a list of 1 to 8"),
    ({"block_out_channels": []}, r"block_out_channels must be a list of 1 to 8"),
    ({"block_out_channels": 64}, r"block_out_channels must be a list"),
    ({"down_block_types": "DownEncoderBlock2D"}, r"down_block_types must be a list of block names"),
    ({"norm_num_groups": 0}, r"norm_num_groups must be an integer"),
    ({"norm_num_groups": 5}, r"not divisible by norm_num_groups 5"),
    ({"act_fn": 3}, r"act_fn must be a string"),
    ({"act_fn": "tanh"}, r"unsupported act_fn 'tanh'"),
    ({"sample_size": -1}, r"sample_size must be a positive integer"),
    ({"scaling_factor": 0}, r"scaling_factor must be a finite non-zero number, not 0"),
    ({"scaling_factor": float("nan")}, r"scaling_factor must be a finite non-zero number, not nan"),
    ({"scaling_factor": "0.18215"}, r"scaling_factor must be a finite non-zero number, not '0.18215'"),
    ({"shift_factor": float("inf")}, r"shift_factor must be a finite number or null"),
    ({"force_upcast": "no"}, r"force_upcast must be true or false, not 'no'"),
    ({"force_upcast": 0}, r"force_upcast must be true or false, not 0"),
    ({"use_quant_conv": None}, r"use_quant_conv must be true or false"),
    ({"latents_mean": [0.1, "x", 0.3, 0.4], "latents_std": [1, 1, 1, 1]},
     r"latents_mean must be a list of finite numbers"),
    ({"latents_mean": [0, 0, 0, 0], "latents_std": [1, 0, 1, 1]}, r"latents_std must be positive"),
    ({"latents_mean": [0, 0], "latents_std": [1, 1]}, r"latents_mean has 2 values for 4 latent channels"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS,
                         ids=[next(iter(c)) + f"-{i}" for i, (c, _) in enumerate(BAD_CONFIGS)])
def test_bad_config_fields_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        VAEConfig.from_dict({**GOOD, **changes})


def test_good_config_and_diffusers_forms_accepted():
    cfg = VAEConfig.from_dict({**GOOD, "sample_size": [256, 256], "scaling_factor": 1, "_class_name": "AutoencoderKL"})
    assert cfg.sample_size == (256, 256) and cfg.scaling_factor == 1
    assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_huge_layers_config_refused_fast_by_the_cli(reference, tmp_path):
    """The reported case: layers_per_block 1e9 in config.json made `vaecli info` hang while memory grew."""
    ref = reference(**{k: v for k, v in GOOD.items() if "types" not in k})
    ref.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["layers_per_block"] = 1_000_000_000
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    start = time.monotonic()
    result = run_module("info", tmp_path / "m", timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode == 2
    assert "layers_per_block must be an integer in [1, 64], not 1000000000" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_force_upcast_string_refused_on_load(reference, tmp_path):
    ref = reference(**{k: v for k, v in GOOD.items() if "types" not in k})
    ref.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["force_upcast"] = "no"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="force_upcast must be true or false, not 'no'"):
        vaecli.load_vae(tmp_path / "m")


@pytest.mark.parametrize("data, message", [
    ({"scaling_factor": 0}, "non-zero"),
    ({"scaling_factor": "abc"}, "finite non-zero number, not 'abc'"),
    ({"scaling_factor": 1, "shift_factor": "nan"}, "shift_factor must be a finite number"),
    ({"scaling_factor": 1, "latents_mean": [0.0], "latents_std": [-1.0]}, "latents_std must be positive"),
    ([1, 2], "expected an object"),
])
def test_latent_spec_from_dict_checks_values(data, message):
    with pytest.raises(ConfigError, match=message):
        LatentSpec.from_dict(data)


def test_latent_spec_round_trip():
    spec = LatentSpec(0.5, None, (0.1, 0.2), (1.5, 2.0))
    assert LatentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model(block_out_channels=(16, 32))  # GOOD's model: its other fields are tiny_config's defaults


@pytest.mark.parametrize("x, message", [
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating-point tensor, got torch.uint8"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.bool), "floating-point tensor, got torch.bool"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.complex64), "floating-point tensor, got torch.complex64"),
    (torch.full((1, 3, 16, 16), 255.0), r"range over \[255, 255\] \(\[0, 255\] pixels: use x / 127.5 - 1\)"),
    (torch.full((1, 3, 16, 16), float("nan")), "NaN or Inf"),
])
def test_encode_refuses_non_images(tiny, x, message):
    with torch.no_grad(), pytest.raises(InputError, match=message):
        tiny.encode(x)
    assert issubclass(InputError, ValueError)  # library callers may catch the builtin type


def test_encode_accepts_images_and_decode_refuses_integer_latents(tiny):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = tiny.encode(x)
        assert post.mean.shape == (1, 4, 8, 8) and math.isfinite(float(post.mean.sum()))
        torch.testing.assert_close(tiny.encode(x * 3, check_range=False).mean,
                                   tiny.encode_moments(x * 3).chunk(2, 1)[0])
        with pytest.raises(InputError, match="floating-point tensor, got torch.int64"):
            tiny.decode(torch.zeros(1, 4, 8, 8, dtype=torch.long))
