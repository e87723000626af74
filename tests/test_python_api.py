"""The Python API as the README shows it: the snippet runs as written; models know their device and dtype and
build no autograd graph unless gradients are asked for."""

from __future__ import annotations

import re

import torch

import vaecli
from cli_support import ROOT


def test_readme_snippet_runs_as_written(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["y"].shape == scope["x"].shape == (1, 3, 256, 256)
    assert scope["z"].shape == (1, 4, 32, 32) and scope["y"].grad_fn is None


def test_device_dtype_and_no_graph_unless_asked(tmp_path):
    vae = vaecli.load_vae()
    assert vae.device == torch.device("cpu") and vae.dtype == torch.float32
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    post = vae.encode(x)
    assert post.mean.grad_fn is None and vae.decode(post.mode()).grad_fn is None  # no graph held
    z = post.mode().clone().requires_grad_(True)  # gradients w.r.t. the latent: asked for by the input
    vae.decode(z).square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    vae.requires_grad_(True)  # fine-tuning: asked for by the weights
    vae.decode(vae.encode(x).mode()).mean().backward()
    assert vae.decoder.conv_out.weight.grad is not None
    half = vaecli.load_vae(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.encode(x).mean.dtype == torch.bfloat16


def test_the_api_and_the_cli_default_to_the_same_plan(tmp_path, monkeypatch):
    """One default for both (pipeline.py's docstring): `Runner(vae)` and `vaecli encode` without run flags
    take the same options and so the device's plan (here a wide model's channels-last CPU plan, not
    diffusers' exact sequence, which `kernels="off"` / `--kernels off` asks for)."""
    import vaecli.batch.run
    from cli_support import make_model, noise_image, run_json
    from vaecli.pipeline import Runner, RunOptions
    from vaecli.plans import REFERENCE

    seen: list = []

    class Recording(Runner):
        def __init__(self, vae, options=RunOptions()):
            super().__init__(vae, options)
            seen.append(self)
            self.given = vae

    monkeypatch.setattr(vaecli.batch.run, "Runner", Recording)  # where run_job builds it
    model = make_model(tmp_path / "m", block_out_channels=(8, 16, 16, 256))
    noise_image(tmp_path / "in" / "a.png", 16, 16)
    code, _, _ = run_json("encode", tmp_path / "in", "-o", tmp_path / "z", "-m", model, "--device", "cpu")
    assert code == 0 and len(seen) == 1
    # the CLI lays out its own model when loading it, so its Runner runs that model, not a second copy
    (ran,) = seen[0]._models.values()
    assert ran is seen[0].given and ran.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    api = Runner(vaecli.load_vae(model))
    assert seen[0].options == api.options == RunOptions() and api.options.tiling == "auto"
    assert seen[0].plan == api.plan and api.plan.layout == torch.channels_last
    assert Runner(vaecli.load_vae(model), RunOptions(kernels="off")).plan is REFERENCE
