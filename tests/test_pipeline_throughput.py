"""scripts/pipeline_throughput.py's gpu_rows() (what scripts/gpu_report.py calls), on the tiny model and
a few small images: every row present, end to end against model only, large images through the CLI."""

from __future__ import annotations

import sys

import pytest

from cli_support import ROOT


@pytest.mark.slow  # the throughput rows end to end, large images through the CLI: 16 s quiet, 61 s busy (2 cores)
def test_gpu_rows_quick_on_the_cpu(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from pipeline_throughput import gpu_rows
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    doc = gpu_rows(budget_s=240, device="cpu", json_out=tmp_path / "rows.json", quick=True)
    assert (tmp_path / "rows.json").exists()
    for name in ("same", "mixed"):
        row = doc[name]["roundtrip"]
        assert row["images"] in (3, 4) and row["ratio"] > 0 and 0 < row["model_busy_share"] <= 1
    assert doc["mixed"]["roundtrip_pad_to"]["pad_to"] == 16
    big = {(r["op"], r["side"], r["tiling"]): r for r in doc["big"] if "op" in r}
    assert set(big) == {("decode", 64, "off"), ("decode", 64, "auto"), ("decode", 32, "on"), ("encode", 64, "off"),
                        ("encode", 64, "auto")}
    assert all(r.get("exit") == 0 and r["wall_s"] > 0 and r["peak_rss_bytes"] > 0 for r in big.values()), big
    assert doc["process_start"]["import_and_load_s"] > 0
