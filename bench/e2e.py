"""Whole-request speed on one GPU: text encode + 4-step DiT sampling + VAE decode + mp4.

Random weights at the real sizes (speed does not depend on the values), bf16, batch 1, 81 frames,
4 rCM steps. "decode" in a request's stage times is VAE decode + mp4 (streamed together); the
VAE decode alone is timed apart (the target's measure). For each model: our pipeline with attention sagesla / sla / original (selected per
request, no reload), 14B also with quant_linear, and diffusers' WanTransformer3DModel and
AutoencoderKLWan of the same configs with their defaults, all in one run, as ratios. Stage times
come from the pipeline's own synchronised timers; warm-up runs are excluded and counted in the JSON.
Kernel profiles (harness.kernel_profile) of the sampling and the decode say where the time goes.
The 14B dense variants (ours "original" and diffusers) are timed as 4 x one measured forward, since
a full dense 4-step run costs ~50 s each; the JSON says so where it applies.

    python bench/e2e.py                      # H200: writes bench/results/e2e_h200.json
    python bench/e2e.py --cases 1.3b-480p    # one model
    python bench/e2e.py --cases 14b-720p --only 'build|quant|diffusers' --out bench/results/e2e_14b_h200.json
    python bench/e2e.py --smoke              # tiny model on the CPU (tests the script)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from harness import RESULTS, Report, free_memory, kernel_profile, synchronize, time_call
from turbo_serve.models.configs import get_preset
from turbo_serve.models.tokenizer import ensure_tiny_tokenizer
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.pipeline.stages import DenoiseStage, Pipeline, PipelineConfig

PROMPT = (
    "A red fox trots through fresh snow at the edge of a pine forest at dawn, breath steaming, soft golden "
    "light, the camera tracks alongside at eye level, shallow depth of field, cinematic, highly detailed."
)
# case -> (preset, width, height)
CASES = {"1.3b-480p": ("wan2.1-t2v-1.3b", 832, 480), "14b-720p": ("wan2.1-t2v-14b", 1280, 720)}
TARGETS = {"1.3b-480p": {"sampling_s": 1.0, "decode_s": 1.2, "request_s": 2.5}, "14b-720p": {"sampling_s": 15.0}}
ATTENTION = ("sagesla", "sla", "original")


def spec_for(preset: str, width: int, height: int, frames: int, attention: str, quant: bool = False) -> GenerationSpec:
    return GenerationSpec(PROMPT, model=preset, width=width, height=height, num_frames=frames, num_steps=4,
                          attention_type=attention, sla_topk=0.1, quant_linear=quant)  # fmt: skip


def request_runs(pipeline: Pipeline, spec: GenerationSpec, out_dir: Path, warmup: int, iters: int) -> dict:
    """Whole requests through Pipeline.generate: per-stage medians and the request wall time."""
    runs = []
    for index in range(warmup + iters):
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        start = time.perf_counter()
        result = pipeline.generate(spec, None, out_dir)
        wall = time.perf_counter() - start
        if index >= warmup:
            runs.append({**result.timings, "request_s": wall})
    keys = runs[0].keys()
    medians = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in keys}
    record = {"median": {k: round(v, 4) for k, v in medians.items()}, "runs": runs, "warmup_runs": warmup}
    record["sampling_s"] = record["median"]["denoise"]
    if torch.cuda.is_available():
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return record


def sampling_runs(stage: DenoiseStage, spec: GenerationSpec, text: torch.Tensor, warmup: int, iters: int) -> dict:
    record = time_call(lambda: stage(spec, text), warmup=warmup, iters=iters, device=stage.config.device)
    record["sampling_s"] = record["median_s"]
    return record


def single_forward_x4(forward, device: str) -> dict:
    """4 x one measured forward (after one warm-up forward): dense 14B sampling without 50 s runs."""
    record = time_call(forward, warmup=1, iters=1, device=device)
    record["forward_s"] = record["median_s"]
    record["sampling_s"] = 4 * record["median_s"]
    record["method"] = "4 x one timed forward (1 warm-up)"
    return record


def diffusers_transformer(config, device: str):
    from diffusers import WanTransformer3DModel

    from turbo_serve.models.wan_dit import init_random_weights

    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
            in_channels=config.in_dim, out_channels=config.out_dim, text_dim=config.text_dim,
            freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=config.eps,
        )  # fmt: skip
    model = model.to_empty(device=device)
    init_random_weights(model, seed=0)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():  # as from_pretrained(torch_dtype=bf16) leaves it
        if not any(k in name for k in keep):
            param.data = param.data.to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def diffusers_sampling(config, shape, device: str, dense_x4: bool) -> dict:
    model = diffusers_transformer(config, device)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=torch.bfloat16)
    times = torch.tensor([988.0, 932.0, 852.0, 608.0], device=device)

    def forward(t=times[:1]):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]

    def four_steps():
        latent = x
        for t in times:
            v = model(hidden_states=latent, timestep=t[None], encoder_hidden_states=context, return_dict=False)[0]
            latent = (latent.float() - (t / 1000) * v.float()).to(torch.bfloat16)
        return latent

    with torch.inference_mode():
        if dense_x4:
            return single_forward_x4(forward, device)
        record = time_call(four_steps, warmup=1, iters=2, device=device)
        record["sampling_s"] = record["median_s"]
        return record


def diffusers_decode(shape, device: str) -> dict:
    from diffusers import AutoencoderKLWan

    from turbo_serve.models.wan_dit import init_random_weights

    vae = AutoencoderKLWan().to(device)
    init_random_weights(vae, seed=0)
    vae = vae.to(torch.bfloat16).eval()
    z = torch.randn(shape, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        record = time_call(lambda: vae.decode(z, return_dict=False)[0], warmup=1, iters=2, device=device)
    record["decode_s"] = record["median_s"]
    return record


def max_frames(stage: DenoiseStage, width: int, height: int, attention: str, candidates: list[int]) -> dict:
    """Largest 4n+1 frame count whose peak memory fits, probed with one DiT block forward per size.

    Blocks run one after another, so the model's peak = all weights + one block's activations: one
    block at each size (weights resident) measures it without a full forward at every size.
    """
    from turbo_kernels.registry import AttentionMetadata, get_attention_backend

    dit = stage.experts[0]
    config = dit.config
    meta = AttentionMetadata(attention, 0.1)
    attend = get_attention_backend(attention)
    fits, probes = None, []
    for frames in candidates:
        grid = ((frames - 1) // 4 + 1, height // 16, width // 16)
        tokens = grid[0] * grid[1] * grid[2]
        try:
            free_memory()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                x = torch.randn(1, tokens, config.dim, device="cuda", dtype=torch.bfloat16)
                e0 = torch.randn(1, 6, config.dim, device="cuda")
                context = torch.randn(1, config.text_len, config.dim, device="cuda", dtype=torch.bfloat16)
                dit.blocks[0](x, e0, context, dit.rope(grid, x.device), attend, meta)
                synchronize("cuda")
            probes.append({"num_frames": frames, "tokens": tokens, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
            fits = frames
        except torch.OutOfMemoryError:
            probes.append({"num_frames": frames, "tokens": tokens, "oom": True})
            break
        finally:
            dit._rope_cache.clear()
    return {"largest_fitting_num_frames": fits, "probes": probes, "method": "one 14B block forward per size, all weights resident"}


def gelu_epilogue_check(device: str) -> dict:
    """The FFN's GEMM + GELU epilogue against the separate ops, in float32 on this device: which GELU
    it computes (Wan's is tanh), and how far the bf16 epilogue lands from the float32 reference."""
    import torch.nn.functional as F

    generator = torch.Generator(device).manual_seed(0)
    x, w, b = (torch.randn(*shape, device=device, generator=generator) for shape in ((4096, 1536), (8960, 1536), (8960,)))
    linear = torch.addmm(b, x, w.t())
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    fused_bf16 = torch._addmm_activation(b.bfloat16(), x.bfloat16(), w.bfloat16().t(), use_gelu=True).float()
    separate_bf16 = F.gelu(torch.addmm(b.bfloat16(), x.bfloat16(), w.bfloat16().t()), approximate="tanh").float()
    reference = F.gelu(linear, approximate="tanh")
    rel = lambda a: float((a - reference).abs().mean() / reference.abs().mean())  # noqa: E731
    return {"fp32_max_abs_vs_tanh": float((fused - reference).abs().max()),
            "fp32_max_abs_vs_erf": float((fused - F.gelu(linear)).abs().max()),
            "bf16_rel_l1_vs_fp32_tanh": {"epilogue": rel(fused_bf16), "separate_ops": rel(separate_bf16)}}  # fmt: skip


def run_case(report: Report, case: str, args, out_dir: Path, device: str) -> None:
    preset_name, width, height = CASES[case] if not args.smoke else ("tiny-t2v", 128, 96)
    frames = 81 if not args.smoke else 9
    preset = get_preset(preset_name)
    latent_shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    dense_x4 = case.startswith("14b") and not args.smoke
    config = PipelineConfig(model=preset_name, device=device, dtype="bfloat16" if device == "cuda" else "float32",
                            tokenizer=str(ensure_tiny_tokenizer(out_dir / "tokenizer")), cache_dir=str(out_dir))  # fmt: skip
    warmup, iters = (0, 1) if args.smoke else (1, 1) if case.startswith("14b") else (1, 2)

    built = {}

    def build() -> dict:
        start = time.perf_counter()
        built["pipeline"] = Pipeline(config)
        return {"build_s": round(time.perf_counter() - start, 1)}

    report.run(f"{case}/build", build)
    pipeline = built.get("pipeline")
    if pipeline is None:
        return
    (text,) = pipeline.text([PROMPT])
    if device == "cuda":
        report.run(f"{case}/gelu_epilogue_check", lambda: gelu_epilogue_check(device))
    sagesla = spec_for(preset_name, width, height, frames, "sagesla")

    def one_forward(attention: str) -> torch.Tensor:
        """One DiT forward at the first timestep (the dense 14B variants time this, x 4)."""
        return pipeline.denoise.experts[0](torch.randn(latent_shape, device=device, dtype=torch.bfloat16),
                                           torch.tensor([988.0], device=device), text[None].to(device, torch.bfloat16),
                                           _meta(attention))  # fmt: skip

    if case.startswith("14b") and not args.smoke:  # the same sampling with the FFN's GELU as separate ops
        report.run(f"{case}/ours/sagesla/sampling_gelu_separate", lambda: separate_gelu(
            pipeline.denoise, lambda: sampling_runs(pipeline.denoise, sagesla, text, warmup, iters)), cost_s=60)
    for attention in ATTENTION:
        spec = spec_for(preset_name, width, height, frames, attention)
        if case.startswith("1.3b") or args.smoke:
            report.run(f"{case}/ours/{attention}/request", lambda: request_runs(pipeline, spec, out_dir, warmup, iters), cost_s=20)
        elif attention == "original":
            report.run(f"{case}/ours/original/sampling", lambda: single_forward_x4(lambda: one_forward("original"), device), cost_s=40)
        else:
            report.run(f"{case}/ours/{attention}/sampling", lambda: sampling_runs(pipeline.denoise, spec, text, warmup, iters), cost_s=60)
    if case.startswith("1.3b") or args.smoke:
        latents = torch.randn(latent_shape[1:])
        report.run(f"{case}/ours/vae_decode", lambda: {**time_call(lambda: pipeline.decode(latents), warmup=1, iters=2, device=device),
                                                       "method": "DecodeStage: VAE decode to uint8 frames on the host, no mp4"}, cost_s=10)  # fmt: skip
        report.run(f"{case}/ours/sagesla/profile_sampling", lambda: kernel_profile(lambda: pipeline.denoise(sagesla, text), device), cost_s=10)
        report.run(f"{case}/ours/profile_vae_decode", lambda: kernel_profile(lambda: pipeline.decode(latents), device), cost_s=10)
    else:
        report.run(f"{case}/ours/sagesla/profile_forward", lambda: kernel_profile(lambda: one_forward("sagesla"), device), cost_s=30)
    if case.startswith("14b") and not args.smoke:
        report.run(f"{case}/ours/sagesla/max_frames", lambda: max_frames(pipeline.denoise, width, height, "sagesla",
                                                                         [161, 241, 321, 401, 481, 561, 641, 721, 801]), cost_s=60)  # fmt: skip
    if case.startswith("14b") or args.smoke:
        del pipeline.denoise
        free_memory()
        quant_stage = {}

        def quant_sampling() -> dict:
            quant_stage["stage"] = DenoiseStage(replace(config, quant_linear=True))
            return sampling_runs(quant_stage["stage"], spec_for(preset_name, width, height, frames, "sagesla", True), text, warmup, iters)

        report.run(f"{case}/ours/sagesla+quant_linear/sampling", quant_sampling, cost_s=60)
        quant_stage.clear()
    del built["pipeline"], pipeline
    free_memory()
    if not args.smoke:
        report.run(f"{case}/diffusers/sampling", lambda: diffusers_sampling(preset.dit, latent_shape, device, dense_x4), cost_s=60)
        if case.startswith("1.3b"):
            report.run(f"{case}/diffusers/vae_decode", lambda: diffusers_decode(latent_shape, device), cost_s=15)


def separate_gelu(stage: DenoiseStage, measure):
    """measure() with the FFN's GELU as separate ops (graphs captured before and after are dropped)."""
    from turbo_serve.models import wan_dit

    stage.drop_graphs()
    wan_dit.GELU_EPILOGUE = False
    try:
        return measure()
    finally:
        wan_dit.GELU_EPILOGUE = True
        stage.drop_graphs()


def _meta(attention: str):
    from turbo_kernels.registry import AttentionMetadata

    return AttentionMetadata(attention, 0.1)


def summarize(report: Report) -> dict:
    results, summary = report.data["results"], {}
    for case, targets in TARGETS.items():
        ours = results.get(f"{case}/ours/sagesla/request") or results.get(f"{case}/ours/sagesla/sampling") or {}
        row = {"sagesla": {k: ours.get("median", {}).get(k) for k in ("text_encode", "denoise", "decode", "request_s")}}
        for name, record in results.items():
            if name.startswith(case) and "sampling_s" in record:
                row.setdefault("sampling_s", {})[name.removeprefix(case + "/")] = round(record["sampling_s"], 3)
        base = results.get(f"{case}/diffusers/sampling", {}).get("sampling_s")
        if base:
            row["speedup_vs_diffusers_sampling"] = {k: round(base / v, 2) for k, v in row.get("sampling_s", {}).items()}
        decode_base = results.get(f"{case}/diffusers/vae_decode", {}).get("decode_s")
        decode = results.get(f"{case}/ours/vae_decode", {}).get("median_s")
        if decode_base and decode:
            row["decode_speedup_vs_diffusers"] = round(decode_base / decode, 2)
        checks = {}
        sampling = ours.get("sampling_s")
        if "sampling_s" in targets and sampling is not None:
            checks["sampling"] = {"target_s": targets["sampling_s"], "measured_s": round(sampling, 3), "pass": sampling <= targets["sampling_s"]}
        measured = {"decode": results.get(f"{case}/ours/vae_decode", {}).get("median_s"), "request_s": ours.get("median", {}).get("request_s")}
        for key, name in (("decode_s", "decode"), ("request_s", "request_s")):
            value = measured[name]
            if key in targets and value is not None:
                checks[name] = {"target_s": targets[key], "measured_s": round(value, 3), "pass": value <= targets[key]}
        row["targets"] = checks
        summary[case] = row
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {', '.join(CASES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--only", default=None, help="regex: run only the variants it matches (e.g. 'build|quant')")
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_h200.json")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --smoke on the CPU")
    report = Report("e2e.py", argv, args.out, args.budget_s, only=args.only)
    with tempfile.TemporaryDirectory() as tmp:
        for case in (["smoke"] if args.smoke else args.cases.split(",")):
            run_case(report, case, args, Path(tmp), device)
    report.data["summary"] = summarize(report)
    report.save()
    for case, row in report.data["summary"].items():
        print(case, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
