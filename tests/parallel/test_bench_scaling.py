"""bench/scaling.py in its CPU smoke mode: every phase runs through the real code paths (gloo ranks,
the application over HTTP, Serve's autoscaler) and the report carries what the GPU run will judge."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "scaling.py"


def test_scaling_smoke_reports_every_phase(tmp_path):
    out = tmp_path / "scaling.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--replicas", "1", "--ranks", "1,2",
               "--window-s", "10"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}, report["errors"]
    phases = report["phases"]

    throughput = phases["throughput"]["1"]
    assert throughput["jobs_per_min"] > 0 and throughput["running_denoisers"] == 1 and not throughput["failed"]
    assert {"denoise", "decode", "queue_wait"} <= set(throughput["stage_s"])

    latency = phases["latency"]
    assert latency["2"]["tokens"] == 189  # odd: the two ranks pad
    assert latency["2"]["eager"]["all_to_alls_per_sampling"] == 4 * 2 * 2  # steps x layers x (in, out)
    assert 0 < latency["2"]["eager"]["all_to_all_share"] < 1 and latency["1"]["eager"]["all_to_all_s"] == 0
    assert set(report["verdicts"]["latency_efficiency"]) == {"1", "2"}

    autoscale = phases["autoscale"]["run"]
    assert autoscale["pass"], autoscale["timeline"]

    shards = phases["shards"]["tiny-t2v"]["degrees"]
    assert set(shards) == {"1", "2"} and all(d["attention_ms"] > 0 and d["rest_of_block_ms"] > 0 for d in shards.values())

    assert report["plot"] == str(out.with_suffix(".png")) and out.with_suffix(".png").stat().st_size > 0
    assert "scaling benchmark" in result.stdout and "autoscale" in result.stdout
