"""The package as users install it: the wheel holds every module and data file of the source tree, and it
imports and runs from an install outside the checkout (a listed package set once shipped without
vaecli.kernels, and every encode failed after `pip install .` while the tests, run from the checkout, passed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cli_support import ROOT

IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "dist", "*.egg-info", ".git", ".pytest_cache")


def _source_files() -> set[str]:
    """Every file of the package in the source tree, as wheel paths (vaecli/...)."""
    pkg = ROOT / "vaecli"
    return {
        p.relative_to(ROOT).as_posix()
        for p in pkg.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _build_isolation() -> list[str]:
    """Build offline with the installed setuptools when it is new enough, else in pip's isolated env."""
    try:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 68:
            return ["--no-build-isolation"]
    except ImportError:
        pass
    return []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a clean copy of the tree (an in-tree build/ folder could hide a missing file)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED, symlinks=True)
    out = tmp / "dist"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *_build_isolation(), "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("vaecli-*.whl")
    return whl


def test_wheel_holds_every_file_of_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    in_wheel = {n for n in names if n.startswith("vaecli/")}
    source = _source_files()
    assert source - in_wheel == set(), f"left out of the wheel: {sorted(source - in_wheel)}"
    assert in_wheel - source == set(), f"in the wheel but not in the tree: {sorted(in_wheel - source)}"
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "vaecli").rglob("__init__.py")}
    assert {"vaecli", "vaecli/kernels", "vaecli/dataset"} <= packages  # the test sees the real tree
    assert "vaecli/default_model/diffusion_pytorch_model.safetensors" in in_wheel
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vaecli = vaecli.entry:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_imports_every_module_and_runs_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples")
    # An editable install of the checkout in this environment (pip install -e) adds an import hook that
    # would quietly supply any module the wheel lacks: the probe removes it and checks where each module is.
    probe = (
        "import importlib, pkgutil, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import vaecli\n"
        "mods = [m.name for m in pkgutil.walk_packages(vaecli.__path__, 'vaecli.') if m.name != 'vaecli.__main__']\n"
        "for m in mods: importlib.import_module(m)\n"
        "outside = [m for m in ('vaecli', *mods) if not sys.modules[m].__file__.startswith(sys.argv[1])]\n"
        "assert not outside, outside\n"
        "print(len(mods))\n"
        "from vaecli.cli import main\n"
        "main(['roundtrip', 'examples', '-o', 'out', '--json'])\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=work, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    count, doc = r.stdout.split("\n", 1)
    assert int(count) >= 30  # every module of the package imported from the install
    import json

    report = json.loads(doc)
    examples = sorted(p.name for p in (ROOT / "examples").iterdir() if p.suffix.lower() in (".jpg", ".png"))
    assert [item["status"] for item in report["items"]] == ["ok"] * len(examples)
    assert sorted(p.stem for p in (work / "out").iterdir()) == [Path(e).stem for e in examples]
