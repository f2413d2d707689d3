"""bench/dit_step.py runs end to end in its CPU smoke mode and reports both models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "dit_step.py"


def test_dit_step_smoke_writes_a_complete_report(tmp_path):
    spec = importlib.util.spec_from_file_location("dit_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dit_step.json"
    bench.main(["--smoke", "--warmup", "1", "--iters", "2", "--out", str(out)])

    report = json.loads(out.read_text())
    entry = report["models"]["tiny"]
    assert entry["tokens"] == 3 * 4 * 6
    for name in ("ours", "diffusers"):
        variant = entry["variants"][name]
        assert "error" not in variant, variant.get("traceback")
        assert variant["finite"] and len(variant["times_ms"]) == 2 and variant["median_ms"] > 0
    medians = [entry["variants"][name]["median_ms"] for name in ("ours", "diffusers")]
    assert entry["ratio"] == pytest.approx(medians[0] / medians[1], rel=1e-3)
    assert entry["pass"] == (entry["ratio"] <= 1.0)
    assert "--smoke" in report["command"] and report["diffusers"]
