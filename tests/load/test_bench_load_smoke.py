"""bench/load_h200.py in its CPU smoke mode: the service deployed from serve_config.yaml's layout
(tiny model), warm-up, capacity, a steady soak and a 2x overload; the JSON and PNG it writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_bench_load_smoke(tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "load_h200.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}, report["errors"]
    assert list(report["phases"]) == ["warmup", "capacity", "steady", "overload"]
    head = report["headline"]
    assert head["sustained_jobs_per_min"] > 0 and head["single_job_s"] > 0
    assert head["steady_p99_e2e_s"] >= head["steady_p50_e2e_s"] > 0
    assert head["overload_429_rate"] > 0 and head["overload_5xx"] == {"submit": 0, "poll": 0}
    assert head["overload_checks"] == {name: True for name in head["overload_checks"]}, head["overload_checks"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "files" not in report["phases"]["steady"]  # no machine paths in the committed report
    assert "sustained jobs/min" in result.stdout and "2x overload: 429 rate" in result.stdout
