"""The generation stages as plain Python: text -> latents -> video, tensor in, tensor out.

Each stage loads its own model from one `PipelineConfig`, so a Ray replica builds exactly the
stage it serves and the offline `Pipeline` builds all of them in one process. Stages return CPU
tensors: that is what crosses deployments through Ray's object store.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from PIL import Image

from turbo_kernels.registry import AttentionMetadata, get_attention_backend
from turbo_serve.models.configs import ModelPreset, get_preset
from turbo_serve.models.loading import load_dit
from turbo_serve.models.loading_vae_text import load_text_encoder, load_vae
from turbo_serve.models.tokenizer import ensure_tiny_tokenizer
from turbo_serve.models.umt5 import pad_text_states
from turbo_serve.pipeline.cuda_graphs import GraphedForward
from turbo_serve.pipeline.memory import OutOfMemory, estimate_denoise_memory, lowering_advice
from turbo_serve.pipeline.resolution import check_num_frames, check_size, latent_frames
from turbo_serve.pipeline.spec import GenerationSpec, output_name
from turbo_serve.pipeline.video import Mp4Writer, to_uint8_frames
from turbo_serve.sampling import flow, rcm
from turbo_serve.sampling.base import Cancelled

GenerationCancelled = Cancelled
T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PipelineConfig:
    """Which model to load, where, and in what precision."""

    model: str = "tiny-t2v"
    device: str = "cpu"
    dtype: str = "float32"
    dit_checkpoints: tuple[str, ...] = ()
    """One path per expert (high-noise first for Wan2.2 A14B); empty = seeded random weights."""
    vae_checkpoint: str | None = None
    text_encoder_checkpoint: str | None = None
    tokenizer: str | None = None
    """Tokenizer folder; None builds the tiny tokenizer (tiny presets only)."""
    quant_linear: bool = False
    """Load the DiT's block linears as W8A8 int8 (TurboDiffusion's -quant checkpoints)."""
    cuda_graphs: bool = True
    """Replay each DiT forward as a CUDA graph (CUDA only; captured on the first request of a shape)."""
    cache_dir: str = ".turbo_serve"

    @property
    def preset(self) -> ModelPreset:
        return get_preset(self.model)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return _DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}") from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    """Hand what a failed call left behind back: unreachable tensors to the caching allocator (gc),
    and its cached blocks to the driver, for the other replicas sharing the GPU (empty_cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def raise_out_of_memory_clean(call: Callable[[], T], device: torch.device, describe: Callable[[str], str],
                              release: Callable[[], None] | None = None) -> T:  # fmt: skip
    """call(), or OutOfMemory(describe(torch's first line)) once its memory is freed. The memory is
    freed after the except block: inside it, the traceback still holds the frames, and with them
    the activations, of the call that failed."""
    try:
        return call()
    except torch.OutOfMemoryError as error:
        detail = str(error).split("\n", 1)[0]
    if release is not None:
        release()
    free_device_memory(device)
    raise OutOfMemory(describe(detail))


class TextEncodeStage:
    """UMT5: prompts -> [tokens, text_dim] states, one per prompt, without the zero padding
    (a few KB instead of text_len rows to ship between replicas; the denoise stage pads)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        tokenizer = config.tokenizer
        if tokenizer is None and config.preset.tiny:
            tokenizer = ensure_tiny_tokenizer(config.cache_dir)
        self.encoder = load_text_encoder(
            config.text_encoder_checkpoint,
            config.preset.text_encoder,
            tokenizer=tokenizer,
            device=config.torch_device,
            dtype=config.torch_dtype,
        )

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> list[torch.Tensor]:
        return [states.cpu() for states in self.encoder.encode_tokens(prompts)]


class ImageEncodeStage:
    """I2V condition: the image resized to the output size, VAE-encoded with gray frames + the mask."""

    def __init__(self, config: PipelineConfig, vae: torch.nn.Module | None = None) -> None:
        self.config = config
        self.vae = vae or _load_vae(config)

    @torch.inference_mode()
    def __call__(self, image: Image.Image, width: int, height: int, num_frames: int) -> torch.Tensor:
        check_size(width, height)
        check_num_frames(num_frames)
        resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(height, width, 3)
        pixels = pixels.permute(2, 0, 1).to(self.config.torch_device, self.config.torch_dtype) / 127.5 - 1.0
        return self.vae.encode_condition(pixels, num_frames).float().cpu()


def _load_vae(config: PipelineConfig) -> torch.nn.Module:
    vae = load_vae(config.vae_checkpoint, config.preset.vae, device=config.torch_device, dtype=config.torch_dtype)
    if config.torch_device.type == "cuda":
        # cuDNN's 3-D convolutions are fastest channels-last (480p decode 1.51 s -> 1.15 s on an H200).
        torch.backends.cudnn.benchmark = True
        vae.to_channels_last()
    return vae


class DenoiseStage:
    """The DiT (both experts for Wan2.2 A14B) and the samplers around it."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        preset = config.preset
        sources: tuple[str | None, ...] = config.dit_checkpoints or (None,) * preset.num_experts
        if len(sources) != preset.num_experts:
            raise ValueError(f"{preset.name} needs {preset.num_experts} DiT checkpoints, got {len(sources)}")
        self.experts = [
            load_dit(
                source,
                preset.dit,
                device=config.torch_device,
                dtype=config.torch_dtype,
                quant_linear=config.quant_linear,
                seed=index,
            )
            for index, source in enumerate(sources)
        ]
        self._forwards = [GraphedForward(e) if config.cuda_graphs else e for e in self.experts]

    def validate(self, spec: GenerationSpec, has_condition: bool) -> None:
        """Raise ValueError for a spec this model cannot run (the API checks the same rules earlier)."""
        preset = self.config.preset
        check_size(spec.width, spec.height)
        check_num_frames(spec.num_frames)
        if spec.num_frames > preset.max_num_frames:
            raise ValueError(f"num_frames must be <= {preset.max_num_frames} for {preset.name}, got {spec.num_frames}")
        if (preset.task == "i2v") != has_condition:
            raise ValueError(f"{preset.name} is a {preset.task} model: the image condition must be {'given' if preset.task == 'i2v' else 'absent'}")
        if spec.quant_linear != self.config.quant_linear:
            raise ValueError(
                f"quant_linear={spec.quant_linear} but this denoiser holds {'int8' if self.config.quant_linear else 'bf16/fp32'} weights"
            )
        AttentionMetadata(spec.attention_type, spec.sla_topk)
        get_attention_backend(spec.attention_type)

    def __call__(
        self,
        spec: GenerationSpec,
        text: torch.Tensor,
        *,
        negative_text: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Final latents [16, T, h, w] on the CPU, in the model dtype: what the VAE decodes in, and
        half the bytes of float32 to ship to a VAE replica. Out of device memory: OutOfMemory saying
        what to lower, raised once the memory (captured graphs included) is released, so the next
        request runs on a clean device."""
        config = self.config

        def describe(detail: str) -> str:
            guided = spec.sampler != "rcm" and negative_text is not None
            estimate = estimate_denoise_memory(spec.model, spec.width, spec.height, spec.num_frames,
                                               dtype=config.dtype, quant_linear=config.quant_linear, guided=guided)  # fmt: skip
            return (f"out of device memory denoising {spec.width}x{spec.height} with {spec.num_frames} frames "
                    f"(estimated {estimate.describe()}): "
                    f"{lowering_advice(quant_linear=config.quant_linear, guided=guided)} [{detail}]")  # fmt: skip

        return raise_out_of_memory_clean(
            lambda: self._sample(spec, text, negative_text, condition, on_step, should_stop),
            config.torch_device, describe, release=self.drop_graphs,
        )  # fmt: skip

    def drop_graphs(self) -> None:
        """Release the captured CUDA graphs (and their memory); the next forward captures anew."""
        for forward in self._forwards:
            if isinstance(forward, GraphedForward):
                forward.clear()

    @torch.inference_mode()
    def _sample(self, spec, text, negative_text, condition, on_step, should_stop) -> torch.Tensor:
        self.validate(spec, condition is not None)
        preset, device, dtype = self.config.preset, self.config.torch_device, self.config.torch_dtype
        attention = AttentionMetadata(spec.attention_type, spec.sla_topk)
        shape = (1, preset.dit.out_dim, latent_frames(spec.num_frames), spec.height // 8, spec.width // 8)
        guided = spec.sampler != "rcm" and negative_text is not None and spec.guidance_scale != 1.0
        context = torch.stack([pad_text_states(t, preset.dit.text_len) for t in ([text, negative_text] if guided else [text])])
        context = context.to(device, dtype)
        cond = None if condition is None else condition[None].to(device, dtype)
        boundary = spec.boundary if spec.boundary is not None else preset.default_boundary

        def velocity(x: torch.Tensor, timestep: float, s: float) -> torch.Tensor:
            expert = self._forwards[0] if len(self._forwards) == 1 or s >= boundary else self._forwards[1]
            inputs = x.to(dtype)
            if cond is not None:
                inputs = torch.cat([inputs, cond], dim=1)
            inputs = inputs.expand(context.shape[0], *inputs.shape[1:])
            t = torch.full((context.shape[0],), timestep, device=device, dtype=torch.float32)
            v = expert(inputs, t, context, attention).float()
            if guided:
                v = v[1:] + spec.guidance_scale * (v[:1] - v[1:])
            return v

        common = dict(seed=spec.seed, device=device, on_step=on_step, should_stop=should_stop)
        if spec.sampler == "rcm":
            sigma_max = spec.sigma_max if spec.sigma_max is not None else preset.default_sigma_max
            latents = rcm.sample(velocity, shape, num_steps=spec.num_steps, sigma_max=sigma_max, ode=spec.ode, **common)
        elif spec.sampler == "unipc":
            latents = flow.sample_unipc(velocity, shape, num_steps=spec.num_steps, shift=spec.shift, **common)
        elif spec.sampler == "euler":
            latents = flow.sample_euler(velocity, shape, num_steps=spec.num_steps, shift=spec.shift, **common)
        else:
            raise ValueError(f"sampler must be rcm, unipc or euler, got {spec.sampler!r}")
        return latents[0].to(dtype).cpu()


class DecodeStage:
    """The VAE decoder and the mp4 encoder, streaming one latent frame at a time."""

    def __init__(self, config: PipelineConfig, vae: torch.nn.Module | None = None) -> None:
        self.config = config
        self.vae = vae or _load_vae(config)

    def _frames(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        z = latents[None].to(self.config.torch_device, self.config.torch_dtype)
        for chunk in self.vae.iter_decode(z):
            yield to_uint8_frames(chunk[0]).cpu()

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 frames [F, H, W, 3]."""
        return raise_out_of_memory_clean(lambda: torch.cat(list(self._frames(latents))),
                                         self.config.torch_device, self._describe_oom(latents))  # fmt: skip

    @torch.inference_mode()
    def write_mp4(self, latents: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
        height, width = latents.shape[-2] * 8, latents.shape[-1] * 8

        def write() -> Path:
            with Mp4Writer(path, width=width, height=height, fps=fps) as writer:
                for frames in self._frames(latents):
                    writer.write(frames)
            return Path(path)

        return raise_out_of_memory_clean(write, self.config.torch_device, self._describe_oom(latents))

    @staticmethod
    def _describe_oom(latents: torch.Tensor) -> Callable[[str], str]:
        # The decoder streams one latent frame at a time: only the frame size matters.
        size = f"{latents.shape[-1] * 8}x{latents.shape[-2] * 8}"
        return lambda detail: f"out of device memory decoding {size} frames: lower the resolution (size) [{detail}]"


@dataclass
class GenerationResult:
    path: Path
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: text_encode, image_encode (I2V), denoise, decode (decode + mp4)."""


class Pipeline:
    """Every stage in one process: the CLI, benchmarks and tests use it; serving splits it."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.text = TextEncodeStage(config)
        self.denoise = DenoiseStage(config)
        vae = _load_vae(config)
        self.decode = DecodeStage(config, vae)
        self.image = ImageEncodeStage(config, vae) if config.preset.task == "i2v" else None

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        synchronize(self.config.torch_device)
        start = time.perf_counter()
        yield
        synchronize(self.config.torch_device)
        timings[stage] = time.perf_counter() - start

    def generate(
        self,
        spec: GenerationSpec,
        image: Image.Image | None,
        out_dir: str | Path,
        *,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        timings: dict[str, float] = {}
        preset = self.config.preset
        if (preset.task == "i2v") != (image is not None):
            raise ValueError(f"{preset.name} is a {preset.task} model: an input image is {'required' if preset.task == 'i2v' else 'not accepted'}")
        with self._timed(timings, "text_encode"):
            prompts = [spec.prompt] + ([spec.negative_prompt] if spec.sampler != "rcm" else [])
            text, *negative = self.text(prompts)
        condition = None
        if image is not None:
            with self._timed(timings, "image_encode"):
                condition = self.image(image, spec.width, spec.height, spec.num_frames)
        with self._timed(timings, "denoise"):
            latents = self.denoise(
                spec, text, negative_text=negative[0] if negative else None, condition=condition, on_step=on_step
            )
        path = Path(out_dir) / output_name(preset.task, spec)
        with self._timed(timings, "decode"):
            self.decode.write_mp4(latents, path, fps=spec.fps)
        return GenerationResult(path, timings)
