"""Our Qwen-Image VAE against diffusers' AutoencoderKLQwenImage (T=1) on identical random weights; its config
validation; loading diffusers folders and original Wan 2.1 single files; the rename table both ways."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLQwenImage as Reference
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as reference_module
from safetensors.torch import save_file

from vaecli.errors import ConfigError, InputError, WeightsError
from vaecli.family_keys import is_qwen_state
from vaecli.models.qwenimage import AutoencoderKLQwenImage
from vaecli.models.qwenimage_config import QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, QwenImageConfig
from vaecli.qwen_weights import (
    diffusers_to_original,
    diffusers_to_original_key,
    is_qwen_config,
    load_qwen,
    original_to_diffusers,
    original_to_diffusers_key,
)

REL = 1e-4  # fp32: max abs error over the reference's max abs value (2D convs sum in another order than 3D ones)
BF16_TOL = dict(atol=0.1, rtol=0.05)  # as tests/test_model_parity.py's half-precision check

# None of these is the released architecture (base_dim 96, dim_mult 1,2,4,4, num_res_blocks 2, no attention).
CONFIGS = {
    "3lvl-r1-attn-half-temporal-first": dict(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[0.5], temperal_downsample=[True, False],
    ),
    "4lvl-r2-attn-1-and-quarter": dict(
        base_dim=12, z_dim=6, dim_mult=[1, 2, 3, 2], num_res_blocks=2, attn_scales=[1.0, 0.25],
        temperal_downsample=[False, True, True],
    ),
    "2lvl-r2-odd-widths-rgba": dict(  # decoder widths 15 -> 7 after the upsampler's halving
        base_dim=5, z_dim=8, dim_mult=[1, 3], num_res_blocks=2, attn_scales=[], temperal_downsample=[True],
        input_channels=4,
    ),
}
RELEASED_NARROW = dict(base_dim=4)  # the released structure and normalization at 1/24 of the width


@pytest.fixture(autouse=True)
def attention_accepts_cache_arguments(monkeypatch):
    """diffusers 0.42.1's encoder calls every down block with the feature-cache arguments, which its
    attention block does not take (TypeError whenever attn_scales selects a level). The attention itself is
    frame-wise and uses no cache, so the oracle's math is kept and only the arguments are dropped."""
    forward = reference_module.QwenImageAttentionBlock.forward
    monkeypatch.setattr(reference_module.QwenImageAttentionBlock, "forward", lambda self, x, *cache: forward(self, x))


def with_normalization(config: dict) -> dict:
    """The config with latents_mean/std of its z_dim (diffusers' defaults have 16 values)."""
    z = config.get("z_dim", 16)
    if z == 16:
        return config
    return {"latents_mean": [0.1 * i for i in range(z)], "latents_std": [1.0 + 0.2 * i for i in range(z)], **config}


def make_reference(seed: int = 0, jitter: float = 0.02, **config) -> Reference:
    """diffusers' model with seeded random weights; norm gains perturbed so they matter."""
    torch.manual_seed(seed)
    model = Reference(**with_normalization(config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model


def ours_from(ref: Reference) -> AutoencoderKLQwenImage:
    ours = AutoencoderKLQwenImage(QwenImageConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def images(ref: Reference, size: tuple[int, int], n: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(n, ref.config.input_channels, *size) * 2 - 1


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    torch.testing.assert_close(actual, expected, atol=rel * float(expected.abs().max()), rtol=0)


def check_parity(ours: AutoencoderKLQwenImage, ref: Reference, x: torch.Tensor) -> None:
    with torch.no_grad():
        theirs = ref.encode(x[:, :, None]).latent_dist  # diffusers takes (N, C, T=1, H, W)
        mine = ours.encode(x)
        assert_close_rel(mine.mean, theirs.mean[:, :, 0])
        assert_close_rel(mine.logvar, theirs.logvar[:, :, 0])
        z = theirs.mean[:, :, 0]
        expected = ref.decode(z[:, :, None]).sample[:, :, 0]
        assert (expected.abs() < 0.99).float().mean() > 0.9  # clamping does not hide the comparison
        assert_close_rel(ours.decode(z), expected)
        assert_close_rel(ours(x), ref(x[:, :, None]).sample[:, :, 0])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", [(32, 48), (40, 24)])
def test_parity_with_diffusers(name, size):
    ref = make_reference(**CONFIGS[name])
    check_parity(ours_from(ref), ref, images(ref, size))


def test_state_dict_keys_and_shapes_are_diffusers():
    for config in (*CONFIGS.values(), {}):  # {}: the released architecture, built without memory
        with torch.device("meta"):
            ref = Reference(**with_normalization(config))
            ours = AutoencoderKLQwenImage(QwenImageConfig.from_dict(dict(ref.config)))
        shapes = {k: v.shape for k, v in ref.state_dict().items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == shapes


def test_bf16_close_to_fp32_and_to_diffusers_bf16():
    ref = make_reference(**CONFIGS["4lvl-r2-attn-1-and-quarter"])
    half = ours_from(ref).to(torch.bfloat16)
    x = images(ref, (32, 32))
    with torch.no_grad():
        mean32 = ref.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
        out32 = ref.decode(mean32[:, :, None]).sample[:, :, 0]
        mean = half.encode(x.bfloat16()).mean
        out = half.decode(mean32.bfloat16())
        assert mean.dtype == out.dtype == torch.bfloat16
        torch.testing.assert_close(mean.float(), mean32, **BF16_TOL)
        torch.testing.assert_close(out.float(), out32, **BF16_TOL)
        ref16 = ref.to(torch.bfloat16)
        torch.testing.assert_close(out, ref16.decode(mean32.bfloat16()[:, :, None]).sample[:, :, 0], **BF16_TOL)


def test_checkpointing_gives_the_same_gradients():
    ours = ours_from(make_reference(**CONFIGS["3lvl-r1-attn-half-temporal-first"]))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    grads = []
    for checkpointing in (False, True):
        ours.zero_grad()
        ours(x, checkpointing=checkpointing).square().mean().backward()
        grads.append(ours.encoder.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert ours.encoder.down_blocks[1].time_conv.weight.grad is None  # unused for a single frame


def test_inputs_are_checked():
    ours = ours_from(make_reference(**CONFIGS["3lvl-r1-attn-half-temporal-first"]))
    with pytest.raises(InputError, match=r"take \[:, :, 0\]"):
        ours.encode(torch.zeros(1, 3, 1, 16, 16))
    with pytest.raises(InputError, match=r"\(N, 4, H, W\)"):
        ours.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(InputError, match=r"\[0, 255\]"):
        ours.encode(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(InputError, match="floating-point"):
        ours.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_are_diffusers_and_round_trip():
    cfg = QwenImageConfig()
    with torch.device("meta"):
        defaults = dict(Reference().config)
    assert cfg.to_dict() == {"_class_name": "AutoencoderKLQwenImage",
                             **{k: v for k, v in defaults.items() if not k.startswith("_")}}
    assert QwenImageConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.class_name, cfg.family, cfg.in_channels, cfg.out_channels, cfg.latent_channels) == (
        "AutoencoderKLQwenImage", "qwenimage", 3, 3, 16)
    assert cfg.downsample_factor == 8 and cfg.force_upcast is False
    odd = QwenImageConfig.from_dict(make_reference(**CONFIGS["2lvl-r2-odd-widths-rgba"]).config)
    assert (odd.in_channels, odd.out_channels, odd.latent_channels, odd.downsample_factor) == (4, 4, 8, 2)


def test_latent_spec_is_the_pipelines_normalization():
    spec = QwenImageConfig().latent_spec
    z = torch.randn(2, 16, 4, 4)
    mean = torch.tensor(QWEN_LATENTS_MEAN).view(1, 16, 1, 1)
    inv_std = 1.0 / torch.tensor(QWEN_LATENTS_STD).view(1, 16, 1, 1)
    torch.testing.assert_close(spec.normalize(z), (z - mean) * inv_std, atol=1e-6, rtol=1e-6)  # img2img encode
    torch.testing.assert_close(spec.denormalize(z), z / inv_std + mean, atol=1e-6, rtol=1e-6)  # before decode
    assert spec.scaling_factor == 1.0 and spec.shift_factor is None


@pytest.mark.parametrize("changes, message", [
    (dict(base_dim=1), "base_dim must be an integer in"),
    (dict(base_dim=8.0), "base_dim must be an integer"),
    (dict(z_dim=True), "z_dim must be an integer"),
    (dict(num_res_blocks=0), "num_res_blocks must be an integer in"),
    (dict(input_channels=0), "input_channels"),
    (dict(dim_mult=()), "dim_mult must be a list"),
    (dict(dim_mult=(1, 0)), "dim_mult must be a list"),
    (dict(dim_mult=(1,) * 9), "dim_mult must be a list"),
    (dict(attn_scales=(2.0,)), "attn_scales must be"),
    (dict(attn_scales=("1",)), "attn_scales must be"),
    (dict(temperal_downsample=(1, 0, 0)), "temperal_downsample must be a list of true/false"),
    (dict(temperal_downsample=(True, True)), "temperal_downsample has 2 entries; 4 levels need 3"),
    (dict(dropout=1.0), "dropout must be a number in"),
    (dict(latents_mean=QWEN_LATENTS_MEAN[:4]), "latents_mean has 4 values for z_dim 16"),
    (dict(latents_std=(0.0,) * 16), "latents_std must be positive"),
    (dict(latents_std=None), "latents_std must be a list"),
    (dict(z_dim=4), "latents_mean has 16 values for z_dim 4"),
    (dict(base_dim=4096, dim_mult=(1, 8), temperal_downsample=(False,)), "exceeds 16384"),
])
def test_config_validation(changes, message):
    with pytest.raises(ConfigError, match="invalid Qwen-Image VAE config: .*" + message.replace("(", r"\(")):
        QwenImageConfig(**changes)


def test_from_dict_refuses_other_classes_and_unknown_fields():
    with pytest.raises(ConfigError, match="'AutoencoderKLWan'"):
        QwenImageConfig.from_dict({"_class_name": "AutoencoderKLWan"})
    with pytest.raises(ConfigError, match="unknown fields is_residual"):
        QwenImageConfig.from_dict({"is_residual": True})
    assert QwenImageConfig.from_dict({"_diffusers_version": "0.42.1", "_name_or_path": "x"}) == QwenImageConfig()


# ----------------------------------------------------------------------------------------- rename table


@pytest.mark.parametrize("config", [*CONFIGS.values(), RELEASED_NARROW])
def test_rename_round_trip_both_directions(config):
    state = make_reference(**config).state_dict()
    original = diffusers_to_original(state)
    assert not any(k.startswith(("encoder.down_blocks", "decoder.up_blocks")) or ".mid_block." in k for k in original)
    back = original_to_diffusers(original)
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)
    assert diffusers_to_original(back).keys() == original.keys()


def test_original_keys_are_what_diffusers_single_file_conversion_reads():
    """diffusers' convert_wan_vae_to_diffusers (hard-coded for the released 4-level, 2-resnet structure) maps
    our original-layout keys back to diffusers' keys: the two tables agree."""
    state = make_reference(**RELEASED_NARROW).state_dict()
    original = diffusers_to_original(state)
    assert convert_wan_vae_to_diffusers(dict(original)).keys() == state.keys()


@pytest.mark.parametrize("original, diffusers", [
    ("encoder.conv1.weight", "encoder.conv_in.weight"),
    ("encoder.downsamples.2.resample.1.weight", "encoder.down_blocks.2.resample.1.weight"),
    ("encoder.downsamples.3.shortcut.bias", "encoder.down_blocks.3.conv_shortcut.bias"),
    ("encoder.downsamples.5.time_conv.weight", "encoder.down_blocks.5.time_conv.weight"),
    ("encoder.middle.1.to_qkv.weight", "encoder.mid_block.attentions.0.to_qkv.weight"),
    ("encoder.head.0.gamma", "encoder.norm_out.gamma"),
    ("conv1.weight", "quant_conv.weight"),
    ("conv2.bias", "post_quant_conv.bias"),
    ("decoder.middle.2.residual.6.weight", "decoder.mid_block.resnets.1.conv2.weight"),
    ("decoder.upsamples.2.residual.3.gamma", "decoder.up_blocks.0.resnets.2.norm2.gamma"),
    ("decoder.upsamples.3.time_conv.bias", "decoder.up_blocks.0.upsamplers.0.time_conv.bias"),
    ("decoder.upsamples.4.shortcut.weight", "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"),
    ("decoder.upsamples.11.resample.1.weight", "decoder.up_blocks.2.upsamplers.0.resample.1.weight"),
    ("decoder.upsamples.14.residual.0.gamma", "decoder.up_blocks.3.resnets.2.norm1.gamma"),
    ("decoder.head.2.weight", "decoder.conv_out.weight"),
])
def test_rename_table_known_keys(original, diffusers):
    """ComfyUI's comfy/ldm/wan/vae.py names (the released structure: num_res_blocks 2)."""
    assert original_to_diffusers_key(original, 2) == diffusers
    assert diffusers_to_original_key(diffusers, 2) == original


# ---------------------------------------------------------------------------------------------- loading


def save_wan_file(ref: Reference, path, prefix: str = "") -> None:
    save_file({prefix + k: v.contiguous() for k, v in diffusers_to_original(ref.state_dict()).items()}, str(path))


@pytest.mark.parametrize(
    "form", ["diffusers-folder", "bin-folder", "wan-file", "wan-file-vae-prefix", "diffusers-file"]
)
def test_load_qwen_layouts(tmp_path, form):
    config = CONFIGS["4lvl-r2-attn-1-and-quarter"] if form != "wan-file" else RELEASED_NARROW
    ref = make_reference(**config)
    if form == "diffusers-folder":
        ref.save_pretrained(tmp_path)
        path = tmp_path
    elif form == "bin-folder":
        ref.save_pretrained(tmp_path, safe_serialization=False)
        path = tmp_path
        assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    elif form == "diffusers-file":
        path = tmp_path / "vae.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        path = tmp_path / "qwen_image_vae.safetensors"
        save_wan_file(ref, path, "vae." if form == "wan-file-vae-prefix" else "")
    ours = load_qwen(path)
    info = ours.info
    assert info.layout == ("wan" if form.startswith("wan") else "diffusers")
    assert info.config_source == ("config.json" if form.endswith("folder") else "inferred from shapes")
    expected = QwenImageConfig.from_dict(dict(ref.config))
    if form.endswith("folder"):
        assert ours.config == expected and info.notes == ()
    else:  # everything but the normalization is read from the tensors
        assert ours.config.replace(latents_mean=expected.latents_mean, latents_std=expected.latents_std) == expected
        assert any("latents_mean" in note for note in info.notes) and any("dropout" in note for note in info.notes)
    if form == "wan-file":
        assert ours.config == QwenImageConfig(base_dim=4)  # Qwen-Image's released values filled in
    from vaecli.weight_files import weights_sha256

    assert info.weights_sha256 == weights_sha256(ref.state_dict())
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    check_parity(ours, ref, images(ref, (32, 32)))


def test_load_qwen_dtype(tmp_path):
    ref = make_reference(**CONFIGS["3lvl-r1-attn-half-temporal-first"])
    ref.to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_qwen(tmp_path).dtype == torch.bfloat16  # None keeps the stored precision
    assert load_qwen(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_strict_loading_names_the_problem(tmp_path):
    ref = make_reference(**CONFIGS["3lvl-r1-attn-half-temporal-first"])
    ref.save_pretrained(tmp_path)
    state = ref.state_dict()
    weights = tmp_path / "diffusion_pytorch_model.safetensors"

    def write(tensors):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights))

    write({k: v for k, v in state.items() if k != "decoder.norm_out.gamma"})
    with pytest.raises(WeightsError, match=r"missing keys \(1\): decoder\.norm_out\.gamma"):
        load_qwen(tmp_path)
    write({**state, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): decoder\.extra\.weight"):
        load_qwen(tmp_path)
    write(state)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "base_dim": 16}))
    with pytest.raises(WeightsError, match=r"shape mismatches \(117\): decoder\.conv_in\.bias \(16,\) != \(32,\)"):
        load_qwen(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_res_blocks": 2}))
    with pytest.raises(WeightsError, match="missing keys"):
        load_qwen(tmp_path)
    write({**state, "decoder.conv_in.weight": torch.full_like(state["decoder.conv_in.weight"], float("nan"))})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="NaN or Inf"):
        load_qwen(tmp_path)


def test_wan22_and_video_vaes_are_refused(tmp_path):
    # Wan 2.2 single file: 2x2-patchified input (12 channels), 48 latent channels, nested residual blocks.
    wan22 = {
        "encoder.conv1.weight": torch.zeros(4, 12, 3, 3, 3),
        "decoder.conv1.weight": torch.zeros(8, 48, 3, 3, 3),
        "decoder.middle.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
        "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(8, 8, 3, 3, 3),
    }
    path = tmp_path / "wan2.2_vae.safetensors"
    save_file(wan22, str(path))
    assert is_qwen_state(wan22)  # routed here, so the refusal names what the file is
    with pytest.raises(WeightsError, match="Wan 2.2 VAE"):
        load_qwen(path)
    for config, expected in (({"z_dim": 48, "is_residual": True}, "Wan 2.2 video VAE"), ({}, "Wan video VAE")):
        folder = tmp_path / f"wan{len(config)}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", **config}))
        save_file({"decoder.mid_block.resnets.0.norm1.gamma": torch.ones(4, 1, 1, 1)},
                  str(folder / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(WeightsError, match=expected):
            load_qwen(folder)


def test_decoder_attention_of_the_original_wan_code_is_refused(tmp_path):
    """The original Wan code also puts attention into the decoder at attn_scales; diffusers' model cannot."""
    ref = make_reference(**CONFIGS["3lvl-r1-attn-half-temporal-first"])
    original = diffusers_to_original(ref.state_dict())
    original["decoder.upsamples.4.to_qkv.weight"] = torch.zeros(48, 16, 1, 1)
    path = tmp_path / "wan.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    with pytest.raises(WeightsError, match="attention in the decoder's up blocks"):
        load_qwen(path)


def test_detection():
    ref = make_reference(**CONFIGS["3lvl-r1-attn-half-temporal-first"])
    assert is_qwen_config(json.loads(ref.to_json_string())) and is_qwen_config(QwenImageConfig().to_dict())
    assert not is_qwen_config({"_class_name": "AutoencoderKL"}) and not is_qwen_config({"base_dim": 8})
    assert not is_qwen_config(["AutoencoderKLQwenImage"])
    state = ref.state_dict()
    assert is_qwen_state(state) and is_qwen_state(diffusers_to_original(state))
    assert is_qwen_state(["first_stage_model." + k for k in state])
    from diffusers import AutoencoderKL

    assert not is_qwen_state(AutoencoderKL(block_out_channels=[8], norm_num_groups=4).state_dict())
