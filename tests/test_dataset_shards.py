"""Shard datasets: tar/parquet in and out, a local S3 server, Ray with 2 workers, resume after kill -9,
and the streaming reader. Every path encodes the same images as the folder pipeline and must match it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_support import run_json, subprocess_env
from test_dataset import SMALL, models  # noqa: F401 - fixture
from vaecli.dataset import DatasetOptions, EngineOptions, prepare_dataset, read_manifest
from vaecli.dataset.locations import expand_braces, need, shard_inputs
from vaecli.dataset.sample import read_latent_bytes
from vaecli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(SMALL, flip=True, moments=True, random_crop=True, crop_seed=3)
WHERE = ("source_path", "encoded_at")  # where and when a record was made; everything else must be equal


def _make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_shards


@pytest.fixture(scope="module")
def shardset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shardset")
    pytest.importorskip("pyarrow", reason="pyarrow (the shards extra) is not installed")
    _make_shards()(root, images=24, shards=3, min_side=20, max_side=120, seed=0)
    return root


@pytest.fixture(scope="module")
def reference(models, shardset, tmp_path_factory):
    """The folder pipeline on the same images: records and tensors by source."""
    out = tmp_path_factory.mktemp("folder")
    report = prepare_dataset(models[0], [shardset / "folder"], out, DatasetOptions(**OPTS))
    assert report.count("failed") == 1  # the corrupt JPEG; the sample without image is not in the folder
    records = {r["source"]: r for r in read_manifest(out / "manifest.jsonl")}
    return {s: (r, load_file(str(out / r["latent"]))) for s, r in records.items()}


def _tar_samples(path: Path) -> dict[str, tuple[dict, dict, dict]]:
    """source -> (tensors, record, side members) of a latent tar shard; members must be unique."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    with tarfile.open(path) as tar:
        assert len(tar.getnames()) == len(members)  # no member twice
    out = {}
    for name, data in members.items():
        if name.endswith(".safetensors"):
            key = name[: -len(".safetensors")]
            tensors, rec = read_latent_bytes(data)
            sides = {n.split(".", 1)[1]: d for n, d in members.items() if n.split(".", 1)[0] == key and n != name}
            out[rec["source"]] = (tensors, rec, sides)
    return out


def _assert_matches_reference(samples: dict, reference: dict) -> None:
    assert sorted(samples) == sorted(reference)
    for source, (tensors, rec, _) in samples.items():
        ref_rec, ref_tensors = reference[source]
        assert tensors.keys() == ref_tensors.keys()
        for k in tensors:
            assert torch.equal(tensors[k], ref_tensors[k]), (source, k)  # bit-identical
        strip = lambda r: {k: v for k, v in r.items() if k not in WHERE}  # noqa: E731
        assert strip(rec) == strip(ref_rec)


def _all_tar_samples(out: Path) -> dict:
    merged: dict = {}
    for path in sorted(out.glob("*.tar")):
        got = _tar_samples(path)
        assert not set(got) & set(merged)  # a sample lives in one shard only
        merged.update(got)
    return merged


def _check_failures(report) -> None:
    failed = {r.input.rsplit("#", 1)[1]: r.error for r in report.items if r.status == "failed"}
    assert sorted(failed) == ["000000001.jpg", "000000002"]
    assert "not an image" in failed["000000001.jpg"] and "missing image" in failed["000000002"]
    assert report.count("ok") + report.count("skipped") == 22


# ------------------------------------------------------------------------------------------ inputs


def test_brace_lists_and_input_kinds(tmp_path):
    assert expand_braces("d/{008..011}.tar") == ["d/008.tar", "d/009.tar", "d/010.tar", "d/011.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert shard_inputs([tmp_path]) is None  # a folder: the folder pipeline
    with pytest.raises(ConfigError, match="not both"):
        shard_inputs(["x.tar", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"pip install 'vaecli\[shards\]'"):
        need("vaecli_no_such_module", "shards", "reading s3:// URLs")


# ------------------------------------------------------------------------------------------ identity


def test_local_tar_shards_equal_the_folder(models, shardset, reference, tmp_path):
    report = prepare_dataset(models[0], [str(shardset / "tar/{00000..00002}.tar")], tmp_path, DatasetOptions(**OPTS))
    _check_failures(report)
    assert [s["status"] for s in report.shards] == ["ok"] * 3
    _assert_matches_reference(_all_tar_samples(tmp_path), reference)
    # Side files go through untouched, next to their latent.
    _, rec, sides = _all_tar_samples(tmp_path)["000000005.jpg"]
    with tarfile.open(shardset / "tar/00000.tar") as tar:
        assert sides == {"json": tar.extractfile("000000005.json").read(),
                         "txt": tar.extractfile("000000005.txt").read()}
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["complete"] and index["samples"] == 22 and [s["shard"] for s in index["shards"]] == [
        "00000.tar", "00001.tar", "00002.tar"]
    shard0 = json.loads((tmp_path / "00000.index.json").read_text())
    assert [f["source"] for f in shard0["failed"]] == ["000000001.jpg", "000000002"]
    assert shard0["bytes"] == (tmp_path / "00000.tar").stat().st_size


@pytest.fixture(scope="module")
def s3(shardset):
    """A local S3-compatible server (moto's server mode) holding the tar shards under s3://data/shards/."""
    pytest.importorskip("s3fs", reason="s3fs (the shards extra) is not installed")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")
    import boto3

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket="data")
    for path in sorted((shardset / "tar").glob("*.tar")):
        client.upload_file(str(path), "data", f"shards/{path.name}")
    yield "s3://data/shards"
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_s3_shards_equal_the_folder(models, s3, reference, tmp_path):
    report = prepare_dataset(models[0], [f"{s3}/*.tar"], tmp_path, DatasetOptions(**OPTS))
    _check_failures(report)
    _assert_matches_reference(_all_tar_samples(tmp_path), reference)
    assert report.items[0].input.startswith("s3://data/shards/00000.tar#")
    again = prepare_dataset(models[0], [f"{s3}/{{00000..00002}}.tar"], tmp_path, DatasetOptions(**OPTS))
    assert [s["status"] for s in again.shards] == ["skipped"] * 3 and again.count("ok") == 0


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray (the ray extra) is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_two_workers_equal_the_folder(models, shardset, reference, ray_cluster, tmp_path):
    engine = EngineOptions("ray", workers=2)
    report = prepare_dataset(models[0], [str(shardset / "tar/*.tar")], tmp_path, DatasetOptions(**OPTS), engine=engine)
    _check_failures(report)
    assert [s["status"] for s in report.shards] == ["ok"] * 3 and report.merged
    _assert_matches_reference(_all_tar_samples(tmp_path), reference)
    again = prepare_dataset(models[0], [str(shardset / "tar/*.tar")], tmp_path, DatasetOptions(**OPTS), engine=engine)
    assert [s["status"] for s in again.shards] == ["skipped"] * 3  # settled in the driver


@pytest.mark.slow  # a Ray actor killed and restarted: 15 s on a quiet 2-core CPU, 23 s on a busy one
def test_ray_actor_killed_mid_shard_is_restarted(models, ray_cluster, tmp_path):
    """kill -9 the Ray actor writing a shard: Ray restarts it and retries the shard; every output is whole."""
    import threading

    from vaecli.files import temp_writer

    _make_shards()(tmp_path / "set", images=48, shards=4, min_side=250, max_side=400, seed=1, parquet=False)
    out = tmp_path / "out"
    opts = DatasetOptions(bucket_resolution=256, batch_size=1)
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(report=prepare_dataset(
        models[0], [str(tmp_path / "set/tar/*.tar")], out, opts, engine=EngineOptions("ray", workers=2))))
    run.start()
    victim, deadline = None, time.monotonic() + 120
    while victim is None and run.is_alive() and time.monotonic() < deadline:
        temps = list(out.glob(".*.tar.tmp-*"))
        if temps:
            victim = temp_writer(temps[0].name)[1]  # the pid of the actor writing it
            assert victim != os.getpid()
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.01)
    run.join(timeout=240)
    assert victim is not None, "no shard was caught mid-write"
    report = result["report"]
    assert [s["status"] for s in report.shards] == ["ok"] * 4 and report.count("ok") == 46
    assert not list(out.glob(".*tmp-*")) and report.temp_files_removed >= 1
    assert sum(len(_tar_samples(p)) for p in sorted(out.glob("*.tar"))) == 46


def test_parquet_in_and_out(models, shardset, reference, tmp_path):
    import pyarrow.parquet as pq

    opts = DatasetOptions(**OPTS, layout="parquet")
    report = prepare_dataset(models[0], [str(shardset / "parquet/*.parquet")], tmp_path / "pq", opts)
    failed = sorted(r.error.split(":")[0] for r in report.items if r.status == "failed")
    assert failed == ["missing image", "not an image, or an unsupported format (supported"]
    rows = [r for p in sorted((tmp_path / "pq").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    samples = {}
    for row in rows:
        tensors, rec = read_latent_bytes(row["latent"])
        assert row["caption"].startswith("sample ") and json.loads(row["record"]) == rec  # side column kept
        samples[rec["source"]] = (tensors, rec, {})
    _assert_matches_reference(samples, reference)  # column jpg: sources are <key>.jpg, as in the folder
    tar_to_pq = prepare_dataset(models[0], [str(shardset / "tar/00001.tar")], tmp_path / "t2p", opts)
    assert tar_to_pq.count("ok") == 8
    row = pq.read_table(tmp_path / "t2p/00001.parquet").to_pylist()[0]
    assert sorted(dict(row["files"])) == ["json", "txt"]


# ------------------------------------------------------------------------------------------ resume


def test_shard_resume_and_invalidation(models, shardset, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    for p in sorted((shardset / "tar").glob("*.tar")):
        (shards / p.name).write_bytes(p.read_bytes())

    def run(**kw):
        return prepare_dataset(models[0], [str(shards / "*.tar")], tmp_path / "out", DatasetOptions(**{**SMALL, **kw}))

    assert [s["status"] for s in run().shards] == ["ok"] * 3
    again = run()
    assert [s["status"] for s in again.shards] == ["skipped"] * 3
    assert again.count("failed") == 2  # failures recorded with the shard are reported again
    assert all("recorded when the shard was written" in r.notes[0] for r in again.items if r.status == "failed")
    with tarfile.open(shards / "00001.tar", "a") as tar:  # the input shard changes
        info = tarfile.TarInfo("zzz.txt")
        tar.addfile(info)
    edited = run()
    assert [s["status"] for s in edited.shards] == ["skipped", "ok", "skipped"]
    assert "input_identity" in edited.shards[1]["note"]
    assert [s["status"] for s in run(flip=True).shards] == ["ok"] * 3  # another setting
    assert [s["status"] for s in prepare_dataset(models[1], [str(shards / "*.tar")], tmp_path / "out",
                                                 DatasetOptions(**{**SMALL, "flip": True})).shards] == ["ok"] * 3


def test_kill_mid_shard_then_rerun(models, tmp_path):
    """kill -9 while a shard is being written; the same command again redoes only unfinished shards."""
    _make_shards()(tmp_path / "set", images=48, shards=4, min_side=250, max_side=400, seed=1, parquet=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vaecli", "encode", str(tmp_path / "set/tar/*.tar"), "-o", str(out), "--dataset",
           "--model", str(models[2]), "--device", "cpu", "--bucket-resolution", "256", "--batch-size", "1",
           "--json", "--quiet"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob("*.index.json")) and list(out.glob(".*.tar.tmp-*")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before a shard was caught mid-write"
    finished = sorted(p.name.split(".")[0] for p in out.glob("*.index.json"))  # the process is dead: final
    assert list(out.glob(".*.tar.tmp-*")) and len(finished) < 4
    rerun = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 1, rerun.stderr[-2000:]  # the corrupt sample and the missing image of shard 0
    doc = json.loads(rerun.stdout)
    status = {Path(s["input"]).stem: s["status"] for s in doc["shards"]}
    assert {k for k, v in status.items() if v == "skipped"} == set(finished)
    assert {k for k, v in status.items() if v == "ok"} == {"00000", "00001", "00002", "00003"} - set(finished)
    assert doc["temp_files_removed"] >= 1 and not list(out.glob(".*tmp-*"))
    total = 0
    for name in ("00000", "00001", "00002", "00003"):
        samples = _tar_samples(out / f"{name}.tar")  # a valid tar, every latent readable, no member twice
        index = json.loads((out / f"{name}.index.json").read_text())
        assert sorted(samples) == [r["source"] for r in index["samples"]]
        total += len(samples)
    assert total == 46 and json.loads((out / "index.json").read_text())["complete"]


# ------------------------------------------------------------------------------------------ CLI, streaming


def test_cli_shards_json_and_usage(models, shardset, tmp_path):
    code, doc, err = run_json("encode", str(shardset / "tar/0000{0,1}.tar"), "-o", tmp_path / "o", "--dataset",
                              "--model", models[2], "--device", "cpu",
                              *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()])
    assert code == 1 and doc["failed"] == 2 and doc["ok"] == 14 and doc["shards_ok"] == 2
    assert "missing image" in err and "Traceback" not in err
    code, doc, err = run_json("encode", str(shardset / "folder"), "-o", tmp_path / "p", "--dataset", "--layout", "tar",
                              "--model", models[2], "--device", "cpu")
    assert code == 2 and "needs shard inputs" in doc["error"]


def test_latent_shards_stream_once_per_rank_and_worker(models, shardset, reference, tmp_path):
    from torch.utils.data import DataLoader

    from vaecli.data import LatentShards

    prepare_dataset(models[0], [str(shardset / "tar/*.tar")], tmp_path, DatasetOptions(**OPTS))
    seen = []
    for rank in range(2):
        ds = LatentShards(tmp_path, batch_size=3, shuffle_buffer=5, seed=1, rank=rank, world_size=2)
        for batch in DataLoader(ds, batch_size=None, num_workers=2):
            assert len({tuple(b) for b in batch["bucket"].tolist()}) == 1  # one bucket per batch
            for source, latent in zip(batch["source"], batch["latent"], strict=True):
                torch.testing.assert_close(latent, reference[source][1]["latent"], atol=0, rtol=0)
            seen += batch["source"]
    assert sorted(seen) == sorted(reference)  # every sample once over 2 ranks x 2 workers (3 shards: per sample)
    order = lambda seed: [it["source"] for it in LatentShards(tmp_path, shuffle_buffer=8, seed=seed)]  # noqa: E731
    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == sorted(reference)
    flipped = next(iter(LatentShards(tmp_path, flip=True, shuffle_buffer=0)))
    torch.testing.assert_close(flipped["latent"], reference[flipped["source"]][1]["latent_flipped"], atol=0, rtol=0)
    drawn = next(iter(LatentShards(tmp_path, sample=True, shuffle_buffer=0)))
    assert drawn["latent"].shape == reference[drawn["source"]][1]["latent"].shape
    assert drawn["sides"]["txt"].startswith(b"sample ")


def test_shard_i_of_n_split_and_index(models, shardset, tmp_path):
    opts = DatasetOptions(**SMALL)
    inputs = [str(shardset / "tar/*.tar")]
    first = prepare_dataset(models[0], inputs, tmp_path, opts, shard=(0, 2))
    assert [Path(s["input"]).name for s in first.shards] == ["00000.tar", "00002.tar"]
    assert not first.merged and "finished so far" in first.notes[0]
    assert not json.loads((tmp_path / "index.json").read_text())["complete"]
    second = prepare_dataset(models[0], inputs, tmp_path, opts, shard=(1, 2))
    assert [Path(s["input"]).name for s in second.shards] == ["00001.tar"] and second.merged
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["complete"] and index["samples"] == 22


def test_base_package_without_the_extras(shardset, tmp_path):
    """Without fsspec, s3fs, pyarrow and ray: local tars still work; the rest names its extra in one line."""
    script = f"""
import sys
for name in ("fsspec", "s3fs", "pyarrow", "pyarrow.parquet", "ray", "ray.data"):
    sys.modules[name] = None  # import raises ImportError, as when the package is not installed
import vaecli.cli, vaecli.data
from vaecli.dataset import DatasetOptions, EngineOptions, prepare_dataset
from vaecli.errors import ConfigError
from vaecli.weights import load_vae
vae = load_vae(None)
opts = DatasetOptions(bucket_resolution=64, bucket_step=16, min_bucket_size=32, max_bucket_size=128)
report = prepare_dataset(vae, [{str(shardset / 'tar/00001.tar')!r}], {str(tmp_path / 'o')!r}, opts)
print("local", report.count("ok"))
for inputs, engine in (([ "s3://b/x.tar"], EngineOptions()),
                       ([{str(shardset / 'parquet/00001.parquet')!r}], EngineOptions()),
                       ([{str(shardset / 'tar/00001.tar')!r}], EngineOptions("ray"))):
    try:
        r = prepare_dataset(vae, inputs, {str(tmp_path / 'p')!r}, opts, engine=engine)
        print("item", r.items[0].error)
    except ConfigError as exc:
        print("config", exc)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "local 8"
    assert "pip install 'vaecli[shards]'" in lines[1] and "s3" in lines[1]
    assert "pip install 'vaecli[shards]'" in lines[2] and "parquet" in lines[2]
    assert "pip install 'vaecli[ray]'" in lines[3]
