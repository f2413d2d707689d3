"""Rank functions the parallel tests spawn (module level, so spawned processes can import them)
and the single-process references they are compared with."""

from __future__ import annotations

import torch

from turbo_kernels.registry import AttentionMetadata
from turbo_serve.models.configs import get_preset
from turbo_serve.models.loading import load_dit
from turbo_serve.parallel.distributed import ParallelConfig, init_parallel, shutdown_parallel
from turbo_serve.parallel.stage import ParallelDenoiseStage
from turbo_serve.parallel.ulysses import CollectiveTimer, SequenceParallel
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.pipeline.stages import GenerationCancelled, PipelineConfig

TINY = get_preset("tiny-t2v").dit

DIT_CASES = (
    # (attention backend, latent T x H x W, batch): 105 and 231 tokens, odd, so 2 ranks pad.
    ("original", (3, 10, 14), 1),
    ("original", (3, 10, 14), 2),
    ("sla", (3, 14, 22), 1),
)


def tiny_dit() -> torch.nn.Module:
    """The tiny DiT with seeded weights, self-attention gates large enough that attention visibly
    moves the output, and a nonzero SLA proj_l, so the linear branch counts too."""
    dit = load_dit(None, TINY, dtype=torch.float32, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in dit.blocks:
            block.modulation.normal_(0.0, 0.5, generator=generator)
            block.self_attn.proj_l.weight.normal_(0.0, 0.2, generator=generator)
            block.self_attn.proj_l.bias.normal_(0.0, 0.2, generator=generator)
    return dit


def dit_inputs(grid: tuple[int, int, int], batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(grid) + batch)
    x = torch.randn(batch, TINY.in_dim, *grid, generator=generator)
    timestep = torch.linspace(900.0, 300.0, batch)
    context = torch.randn(batch, 7, TINY.text_dim, generator=generator)
    return x, timestep, context


@torch.inference_mode()
def dit_outputs(dit: torch.nn.Module) -> list[torch.Tensor]:
    return [
        dit(*dit_inputs(grid, batch), AttentionMetadata(backend, sla_topk=0.5)) for backend, grid, batch in DIT_CASES
    ]


def stage_config(cache_dir: str) -> PipelineConfig:
    return PipelineConfig(model="tiny-t2v", cache_dir=cache_dir)


def stage_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    text = torch.randn(get_preset("tiny-t2v").dit.text_len, TINY.text_dim, generator=generator)
    return text, torch.randn(text.shape, generator=generator)


def rcm_spec() -> GenerationSpec:
    # 144x112, 9 frames: latent 3 x 14 x 18 -> 3 x 7 x 9 = 189 tokens (odd).
    return GenerationSpec("x", model="tiny-t2v", width=144, height=112, num_frames=9, attention_type="original")


def guided_spec() -> GenerationSpec:
    return GenerationSpec(
        "x", model="tiny-t2v", width=144, height=112, num_frames=9, attention_type="original",
        sampler="unipc", num_steps=3, guidance_scale=4.0,
    )  # fmt: skip


def parallel_rank(rank: int, init_method: str, parallel: ParallelConfig, cache_dir: str, stop_after: int) -> dict:
    """One rank of the test Denoiser (one spawn per layout: process start-up dominates).

    With a sequence group: the DIT_CASES forwards through the hooks, the all-to-all count, and
    the same forwards once the hooks are off. Then a ParallelDenoiseStage denoises the rCM spec
    and the guided spec, and a run the leader cancels after `stop_after` steps.
    """
    groups = init_parallel(parallel, rank, init_method, "cpu", timeout_s=120)
    try:
        result = {}
        if groups.sequence is not None:
            dit = tiny_dit()
            timer = CollectiveTimer()
            hooks = SequenceParallel(dit, groups.sequence, timer)
            result["dit"] = dit_outputs(dit)
            result["all_to_alls"] = timer.calls
            hooks.remove()
            result["dit_after_remove"] = dit_outputs(dit)[:2]  # the cheap dense cases
        stage = ParallelDenoiseStage(stage_config(cache_dir), groups)
        text, negative = stage_inputs()
        steps: list[int] = []
        result["rcm"] = stage(rcm_spec(), text, on_step=lambda done, total: steps.append(done))
        result["guided"] = stage(guided_spec(), text, negative_text=negative)
        result["steps"] = steps
        try:
            stage(rcm_spec(), text, should_stop=lambda: len(steps) >= 4 + stop_after, on_step=lambda d, t: steps.append(d))
            result["cancelled"] = None
        except GenerationCancelled as error:
            result["cancelled"] = str(error)
        return result
    finally:
        shutdown_parallel()
