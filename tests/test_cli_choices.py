"""One copy of each choice and default: choices.py against the core's tuples, the CLI's defaults (as Typer
parses them) against the core's option dataclasses, and plain commands that never load vaecli.dataset."""

from __future__ import annotations

import dataclasses
import inspect
import io
import subprocess
import sys
from typing import Any

import pytest
import torch
from PIL import Image
from typer.main import get_command

from cli_support import ROOT, make_model, noise_image, subprocess_env
from vaecli import choices
from vaecli.choices import DEFAULTS


def test_choices_are_the_cores():
    from vaecli import bench, config, latents, plans
    from vaecli import io as vio
    from vaecli.batch import SIZE_POLICIES
    from vaecli.dataset import options as dataset_options
    from vaecli.devices import DTYPES
    from vaecli.latents import musubi

    assert choices.DTYPES == tuple(DTYPES)
    assert choices.FAMILIES == (*config.FAMILY_PRESETS, "flux2")
    assert set(choices.TILING_MODES) == set(bench.TILING_MODES)
    assert choices.KERNEL_MODES == plans.KERNEL_MODES
    assert choices.SIZE_POLICIES == SIZE_POLICIES
    assert choices.CACHE_FORMATS == latents.FORMATS == tuple(latents.CONTAINER_SUFFIX)
    from vaecli.dataset import core as dataset_core

    assert dataset_options.LAYOUTS is choices.LAYOUTS and dataset_core.ENGINES is choices.ENGINES  # one copy
    # musubi's files are named per target and image size: a dataset-only --format outside the table
    assert choices.ENCODE_FORMATS == (*latents.FORMATS, *choices.DATASET_ONLY_FORMATS) == (*latents.FORMATS, "musubi")
    assert not set(choices.DATASET_ONLY_FORMATS) & set(latents.CONTAINER_SUFFIX)
    assert choices.MUSUBI_ARCHITECTURES == tuple(musubi.ARCHITECTURES)
    assert choices.IMAGE_FORMATS == tuple(vio.IMAGE_FORMATS)
    assert DEFAULTS.max_pixels == vio.DEFAULT_MAX_PIXELS
    for device in choices.DEVICES[1:]:  # "auto" is resolve_device's own word
        assert torch.device(device).type == device


def test_each_alpha_policy_is_one_the_core_applies():
    """A transparent pixel over white, over black, or its colour kept: io has no tuple of them to compare."""
    from vaecli.io import read_image

    buf = io.BytesIO()
    Image.new("RGBA", (1, 1), (51, 51, 51, 0)).save(buf, "PNG")
    seen = {}
    for policy in choices.ALPHA_POLICIES:
        buf.seek(0)
        seen[policy] = round(float(read_image(buf, alpha=policy).reshape(-1)[0]), 3)
    assert seen == {"white": 1.0, "black": 0.0, "drop": 0.2}


@pytest.mark.parametrize("enum, values", [
    (choices.Device, choices.DEVICES), (choices.DType, choices.DTYPES), (choices.Family, choices.FAMILIES),
    (choices.Tiling, choices.TILING_MODES), (choices.Kernels, choices.KERNEL_MODES),
    (choices.SizePolicy, choices.SIZE_POLICIES), (choices.Alpha, choices.ALPHA_POLICIES),
    (choices.CacheFormat, choices.CACHE_FORMATS), (choices.EncodeFormat, choices.ENCODE_FORMATS),
    (choices.MusubiArch, choices.MUSUBI_ARCHITECTURES), (choices.Layout, choices.LAYOUTS),
    (choices.Engine, choices.ENGINES), (choices.ImageFormat, choices.IMAGE_FORMATS),
])
def test_enums_are_built_from_the_tuples(enum, values):
    assert tuple(m.value for m in enum) == values and all(isinstance(m, str) and m == m.value for m in enum)


def cli_defaults(command: str) -> dict[str, Any]:
    """What a command's options are when not given, as Typer hands them to the command."""
    from vaecli.cli import app

    return {p.name: p.default for p in get_command(app).commands[command].params}


def group(kind: type, defaults: dict[str, Any]) -> Any:
    return kind(**{f.name: defaults[f.name] for f in dataclasses.fields(kind)})


def built_from_cli_defaults() -> list[tuple[str, Any, Any]]:
    """(name, the core's options as the CLI builds them with no flag given, the core's own defaults)."""
    from vaecli.batch import DecodeOptions, EncodeOptions, RoundtripOptions
    from vaecli.cli import options as o
    from vaecli.cli.dataset_mode import DatasetFlags, dataset_options, engine_options
    from vaecli.cli.settings import (
        LatentOutput,
        decode_options,
        encode_options,
        roundtrip_options,
        run_options,
    )
    from vaecli.dataset import DatasetOptions, EngineOptions
    from vaecli.pipeline import RunOptions

    enc, dec, rt = cli_defaults("encode"), cli_defaults("decode"), cli_defaults("roundtrip")
    latents = LatentOutput(enc["raw"], enc["latent_dtype"].value,
                           (enc["cache_format"] or choices.CacheFormat[DEFAULTS.cache_format]).value, enc["flat"])
    run, sample, pixels, write = (group(k, enc) for k in (o.RunFlags, o.SampleFlags, o.PixelFlags, o.WriteFlags))
    ds = group(DatasetFlags, enc)
    built = [
        ("RunOptions", run_options(run), RunOptions()),
        ("EncodeOptions", encode_options(run, sample, pixels, write, latents), EncodeOptions()),
        ("DecodeOptions", decode_options(group(o.RunFlags, dec), group(o.WriteFlags, dec), dec["image_format"].value,
                                         dec["quality"], dec["force"], dec["scaling_factor"], dec["shift_factor"]),
         DecodeOptions()),
        ("RoundtripOptions", roundtrip_options(group(o.RunFlags, rt), group(o.SampleFlags, rt),
                                               group(o.PixelFlags, rt), group(o.WriteFlags, rt), rt["diff"],
                                               rt["diff_gain"]), RoundtripOptions()),
        ("DatasetOptions", dataset_options(ds, [], run, sample, latents, pixels, write), DatasetOptions()),
        ("EngineOptions", engine_options(ds, run), EngineOptions()),
    ]
    return [(f"{name}.{f.name}", getattr(cli, f.name), getattr(core, f.name))
            for name, cli, core in built for f in dataclasses.fields(core)]


FIELDS = built_from_cli_defaults()


@pytest.mark.parametrize("name, cli, core", FIELDS, ids=[name for name, _, _ in FIELDS])
def test_cli_defaults_are_the_core_dataclasses_defaults(name, cli, core):
    assert cli == core, f"{name}: the CLI's default {cli!r}, the core's {core!r}"


def test_bench_defaults_are_run_bench_defaults():
    from vaecli.bench import run_bench
    from vaecli.cli.options import BenchFlags
    from vaecli.cli.settings import bench_settings

    defaults = cli_defaults("bench")
    settings = bench_settings(group(BenchFlags, defaults), defaults["resolution"], defaults["warmup"],
                              defaults["iters"])
    settings["device"] = defaults["device"].value  # resolved above; run_bench takes the name
    core = {name: p.default for name, p in inspect.signature(run_bench).parameters.items()}
    assert {k: core[k] for k in settings} == settings


PROBE = """
import sys
sys.argv = ["vaecli", *{args!r}]
from vaecli.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print("dataset modules:", sorted(m for m in sys.modules if m.startswith("vaecli.dataset")), "exit:", code,
      file=sys.stderr)
"""


def test_plain_commands_import_no_dataset_module(tmp_path):
    model = make_model(tmp_path / "m")
    image = noise_image(tmp_path / "a.png", 16, 16)
    for args in (["encode", "--help"], ["encode", str(image), "-o", str(tmp_path / "lat"), "--model", model]):
        r = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                           env=subprocess_env(), cwd=ROOT, timeout=120)
        assert r.stderr.strip().splitlines()[-1] == "dataset modules: [] exit: 0", r.stderr
    assert (tmp_path / "lat" / "a.safetensors").is_file()
