"""AutoencoderTiny against diffusers' on identical random weights, in both weight layouts; config validation;
strict loading; the rename table both ways; TAEF2's GroupNorm branch against its formula."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vaecli
from vaecli.errors import ConfigError, InputError, WeightsError
from vaecli.models.tiny import DETERMINISTIC_LOGVAR, AutoencoderTiny, TinyConfig
from vaecli.plans import Plan
from vaecli.tiny_weights import (
    diffusers_to_original,
    diffusers_to_original_key,
    find_tiny_pair,
    infer_tiny_config,
    is_tiny_config,
    is_tiny_state,
    load_tiny,
    original_to_diffusers,
    original_to_diffusers_key,
)
from vaecli.weight_files import weights_sha256

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 (tests/test_model_parity.py)
BF16_TOL = dict(atol=0.1, rtol=0.05)  # bf16 ours vs fp32 diffusers (tests/test_model_parity.py)

# None of these is a released configuration; every one differs from diffusers' defaults.
CONFIGS = {
    "levels4-relu-c4": dict(
        encoder_block_out_channels=[16] * 4, num_encoder_blocks=[1, 2, 2, 1],
        decoder_block_out_channels=[24] * 4, num_decoder_blocks=[2, 1, 2, 1], latent_channels=4,
    ),
    "x4-upsampling-relu-c16": dict(  # 5 encoder levels (16x) undone by 3 decoder levels of x4 nearest
        encoder_block_out_channels=[8] * 5, num_encoder_blocks=[0, 1, 1, 1, 2],
        decoder_block_out_channels=[12] * 3, num_decoder_blocks=[1, 2, 0], latent_channels=16,
        upsampling_scaling_factor=4,
    ),
    "gelu-bilinear-c16": dict(
        encoder_block_out_channels=[8] * 3, num_encoder_blocks=[1, 1, 2],
        decoder_block_out_channels=[16] * 3, num_decoder_blocks=[1, 2, 1], latent_channels=16,
        act_fn="gelu", upsample_fn="bilinear",
    ),
    "mish-rgba-nearest-exact": dict(
        in_channels=4, out_channels=4, encoder_block_out_channels=[8, 8], num_encoder_blocks=[0, 1],
        decoder_block_out_channels=[8, 8], num_decoder_blocks=[1, 0], latent_channels=4,
        act_fn="mish", upsample_fn="nearest-exact",
    ),
    "silu-bicubic": dict(
        encoder_block_out_channels=[8] * 3, num_encoder_blocks=[1, 1, 1],
        decoder_block_out_channels=[8] * 3, num_decoder_blocks=[1, 1, 1], act_fn="silu", upsample_fn="bicubic",
    ),
}
# The original files hold no act_fn/upsample_fn: loading them assumes taesd.py's relu and nearest.
PAIR_CONFIGS = ["levels4-relu-c4", "x4-upsampling-relu-c16"]


def make_tiny_reference(seed: int = 0, jitter: float = 0.05, **config):
    """A diffusers AutoencoderTiny with seeded random weights, perturbed so no tensor keeps its init."""
    from diffusers import AutoencoderTiny as DiffusersTiny

    torch.manual_seed(seed)
    model = DiffusersTiny(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model


def pair(name: str):
    ref = make_tiny_reference(**CONFIGS[name])
    ours = AutoencoderTiny(TinyConfig.from_dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(ref, size=(32, 48), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, ref.config.in_channels, *size, generator=g) * 2 - 1
    f = 2 ** (len(ref.config.encoder_block_out_channels) - 1)
    z = torch.randn(2, ref.config.latent_channels, size[0] // f, size[1] // f, generator=g) * 2
    return x, z


def assert_parity(ours, ref, x, z, tol=TOL):
    with torch.no_grad():
        latents = ref.encode(x).latents
        torch.testing.assert_close(ours.encode(x.to(ours.dtype)).mode().float(), latents, **tol)
        torch.testing.assert_close(ours.decode(z.to(ours.dtype)).float(), ref.decode(z).sample, **tol)
        torch.testing.assert_close(ours.decode(latents.to(ours.dtype)).float(), ref.decode(latents).sample, **tol)


def write_pair(ref, folder: Path, prefix: str, suffix: str, dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """The original two files, written through our rename table."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for half, state in diffusers_to_original(ref.state_dict()).items():
        state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}
        path = folder / f"{prefix}_{half}{suffix}"
        save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
        paths.append(path)
    return paths[0], paths[1]


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32(name):
    ref, ours = pair(name)
    size = (64, 48) if name.startswith("x4") else (32, 48)
    x, z = inputs(ref, size)
    assert_parity(ours, ref, x, z)
    with torch.no_grad():  # diffusers' forward rounds the latents through 8 bits
        torch.testing.assert_close(ours(x, quantize_latents=True), ref(x).sample, **TOL)
        torch.testing.assert_close(ours(x), ref.decode(ref.encode(x).latents).sample, **TOL)


@pytest.mark.parametrize("name", ["levels4-relu-c4", "gelu-bilinear-c16"])
def test_parity_bf16(name):
    ref, ours = pair(name)
    x, z = inputs(ref)
    assert_parity(ours.to(torch.bfloat16), ref, x, z, BF16_TOL)
    assert ours.dtype == torch.bfloat16


def test_odd_sizes_follow_diffusers():
    ref, ours = pair("gelu-bilinear-c16")
    x = torch.rand(1, 3, 30, 21) * 2 - 1  # the stride-2 convs round up: 30x21 -> 8x6
    with torch.no_grad():
        mine, theirs = ours.encode(x).mode(), ref.encode(x).latents
    assert mine.shape == theirs.shape == (1, 16, 8, 6)
    torch.testing.assert_close(mine, theirs, **TOL)


@pytest.mark.parametrize("name", ["levels4-relu-c4", "x4-upsampling-relu-c16"])
def test_plan_layout_same_values(name):
    """A channels-last plan changes the memory layout only; the nearest x2 pairs go through upsample_conv."""
    ref, ours = pair(name)
    x, z = inputs(ref, (64, 48))
    plan = Plan("test-nhwc", layout=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x, plan=plan).mode(), ref.encode(x).latents, **TOL)
        torch.testing.assert_close(ours.decode(z, plan=plan), ref.decode(z).sample, **TOL)


def test_kernel_plan_same_values(monkeypatch):
    """The plan's Triton kernels (interpreted on CPU) on the upsampling pairs and TAEF2's GroupNorm: the
    same values as diffusers' sequence, and the kernels really run."""
    from vaecli.kernels import groupnorm_silu as gn
    from vaecli.kernels import upsample_conv as uc
    from vaecli.plans import KERNEL_OPS

    ref, ours, _ = taef2_pair()
    calls = {"norm": 0, "upsample": 0}
    for name, module, fn in (("norm", gn, "group_norm"), ("upsample", uc, "fused")):
        original = getattr(module, fn)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, fn, counted)
    plan = Plan("test-kernels", kernels=frozenset(KERNEL_OPS))
    x, z = inputs(ref, (16, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x, plan=plan).mode(), ref.encode(x).latents, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.decode(z, plan=plan), ref.decode(z).sample, atol=1e-4, rtol=1e-4)
    assert calls == {"norm": 4, "upsample": 2}  # 2 + 2 branch norms; 2 nearest x2 pairs (16 channels)


def test_deterministic_posterior_and_moments():
    ref, ours = pair("levels4-relu-c4")
    x, _ = inputs(ref)
    with torch.no_grad():
        post = ours.encode(x)
        moments = ours.encode_moments(x)
    assert torch.equal(post.sample(torch.Generator().manual_seed(3)), post.mode())
    assert torch.equal(post.sample(), post.mean)
    assert torch.equal(post.std, torch.zeros_like(post.mean)) and torch.equal(post.var, torch.zeros_like(post.mean))
    assert moments.shape == (2, 8, 4, 6)
    assert torch.equal(moments[:, :4], post.mean)
    assert torch.equal(moments[:, 4:], torch.full_like(post.mean, DETERMINISTIC_LOGVAR))
    assert torch.isfinite(moments).all()
    # AutoencoderKL's posterior reads the moments unchanged: -30 is its clamp floor, not below it
    gauss = vaecli.DiagonalGaussian(moments)
    assert torch.equal(gauss.logvar, moments[:, 4:]) and torch.equal(gauss.mode(), post.mean)
    assert float(gauss.std.max()) < 1e-6
    assert ours.config.deterministic is True and ours.config.family == "tiny"
    assert ours.config.class_name == "AutoencoderTiny"
    assert ours.config.latent_spec.is_identity
    assert ours.config.block_out_channels == ours.config.decoder_block_out_channels == (24,) * 4
    from vaecli.plans import plan_for

    assert plan_for("cpu", ours.config).name == "cpu"  # the device table reads the widths of either model kind
    # forward ignores sampling: there is nothing to sample
    with torch.no_grad():
        assert torch.equal(ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(1)), ours(x))


def test_scale_latents_match_diffusers():
    ref, ours = pair("levels4-relu-c4")
    z = torch.randn(2, 4, 5, 5) * 4
    torch.testing.assert_close(ours.scale_latents(z), ref.scale_latents(z), atol=0, rtol=0)
    u = torch.rand(2, 4, 5, 5)
    torch.testing.assert_close(ours.unscale_latents(u), ref.unscale_latents(u), atol=0, rtol=0)


def test_gradient_checkpointing_same_gradients():
    _, ours = pair("levels4-relu-c4")
    ours.requires_grad_(True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    grads, outs = [], []
    for checkpointing in (False, True):
        ours.zero_grad()
        y = ours(x, checkpointing=checkpointing)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(ours.encoder.layers[0].weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)  # checkpointing never changes the values
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_encode_refuses_non_images():
    _, ours = pair("levels4-relu-c4")
    with pytest.raises(InputError, match=r"\[0, 255\] pixels"):
        ours.encode(torch.rand(1, 3, 16, 16) * 255)
    with pytest.raises(InputError, match="floating-point"):
        ours.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(InputError, match="NaN"):
        ours.encode(torch.full((1, 3, 16, 16), float("nan")))
    ours.encode(torch.rand(1, 3, 16, 16) * 3, check_range=False)  # the check can be skipped


# ----------------------------------------------------------------------------------------------- TAEF2


def _pool(ch: int, seed: int) -> torch.nn.Sequential:
    """taesd.py's use_midblock_gn branch (madebyollin/taesd 5cccb12), seeded and perturbed."""
    torch.manual_seed(seed)
    pool = torch.nn.Sequential(
        torch.nn.Conv2d(ch, 4 * ch, 1, bias=False), torch.nn.GroupNorm(4, 4 * ch), torch.nn.ReLU(),
        torch.nn.Conv2d(4 * ch, ch, 1, bias=False),
    )
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return pool.eval()


def taef2_pair():
    """diffusers' AutoencoderTiny with the branch hooked in front of each lowest-resolution block (the
    oracle: x + pool(x) enters the block), and our midblock_gn model with the same weights."""
    from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock

    cfg = dict(encoder_block_out_channels=[8] * 3, num_encoder_blocks=[1, 1, 2],
               decoder_block_out_channels=[16] * 3, num_decoder_blocks=[2, 1, 1], latent_channels=16)
    ref = make_tiny_reference(**cfg)
    ours = AutoencoderTiny(TinyConfig.from_dict({**ref.config, "midblock_gn": True})).eval()
    state = dict(ref.state_dict())
    enc_blocks = [i for i, m in enumerate(ref.encoder.layers) if isinstance(m, AutoencoderTinyBlock)][-2:]
    dec_blocks = [i for i, m in enumerate(ref.decoder.layers) if isinstance(m, AutoencoderTinyBlock)][:2]
    pools = []
    for half, indices, ch in (("encoder", enc_blocks, 8), ("decoder", dec_blocks, 16)):
        for n, i in enumerate(indices):
            pool = _pool(ch, seed=10 * len(pools) + n)
            pools.append(pool)
            block = getattr(ref, half).layers[i]
            block.register_forward_pre_hook(lambda _m, args, pool=pool: (args[0] + pool(args[0]),))
            state.update({f"{half}.layers.{i}.pool.{k}": v for k, v in pool.state_dict().items()})
    ours.load_state_dict(state, strict=True)  # every pool key lands on a lowest-resolution block
    return ref, ours, state


def test_taef2_midblock_groupnorm_parity(tmp_path):
    ref, ours, state = taef2_pair()
    x, z = inputs(ref)
    assert_parity(ours, ref, x, z)
    assert ours.config.to_dict()["midblock_gn"] is True
    assert "midblock_gn" not in TinyConfig().to_dict()
    # the original pair of a TAEF2-like model: midblock_gn read from the branch's tensors
    for half, original in diffusers_to_original(state).items():
        save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / f"taef2_{half}.safetensors"))
    loaded = load_tiny(tmp_path)
    assert loaded.config.midblock_gn and any("TAEF2" in n for n in loaded.info.notes)
    assert_parity(loaded, ref, x, z)


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", ["levels4-relu-c4", "gelu-bilinear-c16", "mish-rgba-nearest-exact"])
def test_diffusers_folder(tmp_path, name):
    ref = make_tiny_reference(**CONFIGS[name])
    ref.save_pretrained(tmp_path)
    vae = load_tiny(tmp_path)
    assert vae.info.layout == "diffusers" and vae.info.config_source == "config.json"
    assert vae.info.path == str(tmp_path / "diffusion_pytorch_model.safetensors")
    assert vae.info.weights_sha256 == weights_sha256(ref.state_dict())
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x, z = inputs(ref)
    assert_parity(vae, ref, x, z)


def test_diffusers_folder_bin(tmp_path):
    ref = make_tiny_reference(**CONFIGS["gelu-bilinear-c16"])
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    vae = load_tiny(tmp_path)
    assert vae.info.path.endswith(".bin")
    x, z = inputs(ref)
    assert_parity(vae, ref, x, z)


def test_single_diffusers_file_infers_config(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    save_file(ref.state_dict(), str(tmp_path / "taesd_like.safetensors"))
    vae = load_tiny(tmp_path / "taesd_like.safetensors")
    assert vae.info.layout == "diffusers" and vae.info.config_source == "inferred from shapes"
    assert vae.config == TinyConfig.from_dict(ref.config)
    x, z = inputs(ref)
    assert_parity(vae, ref, x, z)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("name", PAIR_CONFIGS)
def test_original_pair(tmp_path, name, suffix):
    ref = make_tiny_reference(**CONFIGS[name])
    enc, dec = write_pair(ref, tmp_path / "vae_approx", "taesd3", suffix)
    expected = TinyConfig.from_dict(ref.config)
    x, z = inputs(ref, (64, 48))
    sha = weights_sha256(ref.state_dict())
    for given in (tmp_path / "vae_approx", enc, dec):  # the folder, or either file of the pair
        vae = load_tiny(given)
        assert vae.config == expected  # every shape-readable field read, the rest taesd.py's
        assert vae.info.layout == "taesd" and vae.info.config_source == "inferred from shapes"
        assert vae.info.path == f"{enc} + {dec}" and vae.info.weights_sha256 == sha
        assert any("cannot be read" in n for n in vae.info.notes)
        assert_parity(vae, ref, x, z)


def test_original_pair_keeps_file_dtype(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    write_pair(ref, tmp_path, "taesdxl", ".pth", dtype=torch.float16)
    assert load_tiny(tmp_path).dtype == torch.float16
    vae = load_tiny(tmp_path, dtype=torch.float32)
    assert vae.dtype == torch.float32
    x, z = inputs(ref)
    assert_parity(vae, ref, x, z, dict(atol=0.02, rtol=0.02))  # fp16-rounded weights


def test_comfyui_combined_checkpoint(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    halves = diffusers_to_original(ref.state_dict())
    state = {f"taesd_{half}.{k}": v for half, s in halves.items() for k, v in s.items()}
    state.update(vae_scale=torch.tensor(0.18215), vae_shift=torch.tensor(0.0))
    save_file(state, str(tmp_path / "taesd_combined.safetensors"))
    vae = load_tiny(tmp_path / "taesd_combined.safetensors")
    assert vae.info.layout == "taesd" and any("vae_scale" in n for n in vae.info.notes)
    x, z = inputs(ref)
    assert_parity(vae, ref, x, z)


# ----------------------------------------------------------------------------------------- rename table


def test_rename_table_both_directions():
    ref = make_tiny_reference(**CONFIGS["x4-upsampling-relu-c16"])
    state = ref.state_dict()
    original = diffusers_to_original(state)
    back = original_to_diffusers(original)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    again = diffusers_to_original(back)
    assert {h: set(s) for h, s in again.items()} == {h: set(s) for h, s in original.items()}
    for key in state:
        assert original_to_diffusers_key(*diffusers_to_original_key(key)) == key
    for half, keys in original.items():
        for key in keys:
            assert diffusers_to_original_key(original_to_diffusers_key(half, key)) == (half, key)


def test_rename_table_matches_taesd_py_indices():
    """taesd.py's Encoder/Decoder Sequentials (madebyollin/taesd): the decoder's layer 0 is a Clamp, 2 the
    ReLU after the first conv, 6/11/16 the Upsamples; every encoder layer holds weights."""
    original = diffusers_to_original(make_tiny_reference().state_dict())  # diffusers' defaults = TAESD
    layers = {h: sorted({int(k.split(".")[0]) for k in s}) for h, s in original.items()}
    assert layers["encoder"] == list(range(15))
    assert layers["decoder"] == [1, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 19]
    assert original["decoder"]["1.weight"].shape == (64, 4, 3, 3) and "1.bias" in original["decoder"]
    assert "7.weight" in original["decoder"] and "7.bias" not in original["decoder"]  # bias-free conv
    assert original["encoder"]["14.weight"].shape == (4, 64, 3, 3)
    assert original_to_diffusers_key("decoder", "3.pool.1.bias") == "decoder.layers.2.pool.1.bias"
    assert original_to_diffusers_key("encoder", "11.conv.4.weight") == "encoder.layers.11.conv.4.weight"
    with pytest.raises(WeightsError, match="holds no weights"):
        original_to_diffusers_key("decoder", "0.weight")  # the Clamp
    with pytest.raises(WeightsError):
        diffusers_to_original_key("encoder.conv_in.weight")


def test_detection(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    ref.save_pretrained(tmp_path)
    assert is_tiny_config(json.loads((tmp_path / "config.json").read_text()))
    assert is_tiny_config(TinyConfig().to_dict())
    assert not is_tiny_config({"_class_name": "AutoencoderKL"})
    assert not is_tiny_config({k: v for k, v in ref.config.items() if k != "_class_name"})
    assert is_tiny_state(ref.state_dict().keys())
    original = diffusers_to_original(ref.state_dict())
    assert is_tiny_state(original["encoder"]) and is_tiny_state(original["decoder"])
    assert not is_tiny_state(["encoder.conv_in.weight", "decoder.conv_in.weight"])
    assert not is_tiny_state([])
    from conftest import make_reference

    assert not is_tiny_state(make_reference(block_out_channels=[32]).state_dict().keys())


# ------------------------------------------------------------------------------------------ config checks


def test_config_defaults_are_diffusers():
    from diffusers import AutoencoderTiny as DiffusersTiny

    theirs = DiffusersTiny().config
    ours = TinyConfig()
    for key, value in ours.to_dict().items():
        if key != "_class_name":
            assert theirs[key] == (tuple(value) if isinstance(value, list) else value), key
    assert TinyConfig.from_dict(theirs) == ours
    assert ours.downsample_factor == 8


def test_config_round_trip_and_diffusers_accepts_it():
    from diffusers import AutoencoderTiny as DiffusersTiny

    cfg = TinyConfig.from_dict(CONFIGS["x4-upsampling-relu-c16"])
    assert TinyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.downsample_factor == 16
    theirs = DiffusersTiny.from_config(cfg.to_dict())
    assert theirs.state_dict().keys() == AutoencoderTiny(cfg).state_dict().keys()


BAD_CONFIGS = [
    (dict(encoder_block_out_channels=[16, 32, 32, 32]), "must all be equal"),
    (dict(num_decoder_blocks=[3, 3, 1]), "same length"),
    (dict(act_fn="tanh"), "unsupported act_fn"),
    (dict(upsample_fn="linear"), "unsupported upsample_fn"),
    (dict(latent_channels=0), "latent_channels must be an integer"),
    (dict(in_channels=True), "in_channels must be an integer"),
    (dict(out_channels=3.0), "out_channels must be an integer"),
    (dict(upsampling_scaling_factor=4), "must undo"),
    (dict(num_encoder_blocks=[1, -1, 3, 3]), "num_encoder_blocks must hold integers"),
    (dict(decoder_block_out_channels=[]), "decoder_block_out_channels must be a list"),
    (dict(encoder_block_out_channels="64"), "encoder_block_out_channels must be a list"),
    (dict(latent_magnitude=0), "latent_magnitude"),
    (dict(latent_shift=float("nan")), "latent_shift"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(shift_factor="0.1"), "shift_factor"),
    (dict(force_upcast=1), "force_upcast must be true or false"),
    (dict(midblock_gn="yes"), "midblock_gn must be true or false"),
]


@pytest.mark.parametrize("changes,message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_config_validation(changes, message):
    with pytest.raises(ConfigError, match="invalid tiny VAE config: .*" + message):
        TinyConfig.from_dict(changes)


def test_config_from_dict_ignores_bookkeeping_and_rejects_unknown_types():
    cfg = TinyConfig.from_dict({"_class_name": "AutoencoderTiny", "_diffusers_version": "0.42.1",
                                "block_out_channels": [1, 2], "act_fn": "ReLU"})  # diffusers lower-cases act_fn
    assert cfg.act_fn == "ReLU" and cfg.decoder_block_out_channels == (64, 64, 64, 64)
    with pytest.raises(ConfigError, match="invalid tiny VAE config"):
        TinyConfig(encoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 1), decoder_block_out_channels=(16,),
                   num_decoder_blocks=(1,))  # 2x down, no upsampling


# ------------------------------------------------------------------------------------------ strict loading


def test_missing_and_unexpected_keys_named(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    ref.save_pretrained(tmp_path)
    state = dict(ref.state_dict())
    del state["decoder.layers.2.conv.2.weight"]
    state["encoder.layers.3.pool.0.weight"] = torch.zeros(64, 16, 1, 1)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError) as info:
        load_tiny(tmp_path)
    assert "missing keys (1): decoder.layers.2.conv.2.weight" in str(info.value)
    assert "unexpected keys (1): encoder.layers.3.pool.0.weight" in str(info.value)


def test_shape_mismatch_named(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["latent_channels"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    mismatch = r"shape mismatches \(3\): decoder.layers.0.weight \(24, 4, 3, 3\) != \(24, 16, 3, 3\)"
    with pytest.raises(WeightsError, match=mismatch):
        load_tiny(tmp_path)


def test_missing_half_named(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    enc, dec = write_pair(ref, tmp_path, "taef1", ".safetensors")
    dec.unlink()
    with pytest.raises(WeightsError, match="its decoder half taef1_decoder.safetensors .* is missing"):
        load_tiny(enc)
    with pytest.raises(WeightsError, match="holds taef1_encoder.safetensors but not its decoder half"):
        load_tiny(tmp_path)
    with pytest.raises(WeightsError, match="its decoder half"):
        find_tiny_pair(enc)
    enc.rename(tmp_path / "encoder_weights.safetensors")  # a name that does not say where the other half is
    with pytest.raises(WeightsError, match="holds only the encoder of a TAESD pair"):
        load_tiny(tmp_path / "encoder_weights.safetensors")


def test_swapped_halves_and_several_pairs(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    enc, dec = write_pair(ref, tmp_path / "swapped", "taesd", ".pth")
    tmp = enc.with_name("tmp.pth")
    enc.rename(tmp), dec.rename(enc), tmp.rename(dec)
    with pytest.raises(WeightsError, match="expected the encoder of a TAESD pair, found decoder weights"):
        load_tiny(tmp_path / "swapped")
    write_pair(ref, tmp_path / "both", "taesd", ".safetensors")
    write_pair(ref, tmp_path / "both", "taesdxl", ".pth")
    with pytest.raises(WeightsError, match=r"several tiny VAE pairs \(taesd, taesdxl\)"):
        load_tiny(tmp_path / "both")
    assert load_tiny(tmp_path / "both" / "taesdxl_decoder.pth").info.path.endswith("taesdxl_decoder.pth")


def test_not_tiny_refused(tmp_path, reference):
    kl = reference(block_out_channels=[32])
    kl.save_pretrained(tmp_path / "kl")
    with pytest.raises(WeightsError, match="does not describe an AutoencoderTiny"):
        load_tiny(tmp_path / "kl")
    with pytest.raises(WeightsError, match="not tiny VAE weights"):
        load_tiny(tmp_path / "kl" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="no tiny VAE here"):
        load_tiny(tmp_path / "nothing")
    assert find_tiny_pair(tmp_path / "kl") is None


def test_non_finite_weights_refused(tmp_path):
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    state = dict(ref.state_dict())
    state["decoder.layers.0.bias"] = torch.full_like(state["decoder.layers.0.bias"], float("nan"))
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match="NaN or Inf"):
        load_tiny(tmp_path / "w.safetensors")


def test_inference_refuses_inconsistent_shapes():
    ref = make_tiny_reference(**CONFIGS["levels4-relu-c4"])
    state = {k: v for k, v in ref.state_dict().items() if k.startswith("encoder.")}
    with pytest.raises(WeightsError, match="no decoder.layers"):
        infer_tiny_config(state)
