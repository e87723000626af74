"""Help and output at 80 columns: nothing cut or garbled; summaries in a pipe stay one line each."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from cli_support import ROOT, make_model, noise_image, run_cli

COMMANDS = ("encode", "decode", "roundtrip", "bench", "info")


def help_text(*args: str) -> str:
    """`vaecli ARGS --help` as a user sees it in an 80-column terminal (and in a pipe)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="80")
    r = subprocess.run([sys.executable, "-m", "vaecli", *args, "--help"], capture_output=True, text=True, env=env,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return r.stdout


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_is_whole(command):
    from typer.main import get_command

    from vaecli.cli import app

    text = help_text(command)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert "…" not in text and "<bool>" not in text and "{" not in lines[0], text
    assert "..." not in text.replace("INPUT...", ""), text  # nothing cut short
    usage = lines[0]
    assert usage == f"Usage: vaecli {command} [OPTIONS]" + {"bench": "", "info": " [MODEL]"}.get(command, " INPUT...")
    flat = squeeze(text)
    params = get_command(app).commands[command].params
    for param in params:
        assert squeeze(param.help or "") in flat, (param.name, param.help)  # every help text, in full
        for opt in param.opts if param.param_type_name == "option" else ():
            assert opt in text, opt
    if command == "encode":
        assert "[default:(resolution/2;--formatkohya:256,assd-scripts)]" in flat
        assert "[default:(resolution*2;--formatkohya:1024,assd-scripts)]" in flat
        for panel in ("Model:", "Precision and memory:", "Output:", "Dataset preparation (--dataset):"):
            assert panel in lines, panel


def test_root_help_lists_commands_whole():
    text = help_text()
    assert "..." not in text.replace("[ARGS]...", "") and "…" not in text
    for command in COMMANDS:
        assert re.search(rf"^  {command} +\S", text, re.M), command


def test_bench_table_fits_80_columns_with_whole_headers():
    from vaecli.cli import bench_table

    rows = [dict(op="encode", resolution=4096, batch_size=16, dtype="bf16", tiling="auto", ms_per_img=12345.6,
                 img_per_s=1234.56, device_busy=0.973, peak_memory_bytes=123456 * 2**20, warmup_s=261.23)]
    buf = io.StringIO()
    Console(file=buf, width=80).print(bench_table(rows))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    header = next(line for line in text.splitlines() if "op" in line.split())
    assert header.split() == ["op", "res", "batch", "dtype", "tiling", "ms/img", "img/s", "busy", "peak", "MiB",
                              "warm-up", "s"]
    assert "12345.6" in text and "1234.56" in text and "123456" in text and "261.23" in text and "…" not in text
    assert "97%" in text


def test_summaries_stay_one_line_in_a_pipe(tmp_path):
    model = make_model(tmp_path / "m")
    deep = tmp_path / ("a-rather-long-folder-name-" * 2) / "another-long-folder-name-for-logs"
    image = noise_image(deep / "photo-with-a-long-name-from-a-camera-roll.png", 16, 16)
    r = run_cli("roundtrip", image, "--model", model)  # CliRunner: stdout is not a terminal, as in a pipe
    assert r.exit_code == 0, r.stderr
    summary = [line for line in r.stdout.splitlines() if line.startswith("roundtrip: ")]
    assert len(summary) == 1 and re.search(r"mean PSNR [\d.]+ dB, mean SSIM -?[\d.]+$", summary[0]), r.stdout
    assert len(summary[0]) > 80 and "…" not in r.stdout
    assert image.name in squeeze(r.stdout.replace("│", ""))  # the table folds a long name, never cuts it
