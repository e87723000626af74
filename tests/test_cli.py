"""The vaecli commands end to end on a tiny random model: outputs, metadata, sizes, JSON shape, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from cli_support import make_model, noise_image, run_cli, run_json, run_module
from vaecli.latents import LATENT_FORMAT


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-vae"))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("other-vae"), seed=1)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    noise_image(root / "a.png", 179, 179, seed=1)
    noise_image(root / "sub" / "b.jpg", 500, 333, seed=2, quality=90)
    noise_image(root / "sub" / "deep" / "c.webp", 64, 48, seed=3)
    return root


def meta_of(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), f.get_tensor("latent")


def test_encode_folder_mirrors_tree_and_writes_metadata(model, images, tmp_path):
    out = tmp_path / "lat"
    code, doc, _ = run_json("encode", images, "-o", out, "--model", model)
    assert code == 0, doc
    assert (doc["ok"], doc["failed"], doc["skipped"]) == (3, 0, 0)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")} == {
        "a.safetensors",
        "sub/b.safetensors",
        "sub/deep/c.safetensors",
    }
    meta, z = meta_of(out / "sub" / "b.safetensors")
    assert z.shape == (4, 42, 63)  # 333x500 padded to 336x504, /8
    assert meta["format"] == LATENT_FORMAT and meta["format_version"] == "1"
    assert (meta["original_width"], meta["original_height"]) == ("500", "333")
    assert meta["size_policy"] == "pad" and json.loads(meta["size_params"])["pad_right"] == 4
    assert json.loads(meta["latent_spec"])["scaling_factor"] == pytest.approx(0.18215)
    assert meta["posterior"] == "mode" and meta["compute_dtype"] == "fp32"
    assert meta["model_sha256"] == doc["model"]["weights_sha256"] and len(meta["model_sha256"]) == 64
    item = next(i for i in doc["items"] if i["input"].endswith("b.jpg"))
    assert item["status"] == "ok" and item["output"] == str(out / "sub" / "b.safetensors")


def test_encode_file_named_directly_goes_to_stem(model, images, tmp_path):
    out = tmp_path / "lat"
    result = run_cli("encode", images / "sub" / "b.jpg", "-o", out, "--model", model, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert (out / "b.safetensors").is_file()


@pytest.mark.parametrize("size", [(179, 179), (500, 333), (8, 8), (1, 13)])
def test_decode_restores_exact_original_size(model, tmp_path, size):
    src = noise_image(tmp_path / "in" / "x.png", *size)
    lat, dec = tmp_path / "lat", tmp_path / "dec"
    assert run_cli("encode", src, "-o", lat, "--model", model).exit_code == 0
    result = run_cli("decode", lat, "-o", dec, "--model", model)
    assert result.exit_code == 0, result.stderr
    assert Image.open(dec / "x.png").size == size


def test_size_policies(model, tmp_path):
    src = noise_image(tmp_path / "x.png", 100, 70)
    for policy, latent_hw, decoded in (("crop", (8, 12), (96, 64)), ("resize", (9, 12), (100, 70))):
        lat, dec = tmp_path / f"lat-{policy}", tmp_path / f"dec-{policy}"
        assert run_cli("encode", src, "-o", lat, "--model", model, "--size-policy", policy).exit_code == 0
        meta, z = meta_of(lat / "x.safetensors")
        assert tuple(z.shape[1:]) == latent_hw and meta["size_policy"] == policy
        assert run_cli("decode", lat, "-o", dec, "--model", model).exit_code == 0
        assert Image.open(dec / "x.png").size == decoded
    meta, _ = meta_of(tmp_path / "lat-crop" / "x.safetensors")
    assert json.loads(meta["size_params"])["crop_ltrb"] == [2, 3, 98, 67]


def test_raw_sample_and_latent_dtype(model, tmp_path):
    src = tmp_path / "in"
    noise_image(src / "x.png", 32, 32)
    norm, raw = tmp_path / "norm", tmp_path / "raw"
    assert run_cli("encode", src, "-o", norm, "--model", model).exit_code == 0
    assert run_cli("encode", src, "-o", raw, "--model", model, "--raw", "--latent-dtype", "fp16").exit_code == 0
    meta_n, zn = meta_of(norm / "x.safetensors")
    meta_r, zr = meta_of(raw / "x.safetensors")
    assert meta_r["latent_spec"] == "none" and zr.dtype == torch.float16 and meta_r["latent_dtype"] == "fp16"
    torch.testing.assert_close(zn, zr.float() * 0.18215, rtol=2e-3, atol=2e-3)
    # Sampling: noise depends on (seed, path) only, so the batch size does not change the result.
    noise_image(src / "y.png", 32, 32, seed=5)
    a, b = tmp_path / "s1", tmp_path / "s2"
    assert run_cli("encode", src, "-o", a, "--model", model, "--sample", "--seed", "7", "-b", "1").exit_code == 0
    assert run_cli("encode", src, "-o", b, "--model", model, "--seed", "7", "-b", "2").exit_code == 0
    meta_s, za = meta_of(a / "x.safetensors")
    assert meta_s["posterior"] == "sample" and meta_s["seed"] == "7"
    torch.testing.assert_close(za, meta_of(b / "x.safetensors")[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(za, zn)


def test_decode_uses_metadata_normalization(model, tmp_path):
    """Raw and normalized latents of one image decode to the same picture with no flags."""
    src = noise_image(tmp_path / "x.png", 40, 40)
    for name, extra in (("n", []), ("r", ["--raw"])):
        assert run_cli("encode", src, "-o", tmp_path / f"lat-{name}", "--model", model, *extra).exit_code == 0
        decoded = run_cli("decode", tmp_path / f"lat-{name}", "-o", tmp_path / f"dec-{name}", "--model", model)
        assert decoded.exit_code == 0
    a = np.asarray(Image.open(tmp_path / "dec-n" / "x.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "dec-r" / "x.png")).astype(int)
    assert np.abs(a - b).max() <= 1


def test_decode_formats(model, tmp_path):
    src = noise_image(tmp_path / "x.png", 24, 24)
    assert run_cli("encode", src, "-o", tmp_path / "lat", "--model", model).exit_code == 0
    for fmt, pil in (("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")):
        out = tmp_path / f"dec-{fmt}"
        decoded = run_cli("decode", tmp_path / "lat", "-o", out, "--model", model, "--format", fmt, "--quality", "80")
        assert decoded.exit_code == 0
        img = Image.open(out / f"x.{fmt}")
        assert img.format == pil and img.size == (24, 24)


def test_decode_refuses_latent_of_another_model(model, other_model, tmp_path):
    src = noise_image(tmp_path / "x.png", 16, 16)
    assert run_cli("encode", src, "-o", tmp_path / "lat", "--model", other_model).exit_code == 0
    code, doc, err = run_json("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model)
    assert code == 1 and doc["failed"] == 1
    assert "another model" in doc["items"][0]["error"] and "--force" in doc["items"][0]["error"]
    assert "another model" in err and "Traceback" not in err
    assert not (tmp_path / "dec" / "x.png").exists()
    result = run_cli("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model, "--force")
    assert result.exit_code == 0 and (tmp_path / "dec" / "x.png").exists()


def test_bare_tensor_latents(model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    z = torch.randn(1, 4, 5, 7)
    save_file({"whatever": z}, str(bare / "one.safetensors"))
    save_file({"latent": z[0]}, str(bare / "chw.safetensors"))
    np.save(bare / "arr.npy", z[0].numpy())
    code, doc, err = run_json("decode", bare, "-o", tmp_path / "refused", "--model", model)
    assert code == 1 and doc["failed"] == 3 and "--scaling-factor" in doc["items"][0]["error"]
    code, doc, _ = run_json("decode", bare, "-o", tmp_path / "dec", "--model", model, "--scaling-factor", "0.18215")
    assert code == 0 and doc["ok"] == 3
    for name in ("one", "chw", "arr"):
        assert Image.open(tmp_path / "dec" / f"{name}.png").size == (56, 40)
    a = np.asarray(Image.open(tmp_path / "dec" / "one.png"))
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "dec" / "arr.png")))


def test_roundtrip_metrics_outputs_and_diff(model, images, tmp_path):
    out = tmp_path / "rt"
    code, doc, _ = run_json("roundtrip", images, "-o", out, "--diff", "--model", model)
    assert code == 0 and doc["ok"] == 3
    for item in doc["items"]:
        assert set(item) >= {"input", "output", "status", "psnr", "ssim", "max_abs_error"}
        assert 0 < item["psnr"] < 100 and -1 <= item["ssim"] <= 1
    assert doc["mean_psnr"] == pytest.approx(np.mean([i["psnr"] for i in doc["items"]]))
    assert doc["mean_ssim"] == pytest.approx(np.mean([i["ssim"] for i in doc["items"]]))
    assert Image.open(out / "sub" / "b.png").size == (500, 333)
    assert Image.open(out / "sub" / "b.diff.png").size == (500, 333)
    assert Image.open(out / "a.png").size == (179, 179)
    # Rerun: reconstructions exist, so items are skipped and scored from the files, with equal metrics.
    code, again, _ = run_json("roundtrip", images, "-o", out, "--model", model)
    assert code == 0 and again["skipped"] == 3
    assert again["mean_psnr"] == pytest.approx(doc["mean_psnr"])


def test_roundtrip_without_output_prints_table(model, images):
    result = run_cli("roundtrip", images, "--model", model)
    assert result.exit_code == 0, result.stderr
    assert "PSNR" in result.stdout and "mean PSNR" in result.stdout


def test_json_shape_with_a_failure(model, images, tmp_path):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, doc, err = run_json("encode", images, "-o", tmp_path / "lat", "--model", model)
    assert code == 1
    assert {"ok", "failed", "skipped", "items", "retries", "events"} <= set(doc)
    assert (doc["ok"], doc["failed"], doc["skipped"]) == (3, 1, 0)
    bad = [i for i in doc["items"] if i["status"] == "failed"]
    assert len(bad) == 1 and bad[0]["input"].endswith("broken.png") and bad[0]["error"]
    assert len(err.strip().splitlines()) == 1 and "broken.png" in err


def test_usage_errors_exit_2(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    result = run_cli("encode", empty, "-o", tmp_path / "o", "--model", model)
    assert result.exit_code == 2 and "no inputs" in result.stderr and not (tmp_path / "o").exists()
    # inputs are looked for before the model loads: "no inputs" also with a model that cannot load
    result = run_cli("encode", empty, "-o", tmp_path / "o", "--model", tmp_path / "missing-model")
    assert result.exit_code == 2 and "no inputs" in result.stderr
    one = tmp_path / "one"
    noise_image(one / "a.png", 16, 16)
    result = run_cli("encode", one, "-o", tmp_path / "o", "--model", tmp_path / "missing-model")
    assert result.exit_code == 2 and "cannot load" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    code, doc, _ = run_json("encode", one, "-o", tmp_path / "o", "--model", tmp_path / "missing-model")
    assert code == 2 and doc["error"] and doc["items"] == []
    assert run_cli("encode", empty, "-o", tmp_path / "o", "--size-policy", "stretch").exit_code == 2
    assert run_cli("encode", empty, "-o", tmp_path / "o", "--batch-size", "0").exit_code == 2
    assert run_cli("decode", empty, "-o", tmp_path / "o", "--format", "gif").exit_code == 2
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_bytes(b"garbage")
    result = run_cli("info", bad_model)
    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_info(model):
    result = run_cli("info", model, "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["layout"] == "diffusers" and doc["downsample_factor"] == 8 and doc["latent_channels"] == 4
    assert doc["parameters"] > 0 and len(doc["weights_sha256"]) == 64
    assert doc["latent_spec"]["scaling_factor"] == pytest.approx(0.18215)
    assert doc["config"]["block_out_channels"] == [8, 16, 16, 16]
    human = run_cli("info", model)
    assert human.exit_code == 0 and "diffusers" in human.stdout and "0.18215" in human.stdout


def test_bench_json(model):
    pytest.importorskip("vaecli.bench")
    result = run_cli("bench", "--model", model, "--resolution", "32", "--warmup", "0", "--iters", "1", "--device",
                     "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["results"] and {"op", "resolution", "ms_per_img", "img_per_s"} <= set(doc["results"][0])


def test_console_entry_point(model, tmp_path):
    """`python -m vaecli` works as a process: stdout holds only the JSON document."""
    src = noise_image(tmp_path / "x.png", 16, 16)
    proc = run_module("encode", src, "-o", tmp_path / "lat", "--model", model, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] == 1


def test_retries_and_events_are_reported(model, tmp_path, monkeypatch):
    """Precision retries and OOM events of the Runner reach the items, the summary and --json."""
    import vaecli.batch.run
    from vaecli.pipeline import Pending, Retry, Runner

    class Flaky(Runner):
        def submit_encode(self, pixels, spec=None, noise=None):
            pending = super().submit_encode(pixels, spec, noise)

            def result():
                result = pending.result()
                result.retries.append(Retry(0, "fp16", "fp32"))
                result.events.append("out of memory: batch halved to 1")
                if pixels.shape[0] > 1:
                    result.failed[1] = "model output is NaN/Inf even in fp32"
                return result

            return Pending(result)

    monkeypatch.setattr(vaecli.batch.run, "Runner", Flaky)  # where run_job makes its Runner
    src = tmp_path / "in"
    noise_image(src / "a.png", 16, 16)
    noise_image(src / "b.png", 16, 16)
    code, doc, err = run_json("encode", src, "-o", tmp_path / "lat", "--model", model, "-b", "2")
    assert code == 1 and (doc["ok"], doc["failed"]) == (1, 1)
    assert doc["items"][0]["retries"] == [{"stage": "encode", "from_dtype": "fp16", "to_dtype": "fp32"}]
    assert doc["retries"] == 1 and doc["events"] == ["encode: out of memory: batch halved to 1"]
    assert "NaN" in doc["items"][1]["error"] and "NaN" in err
    human = run_cli("encode", src, "-o", tmp_path / "lat2", "--model", model, "-b", "2")
    assert "precision retries" in human.stdout and "out of memory" in human.stdout


def test_tiling_flags_reach_the_runner(model, tmp_path):
    src = noise_image(tmp_path / "x.png", 150, 130)
    flags = ["--model", model, "--tiling", "on", "--tile-size", "64", "--tile-overlap", "16"]
    code, doc, _ = run_json("encode", src, "-o", tmp_path / "lat", *flags)
    assert code == 0 and doc["tiles"] > 1
    code, doc, _ = run_json("decode", tmp_path / "lat", "-o", tmp_path / "dec", *flags)
    assert code == 0 and doc["tiles"] > 1
    assert Image.open(tmp_path / "dec" / "x.png").size == (150, 130)
    result = run_cli("encode", src, "-o", tmp_path / "o", *flags[:2], "--tile-size", "64", "--tile-overlap", "64")
    assert result.exit_code == 2 and "tile-overlap" in result.stderr


def test_batch_size_auto_same_latents(model, images, tmp_path):
    code, doc, _ = run_json("encode", images, "-o", tmp_path / "auto", "--model", model, "--batch-size", "auto")
    assert code == 0 and doc["ok"] == 3
    code, _, _ = run_json("encode", images, "-o", tmp_path / "one", "--model", model, "--batch-size", "1")
    assert code == 0
    for name in ("a", "sub/b", "sub/deep/c"):
        _, za = meta_of(tmp_path / "auto" / f"{name}.safetensors")
        _, z1 = meta_of(tmp_path / "one" / f"{name}.safetensors")
        torch.testing.assert_close(za, z1, atol=1e-5, rtol=0)
    bad = run_cli("encode", images, "-o", tmp_path / "x", "--model", model, "--batch-size", "many")
    assert bad.exit_code == 2


def test_dataset_only_flags_refused_without_dataset(model, images, tmp_path):
    result = run_cli("encode", images, "-o", tmp_path / "x", "--model", model, "--flip", "--bucket-step", "64")
    assert result.exit_code == 2 and "--bucket-step, --flip only apply with --dataset" in result.stderr
    result = run_cli("encode", images, "-o", tmp_path / "x", "--model", model, "--flip")
    assert result.exit_code == 2 and "--flip only applies with --dataset" in result.stderr



def test_error_lines_printed_as_items_fail_and_only_once(model, tmp_path, monkeypatch):
    """The progress callback prints a failed item's line at once; the end of the run prints only the
    failures it has not printed (so stderr holds one line per failed item)."""
    from vaecli.batch import Counts, ItemResult
    from vaecli.cli import err_console
    from vaecli.cli.rendering import Live, finish

    lines: list[str] = []
    monkeypatch.setattr(err_console, "print", lambda text, **kw: lines.append(str(text)))
    live = Live(None, debug=False)
    bad = ItemResult("in/x\n.png", None, status="failed", error="corrupt\nimage")
    live(Counts(3, ok=1, failed=1, item=bad))
    assert lines == ["[red]error:[/] in/x\\n.png: corrupt image"]  # escaped, one line

    class Report:
        items = [bad, ItemResult("in/y.png", None, status="failed", error="other")]

        def to_dict(self):
            return {"ok": 0, "failed": 2, "skipped": 0, "items": []}

    with pytest.raises(Exception):  # noqa: B017 - typer.Exit(1), some item failed (its type is click's)
        finish(Report(), True, False, None, live)
    assert lines[1:] == ["[red]error:[/] in/y.png: other"]


def test_images_too_large_for_memory_are_tiled_before_trying(model, tmp_path, monkeypatch):
    """--tiling off and auto with an image predicted not to fit (free memory made small): both finish,
    tiled at once, and the summary and --json say why (issue 13: 8192x8192 decode with --tiling off)."""
    import vaecli.memory as memory

    z = np.random.default_rng(0).standard_normal((4, 40, 40)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    monkeypatch.setattr(memory, "free_memory", lambda device: 4 << 20)
    monkeypatch.setattr(memory, "memory_capacity", lambda device: 4 << 20)
    for tiling in ("off", "auto"):
        args = ("decode", tmp_path / "z.npy", "-o", tmp_path / tiling, "--model", model, "--tiling", tiling,
                "--scaling-factor", "1", "--tile-size", "128", "--tile-overlap", "32")
        code, doc, _ = run_json(*args)
        assert code == 0 and doc["tiles"] > 1 and Image.open(tmp_path / tiling / "z.png").size == (320, 320)
        assert doc["events"][0].startswith("decode: predicted") and "tiled (128 px tiles)" in doc["events"][0]
        human = run_cli(*args[:-4], "--overwrite", "--tile-size", "128", "--tile-overlap", "32", "--scaling-factor",
                        "1")
        assert human.exit_code == 0 and "event: decode: predicted" in human.stdout
    assert 0 < doc["device_busy_share"] <= 1 and doc["device_busy_s"] > 0
