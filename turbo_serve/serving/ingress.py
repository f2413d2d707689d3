"""The Ingress deployment: the FastAPI app of turbo_serve.api plus this replica's job runner, which
drives jobs through the model deployments by DeploymentHandle.

serving is the composition root: it builds the HTTP app from turbo_serve.api (which never imports
Ray) and hands it the Ray-backed pieces, the stage handles and the cluster status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from turbo_serve.api.app import ApiContext, create_app
from turbo_serve.jobs.record import JobRecord
from turbo_serve.jobs.runner import DenoiseOutput, JobCancelled, JobRunner, WorkerLost
from turbo_serve.jobs.storage import Storage
from turbo_serve.jobs.store import open_store
from turbo_serve.metrics import ServingMetrics
from turbo_serve.metrics.gpu_fleet import ensure_gpu_exporters
from turbo_serve.metrics.job_metrics import JobMetrics, report_job_states
from turbo_serve.serving.gpu import gpu_exporter_settings, gpu_snapshot
from turbo_serve.settings import Settings

logger = logging.getLogger("ray.serve")

_LOST = (RayActorError, DeploymentUnavailableError)
"""Replica death or unreachability (ActorDiedError, ActorUnavailableError are RayActorErrors)."""


class HandleStages:
    """The runner's `Stages`, backed by the TextEncoder, VAE and per-model Denoiser deployments."""

    def __init__(self, text_encoder, vae, denoisers: dict[str, Any]):
        self._text_encoder, self._vae, self._denoisers = text_encoder, vae, denoisers

    @staticmethod
    async def _call(deployment: str, response):
        from turbo_serve.pipeline.stages import GenerationCancelled

        try:
            return await response
        except GenerationCancelled as error:  # Ray re-raises the replica's exception type
            raise JobCancelled(str(error)) from None
        except _LOST as error:
            raise WorkerLost(f"the {deployment} replica died or became unreachable ({type(error).__name__})") from None

    async def encode_text(self, prompt: str):
        return await self._call("TextEncoder", self._text_encoder.encode.remote(prompt))

    async def encode_image(self, image_key: str, width: int, height: int, num_frames: int):
        return await self._call("VAE", self._vae.encode_image.remote(image_key, width, height, num_frames))

    async def denoise(self, job: JobRecord, text, negative_text, condition) -> DenoiseOutput:
        handle = self._denoisers[job.spec.model]
        return await self._call(
            "Denoiser", handle.denoise.remote(job.id, job.owner, job.spec, text, negative_text, condition)
        )

    async def decode(self, latents, key: str, fps: int) -> None:
        await self._call("VAE", self._vae.decode.remote(latents, key, fps))


class ClusterStatus:
    """Replicas per deployment (from the Serve controller) and GPU state, cached for a second so a
    page polling /v1/status does not load the controller."""

    def __init__(self, ttl_s: float = 1.0):
        self._ttl_s = ttl_s
        self._cached: tuple[float, dict[str, Any]] | None = None

    def _read(self) -> dict[str, Any]:
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications.get(app_name)
        deployments = {}
        if app is not None:
            for name, deployment in app.deployments.items():
                deployments[name] = {
                    "status": str(deployment.status.value if hasattr(deployment.status, "value") else deployment.status),
                    "replicas": {str(getattr(k, "value", k)): n for k, n in deployment.replica_states.items()},
                }
        resources = ray.cluster_resources()
        return {
            "application": app_name,
            "deployments": deployments,
            "gpus": gpu_snapshot(),
            "ray": {"cpus": resources.get("CPU", 0.0), "gpus": resources.get("GPU", 0.0)},
        }

    async def __call__(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self._ttl_s:
            self._cached = (now, await asyncio.to_thread(self._read))
        return self._cached[1]


class Ingress:
    """HTTP front door and job runner (`serve.ingress()` late-binds the app built below)."""

    async def __init__(self, settings: Settings, text_encoder, vae, denoisers: dict[str, Any]):
        store = open_store(settings.resolved_job_store_url)
        storage = Storage(settings.storage_dir)
        metrics = ServingMetrics()
        runner = JobRunner.from_settings(
            settings, store, HandleStages(text_encoder, vae, denoisers), storage, observer=JobMetrics(metrics)
        )
        # Leave Serve's force-kill deadline some room to re-queue what did not finish.
        grace = max(0.0, settings.deployments["Ingress"].graceful_shutdown_timeout_s - 10.0)
        self._context = ApiContext(
            settings, store, storage, runner, ClusterStatus(), shutdown_grace_s=grace, metrics=metrics
        )
        loop = asyncio.get_running_loop()
        self._metric_tasks = [
            loop.create_task(report_job_states(store, metrics)),
            loop.create_task(_start_gpu_exporters(settings)),
        ]

    def __serve_build_asgi_app__(self):
        return create_app(self._context)

    def check_health(self) -> None:
        if self._context.runner.failed():
            raise RuntimeError("the job runner loop stopped")


async def _start_gpu_exporters(settings: Settings) -> None:
    """One GPU exporter per node, started from the app itself so `serve run` and `serve deploy`
    get them too; idempotent across Ingress replicas. GPU metrics are not worth failing for."""
    try:
        sd_file, targets = await asyncio.to_thread(ensure_gpu_exporters, gpu_exporter_settings(settings))
        logger.info("GPU exporters %s, listed for Prometheus in %s", sorted(targets.values()), sd_file)
    except Exception:
        logger.exception("GPU exporters did not start; turbo_gpu_* metrics are missing, serving goes on")
