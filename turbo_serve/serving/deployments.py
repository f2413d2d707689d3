"""The four deployments, thin shims around the pipeline stages (plain classes: the app builder
applies `serve.deployment` with options from the settings, so the classes run without Serve too).

Each model replica builds its stage in `__init__`, which is the first place CUDA is touched (Ray has
set CUDA_VISIBLE_DEVICES by then). Heavy calls run in a worker thread (`asyncio.to_thread`) so the
replica's event loop keeps answering health checks; tensors cross deployments as CPU tensors.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any

from ray import serve

from turbo_serve.jobs.runner import DenoiseOutput, reported_denoise
from turbo_serve.jobs.storage import Storage
from turbo_serve.jobs.store import open_store
from turbo_serve.metrics import ServingMetrics
from turbo_serve.metrics.gpu_fleet import report_replica_gpus
from turbo_serve.models.configs import get_preset
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.serving.gpu import gpu_exporter_settings
from turbo_serve.settings import Settings


def check_device(device: str) -> None:
    """Serve's health check of a model replica: the device still answers. cudaMemGetInfo does not
    wait for running kernels, and raises once the CUDA context is broken (e.g. after an illegal
    memory access), which is when the replica must be replaced."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.mem_get_info()


class TextEncoder:
    """UMT5: batches concurrent prompts (serve.batch) and caches the embeddings of repeated ones."""

    def __init__(self, settings: Settings):
        from turbo_serve.pipeline.stages import TextEncodeStage

        self._device = settings.device
        self._stage = TextEncodeStage(settings.pipeline_config())
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}
        self._cache_size = settings.text_cache_size
        self.hits = self.misses = 0
        self._metrics, self._model = ServingMetrics(), settings.default_model
        report_replica_gpus(gpu_exporter_settings(settings))

    async def encode(self, prompt: str):
        """[tokens, text_dim] CPU tensor of one prompt. A prompt already being encoded for
        another request is waited for, not encoded twice."""
        cached = self._cache.get(prompt)
        if cached is not None:
            self._cache.move_to_end(prompt)
            self.hits += 1
            self._metrics.count_text_cache(True, self._model)
            return cached
        pending = self._pending.get(prompt)
        if pending is not None:
            self.hits += 1
            self._metrics.count_text_cache(True, self._model)
            return await asyncio.shield(pending)
        self.misses += 1
        self._metrics.count_text_cache(False, self._model)
        task = asyncio.ensure_future(self._encode_batch(prompt))
        self._pending[prompt] = task
        try:
            embedding = await asyncio.shield(task)  # a cancelled caller leaves the others their result
        finally:
            self._pending.pop(prompt, None)
        if self._cache_size:
            self._cache[prompt] = embedding
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return embedding

    # A lone prompt waits at most 3 ms for others to batch with (its encode takes ~45 ms on an H200).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.003)
    async def _encode_batch(self, prompts: list[str]) -> list[Any]:
        unique = list(dict.fromkeys(prompts))
        embeddings = dict(zip(unique, await asyncio.to_thread(self._stage, unique)))
        return [embeddings[p] for p in prompts]

    def cache_stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache)}

    def check_health(self) -> None:
        check_device(self._device)


class Denoiser:
    """The DiT of one model (both experts of a two-expert I2V model live in this replica)."""

    def __init__(self, settings: Settings, model: str):
        from turbo_serve.pipeline.stages import DenoiseStage

        self.model = model
        self._device = settings.device
        self._health_timeout_s = settings.denoiser_settings(model).health_check_timeout_s
        parallel = settings.parallel_config(model)
        self._group = None
        if parallel.world_size > 1:  # this replica is rank 0 of a group spanning its placement group
            from turbo_serve.serving.parallel_denoiser import ParallelDenoiser

            resources = settings.denoiser_rank_resources(model)
            self._group = ParallelDenoiser(settings.pipeline_config(model), parallel, resources)
        self._stage = self._group or DenoiseStage(settings.pipeline_config(model))
        self._store = open_store(settings.resolved_job_store_url)
        # One generation at a time: a cancelled request's thread finishes its step before the next starts.
        self._busy = threading.Lock()
        report_replica_gpus(gpu_exporter_settings(settings))

    async def denoise(self, job_id: str, owner: str, spec: GenerationSpec, text, negative_text, condition) -> DenoiseOutput:
        """Latents of the job; progress goes to the job store after every step, and the loop stops
        (GenerationCancelled) once the job is cancelled or its owner lost it."""

        def run() -> DenoiseOutput:
            with self._busy:
                return reported_denoise(self._store, job_id, owner, self._stage, spec, text, negative_text, condition)

        return await asyncio.to_thread(run)

    def check_health(self) -> None:
        check_device(self._device)
        if self._group is not None:  # a multi-GPU replica: its workers and group too
            self._group.check_health(self._health_timeout_s / 2)


class VAE:
    """Decode + mp4 into the storage folder (returns nothing but the file), and I2V image encode."""

    def __init__(self, settings: Settings):
        from turbo_serve.pipeline.stages import DecodeStage, ImageEncodeStage

        config = settings.pipeline_config()
        self._device = settings.device
        self._decoder = DecodeStage(config)
        needs_images = any(get_preset(m).task == "i2v" for m in settings.models)
        self._image_encoder = ImageEncodeStage(config) if needs_images else None
        self._storage = Storage(settings.storage_dir)
        report_replica_gpus(gpu_exporter_settings(settings))

    async def encode_image(self, image_key: str, width: int, height: int, num_frames: int):
        """The I2V condition [20, T, H/8, W/8] of the stored image."""
        from PIL import Image

        if self._image_encoder is None:
            raise ValueError("no image-to-video model is served, so the VAE has no image encoder")
        path = self._storage.path(image_key)

        def run():
            with Image.open(path) as image:
                return self._image_encoder(image.convert("RGB"), width, height, num_frames)

        return await asyncio.to_thread(run)

    async def decode(self, latents, key: str, fps: int) -> None:
        """Decode the latents to an mp4 published at storage key `key` (never a partial file)."""
        await asyncio.to_thread(self._storage.write_via, key, lambda path: self._decoder.write_mp4(latents, path, fps))

    def check_health(self) -> None:
        check_device(self._device)
