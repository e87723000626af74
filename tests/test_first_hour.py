"""The first hour of a new user (issue 20): what loading assumed reaches every run's output, kohya exports use
kohya's bucket defaults, slow CPU precisions are named, and the small rough edges of the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_support import CLI_TINY, make_model, noise_image, run_cli, run_json, subprocess_env
from test_kohya_comfyui import kohya_bucket_resos
from vaecli.dataset.buckets import make_buckets
from vaecli.dataset.options import DatasetOptions
from vaecli.files import json_path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-vae"))


@pytest.fixture(scope="module")
def bare_file(tmp_path_factory, tiny_model) -> str:
    """The tiny model as one weights file without config: SD's shapes, its normalization unknowable."""
    path = tmp_path_factory.mktemp("single") / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model(**CLI_TINY).state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    noise_image(root / "a.png", 64, 48, seed=1)
    noise_image(root / "b.png", 40, 72, seed=2)
    return root


# ------------------------------------------------------------------------------ load assumptions (item 3)


def test_an_assumed_normalization_is_a_note_of_every_run(bare_file, images, tmp_path):
    code, doc, _ = run_json("encode", images, "-o", tmp_path / "z", "-m", bare_file)
    assert code == 0 and doc["ok"] == 2
    assumed = [n for n in doc["notes"] if n.startswith("model: ") and "assuming the SD latent normalization" in n]
    assert len(assumed) == 1 and "--family" in assumed[0]
    plain = run_cli("decode", tmp_path / "z", "-o", tmp_path / "px", "-m", bare_file)
    assert plain.exit_code == 0
    assert re.search(r"^note: model: no config and no family given: assuming the SD", plain.stdout, re.M)
    code, doc, _ = run_json("encode", images, "-o", tmp_path / "z2", "-m", bare_file, "--family", "sdxl")
    assert code == 0 and not any("assuming" in n for n in doc.get("notes", []))


def test_a_dataset_is_never_built_on_an_assumed_family(bare_file, images, tmp_path):
    out = tmp_path / "cache"
    code, doc, err = run_json("encode", images, "-o", out, "--dataset", "-m", bare_file, "--bucket-resolution", "64",
                              "--bucket-step", "16")
    assert code == 2 and doc["ok"] == 0 and "--family" in doc["error"] and "guess" in doc["error"]
    assert not (out / "manifest.jsonl").exists()
    code, doc, _ = run_json("encode", images, "-o", out, "--dataset", "-m", bare_file, "--family", "sdxl",
                            "--bucket-resolution", "64", "--bucket-step", "16")
    assert code == 0 and doc["ok"] == 2 and (out / "manifest.jsonl").is_file()


# --------------------------------------------------------------------------------- kohya buckets (item 4)


def test_kohya_format_defaults_to_kohyas_bucket_bounds():
    kohya = DatasetOptions(format="kohya", bucket_resolution=256)
    assert kohya.bucket_bounds() == (256, 1024)  # sd-scripts' min_bucket_reso / max_bucket_reso
    lo, hi = kohya.bucket_bounds()
    assert make_buckets(256, 64, lo, hi) == kohya_bucket_resos((256, 256), 256, 1024, 64)
    assert DatasetOptions(bucket_resolution=256).bucket_bounds() == (128, 512)  # our own format: res/2, 2 res
    # rounded to the step as kohya's adjust_min_max_bucket_reso_by_steps does
    assert DatasetOptions(format="kohya", bucket_resolution=600, bucket_step=100).bucket_bounds() == (200, 1100)
    assert DatasetOptions(format="kohya", min_bucket_size=128, bucket_resolution=256).bucket_bounds() == (128, 1024)


def test_kohya_latents_have_the_shapes_kohya_expects(model, tmp_path):
    root = tmp_path / "imgs"
    sizes = [(128, 512), (512, 128), (192, 384), (400, 240)]
    for i, (w, h) in enumerate(sizes):
        noise_image(root / f"{i}.png", w, h, seed=i)
    out = tmp_path / "k"
    code, doc, _ = run_json("encode", root, "-o", out, "--dataset", "--format", "kohya", "-m", model,
                            "--bucket-resolution", "256")
    assert code == 0 and doc["ok"] == len(sizes)
    import numpy as np

    expected = set(kohya_bucket_resos((256, 256), 256, 1024, 64))
    for npz in out.rglob("*.npz"):
        h8, w8 = np.load(npz)["latents"].shape[-2:]
        assert (w8 * 8, h8 * 8) in expected


def test_kohya_bounds_that_cannot_hold_the_resolution_are_refused(model, images, tmp_path):
    code, doc, _ = run_json("encode", images, "-o", tmp_path / "k", "--dataset", "--format", "kohya", "-m", model,
                            "--bucket-resolution", "2048")
    assert code == 2 and "max_bucket_reso 1024" in doc["error"]


def test_a_flag_that_contradicts_the_kohya_config_is_an_error(model, images, tmp_path):
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\nenable_bucket = true\nresolution = 256\nmin_bucket_reso = 128\n\n[[datasets]]\n'
                    f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n')
    code, doc, _ = run_json("encode", images, "-o", tmp_path / "k", "-m", model, "--kohya-config", toml,
                            "--min-bucket-size", "256")
    assert code == 2 and "--min-bucket-size 256 contradicts min_bucket_reso = 128" in doc["error"]


# ---------------------------------------------------------------------------- CPU half precision (item 5)


def test_a_slow_cpu_precision_is_named_with_what_is_fast(model, images, tmp_path, monkeypatch):
    from vaecli import pipeline

    speeds = {torch.float32: 1.0, torch.float16: 135.0, torch.bfloat16: 0.6}
    monkeypatch.setattr(pipeline, "_probe_ms", lambda dtype: speeds[dtype])
    code, doc, _ = run_json("encode", images, "-o", tmp_path / "z", "-m", model, "--dtype", "fp16", "--device", "cpu",
                            "--no-upcast")
    assert code == 0
    slow = [n for n in doc["notes"] if "--dtype fp16 is slow on this CPU" in n]
    assert len(slow) == 1 and "135x" in slow[0] and "--dtype fp32" in slow[0] and "--dtype bf16" in slow[0]
    code, doc, _ = run_json("encode", images, "-o", tmp_path / "z32", "-m", model, "--device", "cpu")
    assert code == 0 and not any("slow on this CPU" in n for n in doc.get("notes", []))


def test_the_precision_probe_measures_this_cpu():
    from vaecli.pipeline import _probe_ms, cpu_precision_notes

    assert _probe_ms(torch.float32) > 0 and _probe_ms(torch.bfloat16) > 0
    assert cpu_precision_notes(torch.device("cpu"), torch.float32) == []
    assert cpu_precision_notes(torch.device("cuda"), torch.float16) == []  # only the CPU is probed


# -------------------------------------------------------------------------------------- small items (7)


def test_a_trailing_slash_makes_the_output_a_folder(model, images, tmp_path):
    code, _, _ = run_json("encode", images / "a.png", "-o", f"{tmp_path / 'x.safetensors'}/", "-m", model)
    assert code == 0 and (tmp_path / "x.safetensors" / "a.safetensors").is_file()
    code, _, _ = run_json("encode", images / "a.png", "-o", tmp_path / "y.safetensors", "-m", model)
    assert code == 0 and (tmp_path / "y.safetensors").is_file()
    code, _, _ = run_json("decode", tmp_path / "y.safetensors", "-o", f"{tmp_path / 'p.png'}/", "-m", model)
    assert code == 0 and (tmp_path / "p.png" / "y.png").is_file()


def test_images_and_latents_given_to_the_wrong_command_are_named(model, images, tmp_path):
    code, doc, _ = run_json("decode", images / "a.png", "-o", tmp_path / "d", "-m", model)
    assert code == 1 and "this is a PNG image, not a latent file" in doc["items"][0]["error"]
    jpeg = noise_image(tmp_path / "photo.safetensors", 32, 32, format="JPEG")  # an image under a latent's name
    code, doc, _ = run_json("decode", jpeg, "-o", tmp_path / "d2", "-m", model)
    assert code == 1 and "this is a JPEG image, not a latent file" in doc["items"][0]["error"]
    run_json("encode", images / "a.png", "-o", tmp_path / "z.safetensors", "-m", model)
    code, doc, _ = run_json("encode", tmp_path / "z.safetensors", "-o", tmp_path / "e", "-m", model)
    assert code == 1 and "this is a safetensors file, not an image: decode" in doc["items"][0]["error"]


def test_info_takes_dash_m_and_prints_whole_lines_when_piped(model, tmp_path):
    code, by_arg, _ = run_json("info", model)
    code2, by_opt, _ = run_json("info", "-m", model)
    assert code == code2 == 0 and by_arg == by_opt and by_arg["command"] == "info"
    assert by_arg["path"] == os.path.abspath(by_arg["path"])
    both = run_cli("info", model, "-m", str(tmp_path))
    assert both.exit_code == 2 and "two models named" in both.stderr
    piped = run_cli("info", "-m", model)  # CliRunner's stdout is not a terminal, as in `vaecli info | grep`
    assert piped.exit_code == 0
    sha = by_arg["weights_sha256"]
    assert f"weights_sha256: {sha}\n" in piped.stdout
    assert f"path: {by_arg['path']}\n" in piped.stdout


def test_bench_json_names_its_command(model):
    code, doc, _ = run_json("bench", "-m", model, "-r", "32", "--iters", "1", "--warmup", "0")
    assert code == 0 and doc["command"] == "bench"


def test_json_paths_are_absolute_and_normalized(model, images, tmp_path, monkeypatch):
    monkeypatch.chdir(images)
    code, doc, _ = run_json("encode", ".", "-o", "../z", "-m", model)
    assert code == 0 and doc["ok"] == 2
    for item in doc["items"]:
        for key in ("input", "output"):
            assert item[key] == os.path.normpath(item[key]) and os.path.isabs(item[key]) and ".." not in item[key]
            assert Path(item[key]).exists()
    code, doc, _ = run_json("encode", ".", "-o", "../k", "-m", model, "--dataset", "--format", "kohya",
                            "--kohya-next-to-images", "--bucket-resolution", "64", "--bucket-step", "16",
                            "--min-bucket-size", "32", "--max-bucket-size", "128")
    assert code == 0 and doc["ok"] == 2
    outputs = [item["output"] for item in doc["items"]]
    assert all(os.path.isabs(o) and ".." not in o and o.endswith(".npz") and Path(o).is_file() for o in outputs)
    assert sorted(Path(o).parent for o in outputs) == [images, images]
    assert doc["manifest"] == json_path(tmp_path / "k" / "manifest.jsonl")


def test_an_unreachable_hub_fails_fast(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = dict(subprocess_env(), HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
               HF_ENDPOINT="https://hub.example.invalid")  # a name no DNS resolves (RFC 2606), as offline
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    start = time.perf_counter()
    got = subprocess.run([sys.executable, "-m", "vaecli", "info", "someone/some-vae", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    doc = json.loads(got.stdout)
    assert got.returncode == 2 and "cannot be reached" in doc["error"] and "hub.example.invalid" in doc["error"]
    assert elapsed < 15, f"gave up after {elapsed:.1f} s"
