"""bench/fused_norm.py end to end in its CPU smoke mode, and its sm90 compile report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_module():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("fused_norm_bench", BENCH / "fused_norm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_every_op_and_the_block(tmp_path, monkeypatch):
    bench = _bench_module()
    # One sweep candidate besides each op's default: every interpreted launch costs ~0.1 s here.
    monkeypatch.setattr(bench.fn, "ROW_CONFIGS", [bench.fn.RowConfig(8, 4)])
    out = tmp_path / "fused_norm.json"
    bench.main(["--smoke", "--sweep", "--attention", "original", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["interpreter"] is True and "--smoke" in report["command"]
    results = report["results"]
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not failed
    for name in bench.OPS:
        op = results[f"tiny/op/{name}"]
        assert op["fused"]["ms"] > 0 and op["torch"]["ms"] > 0 and op["traffic_bytes"] > 0
        assert op["error_vs_fp32"]["fused"] <= op["error_vs_fp32"]["torch"] + 1e-3
        sweep = results[f"tiny/sweep/{name}"]
        assert sweep["best"] in sweep["ms"] and set(sweep["ms"]) == {sweep["default"], "m8/w4"}
    block = results["tiny/block"]
    assert block["fused_vs_torch"]["cosine"] > 0.9999
    summary = report["summary"]["tiny"]
    assert summary["block_ms"]["fused"] > 0 and "ops_saved_ms_per_forward" in summary


def test_sm90_compile_has_no_spills_and_no_layout_shuffles(tmp_path):
    # Compiling needs the real Triton frontend: a process without the session's interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    done = subprocess.run([sys.executable, str(BENCH / "fused_norm.py"), "--compile-check", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["variants"]) == 10
    for row in report["variants"]:
        assert "error" not in row, row
        assert row["spill_bytes"] == 0, row
        # Shared memory holds only the cross-warp reduction scratch: no register layout is
        # converted through shared memory (see fused_norm.VEC).
        assert row["shared_bytes"] <= 64, row
