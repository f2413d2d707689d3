"""The GPU benchmarks' --smoke mode: the same scripts end to end on tiny shapes (interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, out: Path) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_attention_benchmark_smoke(tmp_path):
    report = _run("attention.py", tmp_path / "attention.json")
    assert report["interpreter"] is True
    smoke = report["op_smoke_fp16"]
    assert not [name for name, r in smoke.items() if "error" in r]
    for name in ("sla_128x64", "sagesla_128x64", "block_sparse_64x128", "sla_64x128", "sla_unselected_128x64"):
        assert smoke[name]["pass"], name
    shape = report["shapes"]["smoke"]
    variants = shape["variants"]
    errors = {name: v["error"] for name, v in variants.items() if "error" in v}
    assert not errors
    for name in ("triton_dense", "mask_128x64", "mask_128x64_torch_topk", "block_sparse_128x64", "sla_128x64",
                 "sagesla_128x64", "sagesla_128x64_bf16pv", "sagesla_128x64_fp8pv", "sage_dense",
                 "sla_128x64_unselected", "flex_sparse_128x64_eager"):
        assert variants[name]["ms"] > 0, name
    # FlexAttention with the BlockMask built from our LUT computes the same masked attention.
    assert variants["flex_sparse_128x64_eager"]["vs_exact"]["cosine"] > 0.9999
    assert variants["sla_128x64"]["vs_exact"]["cosine"] > 0.9999
    # Rounding the fp32 reference to the output dtype removes the output's own rounding error.
    sla = variants["sla_128x64"]
    assert sla["vs_exact_rounded"]["rel_l1"] < sla["vs_exact"]["rel_l1"]
    assert 0.0 < shape["mask_recall"]["128x64"] <= 1.0
    # Every launch shape of the radix select picks what torch.topk picks on the same scores.
    sweep = shape["select_launch"]
    for geometry in ("128x64", "64x128"):
        rows = {name: r for name, r in sweep[geometry].items() if name.startswith("warps_")}
        assert len(rows) == 4 and all(r["equal_to_torch_topk"] and r["ms"] > 0 for r in rows.values())
    targets = shape["targets"]
    assert targets["block_sparse_128x64 cosine vs exact masked >= 0.9999"]["pass"]
    assert targets["sla_128x64 rel L1 vs exact masked, fp32 (info)"]["pass"] is None
    # Every autotuner decision is recorded with its reason (the interpreter takes the first candidate).
    assert report["tuning"] and all(rec["chosen"] and rec["reason"] for rec in report["tuning"].values())


def test_passes_benchmark_smoke(tmp_path):
    """Every launch shape the passes' sweep times computes what the default launch computes."""
    report = _run("passes.py", tmp_path / "passes.json")
    passes = report["shapes"]["smoke"]["passes"]
    assert {"pool_queries int8 b64 (num_warps)", "key pass sla b64", "key pass sage b128",
            "quantize_keys b128 fp8 V"} <= set(passes)
    for name, sweep in passes.items():
        assert len(sweep["launches"]) >= 2 and sweep["default"] in sweep["launches"], name
        assert all(r["ms"] > 0 and r["same_output_as_default"] for r in sweep["launches"].values()), name
        assert sweep["default_vs_fastest"] >= 1.0


def test_host_probe_smoke(tmp_path):
    report = _run("host_probe.py", tmp_path / "host.json")
    assert set(report["ops"]) == {"sla", "sla-unselected", "sagesla"}
    for op in report["ops"].values():
        host = op["host_ms"]
        assert op["eager_ms"] > 0 and op["graph_ms"] is None  # no CUDA graphs off the GPU
        assert host["total"] >= host["pool_keys"] > 0 and host["launch_flash"] > 0


def test_w8a8_benchmark_smoke(tmp_path):
    report = _run("w8a8.py", tmp_path / "w8a8.json")
    rows = report["models"]["smoke"]
    for row in rows.values():
        assert "error" not in row.get("w8a8_linear", {}), row
        assert row["w8a8_linear"]["vs_fp32"]["cosine"] > 0.999
        assert row["weight_mb_int8"] * 2 == pytest.approx(row["weight_mb_bf16"])


def test_ab_kernels_smoke(tmp_path):
    """Two kernel trees (here the same one twice), each in its own process: both runs and their
    ratios land in one report."""
    out = tmp_path / "ab.json"
    kernels = BENCH.parent / "kernels"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "ab_kernels.py"), "--smoke", "--tree", f"a={kernels}",
                           "--tree", f"b={kernels}", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"a", "b"}
    for run in report["runs"].values():
        assert set(run["shapes"]["smoke"]) == {"block_sparse", "sla", "sagesla"}
        assert all(min(r["eager_ms"]) > 0 for r in run["shapes"]["smoke"].values())
    ratios = report["ratios_to_a"]["b"]["smoke"]
    assert all(r["eager_best"] > 0 and r["graph"] is None for r in ratios.values())
