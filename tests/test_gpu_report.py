"""scripts/gpu_report.py in its CPU smoke mode: every section runs or says why not, failures stay local."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from vaecli import kernels

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "scripts" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # every section of the report on the CPU: 21 s on a quiet 2-core CPU, 75 s on a busy one
def test_quick_report_survives_a_failing_section(tmp_path, monkeypatch, capsys):
    report = _load_script()
    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # as on any CPU outside the tests

    def broken(args):
        def run(rep, out):
            raise RuntimeError("simulated failure")
        return run

    monkeypatch.setitem(report.SECTIONS, "env", (broken, 0))
    real_plan_for = report.plan_for

    def kernels_fail_in_upsampling(device, config, kernels="auto"):  # an implementation that cannot run
        plan = real_plan_for(device, config, kernels)
        return dataclasses.replace(plan, upsample="missing", wide_from=0) if kernels == "on" else plan

    monkeypatch.setattr(report, "plan_for", kernels_fail_in_upsampling)
    path = tmp_path / "report.json"
    assert report.main(["--device", "cpu", "--quick", "--dtypes", "bf16", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    sections = doc["sections"]
    assert sections["env"]["status"] == "failed" and "simulated failure" in sections["env"]["error"]
    # ran after the failure; the failing implementation is recorded where it ran
    assert [sections[s]["status"] for s in ("rows", "tiling", "accuracy", "pipeline")] == ["ok", "ok", "partial", "ok"]
    assert sections["pipeline"]["same"]["roundtrip"] and "big" in sections["pipeline"]
    assert sections["compile"] == {"status": "skipped", "reason": "--quick (a CPU compile takes minutes)"}
    rows = sections["rows"]["rows"]
    assert [(r["op"], r["resolution"], r["batch"]) for r in rows] == [
        ("encode", 32, 1), ("decode", 32, 1), ("encode", 64, 1), ("decode", 64, 1), ("encode", 32, 2),
        ("decode", 32, 2)]
    for r in rows:
        # on the CPU "off" is REFERENCE, which differs from the CPU row (its tiles and wide-layer forms)
        assert set(r["impls"]) == {"diffusers", "vaecli", "vaecli-kernels-on", "vaecli-kernels-off",
                                   "vaecli-kernels-nhwc"}
        assert r["impls"]["vaecli-kernels-off"]["max_abs_diff_vs_diffusers"] == 0.0  # diffusers' sequence
        failing = {"vaecli-kernels-on", "vaecli-kernels-nhwc"} if r["op"] == "decode" else set()
        assert {n for n, v in r["impls"].items() if "error" in v} == failing  # recorded; the others still timed
        timed = [v for n, v in r["impls"].items() if n not in failing]
        assert all(v["ms_per_img"] > 0 and math.isfinite(v["speedup_vs_diffusers"]) for v in timed)
        # The tiny model is narrow: on the CPU its default plan is diffusers' exact sequence, also in bf16.
        assert r["impls"]["vaecli"]["max_abs_diff_vs_diffusers"] == 0.0
    tiled = sections["tiling"]["rows"]
    assert {t["op"] for t in tiled} == {"encode", "decode"} and all(t["tiles"] > 1 for t in tiled)
    acc = sections["accuracy"]["images"][0]
    assert acc["default"]["decode_psnr_8bit_db"] > 40 and acc["default"]["latent_max_abs_diff"] < 0.2
    assert set(acc) == {"image", "side", "default", "kernels-on", "kernels-off"}
    assert acc["kernels-on"]["error"].startswith("KeyError")
    assert any(line.startswith("bar bf16 decode 1024 b1: default plan >= 3.5x") for line in doc["summary"])
    assert "bar fp16 decode 1024 b1: default plan >= 3.5x diffusers: - not measured" in doc["summary"]
    assert "== summary" in capsys.readouterr().out


def test_time_budget_skips_sections_and_says_so(tmp_path):
    report = _load_script()
    path = tmp_path / "report.json"
    assert report.main(["--device", "cpu", "--quick", "--budget", "0", "--sections", "env,rows", "--json",
                        str(path)]) == 0
    sections = json.loads(path.read_text())["sections"]
    assert sections["env"]["status"] == "ok" and sections["env"]["torch"]
    assert sections["rows"]["status"] == "skipped" and sections["rows"]["reason"].startswith("time budget")
    assert sections["tiling"] == {"status": "skipped", "reason": "not asked for (--sections)"}
