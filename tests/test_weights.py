"""Loading: diffusers folders and files, original LDM single files (checked against diffusers' own
from_single_file), config inference, strictness and safety."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import vaecli
from vaecli.errors import ConfigError, WeightsError
from vaecli.kl_weights import diffusers_to_ldm, diffusers_to_ldm_key, ldm_to_diffusers, ldm_to_diffusers_key

CFG = dict(block_out_channels=[16, 32, 32], layers_per_block=2, norm_num_groups=8, latent_channels=4)
TOL = dict(atol=1e-5, rtol=0)


def assert_same_function(ours, ref, in_ch=3, size=(24, 40)):
    torch.manual_seed(5)
    x = torch.rand(1, in_ch, *size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, **TOL)
        torch.testing.assert_close(ours.encode(x).logvar, ref.encode(x).latent_dist.logvar, **TOL)
        z = torch.randn(1, ref.config.latent_channels, size[0] // 4, size[1] // 4)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, **TOL)


def ldm_state(ref) -> dict[str, torch.Tensor]:
    """The test's own diffusers -> CompVis key mapping, written from the LDM source (not shared with vaecli);
    diffusers' from_single_file is the judge of whether it is right."""
    levels = len(ref.config.block_out_channels)
    out = {}
    for key, value in ref.state_dict().items():
        k = key
        m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
        if m:
            k = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
        if m:
            k = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k)
        if m:
            k = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)
        if m:
            k = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for new, old in attn.items():
            if f"mid_block.attentions.0.{new}." in k:
                k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
                if old != "norm" and value.ndim == 2:
                    value = value[:, :, None, None]
        out[k] = value.contiguous()
    return out


@pytest.fixture
def ref(reference):
    return reference(**CFG)


def test_diffusers_folder_safetensors(ref, tmp_path):
    ref.save_pretrained(tmp_path)
    vae = vaecli.load_vae(tmp_path)
    assert vae.info.layout == "diffusers" and vae.info.config_source == "config.json"
    assert not vae.training
    assert_same_function(vae, ref)


def test_diffusers_folder_bin_and_pipeline_subfolder(ref, tmp_path):
    ref.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=False)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    vae = vaecli.load_vae(tmp_path / "pipe")
    assert vae.info.path.endswith("diffusion_pytorch_model.bin")
    assert_same_function(vae, ref)


def test_fp16_variant_loads_into_requested_dtype(ref, tmp_path):
    from diffusers import AutoencoderKL

    ref.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    ref16 = AutoencoderKL.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float32).eval()
    vae = vaecli.load_vae(tmp_path, dtype=torch.float32)
    assert next(vae.parameters()).dtype == torch.float32
    assert_same_function(vae, ref16)
    bf = vaecli.load_vae(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_ldm_single_file_matches_from_single_file(ref, tmp_path, prefix):
    from diffusers import AutoencoderKL

    state = {prefix + k: v for k, v in ldm_state(ref).items()}
    if prefix == "first_stage_model.":  # a whole SD checkpoint: other parts must be ignored
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
        state["cond_stage_model.transformer.x"] = torch.zeros(3)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    ref.save_pretrained(tmp_path / "cfg")
    if prefix == "vae.":
        theirs = ref  # diffusers' single-file loader does not know the "vae." prefix
    else:
        theirs = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "cfg"), local_files_only=True).eval()
        for k, v in ref.state_dict().items():  # the judge agrees our test mapping is right
            torch.testing.assert_close(theirs.state_dict()[k], v, atol=0, rtol=0)
    vae = vaecli.load_vae(path, config=tmp_path / "cfg")
    assert vae.info.layout == "ldm"
    assert_same_function(vae, theirs)


def test_ckpt_lightning_state_dict_and_inference(reference, tmp_path):
    ref = reference(block_out_channels=[32, 64, 64], layers_per_block=2, latent_channels=4)  # 32 groups
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in ldm_state(ref).items()}, "epoch": 3}, path)
    vae = vaecli.load_vae(path)  # no config: inferred from shapes
    cfg = vae.config
    assert cfg.block_out_channels == (32, 64, 64)
    assert cfg.layers_per_block == 2 and cfg.latent_channels == 4
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    assert cfg.scaling_factor == 0.18215 and cfg.norm_num_groups == 32
    assert any("SD" in n for n in vae.info.notes)
    assert_same_function(vae, ref)


def test_inference_16ch_no_quant_and_family(reference, tmp_path):
    ref = reference(block_out_channels=[32, 32], latent_channels=16, use_quant_conv=False,
                    use_post_quant_conv=False, mid_block_add_attention=False, norm_num_groups=32)
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    vae = vaecli.load_vae(path, family="flux")
    cfg = vae.config
    assert cfg.latent_channels == 16 and not cfg.use_quant_conv and not cfg.use_post_quant_conv
    assert not cfg.mid_block_add_attention and cfg.norm_num_groups == 32
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159) and not vae.info.notes
    assert_same_function(vae, ref)
    assert vaecli.load_vae(path, family="sdxl").config.scaling_factor == 0.13025


def test_config_forms(ref, tmp_path):
    ref.save_pretrained(tmp_path / "cfg")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    as_dict = json.loads((tmp_path / "cfg" / "config.json").read_text())
    for config in (tmp_path / "cfg", tmp_path / "cfg" / "config.json", as_dict):
        vae = vaecli.load_vae(path, config=config)
        assert vae.config.block_out_channels == (16, 32, 32) and vae.info.config_source == "given"
    assert_same_function(vae, ref)


def test_legacy_attention_names(ref, tmp_path):
    legacy = {}
    for k, v in ref.state_dict().items():
        for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
            k = k.replace("attentions.0." + new, "attentions.0." + old)
        legacy[k] = v.contiguous()
    save_file(legacy, str(tmp_path / "old.safetensors"))
    assert_same_function(vaecli.load_vae(tmp_path / "old.safetensors", config=dict(ref.config)), ref)


def test_inferred_groups_fall_back_when_32_does_not_divide(ref, tmp_path):
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    vae = vaecli.load_vae(tmp_path / "w.safetensors")  # channels 16, 32, 32
    assert vae.config.norm_num_groups == 16
    assert any("norm_num_groups" in n for n in vae.info.notes)


def test_rename_table_both_directions(ref):
    levels = len(ref.config.block_out_channels)
    ldm = ldm_state(ref)
    diff_keys = list(ref.state_dict())
    assert sorted(ldm_to_diffusers_key(k, levels) for k in ldm) == sorted(diff_keys)
    assert sorted(diffusers_to_ldm_key(k, levels) for k in diff_keys) == sorted(ldm)
    for k in diff_keys:
        assert ldm_to_diffusers_key(diffusers_to_ldm_key(k, levels), levels) == k


def test_whole_state_renames_both_directions(ref):
    """The state-dict level of the rename table (attention tensors reshaped between conv and linear), both
    ways, against the test's own LDM mapping."""
    ldm = ldm_state(ref)
    ours = diffusers_to_ldm(ref.state_dict())
    assert sorted(ours) == sorted(ldm)
    for k, v in ldm.items():
        torch.testing.assert_close(ours[k], v, atol=0, rtol=0)
    back = ldm_to_diffusers(ours)
    assert sorted(back) == sorted(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0)


def test_weights_sha256_independent_of_layout(ref, tmp_path):
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "a.safetensors"))
    save_file(ldm_state(ref), str(tmp_path / "b.safetensors"))
    a = vaecli.load_vae(tmp_path / "a.safetensors").info.weights_sha256
    b = vaecli.load_vae(tmp_path / "b.safetensors").info.weights_sha256
    assert a == b and len(a) == 64


# ------------------------------------------------------------------------------------------- error cases


def save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_missing_key_named(ref, tmp_path):
    state = ref.state_dict()
    del state["decoder.conv_out.bias"]
    with pytest.raises(WeightsError, match=r"missing keys \(1\): decoder.conv_out.bias"):
        vaecli.load_vae(save(state, tmp_path / "m.safetensors"), config=dict(ref.config))


def test_unexpected_key_named(ref, tmp_path):
    state = ref.state_dict()
    state["decoder.extra.weight"] = torch.zeros(2)
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): decoder.extra.weight"):
        vaecli.load_vae(save(state, tmp_path / "u.safetensors"), config=dict(ref.config))


def test_shape_mismatch_named(ref, tmp_path):
    state = ref.state_dict()
    state["encoder.conv_norm_out.weight"] = torch.ones(7)
    with pytest.raises(WeightsError, match=r"shape mismatches \(1\): encoder.conv_norm_out.weight \(7,\) != \(32,\)"):
        vaecli.load_vae(save(state, tmp_path / "s.safetensors"), config=dict(ref.config))


def test_config_not_describing_the_weights_fails_before_building(ref, tmp_path, monkeypatch):
    path = save(ref.state_dict(), tmp_path / "w.safetensors")
    built = []
    import vaecli.kl_weights

    monkeypatch.setattr(vaecli.kl_weights, "build_model", lambda *a, **k: built.append(1))  # what load_kl calls
    config = {**dict(ref.config), "latent_channels": 8, "layers_per_block": 3}
    with pytest.raises(WeightsError,
                       match=r"layers_per_block 3 in the config, 2 in the weights; latent_channels 8 in the config, 4"):
        vaecli.load_vae(path, config=config)
    assert built == []  # refused from shapes alone, before any module was constructed


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.fill_(float("nan")),
     r"1 tensor\(s\) hold NaN or Inf values \(a damaged file\?\): decoder.conv_out.weight"),
    (lambda t: t.to(torch.int8),
     r"1 tensor\(s\) are not floating point \(quantized weights are not supported\): decoder.conv_out.weight"),
])
def test_non_finite_or_integer_weights_refused(ref, tmp_path, damage, message):
    state = ref.state_dict()
    state["decoder.conv_out.weight"] = damage(state["decoder.conv_out.weight"].clone())
    with pytest.raises(WeightsError, match=message):
        vaecli.load_vae(save(state, tmp_path / "d.safetensors"), config=dict(ref.config))


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder"):
        vaecli.load_vae(tmp_path / "nope.safetensors")


def test_folder_without_weights(tmp_path):
    with pytest.raises(WeightsError, match="no diffusers weights found"):
        vaecli.load_vae(tmp_path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        vaecli.load_vae(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unsupported weights format"):
        vaecli.load_vae(path)


def test_file_without_vae_keys(tmp_path):
    with pytest.raises(WeightsError, match="no VAE weights recognised"):
        vaecli.load_vae(save({"model.diffusion_model.x": torch.zeros(2)}, tmp_path / "unet.safetensors"))


def test_bad_config_values(ref, tmp_path):
    path = save(ref.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="not divisible by norm_num_groups"):
        vaecli.load_vae(path, config={**dict(ref.config), "norm_num_groups": 5})
    with pytest.raises(ConfigError, match="no such file"):
        vaecli.load_vae(path, config=tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown model family"):
        vaecli.load_vae(path, family="sd4")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch evil-ran",))


def test_pickle_code_never_executes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"x": _Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="weights_only"):
        vaecli.load_vae(tmp_path / "evil.ckpt")
    assert not (tmp_path / "evil-ran").exists()
