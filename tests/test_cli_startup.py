"""Help and argument errors answer without importing torch (seconds cold): checked by what got imported, not
by timing (scripts/cli_startup.py measures the time)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli_support import ROOT, subprocess_env

PROBE = """
import sys
sys.argv = ["vaecli", *{args!r}]
from vaecli.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print("torch imported:", "torch" in sys.modules, "exit:", code, file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["encode", "--help"], 0),
    (["bench", "--help"], 0),
    (["--version"], 0),
    (["encode", "photos"], 2),  # missing -o
    (["decode", "x", "-o", "y", "--batch-size", "many"], 2),
    (["frobnicate"], 2),
])
def test_help_and_usage_errors_do_not_import_torch(args, code):
    r = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                       env=subprocess_env(), cwd=ROOT, timeout=60)
    assert r.stderr.strip().splitlines()[-1] == f"torch imported: False exit: {code}", r.stderr


def test_the_library_still_imports_lazily():
    r = subprocess.run([sys.executable, "-c", "import sys, vaecli; a = 'torch' in sys.modules; vaecli.load_vae; "
                        "print(a, 'torch' in sys.modules, sorted(vaecli.__all__)[:3])"],
                       capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=60)
    assert r.stdout.strip() == "False True ['AutoencoderKL', 'AutoencoderKLFlux2', 'AutoencoderTiny']", r.stderr
