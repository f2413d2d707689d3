"""GPU memory of a denoise request, estimated from the model config, and the out-of-memory error.

The Denoiser's peak is its weights plus the activations of one block at a time (inference keeps no
graph), which grow linearly with the latent token count: the sparse and dense attention kernels
are flash-style, never materialising the L x L score matrix. Per token, the peak is the larger of
- the self-attention phase, ~ATTENTION_BYTES_PER_DIM x dim: the bf16 residual, its modulated copy,
  the fused q/k/v projection, the normalised q and k and RoPE's float32 temporaries;
- the feed-forward phase, FFN_BYTES_PER_DIM x dim + FFN_BYTES_PER_HIDDEN x ffn_dim: the residual,
  its modulated copy and float32 norm, and the hidden layer before and after GELU.
Both constants are calibrated on H200 measurements (bench/results/dit_step_h200.json, bf16, batch
1, one forward): 14B at 720p (75600 tokens, attention-bound) peaked at 35.5 GiB, 1.3B at 480p
(32760 tokens, FFN-bound) at 4.1 GiB. Classifier-free guidance runs the batch twice.

CUDA graphs (turbo_serve.pipeline.cuda_graphs) keep one activation pool per captured shape, so a
replica that served several shapes holds more than one request's activations; the out-of-memory
handler drops those pools before the replica takes its next job.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from turbo_serve.models.configs import ModelPreset, get_preset
from turbo_serve.pipeline.resolution import latent_frames

GIB = 2**30
ATTENTION_BYTES_PER_DIM = 24.6
FFN_BYTES_PER_DIM = 8.0
FFN_BYTES_PER_HIDDEN = 4.0
"""Bytes per token at a 2-byte model dtype (float32 models scale them by 2)."""
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class OutOfMemory(RuntimeError):
    """A stage ran out of device memory; the message says what to lower. The job fails (retrying
    the same request on the same replica would fail again), the replica has freed its memory."""


@dataclass(frozen=True)
class MemoryEstimate:
    tokens: int
    weights_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def describe(self) -> str:
        return (f"about {self.total_bytes / GIB:.1f} GiB ({self.weights_bytes / GIB:.1f} GiB weights + "
                f"{self.activation_bytes / GIB:.1f} GiB activations for {self.tokens} tokens)")  # fmt: skip


def denoise_tokens(preset: ModelPreset, width: int, height: int, num_frames: int) -> int:
    """Latent tokens of one video: latent frames x (H / 8 / 2) x (W / 8 / 2) for Wan."""
    stride, (pt, ph, pw) = preset.vae.spatial_stride, preset.dit.patch_size
    return (latent_frames(num_frames) // pt) * (height // stride // ph) * (width // stride // pw)


@functools.lru_cache(maxsize=32)
def dit_weights_bytes(model: str, dtype: str, quant_linear: bool) -> int:
    """Bytes of every DiT expert's parameters and buffers as loaded (float32 keeps and int8 block
    linears included), counted on a meta-device model: exact, and no memory is allocated."""
    import torch

    from turbo_serve.models.quant import quantize_linears
    from turbo_serve.models.wan_dit import WanDiT

    preset = get_preset(model)
    with torch.device("meta"):
        dit = WanDiT(preset.dit)
    dit.cast_(getattr(torch, dtype))
    if quant_linear:
        quantize_linears(dit)
    tensors = [*dit.parameters(), *dit.buffers()]
    return preset.num_experts * sum(t.numel() * t.element_size() for t in tensors)


def estimate_denoise_memory(model: str, width: int, height: int, num_frames: int, *, dtype: str = "bfloat16",
                            quant_linear: bool = False, guided: bool = False, sequence_parallel: int = 1,
                            cfg_parallel: bool = False) -> MemoryEstimate:  # fmt: skip
    """Peak device memory of one denoise request on each GPU of a replica holding `model`: every rank
    keeps the whole DiT, and shares the activations by its sequence shard (and CFG branch)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPE_BYTES)}, got {dtype!r}")
    preset = get_preset(model)
    tokens = denoise_tokens(preset, width, height, num_frames)
    dim, hidden = preset.dit.dim, preset.dit.ffn_dim
    per_token = max(ATTENTION_BYTES_PER_DIM * dim, FFN_BYTES_PER_DIM * dim + FFN_BYTES_PER_HIDDEN * hidden)
    batch = 1 if not guided or cfg_parallel else 2
    activations = int(per_token * -(-tokens // sequence_parallel) * batch * _DTYPE_BYTES[dtype] / 2)
    return MemoryEstimate(tokens, dit_weights_bytes(model, dtype, quant_linear), activations)


def lowering_advice(*, quant_linear: bool, guided: bool) -> str:
    """What a request (or the server) can change to need less Denoiser memory."""
    advice = "lower the resolution (size) or num_frames"
    if guided:
        advice += ", or use the rcm sampler or guidance_scale 1 (classifier-free guidance doubles the batch)"
    if not quant_linear:
        advice += ", or run the server with quant_linear (int8 DiT weights, about half their memory)"
    return advice
