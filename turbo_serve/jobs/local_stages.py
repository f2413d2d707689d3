"""The runner's `Stages` with every pipeline stage in this process (no Ray): the API runs on it in
tests and single-process tools, with exactly the code paths the deployments wrap."""

from __future__ import annotations

import asyncio
import threading

from turbo_serve.jobs.record import JobRecord
from turbo_serve.jobs.runner import DenoiseOutput, JobCancelled, reported_denoise
from turbo_serve.jobs.storage import Storage
from turbo_serve.jobs.store import JobStore
from turbo_serve.models.configs import get_preset


class LocalStages:
    def __init__(self, settings, store: JobStore, storage: Storage):
        from turbo_serve.pipeline.stages import DecodeStage, DenoiseStage, ImageEncodeStage, TextEncodeStage

        config = settings.pipeline_config()
        self._store, self._storage = store, storage
        self._text = TextEncodeStage(config)
        self._decode = DecodeStage(config)
        needs_images = any(get_preset(m).task == "i2v" for m in settings.models)
        self._image = ImageEncodeStage(config) if needs_images else None
        self._denoisers = {m: DenoiseStage(settings.pipeline_config(m)) for m in settings.models}
        self._busy = threading.Lock()  # one model call at a time, as one replica per stage would

    async def _run(self, fn, *args, **kwargs):
        def locked():
            with self._busy:
                return fn(*args, **kwargs)

        return await asyncio.to_thread(locked)

    async def encode_text(self, prompt: str):
        return (await self._run(self._text, [prompt]))[0]

    async def encode_image(self, image_key: str, width: int, height: int, num_frames: int):
        from PIL import Image

        def encode():
            with Image.open(self._storage.path(image_key)) as image:
                return self._image(image.convert("RGB"), width, height, num_frames)

        return await self._run(encode)

    async def denoise(self, job: JobRecord, text, negative_text, condition) -> DenoiseOutput:
        from turbo_serve.pipeline.stages import GenerationCancelled

        try:
            return await self._run(reported_denoise, self._store, job.id, job.owner, self._denoisers[job.spec.model],
                                   job.spec, text, negative_text, condition)  # fmt: skip
        except GenerationCancelled as error:
            raise JobCancelled(str(error)) from None

    async def decode(self, latents, key: str, fps: int) -> None:
        await self._run(self._storage.write_via, key, lambda path: self._decode.write_mp4(latents, path, fps))
