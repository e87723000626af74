"""Models from the Hub through the real huggingface_hub client against a local Hub stand-in
(tests/hub_server.py): only the VAE's files are fetched, each failure says why, the cache works offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save

from cli_support import ROOT
from hub_server import TOKEN, Hub, Repo

CFG = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4)

pytest.importorskip("huggingface_hub", reason="the hub extra (huggingface_hub) is not installed")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """config.json and weights of one tiny VAE, in fp32 and fp16, as bytes."""
    from conftest import make_reference

    ref = make_reference(**CFG)
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    config = (folder / "config.json").read_bytes()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    fp32 = save(state)
    fp16 = save({k: v.half() for k, v in state.items()})
    return {"config": config, "fp32": fp32, "fp16": fp16}


@pytest.fixture(scope="module")
def hub(files):
    junk = b"\0" * 4096  # stands for a UNet or a full checkpoint: must never be fetched
    repos = {
        "acme/vae": Repo({"config.json": files["config"], "diffusion_pytorch_model.safetensors": files["fp32"],
                          "diffusion_pytorch_model.fp16.safetensors": files["fp16"],
                          "full-checkpoint.safetensors": junk}),
        "acme/pipe": Repo({"model_index.json": b"{}", "unet/config.json": b'{"_class_name": "UNet2DConditionModel"}',
                           "unet/diffusion_pytorch_model.safetensors": junk, "vae/config.json": files["config"],
                           "vae/diffusion_pytorch_model.safetensors": files["fp32"],
                           "vae/diffusion_pytorch_model.fp16.safetensors": files["fp16"], "sd.safetensors": junk},
                          revisions=("main", "v1")),
        "acme/single": Repo({"weights/vae-ft.safetensors": files["fp32"], "README.md": b"x"}),
        "acme/gated": Repo({"config.json": files["config"], "diffusion_pytorch_model.safetensors": files["fp32"]},
                           gated=True),
        "acme/private": Repo({"config.json": files["config"], "diffusion_pytorch_model.safetensors": files["fp32"]},
                             private=True),
        "acme/novae": Repo({"config.json": b'{"_class_name": "UNet2DConditionModel"}', "model.safetensors": junk}),
    }
    state = Hub(repos)
    url, server = state.start()
    yield state, url
    server.shutdown()


def load(url: str, home: Path, code: str, offline: bool = False, token: str | None = None,
         block_hub: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `code` (with `import vaecli` done) in a fresh interpreter pointed at the stand-in Hub."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT=url, HF_HOME=str(home),
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    prelude = "import sys; sys.modules['huggingface_hub'] = None\n" if block_hub else ""
    return subprocess.run([sys.executable, "-c", prelude + "import vaecli\n" + code], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


def test_vae_repo_fetches_config_and_one_weights_file(hub, tmp_path):
    state, url = hub
    state.served.clear()
    r = load(url, tmp_path, "v = vaecli.load_vae('acme/vae'); print(v.info.path)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("diffusion_pytorch_model.safetensors")
    assert sorted(state.served) == ["acme/vae/config.json", "acme/vae/diffusion_pytorch_model.safetensors"]


def test_pipeline_repo_fetches_only_its_vae_and_variant(hub, tmp_path):
    state, url = hub
    state.served.clear()
    r = load(url, tmp_path, "v = vaecli.load_vae('acme/pipe', variant='fp16'); print(v.info.path); "
                            "print(next(v.parameters()).dtype)")
    assert r.returncode == 0, r.stderr
    path, dtype = r.stdout.split()
    assert path.endswith("vae/diffusion_pytorch_model.fp16.safetensors") and dtype == "torch.float32"
    assert all(s.startswith("acme/pipe/vae/") or s == "acme/pipe/config.json" for s in state.served), state.served
    assert "acme/pipe/vae/diffusion_pytorch_model.fp16.safetensors" in state.served
    assert not any("unet" in s or s.endswith("sd.safetensors") for s in state.served)


def test_subfolder_revision_and_single_file(hub, tmp_path):
    state, url = hub
    r = load(url, tmp_path, "print(vaecli.load_vae('acme/pipe', subfolder='vae', revision='v1').info.path)")
    assert r.returncode == 0 and "vae/diffusion_pytorch_model.safetensors" in r.stdout, r.stderr
    state.served.clear()
    r = load(url, tmp_path, "v = vaecli.load_vae('acme/single/weights/vae-ft.safetensors', family='sdxl'); "
                            "print(v.config.scaling_factor)")
    assert r.returncode == 0 and r.stdout.strip() == "0.13025", r.stderr
    assert state.served == ["acme/single/weights/vae-ft.safetensors"]


FAILURES = [  # (source, load_vae keyword arguments, the reason the message must give)
    ("acme/gated", {}, "Hub repo acme/gated is gated: accept its conditions on https://huggingface.co/acme/gated"),
    ("acme/private", {}, "no Hub repo 'acme/private': check the spelling; if it is private, log in"),
    ("acme/vea", {}, "no Hub repo 'acme/vea': check the spelling"),
    ("acme/pipe", {"revision": "v9"}, "Hub repo acme/pipe at revision v9: no revision 'v9'"),
    ("acme/vae", {"variant": "bf16"}, "config.json is there but none of diffusion_pytorch_model.bf16.safetensors"),
    ("acme/novae", {},
     "no AutoencoderKL config at config.json or vae/config.json; name the VAE's folder with --subfolder"),
    ("acme/single/weights/missing.safetensors", {}, "Hub repo acme/single: no file 'weights/missing.safetensors'"),
]


def test_each_failure_says_why(hub, tmp_path):
    _, url = hub
    r = load(url, tmp_path, f"""
import json
out = []
for source, kwargs in {[(src, kw) for src, kw, _ in FAILURES]!r}:
    try:
        vaecli.load_vae(source, **kwargs)
        out.append('loaded')
    except vaecli.WeightsError as exc:
        out.append(str(exc))
print(json.dumps(out))""")
    assert r.returncode == 0, r.stderr
    for (source, _, reason), message in zip(FAILURES, json.loads(r.stdout), strict=True):
        assert message.startswith(f"{source}: no such local file or folder, and as a Hub id: "), message
        assert reason in message, message


def test_token_opens_gated_and_private_repos(hub, tmp_path):
    _, url = hub
    r = load(url, tmp_path, "vaecli.load_vae('acme/gated'); vaecli.load_vae('acme/private'); print('ok')", token=TOKEN)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_offline_uses_the_cache_and_says_when_not_cached(hub, tmp_path):
    _, url = hub
    assert load(url, tmp_path, "vaecli.load_vae('acme/pipe')").returncode == 0
    r = load(url, tmp_path, "print(vaecli.load_vae('acme/pipe').info.path)", offline=True)
    assert r.returncode == 0 and "vae/diffusion_pytorch_model.safetensors" in r.stdout, r.stderr
    r = load(url, tmp_path, """
try:
    vaecli.load_vae('acme/vae')
except vaecli.WeightsError as exc:
    print(exc)""", offline=True)
    assert "not in the local cache, and the Hub cannot be reached (offline, HF_HUB_OFFLINE=1" in r.stdout, r.stdout


def test_without_the_hub_extra_the_message_names_it(tmp_path):
    r = load("http://127.0.0.1:9", tmp_path, """
try:
    vaecli.load_vae('stabilityai/sd-vae-ft-mse')
except vaecli.WeightsError as exc:
    print(exc)""", block_hub=True)
    hint = "to load it from the Hugging Face Hub, install the hub extra: pip install 'vaecli[hub]'"
    assert hint in r.stdout, r.stdout + r.stderr


def test_local_paths_are_not_mistaken_for_hub_ids(tmp_path):
    from vaecli.hub import parse

    assert parse("acme/vae").repo_id == "acme/vae"
    assert parse("acme/repo/sub/file.safetensors").filename == "sub/file.safetensors"
    assert parse("acme/repo/sub/notes.txt") is None
    assert parse("../models/vae") is None and parse("vae") is None and parse("/abs/path") is None
