"""The generation spec: what the API builds from a request, the job store keeps, and the pipeline runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

Sampler = Literal["rcm", "unipc", "euler"]


@dataclass(frozen=True)
class GenerationSpec:
    """One video to generate. Plain data: no tensors, no HTTP, safe to store as JSON."""

    prompt: str
    model: str = "tiny-t2v"
    width: int = 832
    height: int = 480
    num_frames: int = 81
    num_steps: int = 4
    seed: int = 0
    sigma_max: float | None = None
    """rCM starting sigma; None takes the model's default (80 T2V, 200 I2V)."""
    attention_type: str = "sagesla"
    sla_topk: float = 0.1
    quant_linear: bool = False
    boundary: float | None = None
    """I2V expert switch in RF time; None takes the model's default (0.9)."""
    ode: bool = False
    """Deterministic Euler update instead of rCM's stochastic re-noising."""
    sampler: Sampler = "rcm"
    """rcm for distilled (TurboDiffusion) weights; unipc or euler for stock Wan weights."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale (teacher samplers only)."""
    negative_prompt: str = ""
    """Negative prompt (teacher samplers only)."""
    shift: float = 5.0
    """Flow-matching sigma shift (teacher samplers only)."""
    image_path: str | None = None
    """I2V conditioning image, already stored on disk."""
    fps: int = 16

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def output_name(task: str, spec: GenerationSpec, when: datetime | None = None) -> str:
    """File name carrying mode, seed, model and time, e.g. t2v_42_wan2.1-t2v-1.3b_20261201-153045.mp4."""
    when = when or datetime.now(timezone.utc)
    return f"{task}_{spec.seed}_{spec.model}_{when:%Y%m%d-%H%M%S}.mp4"
