"""A/B of two kernel trees in one device call: the whole block-sparse, sla and sagesla ops at 1.3B
480p and 14B 720p, eager and under CUDA-graph replay, plus the host time to enqueue one op.

Each tree runs in its own process (it is imported as `turbo_kernels` from a temporary link), one
after the other on the same GPU, so a change can be measured against its parent without the
lease-to-lease spread of separate runs. Export the parent's tree first:

    git archive <rev> kernels | tar -x -C /tmp/parent
    python bench/ab_kernels.py --tree old=/tmp/parent/kernels --tree new=kernels --out bench/results/ab.json
    python bench/ab_kernels.py --smoke --tree a=kernels --tree b=kernels --out /tmp/ab.json   # CPU, interpreter
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("480p", "720p")


def enqueue_ms(fn, calls: int = 20) -> float:
    """Host milliseconds to launch one op while the GPU is kept busy (so launches never block)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    return host


def measure_tree(kernels_dir: Path, tag: str, out: Path, smoke: bool) -> None:
    """Child process: time the three whole ops with fixed (tuned) configs on the tree linked in;
    smoke: the interpreter's tiny shape in float16, eager only."""
    shim = Path(tempfile.mkdtemp(prefix="ab-kernels-"))
    (shim / "turbo_kernels").symlink_to(kernels_dir.resolve())
    (shim / "turbo_serve").symlink_to(REPO / "turbo_serve")
    sys.path[:0] = [str(shim), str(REPO / "bench")]
    import torch

    import attention as bench  # bench helpers; import turbo_kernels from the link
    import turbo_kernels
    from timing import measure
    from turbo_kernels.block_mask import build_block_mask
    from turbo_kernels.block_sparse import block_sparse_attention
    from turbo_kernels.flash import FlashConfig
    from turbo_kernels.sage import sagesla_attention
    from turbo_kernels.sla import sla_attention

    assert Path(turbo_kernels.__file__).resolve().parent == kernels_dir.resolve(), turbo_kernels.__file__
    sparse = FlashConfig(128, 64, 8, 3, use_tma=True, maxnreg=128)
    sage = FlashConfig(64, 128, 4, 3, use_tma=True, pv_fp8=True, maxnreg=168)
    device = "cpu" if smoke else "cuda"
    shapes = {"smoke": bench.SMOKE_SHAPE} if smoke else {name: bench.SHAPES[name] for name in SHAPES}
    report = {"tag": tag, "shapes": {}}
    for name, shape in shapes.items():
        q, k, v = bench.video_qkv(shape, torch.float16 if smoke else torch.bfloat16, device)
        proj = bench.random_proj(shape.head_dim, device)
        ops = {
            "block_sparse": lambda: block_sparse_attention(q, k, v, build_block_mask(q, k, 0.1, 128, 64), blkq=128,
                                                           blkk=64, config=sparse),
            "sla": lambda: sla_attention(q, k, v, 0.1, proj, config=sparse),
            "sagesla": lambda: sagesla_attention(q, k, v, 0.1, proj, geometry=(64, 128), pv_fp8=True, config=sage),
        }
        results = {}
        for op, fn in ops.items():
            first = fn()
            results[op] = {"eager_ms": [measure(fn, device)["ms"] for _ in range(2)],
                           "graph_ms": None if smoke else bench.graph_replay(fn, first, device)["ms"],
                           "host_enqueue_ms": None if smoke else [enqueue_ms(fn) for _ in range(2)]}
            print(tag, name, op, results[op], flush=True)
        report["shapes"][name] = results
        del q, k, v
        torch.cuda.empty_cache()
    out.write_text(json.dumps(report, indent=1))


def ratios(base: dict, other: dict) -> dict:
    """other / base per shape and op: graph replay, and the best of the eager samples."""
    out = {}
    for shape, ops in other["shapes"].items():
        out[shape] = {}
        for op, r in ops.items():
            b = base["shapes"][shape][op]
            out[shape][op] = {"graph": r["graph_ms"] / b["graph_ms"] if r["graph_ms"] else None,
                              "eager_best": min(r["eager_ms"]) / min(b["eager_ms"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", help="TAG=KERNELS_DIR; the first is the base")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shape through the Triton interpreter")
    parser.add_argument("--child", nargs=3, metavar=("DIR", "TAG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_tree(Path(args.child[0]), args.child[1], Path(args.child[2]), args.smoke)
        return
    if not args.tree or not args.out:
        parser.error("--tree (at least one) and --out are required")
    import torch
    import triton

    trees = dict(t.split("=", 1) for t in args.tree)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, path in trees.items():
            part = Path(tmp) / f"{tag}.json"
            subprocess.run([sys.executable, __file__, *(["--smoke"] if args.smoke else []), "--child", path, tag,
                            str(part)], check=True)
            runs[tag] = json.loads(part.read_text())
    base = next(iter(runs))
    device = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()
    report = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(sys.argv), "trees": trees, "runs": runs,
              "ratios_to_" + base: {tag: ratios(runs[base], run) for tag, run in runs.items() if tag != base}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
