"""`sla`: Sparse-Linear Attention as TurboDiffusion runs it.

out = block_sparse(q, k, v; top-k LUT) + proj_l(phi(q) S / (phi(q) z + 1e-5)), with
phi = softmax over head_dim, S = phi(K)^T V and z = sum phi(k) over ALL tokens (thu-ml/SLA main),
proj_l the layer's fp32 Linear(head_dim, head_dim), zero-initialised in models (so an untrained
layer is pure block-sparse attention). proj_l None skips the linear branch.

The whole op is GPU launches only, with no host sync:
1. pool Q per query block (+ Sage's int8 Q, `pool_queries`);
2. pool K per key block, writing phi(K) and reducing z in the same pass, one small launch
   reducing the per-program partials (+ K's mean, the FP8 V scale), S = phi(K)^T V by cuBLAS
   (`pool_keys`);
3. score the pooled blocks and radix-select the sorted top-k LUT (two launches);
4. Sage only: int8 K (and FP8 V^T) (`quantize_keys`);
5. the flash kernel walks the LUT and adds the linear branch and proj_l in its epilogue (proj_l
   folded into S by the key pass's reduce launch: phi(q) (S W^T) / (phi(q) z), one D x D product
   per query tile).
Overlapping the passes with the flash kernel did not pay on the H200: with the heads in 2-6
groups, each group's passes on a second stream while the previous group's flash kernel ran, the op
took 26.9-27.5 ms against 26.6 ms at 14B 720p and 1.79-2.47 against 1.70 ms at 1.3B 480p under
graph replay (one probe run; the flash kernel holds every SM, so the passes wait behind it).
``linear="unselected"`` is the paper's variant (linear attention over the blocks the sparse branch
did not take): the kernel subtracts the selected blocks' phi(q) phi(K_j)^T V_j on the fly.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import triton

from turbo_kernels.autotune import EXACT_MIN_COSINE, close_to_reference, length_bucket, pick_config
from turbo_kernels.block_mask import (
    KeyPass,
    build_block_mask_ref,
    kept_blocks,
    pool_keys,
    pool_queries,
    select_blocks_from_passes,
)
from turbo_kernels.block_sparse import block_sparse_attention_ref, check_lut, sparse_configs
from turbo_kernels.dispatch import use_triton
from turbo_kernels.flash import (
    LOG2E,
    FlashConfig,
    LinearBranch,
    QuantizedQK,
    check_qkv,
    launch_flash,
    with_tma_twins,
)
from turbo_kernels.quant import LN2, dequantize_qk, quantize_keys, quantize_qk_ref
from turbo_kernels.registry import AttentionMetadata, register_attention_backend
from turbo_kernels.tma import tma_candidates_allowed

LINEAR_EPS = 1e-5
LINEAR_MODES = ("all", "unselected")
"""all: linear attention over every token (TurboDiffusion, default); unselected: only over the key
blocks outside the LUT (the SLA paper / SLA-1 branch)."""


def _check_linear_mode(linear: str) -> None:
    if linear not in LINEAR_MODES:
        raise ValueError(f"linear must be one of {LINEAR_MODES}, got {linear!r}")


def linear_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor | None = None,
    blkq: int = 128,
    blkk: int = 64,
) -> torch.Tensor:
    """fp32 phi(q) S / (phi(q) z + eps) in (B, L, H, D); with ``lut``, S and z leave out each
    query block's selected key blocks (the paper's variant)."""
    B, L, H, D = q.shape
    phi_q = torch.softmax(q.float(), dim=-1)
    phi_k = torch.softmax(k.float(), dim=-1)
    if lut is None:
        s = torch.einsum("blhd,blhe->bhde", phi_k, v.float())
        z = phi_k.sum(1)
        num = torch.einsum("blhd,bhde->blhe", phi_q, s)
        den = torch.einsum("blhd,bhd->blh", phi_q, z)
        return num / (den + LINEAR_EPS)[..., None]
    mq, nk = lut.shape[2], -(-L // blkk)
    pad = nk * blkk - L
    phi_kb = torch.nn.functional.pad(phi_k, (0, 0, 0, 0, 0, pad)).view(B, nk, blkk, H, D)
    vb = torch.nn.functional.pad(v.float(), (0, 0, 0, 0, 0, pad)).view(B, nk, blkk, H, D)
    s_blocks = torch.einsum("bnthd,bnthe->bhnde", phi_kb, vb)
    z_blocks = phi_kb.sum(2).permute(0, 2, 1, 3)
    unselected = torch.ones(B, H, mq, nk, device=q.device)
    unselected.scatter_(-1, lut.long(), 0.0)
    s = torch.einsum("bhmn,bhnde->bhmde", unselected, s_blocks)
    z = torch.einsum("bhmn,bhnd->bhmd", unselected, z_blocks)
    block_of = torch.arange(L, device=q.device) // blkq
    num = torch.einsum("blhd,bhlde->blhe", phi_q, s[:, :, block_of])
    den = torch.einsum("blhd,bhld->blh", phi_q, z[:, :, block_of])
    return num / (den + LINEAR_EPS)[..., None]


def sparse_linear_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    proj_l: torch.nn.Linear | None,
    *,
    blkq: int,
    blkk: int,
    linear: str = "all",
    qk_int8: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The exact masked reference for a given LUT: sparse branch (with Sage's int8 Q/K when
    ``qk_int8``) + proj_l(linear branch), summed in fp32, q's dtype out."""
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if qk_int8:
        q_hat, k_hat = dequantize_qk(quantize_qk_ref(q, k, blkq, blkk, sm_scale), blkq, blkk)
        out = block_sparse_attention_ref(q_hat, k_hat, v.float(), lut, blkq, blkk, scale=LN2)
    else:
        out = block_sparse_attention_ref(q.float(), k.float(), v.float(), lut, blkq, blkk, scale=sm_scale)
    if proj_l is not None:
        o_lin = linear_attention_ref(q, k, v, lut if linear == "unselected" else None, blkq, blkk)
        bias = proj_l.bias.detach().float() if proj_l.bias is not None else None
        out = out + torch.nn.functional.linear(o_lin, proj_l.weight.detach().float(), bias)
    return out.to(q.dtype)


PV_FP8_MIN_COSINE = 0.999
"""An FP8 P@V candidate is admitted by the autotuner only if its output keeps this cosine to the
bf16 P@V candidate's output on the call that tunes it (issue 8's sagesla-vs-sla gate)."""


def fp8_pv_supported(device: torch.device) -> bool:
    """e4m3 tensor-core MMAs: Ada (sm89) and Hopper or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


_ADMIT = close_to_reference(lambda cfg: PV_FP8_MIN_COSINE if cfg.pv_fp8 else EXACT_MIN_COSINE, lambda out: out[0])
"""Candidates against the first (bf16 P@V, plain pointers): exact ones at EXACT_MIN_COSINE,
FP8 P@V at PV_FP8_MIN_COSINE."""


def linear_branch(k_pass: KeyPass, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None) -> LinearBranch:
    """The flash epilogue's state from a key pass: proj_l's weight goes to the kernel unless the
    pass folded it into the state (`pool_keys(..., fold_weight=...)`, TurboDiffusion's variant);
    the paper's variant (the pass kept phi(K)) needs S and W apart."""
    weight = None if k_pass.folded else proj_weight
    return LinearBranch(k_pass.kv_state, k_pass.k_state, weight, proj_bias, LINEAR_EPS / k_pass.tokens, k_pass.phi_k)


def sparse_linear_candidates(blkq: int, blkk: int, qk_int8: bool, pv_fp8: bool | None, linear: str,
                             q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[FlashConfig]:
    """What the autotuner tries for one SLA call: the geometry's configs (Sage: one query tile per
    quantisation block), with FP8 P@V when ``pv_fp8`` is None on a GPU that has it, and TMA twins
    on Hopper. The first candidate (bf16 P@V, plain pointers) is the accuracy reference."""
    # Register caps only where they were measured to pay; the paper's variant carries a second
    # accumulator through the loop and slows down under them.
    configs = [c for c in sparse_configs(blkq, blkk)
               if (not qk_int8 or c.block_m == blkq) and (c.maxnreg is None or linear == "all")]
    if pv_fp8 is None:
        options = [False, True] if qk_int8 and linear == "all" and fp8_pv_supported(q.device) else [False]
    else:
        options = [pv_fp8]
    configs = [replace(c, pv_fp8=p) for p in options for c in configs]
    return with_tma_twins(configs, tma_candidates_allowed(q, k, v), blkk)


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: float,
    proj_l: torch.nn.Linear | None = None,
    *,
    blkq: int = 128,
    blkk: int = 64,
    linear: str = "all",
    qk_int8: bool = False,
    pv_fp8: bool | None = False,
    scale: float | None = None,
    config: FlashConfig | None = None,
    return_lut: bool = False,
    select: str = "triton",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The whole SLA op (mask + sparse + linear + proj_l), plain or Sage-quantised.

    qk_int8: Sage's INT8 Q/K (requires block_m == blkq); pv_fp8: FP8 e4m3 P@V (with qk_int8);
    None lets the autotuner choose, admitting FP8 only past PV_FP8_MIN_COSINE. select: how the
    LUT is selected (`turbo_kernels.block_mask.SELECT_METHODS`). return_lut: also return the LUT
    the op built (benchmarks compare against the same mask). After one call per shape (the
    autotuning one) a call launches only kernels: no host sync, no allocation-dependent host
    logic, so it can be captured in a CUDA graph.
    """
    check_qkv(q, k, v)
    _check_linear_mode(linear)
    if pv_fp8 and not qk_int8:
        raise ValueError("pv_fp8 is a Sage option: it needs qk_int8=True")
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not use_triton(q, k, v):
        lut = build_block_mask_ref(q, k, topk, blkq, blkk)
        out = sparse_linear_ref(q, k, v, lut, proj_l, blkq=blkq, blkk=blkk, linear=linear, qk_int8=qk_int8,
                                scale=sm_scale)
        return (out, lut) if return_lut else out

    B, L, H, D = q.shape
    unselected = linear == "unselected"
    # The paper's variant with every block exact has an empty linear branch: proj_l adds its bias.
    everything_exact = unselected and kept_blocks(topk, triton.cdiv(L, blkk)) == triton.cdiv(L, blkk)
    has_linear = proj_l is not None and not everything_exact
    bias_only = proj_l.bias.detach() if proj_l is not None and everything_exact and proj_l.bias is not None else None
    if has_linear:
        proj_weight = proj_l.weight.detach()
        proj_weight = proj_weight if proj_weight.is_contiguous() else proj_weight.contiguous()
        proj_bias = proj_l.bias.detach() if proj_l.bias is not None else None

    def run(cfg: FlashConfig) -> tuple[torch.Tensor, torch.Tensor]:
        q_pass = pool_queries(q, blkq, sm_scale * LOG2E if qk_int8 else None)
        k_pass = pool_keys(k, blkk, v, linear=has_linear, phi_out=has_linear and unselected, v_amax=cfg.pv_fp8,
                           k_mean=qk_int8, fold_weight=proj_weight if has_linear and not unselected else None)
        lut = select_blocks_from_passes(q_pass, k_pass, topk, select)
        quant = None
        if qk_int8:
            k_int8, k_scale, v_t, v_scale = quantize_keys(k, k_pass.mean, blkk, v, k_pass.v_scale)
            quant = QuantizedQK(q_pass.q_int8, q_pass.q_scale, k_int8, k_scale, v_t, v_scale)
        lin = None
        if has_linear:
            lin = linear_branch(k_pass, proj_weight, proj_bias)
        out = launch_flash(q, k, v, cfg, sm_scale=sm_scale, lut=lut, lut_block_m=blkq, lut_block_n=blkk,
                           quant=quant, linear=lin)
        if bias_only is not None:
            out = (out.float() + bias_only.float()).to(q.dtype)
        return out, lut

    if config is None:
        key = ("sla", blkq, blkk, qk_int8, "auto" if pv_fp8 is None else bool(pv_fp8), has_linear, linear, select,
               length_bucket(L), D, q.dtype, q.device.type)
        candidates = lambda: sparse_linear_candidates(blkq, blkk, qk_int8, pv_fp8, linear, q, k, v)  # noqa: E731
        config = pick_config(key, candidates, run, accept=_ADMIT)
    elif pv_fp8 and not config.pv_fp8:
        config = replace(config, pv_fp8=True)
    if config.block_n not in (blkk, 2 * blkk) or (qk_int8 and config.block_m != blkq):
        raise ValueError(f"config {config.describe()} does not fit blocks {blkq}x{blkk}")
    if config.pv_fp8 and not qk_int8:
        raise ValueError(f"config {config.describe()} has FP8 P@V, a Sage option: it needs qk_int8=True")
    out, lut = run(config)
    check_lut(lut, q, blkq, blkk)
    return (out, lut) if return_lut else out


def sla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: float,
    proj_l: torch.nn.Linear | None = None,
    *,
    blkq: int = 128,
    blkk: int = 64,
    linear: str = "all",
    scale: float | None = None,
    config: FlashConfig | None = None,
) -> torch.Tensor:
    """SLA with bf16/fp16 operands; (B, L, H, D) in and out."""
    return sparse_linear_attention(q, k, v, topk, proj_l, blkq=blkq, blkk=blkk, linear=linear, scale=scale,
                                   config=config)


@register_attention_backend("sla")
def sla_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    proj_l: torch.nn.Linear | None = None,
) -> torch.Tensor:
    """`sla`: top-k block-sparse (128x64 blocks, meta.sla_topk) + linear branch through proj_l."""
    return sla_attention(q, k, v, meta.sla_topk, proj_l)
