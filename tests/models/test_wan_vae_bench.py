"""The GPU benchmark's every code path, run on the CPU with the tiny config (its --smoke mode)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "vae_decode.py"


def test_smoke_run_measures_every_variant_without_errors(tmp_path):
    spec = importlib.util.spec_from_file_location("vae_decode_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.json"
    bench.main(["--smoke", "--out", str(out), "--warmup", "0", "--iters", "1"])
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    results = {r["name"]: r for r in report["results"]}
    assert not [r for r in results.values() if "error" in r or "skipped" in r]
    timed = [name for name, r in results.items() if "s" in r]
    assert any(name.startswith("smoke decode diffusers") for name in timed)
    assert any(name.startswith("smoke decode ours channels_last") for name in timed)
    assert any(name.startswith("i2v encode_condition") for name in timed)
    assert any(name.startswith("umt5 encode 4 prompt") for name in timed)
    assert results["smoke decode ours vs diffusers, same weights"]["max_abs_diff"] < 1e-4
    assert results["smoke decode ours"]["output_shape"] == [1, 3, 5, 32, 32]
    assert report["summary"][0].startswith("smoke decode: best ours")
