"""encode --dataset --format musubi (vaecli/dataset/musubi_job.py): each image's file is the one musubi-tuner's
own cache step writes, read back through the musubi loader of tests/test_musubi.py and compared with musubi's
normalization of diffusers' posterior mean of the same resized, cropped pixels; the refusals; reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from cli_support import make_model, noise_image, run_json, run_module
from test_flux2 import make_flux2
from test_musubi import musubi_find, musubi_item, qwen_theirs
from test_qwenimage_cli import make_qwen
from vaecli.latents import musubi

R = 64  # --bucket-resolution: musubi's resolution [64, 64]
SIZES = {"wide.png": (100, 62), "small.png": (40, 56), "square.jpg": (64, 64)}  # shrunk, enlarged, as is


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("models")
    flux2 = make_flux2(block_out_channels=[16, 16, 16, 16], layers_per_block=1, latent_channels=32,
                       norm_num_groups=8)
    flux2.save_pretrained(root / "flux2")
    qwen = make_qwen(root / "qwen", base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    return {"flux2": (root / "flux2", flux2), "qwen": (root / "qwen", qwen)}


def images(folder: Path) -> Path:
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        noise_image(folder / name, w, h, seed=i, **({"quality": 95} if name.endswith(".jpg") else {}))
    return folder


def musubi_pixels(path: Path, bucket: tuple[int, int]) -> torch.Tensor:
    """musubi's resize_image_to_bucket (PIL LANCZOS up; down cv2 INTER_AREA, PIL BOX here) and its [-1, 1]
    range: (1, 3, bh, bw)."""
    img = Image.open(path).convert("RGB")
    (w, h), (bw, bh) = img.size, bucket
    scale = max(bw / w, bh / h)
    rw, rh = int(w * scale + 0.5), int(h * scale + 0.5)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.LANCZOS if scale > 1 else Image.BOX)
    a = np.asarray(img)[(rh - bh) // 2:(rh - bh) // 2 + bh, (rw - bw) // 2:(rw - bw) // 2 + bw]
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def flux2_reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """flux_2 AutoEncoder.encode: the mean, patchified 2x2, batch-normalized with the weights' statistics."""
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean[0]
    c, h, w = z.shape
    z = z.reshape(c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3).reshape(1, c * 4, h // 2, w // 2)
    return F.batch_norm(z, model.bn.running_mean, model.bn.running_var, training=False, eps=model.bn.eps)[0]


def qwen_reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = model.encode(x[:, :, None]).latent_dist.mean[0, :, 0]
    return qwen_theirs(z)


def check_caches(out: Path, src: Path, model: torch.nn.Module, arch: str, reference, no_upscale: bool) -> None:
    """Every cache in `out`: its name, its bucket, its tensor against musubi's of diffusers' mean."""
    t = musubi.target(arch)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{Path(n).stem}_{w:04d}x{h:04d}_{t.short}.safetensors" for n, (w, h) in SIZES.items())
    found = musubi_find(out, t.short)
    assert len(found) == 3
    for key, (w, h), path in found:
        name = next(n for n in SIZES if Path(n).stem == key)
        assert (w, h) == SIZES[name]
        bucket = musubi.bucket_resolution((w, h), (R, R), True, no_upscale)
        stored = musubi_item(path)["latents"]
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        assert {k: meta[k] for k in musubi.MUSUBI_KEYS} == {"architecture": t.metadata_name, "width": str(w),
                                                            "height": str(h), "format_version": "1.0.1"}
        want = reference(model, musubi_pixels(src / name, bucket))
        assert stored.dtype == t.dtype and tuple(stored.shape[-2:]) == (bucket[1] // t.cell, bucket[0] // t.cell)
        if t.dtype == torch.float32:
            torch.testing.assert_close(stored, want, atol=1e-5, rtol=1e-5)
        else:  # bf16: equal after the cast, but where fp32 noise crosses a rounding boundary
            cast = want.to(t.dtype)
            assert (stored == cast).float().mean() >= 0.99  # the rest one bf16 step apart: fp32 noise at a tie
            torch.testing.assert_close(stored.float(), cast.float(), atol=0, rtol=2 ** -7)


CASES = [("flux2", "flux_2_dev", flux2_reference), ("flux2", "flux_2_klein_4b", flux2_reference),
         ("qwen", "qwen_image", qwen_reference), ("qwen", "krea2", qwen_reference)]


@pytest.mark.parametrize("family, arch, reference", CASES)
def test_caches_are_musubis(tmp_path, models, family, arch, reference):
    folder, model = models[family]
    src = images(tmp_path / "in")
    out = tmp_path / "cache"
    args = ("encode", src, "-o", out, "-m", folder, "--dataset", "--format", "musubi", "--musubi-arch", arch,
            "--bucket-resolution", str(R))
    code, doc, err = run_json(*args)
    assert code == 0 and doc["ok"] == 3, (doc, err)
    assert any(f"_{musubi.target(arch).short}_te.safetensors" in n for n in doc["notes"])
    check_caches(out, src, model, arch, reference, no_upscale=False)
    code, doc, _ = run_json(*args)  # unchanged: every cache is current
    assert code == 0 and (doc["ok"], doc["skipped"]) == (0, 3)
    code, doc, _ = run_json(*args, "--overwrite")
    assert code == 0 and (doc["ok"], doc["skipped"]) == (3, 0)


def test_no_upscale_buckets(tmp_path, models):
    """musubi's bucket_no_upscale: images within the area keep their size, rounded down to 16 (40x56 -> 32x48)."""
    folder, model = models["flux2"]
    src = images(tmp_path / "in")
    out = tmp_path / "cache"
    code, doc, err = run_json("encode", src, "-o", out, "-m", folder, "--dataset", "--format", "musubi",
                              "--musubi-arch", "flux_2_dev", "--bucket-resolution", str(R), "--no-upscale")
    assert code == 0 and doc["ok"] == 3, (doc, err)
    assert musubi.bucket_resolution((40, 56), (R, R), True, True) == (32, 48)
    check_caches(out, src, model, "flux_2_dev", flux2_reference, no_upscale=True)


def test_a_changed_model_re_encodes(tmp_path, models):
    src = images(tmp_path / "in")
    base = ("encode", src, "-o", tmp_path / "cache", "--dataset", "--format", "musubi", "--bucket-resolution", "64")
    assert run_json(*base, "-m", models["flux2"][0], "--musubi-arch", "flux_2_dev")[1]["ok"] == 3
    code, doc, _ = run_json(*base, "-m", models["flux2"][0], "--musubi-arch", "flux_2_dev", "--bucket-resolution",
                            "48")
    assert code == 0 and doc["ok"] == 3  # another resolution: other buckets, the same names, remade


def test_musubis_own_cache_is_not_replaced_without_overwrite(tmp_path, models):
    src = tmp_path / "in"
    noise_image(src / "a.png", 64, 64)
    out = tmp_path / "cache"
    spec_model = models["flux2"][0]
    theirs = out / musubi.cache_name("a", 64, 64, "flux_2_dev")
    from vaecli import load_vae

    spec = load_vae(spec_model).config.latent_spec
    musubi.write_image_cache(out, "a", (64, 64), torch.zeros(32, 8, 8), "flux_2_dev", spec)  # no vaecli record
    before = theirs.read_bytes()
    args = ("encode", src, "-o", out, "-m", spec_model, "--dataset", "--format", "musubi", "--musubi-arch",
            "flux_2_dev", "--bucket-resolution", "64")
    code, doc, _ = run_json(*args)
    assert code != 0 and doc["failed"] == 1 and theirs.read_bytes() == before
    code, doc, _ = run_json(*args, "--overwrite")
    assert code == 0 and doc["ok"] == 1 and theirs.read_bytes() != before


def refused(tmp_path: Path, *args: str | Path) -> str:
    src = images(tmp_path / "in")
    out = tmp_path / "cache"
    code, doc, err = run_json("encode", src, "-o", out, "--dataset", *args)
    assert code == 2, (doc, err)
    assert not out.exists() or not any(out.rglob("*.safetensors"))
    return err


@pytest.mark.parametrize("flag", [["--flip"], ["--moments"], ["--sample"], ["--layout", "tar"], ["--random-crop"],
                                  ["--kohya-next-to-images"], ["--latent-dtype", "bf16"], ["--raw"]])
def test_options_it_cannot_honour_are_refused(tmp_path, models, flag):
    err = refused(tmp_path, "-m", models["flux2"][0], "--format", "musubi", "--musubi-arch", "flux_2_dev", *flag)
    assert flag[0] in err and len(err.strip().splitlines()) == 1


def test_wrong_family_and_missing_arch_refused(tmp_path, models):
    assert "qwenimage" in refused(tmp_path / "1", "-m", models["flux2"][0], "--format", "musubi", "--musubi-arch",
                                  "qwen_image")
    kl = make_model(tmp_path / "kl")
    assert "flux2" in refused(tmp_path / "2", "-m", kl, "--format", "musubi", "--musubi-arch", "flux_2_dev")
    assert "--musubi-arch" in refused(tmp_path / "3", "-m", models["qwen"][0], "--format", "musubi")
    assert "--format musubi" in refused(tmp_path / "4", "-m", models["qwen"][0], "--musubi-arch", "qwen_image")


def test_musubi_needs_dataset(tmp_path, models):
    src = images(tmp_path / "in")
    code, _, err = run_json("encode", src, "-o", tmp_path / "c", "-m", models["qwen"][0], "--format", "musubi")
    assert code == 2 and "--dataset" in err and not (tmp_path / "c").exists()


def test_same_stem_refused(tmp_path, models):
    noise_image(tmp_path / "in" / "sub" / "wide.jpg", 100, 62)  # beside wide.png: one musubi item key
    err = refused(tmp_path, "-m", models["qwen"][0], "--format", "musubi", "--musubi-arch", "qwen_image",
                  "--bucket-resolution", "64")
    assert "wide" in err and "rename" in err


def test_as_a_process(tmp_path, models):
    """`python -m vaecli`: the console path writes the same files and exits 2 on a refusal, one line."""
    src = images(tmp_path / "in")
    args = ("encode", src, "-o", tmp_path / "cache", "-m", models["qwen"][0], "--dataset", "--format", "musubi",
            "--bucket-resolution", str(R), "--json")
    proc = run_module(*args, "--musubi-arch", "qwen_image")
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] == 3, proc.stderr
    check_caches(tmp_path / "cache", src, models["qwen"][1], "qwen_image", qwen_reference, no_upscale=False)
    proc = run_module(*args, "--musubi-arch", "flux_2_dev")
    assert proc.returncode == 2 and "qwenimage" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
