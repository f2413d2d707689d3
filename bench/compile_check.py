"""Compile every Triton kernel variant the benchmarks launch for a GPU target, without a GPU.

Triton ships ptxas and cuobjdump, so the full pipeline (TTIR -> TTGIR -> PTX -> cubin) runs on a
CPU-only machine. For each variant this reports registers per thread, local-memory spills,
shared memory, the tensor-core instructions used (wgmma on sm90) and whether the loads were
pipelined (cp.async / TMA), which is what can be checked before GPU time is spent.

    python bench/compile_check.py                 # sm90 (H100/H200), writes bench/results/compile_sm90.json
    python bench/compile_check.py --arch 100 --only flash
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_checkout import importable_from_checkout  # noqa: E402

importable_from_checkout()
from turbo_kernels.block_mask import (  # noqa: E402
    SELECT_WARPS,
    KeyPassLaunch,
    _block_scores_kernel,
    _finalize_keys_kernel,
    _pool_keys_kernel,
    _pool_queries_kernel,
    _select_topk_kernel,
    pool_queries_warps,
)
from turbo_kernels.flash import _flash_fwd  # noqa: E402
from turbo_kernels.quant import QUANTIZE_KEYS_LAUNCH, _quantize_keys_kernel  # noqa: E402
from turbo_kernels.w8a8 import _quantize_tiles_kernel, _w8a8_matmul_kernel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMEM_LIMIT = {90: 232448, 100: 232448, 80: 166912, 89: 101376}
"""Opt-in shared memory per block (bytes)."""


@dataclass
class Variant:
    name: str
    fn: object
    pointers: dict[str, str]
    """Pointer argument -> Triton element type ("bf16", "i8", ...)."""
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    floats: tuple[str, ...] = ()
    maxnreg: int | None = None
    descriptors: dict[str, str] = field(default_factory=dict)
    """Argument -> TMA descriptor type ("tensordesc<bf16[128, 128]>") for host-built descriptors."""
    report: dict = field(default_factory=dict)


def _signature(v: Variant) -> tuple[dict, dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(v.fn.arg_names):
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name in v.descriptors:
            sig[name] = v.descriptors[name]
        elif name in v.pointers:
            sig[name] = "*" + v.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in v.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name == "l_pad":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, dict(v.constexprs), attrs


def compile_variant(v: Variant, arch: int) -> dict:
    sig, const, attrs = _signature(v)
    kernel = triton.compile(
        ASTSource(v.fn, sig, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": v.num_warps, "num_stages": v.num_stages,
                 **({"maxnreg": v.maxnreg} if v.maxnreg else {})},
    )
    ptx = kernel.asm["ptx"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    mma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+?)[;\s]|mma\.sync\.aligned\.(\S+?)[;\s]", ptx)))
    mma = sorted({a or b for a, b in mma})
    shared = kernel.metadata.shared
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(local.group(1)) if local else None,
        "shared_bytes": shared,
        "fits_shared": shared <= SMEM_LIMIT.get(arch, 232448),
        "mma": mma,
        "cp_async": "cp.async" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "sass": sass_mix(sass),
    }


SASS_CLASSES = {
    "mma": ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA"),
    "exp2": ("MUFU.EX2",),
    "rcp": ("MUFU.RCP",),
    "i2f": ("I2F",),
    "f2i": ("F2I", "FRND"),
    "global_load": ("LDG",),
    "async_copy": ("LDGSTS", "UTMALDG", "UBLKCP"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "global_store": ("STG", "UTMASTG"),
    "barrier": ("BAR", "SYNCS", "WARPSYNC"),
    "fp32": ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL"),
}
"""Opcode prefixes counted in the static SASS (instructions in the binary, not executed counts):
enough to compare two variants' inner loops (e.g. conversions per MMA, masking work)."""


def sass_mix(sass: str) -> dict[str, int]:
    """Static instruction counts of a cubin's SASS by SASS_CLASSES, plus the total."""
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, flags=re.M)
    mix = {name: sum(1 for op in ops if op.startswith(prefixes)) for name, prefixes in SASS_CLASSES.items()}
    mix["total"] = len(ops)
    return mix


def _flash(name, bm, bn, warps, stages, *, dense=False, int8=False, fp8=False, linear=False, unselected=False,
           tma=False, lut_block_m=None, lut_block_n=None, dim=128, maxnreg=None) -> Variant:
    act = "bf16"
    qk = "i8" if int8 else act
    pointers = {"Q": qk, "K": qk, "V": "fp8e4nv" if fp8 else act, "Out": act, "QScale": "fp32", "KScale": "fp32",
                "VScale": "fp32", "Lut": "i32", "QRaw": act, "LinS": act, "LinZ": "fp32", "ProjW": "fp32",
                "ProjB": "fp32", "PhiK": act}
    const = dict(HEAD_DIM=dim, BLOCK_M=bm, BLOCK_N=bn, LUT_BLOCK_M=lut_block_m or bm, LUT_BLOCK_N=lut_block_n or bn,
                 DENSE=dense, EVEN_N=False, QK_INT8=int8, PV_FP8=fp8, LINEAR=linear, LINEAR_UNSELECTED=unselected,
                 PROJ_BIAS=linear, USE_TMA=tma)
    descriptors = {}
    if tma:  # what `_tma_descriptors` builds: Q as 2-D rows, K/V/O 4-D, SLA's state 2-D
        v_block = f"1, 1, {dim}, {bn}" if fp8 else f"1, {bn}, 1, {dim}"
        k_block = f"1, 1, {bn}, {dim}" if int8 else f"1, {bn}, 1, {dim}"
        descriptors = {"Q": f"tensordesc<{qk}[{bm}, {dim}]>", "K": f"tensordesc<{qk}[{k_block}]>",
                       "V": f"tensordesc<{pointers['V']}[{v_block}]>", "Out": f"tensordesc<{act}[1, {bm}, 1, {dim}]>"}
        if linear:
            descriptors["LinS"] = f"tensordesc<{act}[{dim}, {dim}]>"
    return Variant(name, _flash_fwd, pointers, const, warps, stages, floats=("lin_eps", "inv_len", "qk_scale"),
                   maxnreg=maxnreg, descriptors=descriptors)


def variants() -> list[Variant]:
    from turbo_kernels.block_sparse import SPARSE_CONFIGS
    from turbo_kernels.dense import DENSE_CONFIGS
    from turbo_kernels.sage import SAGE_DENSE_CONFIGS
    from turbo_kernels.w8a8 import GEMM_CONFIGS, QUANT_LAUNCH

    out = []
    for c in DENSE_CONFIGS:
        out.append(_flash(f"dense {c.describe()}", c.block_m, c.block_n, c.num_warps, c.num_stages, dense=True))
        out.append(_flash(f"dense {c.describe()}+tma", c.block_m, c.block_n, c.num_warps, c.num_stages, dense=True,
                          tma=True))
    for (blkq, blkk), configs in SPARSE_CONFIGS.items():
        for c in configs:
            tag = f"{blkq}x{blkk} {c.describe()}"
            tma_ok = c.block_n == blkk  # the two-block walk gathers rows: pointers only
            geo = dict(lut_block_m=blkq, lut_block_n=blkk, maxnreg=c.maxnreg)
            out.append(_flash(f"sparse {tag}", c.block_m, c.block_n, c.num_warps, c.num_stages, **geo))
            if tma_ok:
                out.append(_flash(f"sparse {tag}+tma", c.block_m, c.block_n, c.num_warps, c.num_stages, tma=True,
                                  **geo))
            out.append(_flash(f"sla {tag}", c.block_m, c.block_n, c.num_warps, c.num_stages, linear=True, **geo))
            if tma_ok:
                out.append(_flash(f"sla {tag}+tma", c.block_m, c.block_n, c.num_warps, c.num_stages, linear=True,
                                  tma=True, **geo))
            if c.block_m == blkq:
                for fp8 in (False, True):
                    pv = "fp8" if fp8 else "bf16"
                    out.append(_flash(f"sagesla/{pv} {tag}", c.block_m, c.block_n, c.num_warps, c.num_stages,
                                      int8=True, fp8=fp8, linear=True, **geo))
                    if tma_ok:
                        out.append(_flash(f"sagesla/{pv} {tag}+tma", c.block_m, c.block_n, c.num_warps,
                                          c.num_stages, int8=True, fp8=fp8, linear=True, tma=True, **geo))
        c = configs[0]
        out.append(_flash(f"sla-unselected {blkq}x{blkk} {c.describe()}", c.block_m, c.block_n, c.num_warps,
                          c.num_stages, linear=True, unselected=True, lut_block_m=blkq, lut_block_n=blkk))
    for c in SAGE_DENSE_CONFIGS:
        for fp8 in (False, True):
            pv = "fp8" if fp8 else "bf16"
            out.append(_flash(f"sage/{pv} {c.describe()}", c.block_m, c.block_n, c.num_warps, c.num_stages,
                              dense=True, int8=True, fp8=fp8))
    for block in (64, 128):
        out.append(Variant(f"pool_queries {block}", _pool_queries_kernel,
                           {"Q": "bf16", "Pooled": "fp32", "QInt8": "fp32", "QScale": "fp32"},
                           dict(BLOCK=block, HEAD_DIM=128, QUANTIZE=False), pool_queries_warps(block, 128, False), 3,
                           floats=("quant_scale",)))
        out.append(Variant(f"pool_queries+int8 {block}", _pool_queries_kernel,
                           {"Q": "bf16", "Pooled": "fp32", "QInt8": "i8", "QScale": "fp32"},
                           dict(BLOCK=block, HEAD_DIM=128, QUANTIZE=True), pool_queries_warps(block, 128, True), 3,
                           floats=("quant_scale",)))
        keys = {"K": "bf16", "V": "bf16", "BlockSum": "fp32", "KSumPart": "fp32", "ZPart": "fp32",
                "VAmaxPart": "fp32", "PhiK": "bf16"}
        key_pass = KeyPassLaunch()
        out.append(Variant(f"pool_keys {block}", _pool_keys_kernel, keys,
                           dict(BLOCK=block, ROWS=key_pass.rows, HEAD_DIM=128, LINEAR=False, V_AMAX=False),
                           key_pass.num_warps, 1))
        out.append(Variant(f"pool_keys+linear+vamax {block}", _pool_keys_kernel, keys,
                           dict(BLOCK=block, ROWS=key_pass.rows, HEAD_DIM=128, LINEAR=True, V_AMAX=True),
                           key_pass.num_warps, 1))
        out.append(Variant(f"quantize_keys+fp8v {block}", _quantize_keys_kernel,
                           {"K": "bf16", "KMean": "fp32", "KInt8": "i8", "KScale": "fp32", "V": "bf16",
                            "VScale": "fp32", "VT8": "fp8e4nv"},
                           dict(BLOCK=block, HEAD_DIM=128, V_FP8=True), QUANTIZE_KEYS_LAUNCH["num_warps"], 3,
                           maxnreg=QUANTIZE_KEYS_LAUNCH["maxnreg"]))
    out.append(Variant("finalize_keys+linear+fp8v+fold", _finalize_keys_kernel,
                       {"KSumPart": "fp32", "ZPart": "fp32", "VAmaxPart": "fp32", "KMean": "fp32", "KState": "fp32",
                        "VScale": "fp32", "KVState": "bf16", "FoldW": "fp32"},
                       dict(HEAD_DIM=128, LINEAR=True, V_AMAX=True, FOLD=True), 8, 3, floats=("inv_len",)))
    for block in (64, 128):
        out.append(Variant(f"block_scores key block {block}", _block_scores_kernel,
                           {"PooledQ": "fp32", "BlockSum": "fp32", "Score": "fp32"},
                           dict(KEY_BLOCK=block, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64), 4, 3))
    for nk_pad in (256, 512, 1024, 2048):  # 480p and 720p, both geometries
        out.append(Variant(f"select_topk {nk_pad}", _select_topk_kernel, {"Score": "fp32", "Lut": "i32"},
                           dict(NK_PAD=nk_pad), SELECT_WARPS, 3))
    out.append(Variant("quantize_tiles", _quantize_tiles_kernel, {"X": "bf16", "XQ": "i8", "Scale": "fp32"},
                       dict(TILE_SIZE=128), QUANT_LAUNCH["num_warps"], 3, maxnreg=QUANT_LAUNCH["maxnreg"]))
    for c in GEMM_CONFIGS:
        out.append(Variant(f"w8a8 {c.describe()}", _w8a8_matmul_kernel,
                           {"A": "i8", "W": "i8", "C": "bf16", "AScale": "fp32", "WScale": "fp32", "Bias": "bf16"},
                           dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m, TILE_SIZE=128,
                                EVEN_K=True, HAS_BIAS=True, FAST_CONVERT=c.fast_convert, K_UNROLL=c.k_unroll,
                                USE_TMA=c.use_tma),
                           c.num_warps, c.num_stages))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    parser.add_argument("--only", default="", help="substring filter on variant names")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for v in variants():
        if args.only and args.only not in v.name:
            continue
        try:
            report = compile_variant(v, args.arch)
        except Exception as error:  # noqa: BLE001 - one failing variant must not hide the others
            report = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        rows.append({"variant": v.name, "num_warps": v.num_warps, "num_stages": v.num_stages, **report})
        r = rows[-1]
        if "error" in r:
            print(f"{v.name:45s} ERROR {r['error']}", flush=True)
        else:
            mix = r["sass"]
            print(f"{v.name:45s} regs {r['registers']:>3} spill {r['spill_bytes']:>4} smem {r['shared_bytes']:>6}"
                  f"{'' if r['fits_shared'] else ' (TOO BIG)'} sass {mix['total']:>5} (mma {mix['mma']} ex2 "
                  f"{mix['exp2']} rcp {mix['rcp']} i2f {mix['i2f']} f2i {mix['f2i']} ldg {mix['global_load']} "
                  f"async {mix['async_copy']}) "
                  f"mma {' '.join(r['mma'])}{' tma' if r['tma'] else ''}{' cp.async' if r['cp_async'] else ''}",
                  flush=True)
    out = args.out or RESULTS / f"compile_sm{args.arch}.json"
    if not args.only:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "command": " ".join(sys.argv),
                                   "variants": rows}, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
