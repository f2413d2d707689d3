"""Host (launch) time of each stage of the sla / sagesla ops, next to their eager and CUDA-graph
times: where eager time above the graph replay goes (at 480p the GPU work is short enough that
the host's launches show). Prints one line per op; the H200 output is in
bench/results/logs/host_probe.log.

    python bench/host_probe.py [480p|720p]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_checkout import importable_from_checkout  # noqa: E402

importable_from_checkout()
from attention import SHAPES, random_proj, video_qkv  # noqa: E402
from timing import measure  # noqa: E402
from turbo_kernels.autotune import last_config  # noqa: E402
from turbo_kernels.block_mask import pool_keys, pool_queries, select_blocks_from_passes  # noqa: E402
from turbo_kernels.flash import LOG2E, QuantizedQK, launch_flash  # noqa: E402
from turbo_kernels.quant import quantize_keys  # noqa: E402
from turbo_kernels.sla import linear_branch, sparse_linear_attention  # noqa: E402


def main() -> None:
    shape = SHAPES[sys.argv[1] if len(sys.argv) > 1 else "480p"]
    q, k, v = video_qkv(shape, torch.bfloat16, "cuda")
    B, L, H, D = q.shape
    sm = 1.0 / math.sqrt(D)
    proj = random_proj(D, "cuda")
    for label, kw in (("sla", dict(blkq=128, blkk=64)), ("sla-unselected", dict(blkq=128, blkk=64, linear="unselected")),
                      ("sagesla", dict(blkq=64, blkk=128, qk_int8=True, pv_fp8=None))):
        fn = lambda kw=kw: sparse_linear_attention(q, k, v, 0.1, proj, **kw)  # noqa: E731
        eager = measure(fn, "cuda", max_s=1.0, max_reps=30)["ms"]
        cfg = last_config("sla")
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            fn()
        graph = measure(g.replay, "cuda", max_s=1.0, max_reps=30)["ms"]
        blkq, blkk, int8 = kw["blkq"], kw["blkk"], kw.get("qk_int8", False)
        unsel = kw.get("linear") == "unselected"
        host = {}
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            qp = pool_queries(q, blkq, sm * LOG2E if int8 else None)
            t1 = time.perf_counter()
            kp = pool_keys(k, blkk, v, linear=True, phi_out=unsel, v_amax=cfg.pv_fp8, k_mean=int8,
                           fold_weight=None if unsel else proj.weight.detach())
            t2 = time.perf_counter()
            lut = select_blocks_from_passes(qp, kp, 0.1)
            t3 = time.perf_counter()
            quant = None
            if int8:
                k8, ks, vt, vs = quantize_keys(k, kp.mean, blkk, v, kp.v_scale)
                quant = QuantizedQK(qp.q_int8, qp.q_scale, k8, ks, vt, vs)
            t4 = time.perf_counter()
            lin = linear_branch(kp, proj.weight.detach(), proj.bias.detach(), unsel)
            t5 = time.perf_counter()
            launch_flash(q, k, v, cfg, sm_scale=sm, lut=lut, lut_block_m=blkq, lut_block_n=blkk, quant=quant, linear=lin)
            t6 = time.perf_counter()
            torch.cuda.synchronize()
            t7 = time.perf_counter()
            stages = dict(pool_queries=t1 - t0, pool_keys=t2 - t1, select=t3 - t2, quantize=t4 - t3, linear_branch=t5 - t4,
                          launch_flash=t6 - t5, sync_wait=t7 - t6, total=t7 - t0)
            for key, val in stages.items():
                host.setdefault(key, []).append(val * 1e3)
        med = {key: round(sorted(vals)[len(vals) // 2], 3) for key, vals in host.items()}
        print(f"{label}: config {cfg.describe()} eager {eager:.3f} ms graph {graph:.3f} ms host ms {med}", flush=True)


if __name__ == "__main__":
    main()
