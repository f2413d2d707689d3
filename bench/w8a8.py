"""W8A8 linear (int8 weights and activations, one scale per 128x128 tile) against bf16
torch.matmul at the DiT's GEMM shapes, activation quantisation included.

    python bench/w8a8.py            # H200, ~30 s; writes bench/results/w8a8_h200.json
    python bench/w8a8.py --quick    # 1.3B shapes only
    python bench/w8a8.py --smoke    # CPU: tiny shapes through the Triton interpreter

Rows per shape: bf16 F.linear, the whole int8_linear (quantise x + int8 GEMM), and its two parts
(the quantiser's bandwidth as a fraction of the H200's 4.8 TB/s; the GEMM's speedup over bf16
alone); accuracy of both against an fp32 matmul of the unquantised operands. The weight is bf16
data quantised with `quantize_weight`, as a TurboDiffusion -quant checkpoint stores it. Every
GEMM autotuner decision (candidate times, choice) is recorded.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_checkout import importable_from_checkout  # noqa: E402

importable_from_checkout()

from turbo_kernels.accuracy import compare  # noqa: E402
from turbo_kernels.autotune import last_config, tuning_log  # noqa: E402
from turbo_kernels.w8a8 import int8_linear, quantize_tiles_triton, quantize_weight, w8a8_matmul  # noqa: E402

from timing import measure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    "wan2.1-1.3b-480p": (32760, [("qkv fused", 1536, 4608), ("attn out", 1536, 1536), ("ffn up", 1536, 8960),
                                 ("ffn down", 8960, 1536)]),
    "wan2.1-14b-720p": (75600, [("qkv fused", 5120, 15360), ("attn out", 5120, 5120), ("ffn up", 5120, 13824),
                                ("ffn down", 13824, 5120)]),
}
SMOKE_SHAPES = {"smoke": (300, [("tiny qkv", 128, 384), ("tiny ffn down", 256, 128)])}
PEAK_GB_S = 4800.0
"""H200 HBM3e nominal bandwidth: the quantiser's fraction of it is its 'near memory speed' check."""


def run_gemm(m: int, k: int, n: int, device: str, dtype: torch.dtype, deadline: float) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    w = (torch.randn(n, k, generator=gen, device=device) * k**-0.5).to(dtype)
    bias = (torch.randn(n, generator=gen, device=device) * 0.02).to(dtype)
    wq, ws = quantize_weight(w)
    flops = 2.0 * m * n * k
    row: dict = {"M": m, "K": k, "N": n, "weight_mb_bf16": n * k * 2 / 2**20, "weight_mb_int8": n * k / 2**20}
    exact = (x.float() @ w.float().t() + bias.float())
    jobs = {
        "bf16_linear": lambda: F.linear(x, w, bias),
        "w8a8_linear": lambda: int8_linear(x, wq, ws, bias),
        "act_quant": lambda: quantize_tiles_triton(x),
    }
    xq, xs = quantize_tiles_triton(x)
    jobs["w8a8_gemm"] = lambda: w8a8_matmul(xq, xs, wq, ws, bias, dtype)
    for name, fn in jobs.items():
        if time.time() > deadline:
            row[name] = {"skipped": "time budget"}
            continue
        try:
            out = fn()
            entry = measure(fn, device, max_s=0.5)
            if name == "act_quant":
                moved = m * k * (x.element_size() + 1) + triton.cdiv(m, 128) * triton.cdiv(k, 128) * 4
                entry["gb_per_s"] = moved / (entry["ms"] * 1e-3) / 1e9
                entry["fraction_of_peak_bw"] = entry["gb_per_s"] / PEAK_GB_S
            else:
                entry["tflops"] = flops / (entry["ms"] * 1e-3) / 1e12
                entry["vs_fp32"] = compare(out, exact)
            if name == "w8a8_gemm" and last_config("w8a8") is not None:
                entry["config"] = last_config("w8a8").describe()
            row[name] = entry
        except Exception as error:  # noqa: BLE001 - record it and go on
            row[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}",
                         "traceback": traceback.format_exc(limit=3)[-1000:]}
    bf16, w8, gemm = row.get("bf16_linear", {}), row.get("w8a8_linear", {}), row.get("w8a8_gemm", {})
    if "ms" in bf16 and "ms" in w8:
        row["speedup_vs_bf16"] = bf16["ms"] / w8["ms"]
    if "ms" in bf16 and "ms" in gemm:
        row["gemm_speedup_vs_bf16"] = bf16["ms"] / gemm["ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1.3B shapes only")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes through the Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    dtype = torch.float16 if args.smoke else torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else ({k: v for k, v in SHAPES.items() if "1.3b" in k} if args.quick else SHAPES)
    start = time.time()
    deadline = start + args.budget_s
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name] + sys.argv), "dtype": str(dtype).replace("torch.", ""),
        "timing": "median of CUDA-event timed calls after one warm-up call",
        "note": "w8a8_linear = act_quant + w8a8_gemm (per-tile activation scales, int32 per 128-wide K tile)",
        "models": {},
    }
    out_path = args.out or (Path(tempfile.gettempdir()) / "w8a8_smoke.json" if args.smoke else RESULTS / "w8a8_h200.json")
    for model, (m, gemms) in shapes.items():
        rows = {}
        for label, k, n in gemms:
            rows[f"{label} ({k}->{n})"] = run_gemm(m, k, n, device, dtype, deadline)
            if device == "cuda":
                torch.cuda.empty_cache()
        report["models"][model] = rows
        report["tuning"] = {str(k): v for k, v in tuning_log().items()}
        report["wall_s"] = round(time.time() - start, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1, default=str))
    for model, rows in report["models"].items():
        print(f"\n== {model}")
        print(f"{'gemm':28s} {'bf16 ms':>8s} {'w8a8 ms':>8s} {'quant ms':>8s} {'quant bw':>8s} {'gemm ms':>8s} "
              f"{'speedup':>7s} {'gemm x':>7s} {'bf16 TF':>7s} {'gemm TF':>7s} {'cos w8a8':>9s}  gemm config")
        for label, r in rows.items():
            def get(name, field="ms"):
                return r.get(name, {}).get(field, float("nan"))
            print(f"{label:28s} {get('bf16_linear'):8.3f} {get('w8a8_linear'):8.3f} {get('act_quant'):8.3f} "
                  f"{get('act_quant', 'fraction_of_peak_bw'):8.0%} {get('w8a8_gemm'):8.3f} "
                  f"{r.get('speedup_vs_bf16', float('nan')):7.2f} {r.get('gemm_speedup_vs_bf16', float('nan')):7.2f} "
                  f"{get('bf16_linear', 'tflops'):7.0f} {get('w8a8_gemm', 'tflops'):7.0f} "
                  f"{r.get('w8a8_linear', {}).get('vs_fp32', {}).get('cosine', float('nan')):9.6f}  "
                  f"{r.get('w8a8_gemm', {}).get('config', '')}")
    print("\nGEMM autotuner (key -> chosen; candidate ms)")
    for key, rec in report.get("tuning", {}).items():
        print(f"  {key} -> {rec.get('chosen')}: {rec.get('timings_ms', {})}"
              f"{'; rejected ' + str(rec['rejected']) if rec.get('rejected') else ''}")
    print(f"\nwrote {out_path} ({report.get('wall_s', 0)} s)")


if __name__ == "__main__":
    main()
