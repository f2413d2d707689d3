"""`sage` and `sagesla`: SageAttention's INT8 QK^T inside dense attention and inside SLA.

Q (times sm_scale*log2(e)) and K (minus its token mean) are int8 with one scale per block; the
kernel's int8 dot gives int32 logits, dequantised by q_scale*k_scale straight into the exp2
domain. P@V stays bf16/fp16 with fp32 accumulation, or, with ``pv_fp8``, FP8 e4m3 against a
pre-transposed per-channel-scaled V with two-level accumulation. On Hopper (sm90) INT8 tensor
cores run at twice the bf16 rate, and sagesla uses TurboDiffusion's sm90 geometry of 64-query x
128-key blocks (one warpgroup per 64-row tile); elsewhere it uses 128x64.
"""

from __future__ import annotations

import math
import os

import torch

from turbo_kernels.autotune import close_to_reference, length_bucket, pick_config
from turbo_kernels.block_mask import pool_keys, pool_queries
from turbo_kernels.dense import attention_ref
from turbo_kernels.dispatch import use_triton
from turbo_kernels.flash import LOG2E, FlashConfig, QuantizedQK, check_qkv, launch_flash
from turbo_kernels.quant import LN2, dequantize_qk, quantize_keys, quantize_qk_ref
from turbo_kernels.registry import AttentionMetadata, register_attention_backend
from turbo_kernels.sla import sparse_linear_attention

SAGE_DENSE_CONFIGS = [
    FlashConfig(64, 128, num_warps=4, num_stages=3),
    FlashConfig(128, 64, num_warps=8, num_stages=3),
    FlashConfig(128, 128, num_warps=8, num_stages=3),
]
"""Autotune candidates of dense Sage; Q/K quantisation blocks follow the tile (block_m, block_n)."""


PV_MODES = {"auto": None, "bf16": False, "fp8": True}
"""TURBO_KERNELS_SAGE_PV values: the P@V precision sagesla uses when the caller does not pin it."""


def sage_pv_mode() -> bool | None:
    """TURBO_KERNELS_SAGE_PV=bf16|fp8 pins sagesla's P@V precision (the DiT's backend call has no
    option for it); auto (default) leaves it to the autotuner's gated choice."""
    value = os.environ.get("TURBO_KERNELS_SAGE_PV", "auto")
    if value not in PV_MODES:
        raise ValueError(f"TURBO_KERNELS_SAGE_PV must be one of {sorted(PV_MODES)}, got {value!r}")
    return PV_MODES[value]


def sagesla_geometry(device: torch.device) -> tuple[int, int]:
    """(blkq, blkk): 64x128 on Hopper like TurboDiffusion's sm90 SageSLA, else 128x64."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return 64, 128
    return 128, 64


def sage_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    blkq: int = 128,
    blkk: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention on Sage's int8 Q/K (same quantisation as the kernel), exact softmax and PV."""
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_hat, k_hat = dequantize_qk(quantize_qk_ref(q, k, blkq, blkk, sm_scale), blkq, blkk)
    return attention_ref(q_hat, k_hat, v.float(), scale=LN2).to(q.dtype)


def sage_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pv_fp8: bool = False,
    scale: float | None = None,
    config: FlashConfig | None = None,
) -> torch.Tensor:
    """Dense SageAttention (quantisation included); (B, L, H, D) in and out."""
    check_qkv(q, k, v)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not use_triton(q, k, v):
        return sage_attention_ref(q, k, v, scale=sm_scale)

    def run(cfg: FlashConfig) -> torch.Tensor:
        q_pass = pool_queries(q, cfg.block_m, sm_scale * LOG2E)
        k_pass = pool_keys(k, cfg.block_n, v, v_amax=pv_fp8, k_mean=True)
        k_int8, k_scale, v_t, v_scale = quantize_keys(k, k_pass.mean, cfg.block_n, v, k_pass.v_scale)
        quant = QuantizedQK(q_pass.q_int8, q_pass.q_scale, k_int8, k_scale, v_t, v_scale)
        return launch_flash(q, k, v, cfg, sm_scale=sm_scale, quant=quant)

    if config is None:
        key = ("sage", pv_fp8, length_bucket(q.shape[1]), q.shape[-1], q.dtype, q.device.type)
        config = pick_config(key, SAGE_DENSE_CONFIGS, run, accept=close_to_reference())
    return run(config)


def sagesla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: float,
    proj_l: torch.nn.Linear | None = None,
    *,
    geometry: tuple[int, int] | None = None,
    pv_fp8: bool | None = None,
    linear: str = "all",
    scale: float | None = None,
    config: FlashConfig | None = None,
) -> torch.Tensor:
    """SLA with Sage's INT8 QK^T in the sparse branch; geometry (blkq, blkk) defaults per GPU.

    pv_fp8 None (the default): `sage_pv_mode` decides; unless pinned there, the autotuner picks
    bf16 or FP8 P@V per shape where the GPU has FP8 MMAs, FP8 only if it keeps cosine >=
    `turbo_kernels.sla.PV_FP8_MIN_COSINE` to bf16 P@V."""
    blkq, blkk = geometry or sagesla_geometry(q.device)
    if pv_fp8 is None:
        pv_fp8 = sage_pv_mode()
    return sparse_linear_attention(q, k, v, topk, proj_l, blkq=blkq, blkk=blkk, linear=linear, qk_int8=True,
                                   pv_fp8=pv_fp8, scale=scale, config=config)


@register_attention_backend("sage")
def sage_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    proj_l: torch.nn.Linear | None = None,
) -> torch.Tensor:
    """`sage`: dense attention with INT8 QK^T (proj_l unused: there is no linear branch)."""
    return sage_attention(q, k, v)


@register_attention_backend("sagesla")
def sagesla_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    proj_l: torch.nn.Linear | None = None,
) -> torch.Tensor:
    """`sagesla`: SLA (meta.sla_topk, proj_l) with INT8 QK^T in the sparse branch."""
    return sagesla_attention(q, k, v, meta.sla_topk, proj_l)
