"""One denoise step (one DiT forward) of the real-size Wan DiTs: ours against diffusers.

Random weights (initialised on the GPU: meta -> to_empty -> normal_ in place), bf16, batch 1,
attention "original" (SDPA) for ours and diffusers' default attention for WanTransformer3DModel of
the same config. 1.3B at 480p (latent 16x21x60x104, 32,760 tokens) and 14B at 720p (16x21x90x160,
75,600 tokens). CUDA-synchronised wall time per forward, warm-up excluded, median of the timed
calls; peak memory per variant; models freed between variants. Every variant runs in its own
try/except, the JSON is rewritten after each one, and variants past the time budget are skipped.

    python bench/dit_step.py --models 1.3b,14b [--compile]     # GPU, writes bench/results/dit_step_h200.json
    python bench/dit_step.py --smoke --out /tmp/dit_step.json   # tiny config on the CPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("turbo_kernels") is None:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
    _spec = importlib.util.spec_from_file_location(
        "turbo_kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
    )
    sys.modules["turbo_kernels"] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)

from turbo_serve.models.configs import WanDiTConfig, get_preset  # noqa: E402
from turbo_serve.models.loading import load_dit  # noqa: E402
from turbo_serve.models.wan_dit import init_random_weights  # noqa: E402

MODELS = {
    "1.3b": ("wan2.1-t2v-1.3b", (16, 21, 60, 104)),
    "14b": ("wan2.1-t2v-14b", (16, 21, 90, 160)),
}
SMOKE_MODEL = ("tiny-t2v", (16, 3, 8, 12))
DEFAULT_OUT = REPO / "bench" / "results" / "dit_step_h200.json"


def diffusers_kwargs(config: WanDiTConfig) -> dict:
    return dict(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_dim,
        out_channels=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=config.eps,
        rope_max_seq_len=config.rope_max_positions,
    )


def build_ours(config: WanDiTConfig, device: str, dtype: torch.dtype, compile_blocks: bool):
    dit = load_dit(None, config, device=device, dtype=dtype, seed=0)
    if compile_blocks:
        for block in dit.blocks:
            block.compile(dynamic=False)
    return lambda x, t, context: dit(x, t, context), dit


def build_diffusers(config: WanDiTConfig, device: str, dtype: torch.dtype):
    """diffusers' model as from_pretrained(torch_dtype=dtype) leaves it: _keep_in_fp32_modules stay fp32."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_kwargs(config))
    keep = set(model._keep_in_fp32_modules or ())
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    model.to_empty(device=device)
    init_random_weights(model, seed=0)
    # The RoPE tables are non-persistent buffers computed in __init__: rebuild them for real.
    model.rope = WanRotaryPosEmbed(config.head_dim, config.patch_size, config.rope_max_positions).to(device)
    model.eval().requires_grad_(False)
    return lambda x, t, context: model(x, t, context, return_dict=False)[0], model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(forward, inputs, device: str, warmup: int, iters: int) -> dict:
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(warmup):
            out = forward(*inputs)
            del out
        synchronize(device)
        warmup_s = time.perf_counter() - start  # includes torch.compile for the compiled variant
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            out = forward(*inputs)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
        stats = {"finite": bool(torch.isfinite(out).all()), "output_std": float(out.float().std())}
    return {
        "median_ms": statistics.median(times),
        "times_ms": [round(t, 2) for t in times],
        "warmup_s": round(warmup_s, 2),
        **stats,
    }


def sdpa_choice(config: WanDiTConfig, tokens: int, device: str, dtype: torch.dtype) -> dict:
    """Which fused SDPA kernel PyTorch picks for our self-attention layout vs a contiguous one."""
    from torch.nn.attention import SDPBackend

    heads, head_dim = config.num_heads, config.head_dim
    q = torch.empty(1, tokens, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    qkv = torch.empty(1, tokens, 3, heads, head_dim, device=device, dtype=dtype)
    v_view = qkv[:, :, 2].transpose(1, 2)  # ours: v is a strided view of the fused qkv output
    return {
        "ours_layout": SDPBackend(torch._fused_sdp_choice(q, q, v_view)).name,
        "contiguous_bhld": SDPBackend(torch._fused_sdp_choice(q, q, q.contiguous())).name,
    }


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_variant(name: str, build, inputs, device: str, args) -> dict:
    free(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    forward, model = build()
    result = {"build_s": round(time.perf_counter() - start, 2)}
    result["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    result.update(measure(forward, inputs, device, args.warmup, args.iters))
    if device.startswith("cuda"):
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del forward, model
    free(device)
    return result


def environment(device: str, argv: list[str]) -> dict:
    import diffusers

    env = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", str(Path(__file__).resolve().relative_to(REPO)), *argv]),
    }
    if device.startswith("cuda"):
        env["sdpa_enabled"] = {
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        }
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.3b,14b", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--compile", action="store_true", help="also time ours with every block torch.compile'd")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU (tests the script)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip variants that start after this")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(REPO)})")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    if args.smoke:
        device, dtype, models = "cpu", torch.bfloat16, {"tiny": SMOKE_MODEL}
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --smoke for the CPU check")
        unknown = set(args.models.split(",")) - set(MODELS)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; valid: {', '.join(MODELS)}")
        device, dtype, models = "cuda", torch.bfloat16, {m: MODELS[m] for m in args.models.split(",")}
    out_path = args.out or DEFAULT_OUT
    report = {**environment(device, argv), "dtype": str(dtype), "warmup": args.warmup, "iters": args.iters}
    report["models"] = {}
    started = time.perf_counter()

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    for key, (preset, latent) in models.items():
        config = get_preset(preset).dit
        if args.smoke:
            config = replace(config, num_layers=2)
        channels, frames, height, width = latent
        tokens = frames * (height // 2) * (width // 2)
        generator = torch.Generator(device=device).manual_seed(0)
        inputs = (
            torch.randn(1, channels, frames, height, width, generator=generator, device=device, dtype=dtype),
            torch.tensor([900.0], device=device),
            torch.randn(1, config.text_len, config.text_dim, generator=generator, device=device, dtype=dtype),
        )
        entry = report["models"][key] = {"preset": preset, "config": asdict(config), "latent": list(latent),
                                         "tokens": tokens, "variants": {}}  # fmt: skip
        if device.startswith("cuda"):
            try:
                entry["sdpa_choice"] = sdpa_choice(config, tokens, device, dtype)
            except Exception as error:  # diagnostics only
                entry["sdpa_choice"] = {"error": repr(error)}
        variants = {
            "ours": partial(build_ours, config, device, dtype, compile_blocks=False),
            "diffusers": partial(build_diffusers, config, device, dtype),
        }
        if args.compile:
            variants["ours_compiled"] = partial(build_ours, config, device, dtype, compile_blocks=True)
        for name, build in variants.items():
            if time.perf_counter() - started > args.budget_s:
                entry["variants"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
                continue
            print(f"[{key}] {name} ...", flush=True)
            try:
                entry["variants"][name] = run_variant(name, build, inputs, device, args)
            except Exception as error:
                entry["variants"][name] = {"error": repr(error), "traceback": traceback.format_exc(limit=6)}
                free(device)
            summarize(entry)
            save()
        del inputs
        free(device)

    report["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print_table(report)
    print(f"wrote {out_path}")
    return report


def summarize(entry: dict) -> None:
    """ours / diffusers per our variant; pass = plain eager ours is not slower than diffusers."""
    variants = entry["variants"]
    reference = variants.get("diffusers", {}).get("median_ms")
    for name in ("ours", "ours_compiled"):
        ours = variants.get(name, {}).get("median_ms")
        if ours is not None and reference is not None:
            variants[name]["ratio_vs_diffusers"] = round(ours / reference, 4)
    ratio = variants.get("ours", {}).get("ratio_vs_diffusers")
    entry["ratio"] = ratio
    entry["pass"] = None if ratio is None else ratio <= 1.0


def print_table(report: dict) -> None:
    print(f"\n{report['device']}  torch {report['torch']}  diffusers {report['diffusers']}  {report['dtype']}")
    print(f"{'model':<6} {'tokens':>7} {'variant':<14} {'median ms':>10} {'peak GiB':>9} {'ratio':>7}")
    for key, entry in report["models"].items():
        for name, result in entry["variants"].items():
            median = result.get("median_ms")
            shown = f"{median:10.1f}" if median is not None else f"{'-':>10}"
            peak = result.get("peak_gib", float("nan"))
            ratio = result.get("ratio_vs_diffusers")
            ratio_text = f"{ratio:7.3f}" if ratio is not None else f"{'':>7}"
            note = "" if median is not None else "  " + (result.get("error") or result.get("skipped", ""))[:80]
            print(f"{key:<6} {entry['tokens']:>7} {name:<14} {shown} {peak:9.2f} {ratio_text}{note}")
        if entry.get("pass") is not None:
            print(f"{key:<6} pass (ours <= diffusers): {entry['pass']}")
    print(f"total {report.get('total_s', math.nan)} s")


if __name__ == "__main__":
    main()
