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


def _one_document(logs: Path) -> dict:
    """Exactly one JSON document over all ranks' stdout (rank 0's, holding every rank's items)."""
    texts = [p.read_text() for p in sorted(logs.rglob("stdout.log"))]
    assert len(texts) == 2 and sorted(bool(t.strip()) for t in texts) == [False, True], texts
    return json.loads(next(t for t in texts if t.strip()))


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
    report = _one_document(logs)
    assert report["ranks"] == 2 and report["ok"] == 4 and report["merged"] and len(report["items"]) == 4
    assert (sorted(Path(i["input"]).name for i in report["items"])
            == sorted(p.name for p in images.rglob("*") if p.is_file()))
    assert all(i["notes"] == [] for i in report["items"])  # every item has notes, empty when none
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


def test_torchrun_over_shards_equals_one_process(models, tmp_path):
    """Two torchrun ranks deal the input shards; outputs equal a single process's, sample by sample."""
    import importlib.util

    from test_dataset_shards import _tar_samples

    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    make.make_shards(tmp_path / "set", images=15, shards=3, min_side=20, max_side=120, seed=2, parquet=False)
    vae, _, model_dir = models
    single, dist_out = tmp_path / "single", tmp_path / "torchrun"
    _prepare(vae, str(tmp_path / "set/tar/*.tar"), single, flip=True, batch_size=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--log-dir={logs}", "--redirects=1", *ENTRY, str(tmp_path / "set/tar/*.tar"), "-o", str(dist_out),
           "--model", str(model_dir), "--device", "cpu", "--json", *_flags()]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]  # shard 0 holds a corrupt image and a missing one
    report = _one_document(logs)
    assert report["ranks"] == 2 and len(report["shards"]) == 3 and report["merged"]
    assert report["failed"] == 2 and all("notes" in i for i in report["items"])
    assert json.loads((dist_out / "index.json").read_text())["complete"]
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        a, b = _tar_samples(single / name), _tar_samples(dist_out / name)
        assert a.keys() == b.keys()
        for source in a:
            for key in a[source][0]:
                torch.testing.assert_close(b[source][0][key], a[source][0][key], atol=0, rtol=0)
            assert _strip([a[source][1]]) == _strip([b[source][1]])
