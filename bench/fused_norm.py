"""The fused norm kernels (turbo_kernels.fused_norm) against the PyTorch code they replace.

    python bench/fused_norm.py                    # H200, ~1 min; writes bench/results/fused_norm_h200.json
    python bench/fused_norm.py --sweep            # also every row-block shape per kernel (~2 more min)
    python bench/fused_norm.py --compile-check    # CPU is fine: sm90 registers/spills of the launched kernels
    python bench/fused_norm.py --smoke            # CPU: tiny shapes through the Triton interpreter

Shapes: Wan2.1-1.3B at 480p (32,760 tokens, dim 1536, 12 heads) and 14B at 720p (75,600 tokens,
dim 5120, 40 heads), bf16, batch 1. For each of the five row ops a block runs, the fused kernel and
the current PyTorch code (turbo_serve.models.wan_dit's own functions and modules) on the same inputs:
median CUDA-event ms after a warm-up call, effective GB/s of the op's least traffic
(`fused_norm.traffic_bytes`, the same bytes for both) against a device copy measured in the same
run, and each one's max error against the float32 reference. Then one whole WanBlock forward
(random weights, the sparse attention backend when registered) with FUSED_NORMS on and off, and,
as a candidate for the next step, the FFN's first Linear + GELU(tanh) as one cuBLASLt epilogue.
Every measurement runs in its own try/except under a time budget; the JSON is rewritten after each.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from source_checkout import importable_from_checkout  # noqa: E402

importable_from_checkout()

from harness import Report  # noqa: E402
from timing import measure  # noqa: E402
from turbo_kernels import fused_norm as fn  # noqa: E402
from turbo_kernels.accuracy import compare  # noqa: E402
from turbo_kernels.dispatch import interpreting  # noqa: E402
from turbo_kernels.registry import AttentionMetadata, attention_types, get_attention_backend  # noqa: E402
from turbo_serve.models import wan_dit  # noqa: E402
from turbo_serve.models.configs import WanDiTConfig, get_preset  # noqa: E402
from turbo_serve.models.loading import load_dit  # noqa: E402

NOMINAL_COPY_GBPS = 4300.0
"""H200 device-to-device copy bandwidth the issue quotes (read + write counted), GB/s."""
DEFAULT_OUT = BENCH / "results" / "fused_norm_h200.json"
COMPILE_OUT = BENCH / "results" / "compile_fused_norm_sm90.json"


@dataclass(frozen=True)
class Case:
    preset: str
    grid: tuple[int, int, int]
    """Token grid (latent frames, height / 2, width / 2)."""


CASES = {"1.3b": Case("wan2.1-t2v-1.3b", (21, 30, 52)), "14b": Case("wan2.1-t2v-14b", (21, 45, 80))}
SMOKE_CASES = {"tiny": Case("tiny-t2v", (2, 3, 5))}
OPS = ("layernorm_modulate", "residual_layernorm_modulate", "gated_residual_layernorm", "gated_residual",
       "rmsnorm_rope")
"""The five row ops of one block, each once per block."""


@dataclass
class Op:
    fused: Callable[..., object]
    """Takes `config=`; where the block works in place, so does this (on a copy of x)."""
    torch_code: Callable[[], object]
    reference: Callable[[], object]
    """float32 math on float32 copies of the inputs."""
    values_per_thread: int
    """What the launcher asks `row_config` for (the sweep varies around it)."""
    check: Callable[[], object] | None = None
    """The fused op on fresh inputs for the accuracy check, where `fused` works in place."""


class BlockInputs:
    """One block's activations at a real size, plus its modules, made once per case."""

    def __init__(self, config: WanDiTConfig, grid: tuple[int, int, int], device: str, dtype: torch.dtype):
        self.config, self.grid, self.tokens = config, grid, math.prod(grid)
        self.dit = load_dit(None, replace(config, num_layers=1), device=device, dtype=dtype, seed=0)
        self.block = self.dit.blocks[0]
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (1, self.tokens, config.dim)

        def rand(*size, dtype=dtype, scale=1.0):
            return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

        self.x, self.y, self.c = rand(*shape), rand(*shape), rand(*shape)
        self.qkv = rand(1, self.tokens, 3 * config.dim)
        self.e0 = rand(1, 6, config.dim, dtype=torch.float32, scale=0.1)
        self.context = rand(1, config.text_len, config.dim)
        self.rope = self.dit.rope(grid, torch.device(device))

    def ops(self) -> dict[str, Op]:
        eps, heads = self.config.eps, self.config.num_heads
        x, y, c = self.x, self.y, self.c
        shift, scale, gate = self.e0[:, 0:1], self.e0[:, 1:2], self.e0[:, 2:3]
        q, k, _ = self.qkv.chunk(3, dim=-1)
        attn, norm3 = self.block.self_attn, self.block.norm3
        x_work = x.clone()  # the in-place ops update this copy
        f32 = {name: t.float() for name, t in (("x", x), ("y", y), ("q", q), ("k", k))}

        def torch_rope():
            unflat = (heads, -1)
            return (wan_dit.apply_rope(attn.norm_q(q).unflatten(-1, unflat), *self.rope),
                    wan_dit.apply_rope(attn.norm_k(k).unflatten(-1, unflat), *self.rope))

        def torch_norm3():
            total = wan_dit._gated_residual(x, y, gate)
            return total, norm3(total).to(total.dtype)

        return {
            "layernorm_modulate": Op(
                lambda config=None: fn.layernorm_modulate(x, shift, scale, eps, config=config),
                lambda: wan_dit._modulate(x, shift, scale, eps),
                lambda: fn.layernorm_modulate_ref(f32["x"], shift, scale, eps), 32),
            "residual_layernorm_modulate": Op(
                lambda config=None: fn.layernorm_modulate(x_work, shift, scale, eps, residual=c, config=config),
                lambda: wan_dit._modulate(x + c, shift, scale, eps),
                lambda: fn.layernorm_modulate_ref((x + c).float(), shift, scale, eps), 32,
                check=lambda: fn.layernorm_modulate(x.clone(), shift, scale, eps, residual=c)),
            "gated_residual_layernorm": Op(
                lambda config=None: fn.gated_residual_layernorm(x, y, gate, norm3.weight, norm3.bias, eps,
                                                                config=config),
                torch_norm3,
                lambda: fn.gated_residual_layernorm_ref(f32["x"], f32["y"], gate, norm3.weight, norm3.bias, eps), 16),
            "gated_residual": Op(
                lambda config=None: fn.gated_residual(x_work, y, gate, inplace=True, config=config),
                lambda: wan_dit._gated_residual(x, y, gate),
                lambda: fn.gated_residual_ref(f32["x"], f32["y"], gate), 32,
                check=lambda: fn.gated_residual(x, y, gate)),
            "rmsnorm_rope": Op(
                lambda config=None: fn.rmsnorm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, *self.rope, eps,
                                                    heads, config=config),
                torch_rope,
                lambda: (fn.rmsnorm_rope_ref(f32["q"], attn.norm_q.weight, *self.rope, eps, heads),
                         fn.rmsnorm_rope_ref(f32["k"], attn.norm_k.weight, *self.rope, eps, heads)), 16),
        }


def _tensors(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _max_error(out, ref) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(_tensors(out), _tensors(ref), strict=True))


def _timed(call: Callable[[], object], device: str, traffic: int, copy_gbps: float | None) -> dict:
    entry = measure(call, device, max_s=0.3)
    gbps = traffic / (entry["ms"] * 1e-3) / 1e9
    entry["gbps"] = round(gbps, 1)
    entry["of_nominal_copy"] = round(gbps / NOMINAL_COPY_GBPS, 3)
    if copy_gbps:
        entry["of_measured_copy"] = round(gbps / copy_gbps, 3)
    return entry


def measure_op(name: str, op: Op, inputs: BlockInputs, device: str, copy_gbps: float | None) -> dict:
    """Fused vs PyTorch on the same inputs; errors are taken before the timed (in-place) runs."""
    config = inputs.config
    traffic = fn.traffic_bytes(name, inputs.tokens, config.dim, inputs.x.element_size(), config.head_dim)
    reference = op.reference()
    fused_out = (op.check or op.fused)()
    result = {"traffic_bytes": traffic, "default_config": fn.row_config(config.dim, op.values_per_thread)
              .describe(), "error_vs_fp32": {"fused": _max_error(fused_out, reference),
                                             "torch": _max_error(op.torch_code(), reference)},
              "cosine_fused_vs_fp32": min(compare(a, b)["cosine"] for a, b in zip(_tensors(fused_out),
                                                                                  _tensors(reference)))}
    result["torch"] = _timed(op.torch_code, device, traffic, copy_gbps)
    result["fused"] = _timed(op.fused, device, traffic, copy_gbps)
    result["saved_ms"] = round(result["torch"]["ms"] - result["fused"]["ms"], 4)
    result["speedup"] = round(result["torch"]["ms"] / result["fused"]["ms"], 2)
    return result


def sweep_op(name: str, op: Op, inputs: BlockInputs, device: str) -> dict:
    """The default launch shape and every ROW_CONFIGS one with 4..64 values per thread at this width."""
    block_n = triton.next_power_of_2(inputs.config.dim)
    default = fn.row_config(inputs.config.dim, op.values_per_thread)
    candidates = [c for c in fn.ROW_CONFIGS if 4 <= c.block_m * block_n // (32 * c.num_warps) <= 64]
    timings = {}
    for cfg in [default, *(c for c in candidates if c != default)]:
        try:
            timings[cfg.describe()] = round(measure(lambda: op.fused(config=cfg), device, max_s=0.15)["ms"], 4)
        except Exception as error:  # noqa: BLE001 - a shape that does not launch is a result too
            timings[cfg.describe()] = f"{type(error).__name__}: {str(error)[:120]}"
    numeric = {k: v for k, v in timings.items() if isinstance(v, float)}
    best = min(numeric, key=numeric.get) if numeric else None
    return {"ms": timings, "best": best, "default": default.describe()}


def measure_copy(inputs: BlockInputs, device: str) -> dict:
    dst = torch.empty_like(inputs.x)
    traffic = 2 * inputs.x.numel() * inputs.x.element_size()
    entry = measure(lambda: dst.copy_(inputs.x), device, max_s=0.3)
    entry["gbps"] = round(traffic / (entry["ms"] * 1e-3) / 1e9, 1)
    return entry


def measure_block(inputs: BlockInputs, device: str, attention: AttentionMetadata, compiled: bool) -> dict:
    """One WanBlock forward with FUSED_NORMS off and on (and torch.compile'd fused when asked)."""
    attend = get_attention_backend(attention.attention_type)
    args = (inputs.x, inputs.e0, inputs.context, inputs.rope, attend, attention)
    result: dict = {"attention": attention.attention_type, "sla_topk": attention.sla_topk}
    outputs = {}
    previous = wan_dit.FUSED_NORMS
    try:
        for fused in (False, True):
            wan_dit.FUSED_NORMS = fused
            with torch.inference_mode():
                outputs[fused] = inputs.block(*args)
                result["fused" if fused else "torch"] = measure(lambda: inputs.block(*args), device, max_s=1.0)
        if compiled:
            wan_dit.FUSED_NORMS = True
            block = torch.compile(inputs.block, fullgraph=True, dynamic=False)
            with torch.inference_mode():
                result["fused_compiled"] = measure(lambda: block(*args), device, max_s=1.0)
    finally:
        wan_dit.FUSED_NORMS = previous
    result["saved_ms"] = round(result["torch"]["ms"] - result["fused"]["ms"], 3)
    result["fused_vs_torch"] = compare(outputs[True], outputs[False])
    return result


def measure_gelu_epilogue(inputs: BlockInputs, device: str) -> dict:
    """FFN up-projection: F.linear then GELU(tanh), vs one GEMM with cuBLASLt's GELU epilogue."""
    up = inputs.block.ffn[0]
    x2 = inputs.x.flatten(0, 1)
    separate = lambda: F.gelu(F.linear(x2, up.weight, up.bias), approximate="tanh")  # noqa: E731
    epilogue = lambda: torch._addmm_activation(up.bias, x2, up.weight.t(), use_gelu=True)  # noqa: E731
    result = {"separate": measure(separate, device, max_s=0.5), "epilogue": measure(epilogue, device, max_s=0.5)}
    result["saved_ms"] = round(result["separate"]["ms"] - result["epilogue"]["ms"], 3)
    result["epilogue_vs_separate"] = compare(epilogue(), separate())
    return result


def run_case(report: Report, case_name: str, case: Case, device: str, dtype: torch.dtype, args) -> None:
    config = get_preset(case.preset).dit
    holder: dict = {}

    def build():
        holder["inputs"] = BlockInputs(config, case.grid, device, dtype)
        return {"tokens": holder["inputs"].tokens, "dim": config.dim, "heads": config.num_heads,
                "layers": config.num_layers}

    report.run(f"{case_name}/setup", build)
    inputs = holder.get("inputs")
    if inputs is None:
        return
    copy = report.run(f"{case_name}/copy", lambda: measure_copy(inputs, device))
    ops = inputs.ops()
    for name in OPS:
        report.run(f"{case_name}/op/{name}", lambda: measure_op(name, ops[name], inputs, device, copy.get("gbps")),
                   cost_s=2)
    if args.sweep:
        for name in OPS:
            report.run(f"{case_name}/sweep/{name}", lambda: sweep_op(name, ops[name], inputs, device), cost_s=10)
    attention_type = args.attention if args.attention in attention_types() else "original"
    meta = AttentionMetadata(attention_type, sla_topk=args.sla_topk)
    report.run(f"{case_name}/block", lambda: measure_block(inputs, device, meta, args.compile), cost_s=5)
    if device == "cuda":
        report.run(f"{case_name}/ffn_gelu_epilogue", lambda: measure_gelu_epilogue(inputs, device), cost_s=3)
    del holder["inputs"], inputs, ops


def summarize(report: Report, cases: dict[str, Case]) -> dict:
    """Per-block and per-forward savings: the five ops' sum, and the whole-block difference."""
    summary = {}
    results = report.data["results"]
    for case_name, case in cases.items():
        layers = get_preset(case.preset).dit.num_layers
        saved = [results.get(f"{case_name}/op/{name}", {}).get("saved_ms") for name in OPS]
        block = results.get(f"{case_name}/block", {})
        entry = {"layers": layers}
        if all(s is not None for s in saved):
            entry["ops_saved_ms_per_block"] = round(sum(saved), 3)
            entry["ops_saved_ms_per_forward"] = round(sum(saved) * layers, 1)
        if "saved_ms" in block:
            entry["block_saved_ms"] = block["saved_ms"]
            entry["block_saved_ms_per_forward"] = round(block["saved_ms"] * layers, 1)
            entry["block_ms"] = {"torch": round(block["torch"]["ms"], 3), "fused": round(block["fused"]["ms"], 3)}
        summary[case_name] = entry
    return summary


def print_table(report: Report, cases: dict[str, Case]) -> None:
    results = report.data["results"]
    for case_name in cases:
        print(f"\n== {case_name}: {results.get(f'{case_name}/setup', {})}")
        print(f"{'op':30s} {'torch ms':>9s} {'fused ms':>9s} {'saved':>7s} {'fused GB/s':>10s} {'of copy':>7s} "
              f"{'err fused':>9s} {'err torch':>9s}")
        for name in OPS:
            r = results.get(f"{case_name}/op/{name}", {})
            if "fused" not in r:
                print(f"{name:30s} {r.get('error', r.get('skipped', '?'))[:80]}")
                continue
            print(f"{name:30s} {r['torch']['ms']:9.3f} {r['fused']['ms']:9.3f} {r['saved_ms']:7.3f} "
                  f"{r['fused']['gbps']:10.0f} {r['fused'].get('of_measured_copy', float('nan')):7.2f} "
                  f"{r['error_vs_fp32']['fused']:9.2e} {r['error_vs_fp32']['torch']:9.2e}")
        copy = results.get(f"{case_name}/copy", {})
        block = results.get(f"{case_name}/block", {})
        print(f"copy: {copy.get('gbps', '?')} GB/s; block ({block.get('attention', '?')}): "
              f"torch {block.get('torch', {}).get('ms', float('nan')):.3f} ms, "
              f"fused {block.get('fused', {}).get('ms', float('nan')):.3f} ms")
    print("\nsummary:", json.dumps(report.data.get("summary", {}), indent=1))


# ---------------------------------------------------------------------------------------------
# sm90 compile check (no GPU needed)


def compile_variants() -> list:
    from compile_check import Variant

    rows = {"X": "bf16", "Res": "bf16", "Shift": "fp32", "Scale": "fp32", "Out": "bf16"}
    residual = {"X": "bf16", "Y": "bf16", "Gate": "fp32", "Out": "bf16", "W": "bf16", "Bias": "bf16",
                "Normed": "bf16"}
    rope = {"Q": "bf16", "K": "bf16", "WQ": "bf16", "WK": "bf16", "Cos": "fp32", "Sin": "fp32", "QOut": "bf16",
            "KOut": "bf16"}
    kernels = [("layernorm_modulate", fn._layernorm_modulate_kernel, rows, {"HAS_RESIDUAL": False}, 32),
               ("residual_layernorm_modulate", fn._layernorm_modulate_kernel, rows, {"HAS_RESIDUAL": True}, 32),
               ("gated_residual", fn._gated_residual_kernel, residual, {"HAS_NORM": False}, 32),
               ("gated_residual_layernorm", fn._gated_residual_kernel, residual, {"HAS_NORM": True}, 16),
               ("rmsnorm_rope", fn._rmsnorm_rope_kernel, rope, {"HEAD_DIM": 128}, 16)]
    out = []
    for dim in (1536, 5120):
        for name, kernel, pointers, flags, values in kernels:
            cfg = fn.row_config(dim, values)
            const = dict(flags, DIM=dim, BLOCK_M=cfg.block_m, BLOCK_N=triton.next_power_of_2(dim))
            out.append(Variant(f"{name} dim{dim} {cfg.describe()}", kernel, pointers, const, cfg.num_warps, 1,
                               floats=("eps",)))
    return out


def compile_check(out_path: Path) -> dict:
    """Registers, spills and shared memory (only reductions: no layout shuffles) of each launch."""
    from compile_check import compile_variant

    rows = []
    for v in compile_variants():
        try:
            report = compile_variant(v, 90)
        except Exception as error:  # noqa: BLE001 - one failing variant must not hide the others
            report = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        rows.append({"variant": v.name, "num_warps": v.num_warps, **report})
        r = rows[-1]
        print(f"{v.name:50s} " + (f"ERROR {r['error']}" if "error" in r else
                                  f"regs {r['registers']:>3} spill {r['spill_bytes']:>4} smem {r['shared_bytes']:>6}"))
    data = {"arch": 90, "triton": triton.__version__, "command": "python bench/fused_norm.py --compile-check",
            "variants": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out_path}")
    return data


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1.3b,14b", help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--attention", default="sagesla", help="block's attention backend (original if unknown)")
    parser.add_argument("--sla-topk", type=float, default=0.1)
    parser.add_argument("--sweep", action="store_true", help="also time every row-block shape per kernel")
    parser.add_argument("--compile", action="store_true", help="also time the fused block under torch.compile")
    parser.add_argument("--compile-check", action="store_true", help="only the sm90 compile report (no GPU)")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes through the Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=90.0)
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.compile_check:
        return compile_check(args.out or COMPILE_OUT)
    if args.smoke:
        device, dtype, cases = "cpu", torch.float16, SMOKE_CASES
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on a CPU")
        unknown = set(args.cases.split(",")) - set(CASES)
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; valid: {', '.join(CASES)}")
        device, dtype, cases = "cuda", torch.bfloat16, {c: CASES[c] for c in args.cases.split(",")}
    out = args.out or (Path(tempfile.gettempdir()) / "fused_norm_smoke.json" if args.smoke else DEFAULT_OUT)
    report = Report("fused_norm.py", argv, out, args.budget_s)
    report.data.update({"dtype": str(dtype).replace("torch.", ""), "interpreter": interpreting(),
                        "nominal_copy_gbps": NOMINAL_COPY_GBPS,
                        "timing": "median of CUDA-event timed calls after one warm-up call (first_call_s apart)"})
    for case_name, case in cases.items():
        run_case(report, case_name, case, device, dtype, args)
    report.data["summary"] = summarize(report, cases)
    report.save()
    print_table(report, cases)
    print(f"\nwrote {out}")
    return report.data


if __name__ == "__main__":
    main()
