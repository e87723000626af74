"""The CLI contract a script relies on: exit codes (one rule), `-o` naming one file, `--json` items."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from cli_support import make_model, noise_image, run_cli, run_json


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-vae"))


# ----------------------------------------------------------------------------------------- exit codes
# 2: the command as given cannot run (nothing is read or written); 1: it ran and some item failed.


def test_missing_input_path_is_a_usage_error_before_any_work(model, tmp_path):
    src = tmp_path / "in"
    noise_image(src / "a.png", 16, 16)
    latent = tmp_path / "a.safetensors"
    assert run_cli("encode", src / "a.png", "-o", latent, "--model", model).exit_code == 0
    for command, given in (("encode", src), ("decode", latent), ("roundtrip", src)):
        out = tmp_path / f"out-{command}"
        r = run_cli(command, given, tmp_path / "nope.png", "-o", out, "--model", model)
        assert r.exit_code == 2, (command, r.stderr)
        assert r.stderr.strip() == f"error: no such file or folder: {tmp_path / 'nope.png'}", r.stderr
        assert not out.exists(), command  # nothing written, not even the good input's output
        code, doc, _ = run_json(command, tmp_path / "nope.png", "-o", out, "--model", model)
        assert code == 2 and doc["items"] == [] and doc["error"].startswith("no such file or folder")


def test_no_inputs_found_is_a_usage_error_and_failed_items_exit_1(model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    r = run_cli("encode", tmp_path / "empty", "-o", tmp_path / "o", "--model", model)
    assert r.exit_code == 2 and "no inputs found" in r.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    noise_image(tmp_path / "bad" / "y.png", 16, 16)
    r = run_cli("encode", tmp_path / "bad", "-o", tmp_path / "o", "--model", model)
    assert r.exit_code == 1 and r.stderr.count("error: ") == 1
    assert (tmp_path / "o" / "y.safetensors").is_file()


def test_missing_local_shard_is_a_usage_error(model, tmp_path):
    r = run_cli("encode", tmp_path / "shard-000.tar", "-o", tmp_path / "o", "--dataset", "--model", model)
    assert r.exit_code == 2 and "no such file or folder" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ -o naming one file


def test_o_with_the_output_suffix_names_that_file(model, tmp_path):
    image = noise_image(tmp_path / "a.png", 24, 16)
    target = tmp_path / "x.safetensors"
    code, doc, _ = run_json("encode", image, "-o", target, "--model", model)
    assert code == 0 and target.is_file() and doc["items"][0]["output"] == str(target)
    with safe_open(str(target), "pt") as f:
        assert list(f.get_tensor("latent").shape) == [4, 2, 3]
    code, doc, _ = run_json("encode", image, "-o", target, "--model", model)
    assert code == 0 and doc["items"][0]["status"] == "skipped"  # resume works on the file, too
    code, doc, _ = run_json("decode", target, "-o", tmp_path / "back.png", "--model", model)
    assert code == 0 and (tmp_path / "back.png").is_file()
    code, _, _ = run_json("decode", target, "-o", tmp_path / "back.jpeg", "--format", "jpg", "--model", model)
    assert code == 0 and (tmp_path / "back.jpeg").is_file()
    code, doc, _ = run_json("roundtrip", image, "-o", tmp_path / "r.png", "--diff", "--model", model)
    assert code == 0 and (tmp_path / "r.png").is_file() and (tmp_path / "r.diff.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "back.jpeg", "back.png", "r.diff.png", "r.png",
                                                          "x.safetensors"]


def test_o_naming_a_file_with_several_inputs_or_another_suffix_is_a_usage_error(model, tmp_path):
    a = noise_image(tmp_path / "in" / "a.png", 16, 16)
    b = noise_image(tmp_path / "in" / "b.png", 16, 16)
    cases = [
        (("encode", a, b, "-o", tmp_path / "x.safetensors"), "takes one input file, but 2 inputs are given"),
        (("encode", tmp_path / "in", "-o", tmp_path / "x.safetensors"),
         "takes one input file, but the input is a folder"),
        (("encode", a, "-o", tmp_path / "x.npz"), "this command writes .safetensors files here"),
        (("roundtrip", a, "-o", tmp_path / "x.webp"), "this command writes .png files here"),
        (("decode", a, "-o", tmp_path / "x.jpg"), "choose the --format that writes .jpg"),
    ]
    for args, message in cases:
        r = run_cli(*args, "--model", model)
        assert r.exit_code == 2 and message in r.stderr, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_an_existing_folder_with_a_suffix_stays_a_folder(model, tmp_path):
    image = noise_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "odd.safetensors").mkdir()
    assert run_cli("encode", image, "-o", tmp_path / "odd.safetensors", "--model", model).exit_code == 0
    assert (tmp_path / "odd.safetensors" / "a.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- --json


def test_every_item_has_notes(model, tmp_path):
    image = noise_image(tmp_path / "a.png", 16, 16)
    docs = [run_json("encode", image, "-o", tmp_path / "lat", "--model", model)[1],
            run_json("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--model", model)[1],
            run_json("roundtrip", image, "--model", model)[1],
            run_json("info", model)[1]]
    for doc in docs:
        assert doc["items"] and all(isinstance(item["notes"], list) for item in doc["items"]), doc
    assert docs[0]["items"][0]["notes"] == []


def test_under_torchrun_only_dataset_encode_runs_and_only_rank_0_prints_json(model, tmp_path):
    from typer.testing import CliRunner

    from vaecli.cli import app

    image = noise_image(tmp_path / "a.png", 16, 16)
    for rank, printed in (("0", True), ("1", False)):
        r = CliRunner().invoke(app, ["decode", str(image), "-o", str(tmp_path / "o"), "--model", model, "--json"],
                               env={"WORLD_SIZE": "2", "RANK": rank})
        assert r.exit_code == 2 and "only encode --dataset does" in r.stderr
        assert bool(r.stdout.strip()) == printed  # one JSON document over all ranks: rank 0's
        if printed:
            assert json.loads(r.stdout)["error"].startswith("decode does not split its work")
    assert not (tmp_path / "o").exists()
