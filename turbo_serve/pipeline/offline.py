"""`turbo-serve generate`: the whole pipeline in one process, with a progress bar, writing an mp4."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from turbo_kernels.registry import attention_types
from turbo_serve.models.configs import PRESETS
from turbo_serve.pipeline.resolution import ASPECT_RATIOS, RESOLUTIONS, adaptive_size, resolve_size
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.pipeline.stages import Pipeline, PipelineConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--image", type=Path, help="conditioning image (I2V models)")
    parser.add_argument("--model", default="tiny-t2v", choices=sorted(PRESETS))
    parser.add_argument("--dit-checkpoint", action="append", default=[], help="one per expert (high-noise first)")
    parser.add_argument("--vae-checkpoint")
    parser.add_argument("--text-encoder-checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer folder (required for the real models)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
    parser.add_argument("--resolution", default=None, choices=sorted(RESOLUTIONS), help="default: the model's")
    parser.add_argument("--aspect-ratio", default="16:9", choices=ASPECT_RATIOS)
    parser.add_argument("--size", help="WxH, overrides --resolution/--aspect-ratio")
    parser.add_argument("--adaptive-resolution", action="store_true", help="I2V: keep the area, follow the image's aspect")
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigma-max", type=float)
    parser.add_argument("--attention-type", default="sagesla", choices=attention_types())
    parser.add_argument("--sla-topk", type=float, default=0.1)
    parser.add_argument("--quant-linear", action="store_true")
    parser.add_argument("--boundary", type=float)
    parser.add_argument("--ode", action="store_true")
    parser.add_argument("--sampler", default="rcm", choices=("rcm", "unipc", "euler"))
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))


def _size(args: argparse.Namespace, image: Image.Image | None) -> tuple[int, int]:
    if args.size:
        width, _, height = args.size.lower().partition("x")
        return int(width), int(height)
    resolution = args.resolution or PRESETS[args.model].default_resolution
    if args.adaptive_resolution and image is not None:
        return adaptive_size(resolution, args.aspect_ratio, *image.size)
    return resolve_size(resolution, args.aspect_ratio)


def run(args: argparse.Namespace) -> int:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    image = Image.open(args.image) if args.image else None
    width, height = _size(args, image)
    spec = GenerationSpec(
        prompt=args.prompt,
        model=args.model,
        width=width,
        height=height,
        num_frames=args.num_frames,
        num_steps=args.steps,
        seed=args.seed,
        sigma_max=args.sigma_max,
        attention_type=args.attention_type,
        sla_topk=args.sla_topk,
        quant_linear=args.quant_linear,
        boundary=args.boundary,
        ode=args.ode,
        sampler=args.sampler,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        shift=args.shift,
    )
    config = PipelineConfig(
        model=args.model,
        device=device,
        dtype=dtype,
        dit_checkpoints=tuple(args.dit_checkpoint),
        vae_checkpoint=args.vae_checkpoint,
        text_encoder_checkpoint=args.text_encoder_checkpoint,
        tokenizer=args.tokenizer,
        quant_linear=args.quant_linear,
    )
    print(f"loading {args.model} on {device} ({dtype})")
    pipeline = Pipeline(config)
    with tqdm(total=spec.num_steps, desc=f"denoising {width}x{height}x{spec.num_frames}", unit="step") as bar:
        result = pipeline.generate(spec, image, args.output_dir, on_step=lambda done, total: bar.update(1))
    stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in result.timings.items())
    print(f"wrote {result.path} ({stages})")
    return 0
