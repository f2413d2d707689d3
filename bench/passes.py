"""The passes around the flash kernel by launch shape, against HBM baselines of the same run.

Mask pooling of Q (`pool_queries`, also Sage's int8 Q), the key pass over K (mask only; SLA's phi(K)
and linear state; Sage's with the V range), and Sage's K/V quantisation (`quantize_keys`): each
launch shape of a sweep is timed as one CUDA-graph replay (no launch gaps or host time), its output
checked against the default launch's. What `KeyPassLaunch`, `pool_queries_warps` and
`QUANTIZE_KEYS_LAUNCH` were chosen from.

    python bench/passes.py                                  # H200: 1.3B 480p and 14B 720p
    TRITON_INTERPRET=1 python bench/passes.py --smoke --out /tmp/passes.json   # CPU, tiny shape
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_checkout import importable_from_checkout  # noqa: E402

importable_from_checkout()
import attention as bench  # noqa: E402  (shapes, video-like inputs, graph replay)
from timing import measure  # noqa: E402
from turbo_kernels.block_mask import KeyPassLaunch, pool_keys, pool_queries, pool_queries_warps  # noqa: E402
from turbo_kernels.flash import LOG2E  # noqa: E402
from turbo_kernels.quant import QUANTIZE_KEYS_LAUNCH, quantize_keys  # noqa: E402

KEY_PASS_MODES = {
    "mask": (64, {}),
    "sla": (64, {"linear": True, "fold": True}),
    "sage": (128, {"linear": True, "v_amax": True, "k_mean": True, "fold": True}),
}
"""Key-pass uses: block size and options (the mask alone; sla's 64-token pass with phi(K), S and
proj_l folded in; sagesla's 128-token pass that also takes K's mean and the FP8 V range)."""
KEY_PASS_LAUNCHES = [KeyPassLaunch(w, rows, ps) for w, rows in ((1, 8), (1, 16), (1, 32), (2, 32), (4, 64))
                     for ps in (16, 64)]
POOL_QUERIES_WARPS = (1, 2, 4, 8)
QUANTIZE_KEYS_LAUNCHES = ({"num_warps": 4}, {"num_warps": 8, "maxnreg": 96}, {"num_warps": 16})


def timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[dict, torch.Tensor]:
    """(timing, output) of one call: a CUDA-graph replay on the GPU (after an eager warm-up), one
    eager call on the CPU."""
    out = fn()
    if device != "cuda":
        return {"ms": round(measure(fn, device)["ms"], 4)}, out
    replay = bench.graph_replay(fn, out, device)
    return {"ms": round(replay["ms"], 4), "replay_equal_to_eager": replay["equal_to_eager"]}, out


def sweep(launches: list, run: Callable, default, same: Callable, device: str) -> dict:
    """Every launch of one pass, the default first (the output the others are checked against)."""
    launches = [default] + [x for x in launches if x != default]
    entries, reference = {}, None
    for launch in launches:
        entry, out = timed(lambda launch=launch: run(launch), device)
        reference = out if reference is None else reference
        entry["same_output_as_default"] = bool(same(out, reference))
        entries[str(launch)] = entry
    fastest = min(entries, key=lambda name: entries[name]["ms"])
    return {"default": str(default), "fastest": fastest,
            "default_vs_fastest": round(entries[str(default)]["ms"] / entries[fastest]["ms"], 3), "launches": entries}


def sweep_shape(shape: bench.Shape, device: str, smoke: bool) -> dict:
    dtype = torch.float16 if smoke else torch.bfloat16
    q, k, v = bench.video_qkv(shape, dtype, device)
    weight = bench.random_proj(shape.head_dim, device).weight.detach()
    D = shape.head_dim
    passes: dict = {}
    baselines: dict = {}
    if device == "cuda":
        baselines["read K (torch sum over L)"] = timed(lambda: k.sum(1), device)[0]
        copy = torch.empty_like(k)
        baselines["read + write K (copy)"] = timed(lambda: copy.copy_(k), device)[0]
    exact = torch.equal
    # fp32 sums of a block's 64-128 values in another order (one warp or a tree across warps): on
    # these inputs each order is within 6e-6 of the fp64 sum (checked on the CPU), so 1e-4 apart.
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-4)  # noqa: E731
    warps = list(POOL_QUERIES_WARPS[:2] if smoke else POOL_QUERIES_WARPS)
    passes["pool_queries mean b128 (num_warps)"] = sweep(
        warps, lambda w: pool_queries(q, 128, num_warps=w).pooled, pool_queries_warps(128, D, False), close, device)
    scale = LOG2E / math.sqrt(D)
    passes["pool_queries int8 b64 (num_warps)"] = sweep(
        warps, lambda w: pool_queries(q, 64, scale, num_warps=w).q_int8, pool_queries_warps(64, D, True), exact, device)
    key_launches = KEY_PASS_LAUNCHES[2:3] if smoke else KEY_PASS_LAUNCHES
    for mode, (block, options) in KEY_PASS_MODES.items():
        options = dict(options)
        fold = weight if options.pop("fold", False) else None

        def key_pass(launch, block=block, options=options, fold=fold):
            keys = pool_keys(k, block, v, fold_weight=fold, launch=launch, **options)
            return keys.block_sum if keys.kv_state is None else keys.kv_state

        passes[f"key pass {mode} b{block}"] = sweep(key_launches, key_pass, KeyPassLaunch(), close, device)
    keys = pool_keys(k, 128, v, v_amax=True, k_mean=True)
    passes["quantize_keys b128 fp8 V"] = sweep(
        list(QUANTIZE_KEYS_LAUNCHES[:1] if smoke else QUANTIZE_KEYS_LAUNCHES),
        lambda launch: quantize_keys(k, keys.mean, 128, v, keys.v_scale, launch=launch)[0], QUANTIZE_KEYS_LAUNCH,
        exact, device)
    return {"heads": shape.heads, "length": shape.length, "head_dim": D, "dtype": str(dtype),
            "baselines": baselines, "passes": passes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shape through the Triton interpreter")
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--out", type=Path, default=bench.RESULTS / "passes_h200.json")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on a CPU")
    shapes = {"smoke": bench.SMOKE_SHAPE} if args.smoke else {s: bench.SHAPES[s] for s in args.shapes.split(",")}
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "command": " ".join([Path(sys.executable).name] + sys.argv),
              "timing": "each pass captured in a CUDA graph after an eager warm-up; median of timed replays "
                        "(timing.measure); CPU: one eager call", "inputs": bench.INPUTS, "shapes": {}}
    for name, shape in shapes.items():
        report["shapes"][name] = sweep_shape(shape, device, args.smoke)
        for group, r in report["shapes"][name]["passes"].items():
            print(f"{name} {group}: default {r['default']} at {r['launches'][r['default']]['ms']} ms is "
                  f"{r['default_vs_fastest']}x the fastest ({r['fastest']})", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
