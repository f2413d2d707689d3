"""Host (launch) time of each stage of the sla / sagesla ops, next to their eager and CUDA-graph
times: where eager time above the graph replay goes (at 480p the GPU work is short enough that
the host's launches show). Prints one line per op and, with --out, writes them as JSON; the H200
output is in bench/results/logs/host_probe.log.

    python bench/host_probe.py [--shape 480p|720p] [--out FILE]
    python bench/host_probe.py --smoke        # CPU: tiny shape through the Triton interpreter
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_checkout import importable_from_checkout  # noqa: E402

importable_from_checkout()
from attention import SHAPES, SMOKE_SHAPE, graph_replay, random_proj, video_qkv  # noqa: E402
from timing import measure, sync  # noqa: E402
from turbo_kernels.autotune import last_config  # noqa: E402
from turbo_kernels.block_mask import pool_keys, pool_queries, select_blocks_from_passes  # noqa: E402
from turbo_kernels.flash import LOG2E, QuantizedQK, launch_flash  # noqa: E402
from turbo_kernels.quant import quantize_keys  # noqa: E402
from turbo_kernels.sla import linear_branch, sparse_linear_attention  # noqa: E402

OPS = (
    ("sla", dict(blkq=128, blkk=64)),
    ("sla-unselected", dict(blkq=128, blkk=64, linear="unselected")),
    ("sagesla", dict(blkq=64, blkk=128, qk_int8=True, pv_fp8=None)),
)


def host_stages(q, k, v, proj, kw: dict, cfg, device: str, iters: int) -> dict[str, float]:
    """Median wall ms of each stage's host call (no sync inside), then of waiting for the GPU."""
    blkq, blkk, int8 = kw["blkq"], kw["blkk"], kw.get("qk_int8", False)
    unselected = kw.get("linear") == "unselected"
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    times: dict[str, list[float]] = {}
    for _ in range(iters):
        sync(device)
        marks = [("start", time.perf_counter())]
        qp = pool_queries(q, blkq, sm_scale * LOG2E if int8 else None)
        marks.append(("pool_queries", time.perf_counter()))
        kp = pool_keys(k, blkk, v, linear=True, phi_out=unselected, v_amax=cfg.pv_fp8, k_mean=int8,
                       fold_weight=None if unselected else proj.weight.detach())
        marks.append(("pool_keys", time.perf_counter()))
        lut = select_blocks_from_passes(qp, kp, 0.1)
        marks.append(("select", time.perf_counter()))
        quant = None
        if int8:
            k8, ks, vt, vs = quantize_keys(k, kp.mean, blkk, v, kp.v_scale)
            quant = QuantizedQK(qp.q_int8, qp.q_scale, k8, ks, vt, vs)
        marks.append(("quantize", time.perf_counter()))
        lin = linear_branch(kp, proj.weight.detach(), proj.bias.detach())
        marks.append(("linear_branch", time.perf_counter()))
        launch_flash(q, k, v, cfg, sm_scale=sm_scale, lut=lut, lut_block_m=blkq, lut_block_n=blkk, quant=quant,
                     linear=lin)
        marks.append(("launch_flash", time.perf_counter()))
        sync(device)
        marks.append(("sync_wait", time.perf_counter()))
        for (_, before), (name, after) in zip(marks, marks[1:]):
            times.setdefault(name, []).append((after - before) * 1e3)
        times.setdefault("total", []).append((marks[-1][1] - marks[0][1]) * 1e3)
    return {name: round(sorted(vals)[len(vals) // 2], 3) for name, vals in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="480p", choices=sorted(SHAPES))
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shape through the Triton interpreter")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    shape = SMOKE_SHAPE if args.smoke else SHAPES[args.shape]
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter's tl.dot mishandles bf16
    q, k, v = video_qkv(shape, dtype, device)
    proj = random_proj(q.shape[-1], device)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "command": " ".join(["python"] + sys.argv), "shape": shape.name, "ops": {}}
    for label, kw in OPS:
        fn = lambda kw=kw: sparse_linear_attention(q, k, v, 0.1, proj, **kw)  # noqa: E731
        eager = measure(fn, device, max_s=1.0, max_reps=30)["ms"]
        cfg = last_config("sla")
        graph = graph_replay(fn, fn(), device)["ms"] if device == "cuda" else None
        row = {"config": cfg.describe(), "eager_ms": round(eager, 3), "graph_ms": graph,
               "host_ms": host_stages(q, k, v, proj, kw, cfg, device, iters=1 if args.smoke else 5)}
        report["ops"][label] = row
        print(f"{label}: {row}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
