"""Helpers for the CLI tests: a tiny saved model, image writers, and a CliRunner wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from conftest import make_tiny_model
from vaecli import save_vae
from vaecli.cli import app

ROOT = Path(__file__).resolve().parents[1]
CLI_TINY: dict[str, Any] = {"force_upcast": False}  # the CLI tests' model: half precision runs stay in half


def make_model(folder: Path, seed: int = 0, **changes: Any) -> str:
    """Save a tiny random AutoencoderKL as a diffusers folder; returns its path."""
    save_vae(make_tiny_model(seed, **{**CLI_TINY, **changes}), folder)
    return str(folder)


def noise_image(path: Path, w: int, h: int, mode: str = "RGB", seed: int = 0, **save: Any) -> Path:
    """A smooth-ish random image (so JPEG and the model behave like on photos) in `mode`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 4), dtype=np.uint8)
    img = Image.fromarray(small, "RGBA").resize((w, h), Image.BILINEAR)
    if mode != "RGBA":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return path


def run_cli(*args: str | Path) -> Any:
    """Invoke the Typer app in-process; result has exit_code, stdout, stderr."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_json(*args: str | Path) -> tuple[int, dict[str, Any], str]:
    """Invoke with --json; stdout must be exactly one JSON document."""
    result = run_cli(*args, "--json")
    return result.exit_code, json.loads(result.stdout), result.stderr


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def run_module(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m vaecli ...` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "vaecli", *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
        cwd=ROOT,
    )
