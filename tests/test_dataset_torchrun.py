"""Two CPU processes under torchrun produce the same manifest and latents as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from test_dataset import SMALL, _prepare, _strip, images, models  # noqa: F401 - fixtures
from vaecli.dataset import read_manifest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ["-m", "vaecli", "encode", "--dataset"]


def _flags() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()] + ["--flip", "--batch-size=2"]


def test_torchrun_two_processes_equal_one(models, images, tmp_path):
    vae, _, model_dir = models
    single, dist_out = tmp_path / "single", tmp_path / "torchrun"
    _prepare(vae, images, single, flip=True, batch_size=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    logs = tmp_path / "logs"  # each rank's stdout in its own file: two JSON documents must not interleave
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--log-dir={logs}", "--redirects=1", *ENTRY,
           str(images), "-o", str(dist_out), "--model", str(model_dir), "--device", "cpu", "--json", *_flags()]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(logs.rglob("stdout.log"))]
    assert sorted(r["shard"] for r in reports) == ["0/2", "1/2"]
    assert sum(r["ok"] for r in reports) == 4 and any(r["merged"] for r in reports)
    assert not list(dist_out.glob("manifest.shard-*"))

    one = _strip(read_manifest(single / "manifest.jsonl"))
    two = _strip(read_manifest(dist_out / "manifest.jsonl"))
    assert two == one
    for rec in one:
        a = safetensors.torch.load_file(str(single / rec["latent"]))
        b = safetensors.torch.load_file(str(dist_out / rec["latent"]))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
