"""bench/serve.py in its CPU smoke mode: every phase runs and the JSON holds the numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_bench_serve_smoke(tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=400, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}, report["errors"]
    assert report["phases"]["in_process"]["latency_s"]["n"] == 2
    assert report["phases"]["http_single"]["latency_s"]["median"] > 0
    assert report["phases"]["http_single"]["mp4_bytes"]["min"] > 0
    concurrent = report["phases"]["http_concurrent"]
    assert concurrent["completed"] == concurrent["jobs"] == 3 and concurrent["jobs_per_min"] > 0
    assert {"text_encode", "denoise", "decode", "queue_wait"} <= set(concurrent["stage_s"])
    assert "ratio" in report["serving_overhead"]
    assert "serving overhead" in result.stdout
