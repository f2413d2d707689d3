"""The application builder: settings in, a bound Serve application out.

`serve run turbo_serve.serving.app:build_app models=tiny-t2v`, a config file's `import_path:
turbo_serve.serving.app:build_app` with `args:`, `turbo-serve serve` and the tests all go through
`build_app`, so the graph is defined once. Deployment names are fixed (Ingress, TextEncoder, VAE,
and Denoiser-<model> per served model) because config files override deployments by name.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from turbo_kernels.registry import get_attention_backend
from turbo_serve.pipeline.memory import GIB
from turbo_serve.serving.deployments import VAE, Denoiser, TextEncoder
from turbo_serve.serving.gpu import gpu_snapshot
from turbo_serve.serving.ingress import Ingress
from turbo_serve.settings import Settings, denoiser_name

logger = logging.getLogger("ray.serve")


def check_attention_default(settings: Settings) -> None:
    """Refuse to deploy a default attention backend that is not registered (every request that
    names none would fail), naming the registered ones and why the others did not load."""
    try:
        get_attention_backend(settings.attention_type)
    except ValueError as error:
        raise ValueError(f"settings.attention_type: {error}") from None


def with_denoiser_memory(settings: Settings) -> Settings:
    """Settings whose denoiser_memory_gib is filled from the GPU (NVML) on CUDA when not given: its
    memory times the Denoiser's GPU share, so requests that cannot fit are refused with 422."""
    if settings.denoiser_memory_gib is not None or not settings.device.startswith("cuda"):
        return settings
    gpus = gpu_snapshot()
    share = min(1.0, settings.deployment_options("Denoiser")["ray_actor_options"]["num_gpus"])
    if not gpus["available"] or share <= 0:
        logger.warning("turbo-serve: denoiser_memory_gib unset and no GPU share known here (%s); requests are "
                       "not checked against the Denoiser's memory up front", gpus.get("reason", f"num_gpus {share}"))  # fmt: skip
        return settings
    budget = gpus["devices"][0]["memory_total_bytes"] * share / GIB
    logger.info("turbo-serve: denoiser_memory_gib = %.1f (GPU 0 x num_gpus %.2f)", budget, share)
    return settings.model_copy(update={"denoiser_memory_gib": budget})



def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder (Serve passes the config's `args` dict; env fills the rest)."""
    settings = (args if isinstance(args, Settings) else Settings(**(args or {}))).with_absolute_paths()
    settings = with_denoiser_memory(settings)
    check_attention_default(settings)

    def deployment(cls, name: str):
        options = settings.deployment_options(name)
        logger.info("turbo-serve deployment %s: %s", name, options)
        return serve.deployment(cls, name=name, **options)

    text_encoder = deployment(TextEncoder, "TextEncoder").bind(settings)
    vae = deployment(VAE, "VAE").bind(settings)
    denoisers = {m: deployment(Denoiser, denoiser_name(m)).bind(settings, m) for m in settings.models}
    return deployment(serve.ingress()(Ingress), "Ingress").bind(settings, text_encoder, vae, denoisers)
