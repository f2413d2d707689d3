import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_metrics.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_metrics_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_asserts_the_no_gpu_path_and_still_plots(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path), "--interval", "0.25"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: no-GPU path OK" in result.stdout
    report = json.loads((tmp_path / "gpu_metrics_smoke.json").read_text())
    assert report["meta"]["nvml_error"].startswith("NVMLError")
    phases = {p["name"]: p for p in report["phases"]}
    assert list(phases) == ["load tiny-t2v", "job 1", "job 2", "idle", "cpu matmul", "cpu 30% duty"]
    assert not any("error" in p for p in report["phases"]), report["errors"]
    assert set(phases["job 1"]["timings"]) == {"text_encode", "denoise", "decode"}
    assert len(report["samples"]) >= 8 and all(s["exporter"]["turbo_gpu_present"] == 0 for s in report["samples"])
    assert (tmp_path / "gpu_metrics_smoke.png").read_bytes()[:4] == b"\x89PNG"


def sample(t, util, used_bytes, smi_util, smi_used_mib):
    uuid = "GPU-0000"
    exporter = {"turbo_gpu_utilization_percent": util, "turbo_gpu_memory_used_bytes": used_bytes}
    smi = {"utilization.gpu": smi_util, "memory.used": smi_used_mib, "memory.total": 143771.0}
    return {"t": t, "t_exporter": t, "t_nvidia_smi": t + 0.05, "exporter": {"gpus": {uuid: exporter}},
            "nvidia_smi": {"gpus": {uuid: smi}}}  # fmt: skip


def test_agreement_pairs_sources_per_gpu_in_common_units(tmp_path):
    bench = load_bench()
    mib = 1024 * 1024
    samples = [sample(t, u, m * mib, su, sm) for t, u, m, su, sm in [
        (0.0, 0, 500, 0, 500), (0.5, 100, 16884, 97, 16884), (1.0, 50, 49652, 80, 49600), (1.5, 20, 8692, 21, 8692),
    ]]  # fmt: skip
    report = bench.agreement(samples)
    util, memory = report["utilization_percent"], report["memory_used_mib"]
    assert util["n"] == 4 and util["max_abs_diff"] == 30 and util["within_tolerance"] == 0.75 and not util["agree"]
    assert memory["n"] == 4 and memory["max_abs_diff"] == 52 and memory["agree"]
    assert report["temperature_celsius"] == {"n": 0}
    bench.plot(samples, [{"name": "load", "t_start": 0.0, "t_end": 1.5}], tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.parametrize("text,value", [("97", 97.0), ("[N/A]", None), ("[Not Supported]", None)])
def test_nvidia_smi_fields_parse_to_numbers_or_none(text, value):
    assert load_bench()._number(text) == value
