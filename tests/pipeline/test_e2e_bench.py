"""bench/e2e.py in its CPU smoke mode: every variant runs, the VAE decode is timed apart from the
mp4, and the kernel profiles account for the time they measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "e2e.py"


def test_e2e_smoke_reports_every_variant_and_profiles(tmp_path):
    out = tmp_path / "e2e.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    failed = {name: r["error"] for name, r in results.items() if "error" in r or "skipped" in r}
    assert not failed
    for attention in ("sagesla", "sla", "original"):
        stages = results[f"smoke/ours/{attention}/request"]["median"]
        assert stages["request_s"] >= stages["denoise"] + stages["decode"] > 0
    assert results["smoke/ours/vae_decode"]["median_s"] > 0
    for name in ("smoke/ours/sagesla/profile_sampling", "smoke/ours/profile_vae_decode"):
        profile = results[name]
        assert profile["kernel_launches"] > 0 and profile["top_kernels"]
        assert 0 < profile["gpu_busy_s"] <= profile["wall_s"] * 1.05
        assert abs(profile["gpu_busy_s"] + profile["gpu_idle_s"] - profile["wall_s"]) < 0.05 * profile["wall_s"] + 1e-3
    assert "convolution" in results["smoke/ours/profile_vae_decode"]["kernel_s_by_category"]
    assert results["smoke/ours/sagesla+quant_linear/sampling"]["sampling_s"] > 0
