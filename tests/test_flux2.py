"""FLUX.2's VAE (diffusers' AutoencoderKLFlux2) against diffusers on identical random weights: encode, decode,
the pipelines' latent normalization, both file layouts, the plans, tiling, and the CLI."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vaecli
from cli_support import run_cli, run_json
from vaecli.config import Flux2Config, VAEConfig
from vaecli.errors import ConfigError, WeightsError
from vaecli.kl_weights import diffusers_to_bfl
from vaecli.models.kl import build_model
from vaecli.plans import REFERENCE, apply_layout, plan_for
from vaecli.tiling import tiled_decode

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "coffee.jpg"
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32: test_model_parity's 1e-5, plus 1e-5 relative (outputs reach ~3 here)
BF16 = dict(atol=0.1, rtol=0.05)  # as test_model_parity's half-precision test

CONFIGS = {
    "asymmetric-decoder": dict(block_out_channels=[32, 64, 64, 64], decoder_block_out_channels=[32, 32, 64, 64],
                               layers_per_block=1, latent_channels=8, norm_num_groups=32),
    "layers2-latent4-groups8": dict(block_out_channels=[16, 32, 32], layers_per_block=2, latent_channels=4,
                                    norm_num_groups=8),
    "no-quant-eps-gelu": dict(block_out_channels=[24, 48], layers_per_block=1, latent_channels=6, norm_num_groups=12,
                              use_quant_conv=False, use_post_quant_conv=False, batch_norm_eps=1e-3, act_fn="gelu"),
}


def make_flux2(seed: int = 0, jitter: float = 0.02, **config):
    """A diffusers AutoencoderKLFlux2 with seeded random weights and non-trivial batch-norm statistics."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    levels = len(config["block_out_channels"])
    config.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
    config.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    model = AutoencoderKLFlux2(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.3, 3.0)
        model.bn.num_batches_tracked.fill_(1234)
    return model


def pipeline_static(name: str):
    """A static method of diffusers' Flux2Pipeline, compiled from its source file (importing the pipeline
    needs transformers, which the VAE does not)."""
    path = Path(importlib.util.find_spec("diffusers").origin).parent / "pipelines" / "flux2" / "pipeline_flux2.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Flux2Pipeline")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list = []
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module([fn], []), str(path), "exec"), namespace)  # noqa: S102 - diffusers' own source
    return namespace[name]


def pipeline_normalize(ref, z):
    """What Flux2Pipeline._encode_vae_image hands the transformer for raw latents z."""
    z = pipeline_static("_patchify_latents")(z)
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return (z - mean) / std


def bfl_file(ref, path: Path) -> Path:
    """Black Forest Labs' ae.safetensors layout (flux2/src/flux2/autoencoder.py): LDM keys, the moment convs
    inside encoder/decoder (encoder.quant_conv, decoder.post_quant_conv), the bn statistics as in diffusers."""
    state = diffusers_to_bfl(ref.state_dict())
    if ref.config.use_quant_conv:
        assert "encoder.quant_conv.weight" in state and "quant_conv.weight" not in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def load_both(ref, tmp_path: Path, layout: str):
    if layout == "diffusers":
        ref.save_pretrained(tmp_path / "folder")
        return vaecli.load_vae(tmp_path / "folder")
    path = bfl_file(ref, tmp_path / "ae.safetensors")
    if ref.config.norm_num_groups == 32:  # what a bare file implies (GroupNorm groups leave no trace in weights)
        return vaecli.load_vae(path)
    return vaecli.load_vae(path, config={**ref.config, "_class_name": "AutoencoderKLFlux2"})  # file + its config


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = ((a.clamp(-1, 1) + 1) * 127.5).round(), ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = (qa - qb).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_in_both_layouts(name, layout, tmp_path):
    ref = make_flux2(**CONFIGS[name])
    ours = load_both(ref, tmp_path, layout)
    assert type(ours).__name__ == "AutoencoderKLFlux2" and isinstance(ours.config, Flux2Config)
    quant = ref.config.use_quant_conv  # without moment convs, BFL's keys are the LDM ones
    assert ours.info.layout == ("diffusers" if layout == "diffusers" else "bfl" if quant else "ldm")
    assert not ours.info.family_assumed
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        theirs, mine = ref.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(mine.mean, theirs.mean, **TOL)
        torch.testing.assert_close(mine.logvar, theirs.logvar, **TOL)
        z = theirs.mean
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, **TOL)
        spec = ours.config.latent_spec
        torch.testing.assert_close(spec.normalize(z), pipeline_normalize(ref, z), atol=0, rtol=0)
        torch.testing.assert_close(spec.patchify(z), pipeline_static("_patchify_latents")(z), atol=0, rtol=0)
        torch.testing.assert_close(spec.unpatchify(spec.patchify(z)), pipeline_static("_unpatchify_latents")(
            spec.patchify(z)), atol=0, rtol=0)
        torch.testing.assert_close(spec.denormalize(spec.normalize(z)), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(spec.normalize(z[0]), pipeline_normalize(ref, z)[0], atol=0, rtol=0)  # (C, h, w)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_every_plan_matches_diffusers(device, kernels):
    """The CPU and CUDA plans (the CUDA kernels under Triton's interpreter on CPU tensors), fp32 and bf16."""
    if device == "cuda" and kernels == "auto":
        pytest.importorskip("triton", reason="Triton wheels exist for Linux only; CI runs this there")
    cfg = dict(CONFIGS["asymmetric-decoder"], block_out_channels=[32, 64, 256, 256],
               decoder_block_out_channels=[32, 64, 256, 256], norm_num_groups=32)  # wide: the CPU's fast forms
    ref = make_flux2(**cfg)
    ours = build_model(Flux2Config.from_dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    plan = plan_for(device, ours.config, "on" if device == "cuda" and kernels == "auto" else kernels)
    apply_layout(ours, plan)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
        z = theirs.mean
        exact = plan is REFERENCE
        tol = dict(atol=0, rtol=0) if exact else dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.encode(x, plan=plan).mean, theirs.mean, **tol)
        torch.testing.assert_close(ours.decode(z, plan=plan), ref.decode(z).sample, **tol)
        ref16, ours16 = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        torch.testing.assert_close(ours16.decode(z.bfloat16(), plan=plan).float(),
                                   ref16.decode(z.bfloat16()).sample.float(), **BF16)


def test_tiled_decode_of_1024_matches_untiled():
    """Trained weights (random ones decode to values of +-13, where seams say nothing about photos): the
    embedded model's encoder and decoder as a FLUX.2 VAE, with batch-norm statistics of its own."""
    base = vaecli.load_vae()
    cfg = Flux2Config.from_dict({**base.config.to_dict(), "_class_name": "AutoencoderKLFlux2"})
    ours = build_model(cfg).eval()
    bn = {"bn.running_mean": torch.randn(cfg.bn_channels), "bn.running_var": torch.rand(cfg.bn_channels) + 0.5,
          "bn.num_batches_tracked": torch.tensor(1)}
    ours.load_state_dict({**base.state_dict(), **bn}, strict=True)
    img = Image.open(PHOTO).convert("RGB").resize((1024, 1024), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = ours.encode(x).mean
        whole = ours.decode(z)
        tiled, report = tiled_decode(ours, z, 256, 64)
    assert report.tiles > 1
    assert psnr(tiled, whole) >= 40.0


# ------------------------------------------------------------------------------ identification, refusals


def test_the_silent_case_now_names_the_class(tmp_path):
    """The folder of the issue: diffusers' AutoencoderKLFlux2 saved as is."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    AutoencoderKLFlux2(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=8,
                       norm_num_groups=16).save_pretrained(tmp_path / "flux2")
    code, doc, _ = run_json("info", tmp_path / "flux2")
    assert code == 0 and doc["class_name"] == "AutoencoderKLFlux2" and doc["family"] == "flux2"
    assert doc["normalization"].startswith("2x2 patchify, then per-channel batch-norm statistics (32 channels)")
    assert doc["latent_spec"]["patch_size"] == 2 and len(doc["latent_spec"]["latents_mean"]) == 32
    assert doc["size_multiple"] == 16 and doc["latent_spec"]["scaling_factor"] == 1.0
    human = run_cli("info", tmp_path / "flux2")
    assert "FLUX.2 VAE" in human.stdout and "2x2 patchify" in human.stdout and "multiples of 16" in human.stdout


def test_flux2_weights_are_never_loaded_as_plain_autoencoderkl(tmp_path):
    ref = make_flux2(**CONFIGS["layers2-latent4-groups8"])
    ref.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    plain = {k: v for k, v in config.items() if k in VAEConfig.__dataclass_fields__}
    with pytest.raises(WeightsError, match="FLUX.2 VAE's batch-norm statistics.*AutoencoderKLFlux2"):
        vaecli.load_vae(tmp_path / "m" / "diffusion_pytorch_model.safetensors", config=plain)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    code, doc, _ = run_json("info", tmp_path / "m")
    assert code == 2 and "AutoencoderKLFlux2" in doc["error"]
    # an asymmetric decoder without its config cannot be an AutoencoderKL either: bn keys say FLUX.2
    single = vaecli.load_vae(bfl_file(make_flux2(**CONFIGS["asymmetric-decoder"]), tmp_path / "ae.safetensors"))
    assert single.config.decoder_channels == (32, 32, 64, 64)
    with pytest.raises(ConfigError, match="--family sdxl does not apply"):
        vaecli.load_vae(tmp_path / "ae.safetensors", family="sdxl")


def test_unknown_and_unsupported_classes_are_refused(tmp_path, reference):
    ref = reference(block_out_channels=[16, 16], norm_num_groups=8)
    ref.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for name, words in (("AutoencoderDC", "not supported yet"), ("UNet2DModel", "not a VAE class vaecli knows")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "_class_name": name}))
        with pytest.raises(ConfigError, match=f"this is a {name} model: {words}"):
            vaecli.load_vae(tmp_path / "m")


@pytest.mark.parametrize("change,words", [
    (dict(decoder_block_out_channels=[16, 32]), "decoder_block_out_channels has 2 levels"),
    (dict(decoder_block_out_channels=[16, 32, 30, 32]), "not all divisible by norm_num_groups"),
    (dict(batch_norm_eps=0), "batch_norm_eps must be a number in"),
    (dict(batch_norm_momentum=2), "batch_norm_momentum must be"),
    (dict(patch_size=[2, 1]), "only square patches"),
    (dict(patch_size=[0, 0]), "patch_size must be two integers"),
])
def test_config_fields_are_validated(change, words):
    base = dict(CONFIGS["asymmetric-decoder"], _class_name="AutoencoderKLFlux2")
    with pytest.raises(ConfigError, match=words):
        vaecli.families.config_from_dict({**base, **change})


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def flux2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux2") / "m"
    make_flux2(**CONFIGS["asymmetric-decoder"]).save_pretrained(folder)
    return folder


def test_cli_roundtrip_equals_diffusers(flux2_folder, tmp_path):
    from diffusers import AutoencoderKLFlux2

    photo = tmp_path / "in" / "photo.png"
    photo.parent.mkdir()
    Image.open(PHOTO).convert("RGB").resize((256, 192), Image.BICUBIC).save(photo)
    code, doc, _ = run_json("roundtrip", photo.parent, "-o", tmp_path / "rec", "-m", flux2_folder)
    assert code == 0 and doc["ok"] == 1
    ref = AutoencoderKLFlux2.from_pretrained(flux2_folder).eval()
    x = torch.from_numpy(np.asarray(Image.open(photo)).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        theirs = ref.decode(ref.encode(x).latent_dist.mean).sample
    mine = torch.from_numpy(np.asarray(Image.open(tmp_path / "rec" / "photo.png")).copy()).permute(2, 0, 1)[None]
    assert psnr(mine.float() / 127.5 - 1, theirs) >= 45.0


def test_cli_files_hold_the_pipelines_latents(flux2_folder, tmp_path):
    """vaecli files hold the normalized, patchified latents (self-describing); sides are padded to 16;
    ComfyUI files hold the same form (its Flux2 latent format: 4C channels, no process_in scaling)."""
    from diffusers import AutoencoderKLFlux2

    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    Image.open(PHOTO).convert("RGB").resize((100, 72), Image.BICUBIC).save(src)
    assert run_json("encode", src.parent, "-o", tmp_path / "z", "-m", flux2_folder)[0] == 0
    assert run_json("encode", src.parent, "-o", tmp_path / "c", "-m", flux2_folder, "--format", "comfyui")[0] == 0
    assert run_json("encode", src.parent, "-o", tmp_path / "r", "-m", flux2_folder, "--raw")[0] == 0
    ours = load_file(str(tmp_path / "z" / "a.safetensors"))["latent"]
    comfy = load_file(str(tmp_path / "c" / "a.latent"))["latent_tensor"]
    raw = load_file(str(tmp_path / "r" / "a.safetensors"))["latent"]
    assert ours.shape == (32, 5, 7) and comfy.shape == (1, 32, 5, 7) and raw.shape == (8, 10, 14)  # 112x80 pixels
    ref = AutoencoderKLFlux2.from_pretrained(flux2_folder).eval()
    img = np.asarray(Image.open(src)).astype(np.float32)
    padded = np.pad(img, ((0, 8), (0, 12), (0, 0)), mode="edge")  # pad policy: replicate to 80x112
    x = torch.from_numpy(padded).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        expected = pipeline_normalize(ref, ref.encode(x).latent_dist.mode())[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(comfy[0], ours, atol=0, rtol=0)
    # all three decode to the same image at the original size
    images = []
    for folder in ("z", "c", "r"):
        assert run_json("decode", tmp_path / folder, "-o", tmp_path / f"px-{folder}", "-m", flux2_folder)[0] == 0
        images.append(np.asarray(Image.open(next((tmp_path / f"px-{folder}").iterdir()))))
    assert images[0].shape == (72, 100, 3) and images[2].shape == (72, 100, 3)
    assert np.array_equal(images[0], images[1]) and np.abs(images[0].astype(int) - images[2]).max() <= 1
    # a ComfyUI file written by ComfyUI itself (no vaecli metadata) decodes through the model's statistics
    save_file({"latent_tensor": comfy.contiguous(), "latent_format_version_0": torch.tensor([])},
              str(tmp_path / "plain.latent"))
    code, doc, _ = run_json("decode", tmp_path / "plain.latent", "-o", tmp_path / "plain.png", "-m", flux2_folder)
    assert code == 0 and np.asarray(Image.open(tmp_path / "plain.png")).shape == (80, 112, 3)


def test_dataset_caches_carry_the_flux2_normalization(flux2_folder, tmp_path):
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    Image.open(PHOTO).convert("RGB").resize((90, 60), Image.BICUBIC).save(src)
    common = ("--dataset", "-m", flux2_folder, "--bucket-resolution", "64", "--bucket-step", "16")
    assert run_json("encode", src.parent, "-o", tmp_path / "ds", *common)[0] == 0
    assert run_json("encode", src.parent, "-o", tmp_path / "dc", *common, "--format", "comfyui")[0] == 0
    ours = load_file(str(tmp_path / "ds" / "a.safetensors"))["latent"]
    comfy = load_file(str(tmp_path / "dc" / "a.latent"))["latent_tensor"]
    assert ours.shape[0] == 32 and comfy.shape[1] == 32 and torch.equal(comfy[0], ours)  # 4C: patchified
    record = json.loads((tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["latent_spec"]["patch_size"] == 2
    code, doc, _ = run_json("encode", src.parent, "-o", tmp_path / "bad", *common[:-1], "8")
    assert code == 2 and "multiple of the VAE's factor 16" in doc["error"]
    for args in (common, ("-m", flux2_folder)):  # a cache sd-scripts would never read is refused up front
        code, doc, _ = run_json("encode", src.parent, "-o", tmp_path / "k", *args, "--format", "kohya")
        assert code == 2 and "sd-scripts does not train AutoencoderKLFlux2" in doc["error"]
        assert not (tmp_path / "k").exists()
