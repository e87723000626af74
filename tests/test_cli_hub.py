"""--subfolder, --revision and --variant through the CLI of every command that takes a model, against the
local Hub stand-in of tests/hub_server.py (the real huggingface_hub client, HF_ENDPOINT pointed at it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import ROOT, noise_image, run_cli
from test_hub import files, hub  # noqa: F401 - module-scoped fixtures: the tiny VAE's files and the stand-in Hub

pytest.importorskip("huggingface_hub", reason="the hub extra (huggingface_hub) is not installed")


def vaecli(url: str, home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m vaecli ARGS` in a fresh process pointed at the stand-in Hub, with its own HF cache."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT=url, HF_HOME=str(home), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "vaecli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=180, cwd=ROOT)


def test_info_selects_subfolder_revision_and_variant(hub, tmp_path):  # noqa: F811
    state, url = hub
    state.served.clear()
    r = vaecli(url, tmp_path, "info", "acme/pipe", "--subfolder", "vae", "--revision", "v1", "--variant", "fp16",
               "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["path"].endswith("vae/diffusion_pytorch_model.fp16.safetensors"), doc["path"]
    assert sorted(state.served) == ["acme/pipe/vae/config.json",
                                    "acme/pipe/vae/diffusion_pytorch_model.fp16.safetensors"]


@pytest.mark.slow  # five CLI processes against the stand-in Hub: 13 s quiet, 39 s busy (2 cores)
def test_encode_decode_roundtrip_and_bench_pass_them_to_load_vae(hub, tmp_path):  # noqa: F811
    state, url = hub
    image = noise_image(tmp_path / "in" / "a.png", 32, 24)
    home = tmp_path / "hf"
    r = vaecli(url, home, "encode", image, "-o", tmp_path / "lat", "-m", "acme/pipe", "--variant", "fp16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["items"][0]["status"] == "ok"
    assert "acme/pipe/vae/diffusion_pytorch_model.fp16.safetensors" in state.served
    latent = tmp_path / "lat" / "a.safetensors"
    # The fp16 file holds other weights than the fp32 one (rounded): decode with the same variant, by sha256.
    r = vaecli(url, home, "decode", latent, "-o", tmp_path / "dec", "-m", "acme/pipe", "--subfolder", "vae",
               "--variant", "fp16", "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dec" / "a.png").is_file()
    r = vaecli(url, home, "decode", latent, "-o", tmp_path / "dec32", "-m", "acme/pipe", "--json")
    assert r.returncode == 1 and "made by another model" in r.stderr, r.stderr
    for command in (("roundtrip", image), ("bench", "-r", "16", "--iters", "1", "--warmup", "0")):
        r = vaecli(url, home, *command, "-m", "acme/pipe", "--revision", "v9")
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert "Hub repo acme/pipe at revision v9: no revision 'v9'" in r.stderr, r.stderr


def test_selection_without_a_model_is_a_usage_error(tmp_path):
    image = noise_image(tmp_path / "a.png", 16, 16)
    for args in (("info", "--variant", "fp16"), ("encode", image, "-o", tmp_path / "o", "--subfolder", "vae"),
                 ("bench", "--revision", "v1")):
        r = run_cli(*args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert "--subfolder, --revision and --variant select files of a --model; give --model" in r.stderr
    assert not (tmp_path / "o").exists()
