"""The one settings object of the service.

Read from the environment (prefix ``TURBO_SERVE_``, nested fields with ``__``, e.g.
``TURBO_SERVE_DEPLOYMENTS__DENOISER__NUM_GPUS=1``) and overridden by keyword arguments, which is how
a Serve config file's application ``args`` reach it (see turbo_serve.serving.app.build_app).
Everything a replica needs travels as this object, so replicas never read a config of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from turbo_serve.models.configs import get_preset


class Checkpoints(BaseModel):
    """Weights of one model; empty fields mean seeded random weights (tiny presets, benchmarks)."""

    model_config = ConfigDict(extra="forbid")

    dit: list[str] = []
    """One safetensors file per expert (two for Wan2.2 A14B I2V)."""
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    """Tokenizer folder; None builds the tiny tokenizer (tiny presets only)."""


class Autoscaling(BaseModel):
    """Serve's autoscaling_config for one deployment (see Ray's AutoscalingConfig)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(1.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(2.0, gt=0)
    look_back_period_s: float = Field(10.0, gt=0)


class DeploymentSettings(BaseModel):
    """Code-level defaults of one deployment. A Serve config file's `deployments:` entry of the
    same name overrides them (config file > code, Serve's own priority rule)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(0.25, ge=0)
    """Logical CPUs reserved per replica; fractional so all four deployments fit on 2 cores."""
    num_gpus: float | None = Field(None, ge=0)
    """Logical GPUs per replica; fractions share one GPU (no memory isolation). None: by device
    (none on the CPU; on CUDA a whole GPU per Denoiser, half a GPU for the TextEncoder and VAE)."""
    max_ongoing_requests: int = Field(4, ge=1)
    autoscaling: Autoscaling | None = None
    """None: a fixed single replica."""
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(60.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0)
    """How long Serve lets in-flight requests finish before it kills a stopping replica."""
    sequence_parallel: int = Field(1, ge=1)
    """Denoiser only: GPUs (ranks) sharing each DiT forward's tokens (Ulysses); must divide the
    model's head count (12 for 1.3B: 1, 2, 3, 4, 6, 12; 40 for 14B: 1, 2, 4, 5, 8, 10)."""
    cfg_parallel: bool = False
    """Denoiser only: run the teacher sampler's two guidance branches on two ranks (doubles the ranks)."""

    @property
    def ranks(self) -> int:
        """Processes (and GPUs, with num_gpus 1) one replica spans."""
        return self.sequence_parallel * (2 if self.cfg_parallel else 1)

    def rank_resources(self, default_num_gpus: float = 0.0) -> dict[str, float]:
        """Ray resources of each rank: one placement-group bundle (zero entries left out)."""
        num_gpus = default_num_gpus if self.num_gpus is None else self.num_gpus
        return {name: value for name, value in (("CPU", self.num_cpus), ("GPU", num_gpus)) if value > 0}

    def serve_options(self, default_num_gpus: float = 0.0) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`.

        A replica of several ranks reserves one bundle per rank, STRICT_PACK (one node: the
        all-to-alls need NVLink); Serve runs the replica itself in bundle 0 and the replica starts
        its worker actors in the others.
        """
        num_gpus = default_num_gpus if self.num_gpus is None else self.num_gpus
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is None:
            options["num_replicas"] = 1
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        if self.ranks > 1:
            bundle = self.rank_resources(default_num_gpus)
            if not bundle:
                raise ValueError("a Denoiser of several ranks needs num_cpus or num_gpus > 0 per rank (its bundles)")
            options["placement_group_bundles"] = [bundle] * self.ranks
            options["placement_group_strategy"] = "STRICT_PACK"
        return options


def _default_deployments() -> dict[str, DeploymentSettings]:
    # The Denoiser holds one generation at a time and scales on its queue; the longest generation
    # (14B 720p, teacher sampler) takes tens of minutes, hence the shutdown grace.
    return {
        "Ingress": DeploymentSettings(max_ongoing_requests=200, graceful_shutdown_timeout_s=60.0),
        "TextEncoder": DeploymentSettings(max_ongoing_requests=16),
        "Denoiser": DeploymentSettings(
            max_ongoing_requests=1,
            autoscaling=Autoscaling(min_replicas=1, max_replicas=1, target_ongoing_requests=1.0),
            graceful_shutdown_timeout_s=1800.0,
        ),
        "VAE": DeploymentSettings(max_ongoing_requests=2, graceful_shutdown_timeout_s=300.0),
    }


DEPLOYMENT_KINDS = ("Ingress", "TextEncoder", "Denoiser", "VAE")


def denoiser_name(model: str) -> str:
    """The Denoiser deployment of one model (config files override deployments by this name)."""
    return f"Denoiser-{model}"

_CUDA_NUM_GPUS = {"Ingress": 0.0, "TextEncoder": 0.5, "Denoiser": 1.0, "VAE": 0.5}


class Settings(BaseSettings):
    """Model, limits, storage, job store and deployment defaults of one turbo-serve application."""

    model_config = SettingsConfigDict(
        env_prefix="TURBO_SERVE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    models: Annotated[list[str], NoDecode] = ["tiny-t2v"]
    """Presets to serve (turbo_serve.models.configs.PRESETS); the first is the default `model`.
    Env: comma separated, e.g. TURBO_SERVE_MODELS=tiny-t2v,tiny-i2v."""
    checkpoints: dict[str, Checkpoints] = {}
    """Per model name; a model without an entry runs seeded random weights."""
    device: str = "cpu"
    """Where replicas run the models: cpu | cuda (Ray picks the GPU through CUDA_VISIBLE_DEVICES)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    attention_type: str = "sagesla"
    """Default attention backend of requests that name none."""
    sla_topk: float = Field(0.1, gt=0, le=1)
    quant_linear: bool = False
    """Load the DiT's linear layers as int8 (W8A8). Requests cannot change it: a replica holds one
    set of weights, so a request asking for the other setting is refused."""
    cache_dir: str = ".turbo_serve"

    storage_dir: str = "outputs"
    """Folder for uploaded images and finished mp4s (shared by the VAE and Ingress replicas)."""
    retention_s: float = Field(86400.0, gt=0)
    """Finished jobs and their files are deleted this long after completion."""
    job_store_url: str | None = None
    """sqlite:///path (single host) or redis://host:port/db (several hosts); None means
    sqlite:///<storage_dir>/jobs.sqlite3."""

    max_queued_jobs: int = Field(64, ge=1)
    """Admission limit on unfinished jobs (queued + running); beyond it, create answers 429."""
    max_running_jobs: int = Field(2, ge=1)
    """Jobs each Ingress replica drives at once; the rest wait queued in the store. Keep it at
    least the Denoiser's max_replicas so the Denoiser's queue can drive its autoscaler."""
    job_max_attempts: int = Field(2, ge=1)
    """Attempts of a job whose worker replica died before it is failed."""
    lease_s: float = Field(30.0, gt=0)
    """A running job's owner lease; an owner silent this long loses the job to the reaper."""
    poll_interval_s: float = Field(0.5, gt=0)
    """Runner cadence: claim queued jobs, renew leases, notice cancellations."""
    sync_timeout_s: float = Field(1800.0, gt=0)
    """How long POST /v1/videos/sync waits for its video before answering 504 (the job goes on)."""
    retry_after_s: int = Field(10, ge=1)
    """Retry-After of a 429 before any job has finished (afterwards it follows job durations)."""

    max_prompt_chars: int = Field(2000, ge=1)
    max_upload_bytes: int = Field(10 * 2**20, ge=1)
    max_upload_pixels: int = Field(4096 * 4096, ge=1)
    max_frame_pixels: int = Field(1280 * 720, ge=256)
    """Largest width*height a request may ask for (720p)."""
    denoiser_memory_gib: float | None = Field(None, gt=0)
    """Device memory one Denoiser replica may use. A request whose estimated peak
    (turbo_serve.pipeline.memory) exceeds it is refused with 422 before it queues. None: on CUDA the
    GPU's memory times the Denoiser's num_gpus, read when the application is built; on the CPU, no
    limit."""
    api_key: SecretStr | None = None
    """When set, every route except /healthz and the web page needs `Authorization: Bearer <key>`."""
    text_cache_size: int = Field(256, ge=0)
    """Prompt embeddings kept by each TextEncoder replica (LRU)."""
    gpu_exporter_port: int = Field(9401, ge=0, le=65535)
    """Port of the per-node GPU exporter (turbo_gpu_* metrics); 0 takes a free one per node, which
    Prometheus still finds through the exporters' file_sd file."""
    gpu_exporter_host: str = "node"
    """Address the GPU exporters bind: "node" (each node's Ray IP), or e.g. 127.0.0.1 or 0.0.0.0."""

    deployments: dict[str, DeploymentSettings] = Field(default_factory=_default_deployments)
    """Per deployment kind (Ingress, TextEncoder, Denoiser, VAE); a partial dict keeps the other
    kinds' defaults. `Denoiser-<model>` entries override the Denoiser kind for one served model
    (e.g. data-parallel 1.3B replicas next to a sequence_parallel 4 14B replica)."""

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("models must name at least one preset")
        if len(set(value)) != len(value):
            raise ValueError(f"models must not repeat a name, got {value}")
        presets = [get_preset(name) for name in value]
        # One TextEncoder and one VAE deployment serve every model, so their architectures must agree.
        first = presets[0]
        for preset in presets[1:]:
            if preset.text_encoder != first.text_encoder or preset.vae != first.vae:
                raise ValueError(
                    f"models {first.name!r} and {preset.name!r} need different text encoders or VAEs; "
                    "serve them as separate applications"
                )
        return value

    @field_validator("deployments", mode="before")
    @classmethod
    def _merge_deployment_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict):
            return value
        # Env variable names arrive lower-cased.
        canonical = {kind.lower(): kind for kind in DEPLOYMENT_KINDS}
        per_model = {denoiser_name(m).lower(): denoiser_name(m) for m in info.data.get("models", [])}
        unknown = [k for k in value if k.lower() not in canonical and k.lower() not in per_model]
        if unknown:
            valid = ", ".join([*DEPLOYMENT_KINDS, *per_model.values()])
            raise ValueError(f"unknown deployment {sorted(unknown)}; valid: {valid}")

        def dump(override: Any) -> Any:
            return override.model_dump(exclude_unset=True) if isinstance(override, BaseModel) else override

        merged: dict[str, Any] = {k: v.model_dump() for k, v in _default_deployments().items()}
        for name, override in value.items():
            if name.lower() in canonical:
                kind = canonical[name.lower()]
                merged[kind] = {**merged[kind], **dump(override)}
        for name, override in value.items():  # after the kinds: a model's entry builds on its kind's
            if name.lower() in per_model:
                merged[per_model[name.lower()]] = {**merged["Denoiser"], **dump(override)}
        return merged

    @model_validator(mode="after")
    def _checkpoints_name_served_models(self) -> "Settings":
        unknown = set(self.checkpoints) - set(self.models)
        if unknown:
            raise ValueError(f"checkpoints given for models not served: {sorted(unknown)}; served: {self.models}")
        return self

    @model_validator(mode="after")
    def _parallelism_fits(self) -> "Settings":
        for name, deployment in self.deployments.items():
            if deployment.ranks > 1 and name in ("Ingress", "TextEncoder", "VAE"):
                raise ValueError(f"sequence_parallel/cfg_parallel are Denoiser settings, not {name}'s")
        from turbo_serve.parallel.distributed import check_sequence_parallel

        for model in self.models:
            try:
                check_sequence_parallel(self.denoiser_settings(model).sequence_parallel, get_preset(model).dit.num_heads)
            except ValueError as error:
                raise ValueError(f"{denoiser_name(model)} ({model}): {error}") from None
        return self

    def with_absolute_paths(self) -> "Settings":
        """Relative folders resolved against this process's directory, so replicas started
        elsewhere (Ray workers' own working directory) use the same files."""
        url = self.resolved_job_store_url
        if url.startswith("sqlite:///"):
            url = f"sqlite:///{Path(url.removeprefix('sqlite:///')).resolve()}"
        return self.model_copy(update={
            "storage_dir": str(Path(self.storage_dir).resolve()),
            "cache_dir": str(Path(self.cache_dir).resolve()),
            "job_store_url": url,
        })  # fmt: skip

    def deployment_options(self, name: str) -> dict[str, Any]:
        """Serve options of one deployment (a kind, or Denoiser-<model>), GPUs defaulted by device."""
        from turbo_serve.parallel.distributed import NVLINK_MULTICAST_OFF

        kind = "Denoiser" if name.startswith("Denoiser-") else name
        deployment = self.deployments.get(name, self.deployments[kind])
        options = deployment.serve_options(self._default_num_gpus(kind))
        # Every replica process keeps NVLink multicast off (a config file's ray_actor_options
        # replace these; serve_config.yaml sets the same variables application-wide).
        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(NVLINK_MULTICAST_OFF)}
        return options

    def _default_num_gpus(self, kind: str) -> float:
        return _CUDA_NUM_GPUS[kind] if self.device.startswith("cuda") else 0.0

    def denoiser_settings(self, model: str) -> DeploymentSettings:
        """The Denoiser entry of one model: its own `Denoiser-<model>` entry, else the kind's."""
        return self.deployments.get(denoiser_name(model), self.deployments["Denoiser"])

    def denoiser_rank_resources(self, model: str) -> dict[str, float]:
        return self.denoiser_settings(model).rank_resources(self._default_num_gpus("Denoiser"))

    def parallel_config(self, model: str):
        """How the model's Denoiser replica splits each job over its ranks."""
        from turbo_serve.parallel.distributed import ParallelConfig

        deployment = self.denoiser_settings(model)
        return ParallelConfig(sequence_parallel=deployment.sequence_parallel, cfg_parallel=deployment.cfg_parallel)

    @property
    def default_model(self) -> str:
        return self.models[0]

    @property
    def resolved_job_store_url(self) -> str:
        return self.job_store_url or f"sqlite:///{Path(self.storage_dir) / 'jobs.sqlite3'}"

    def pipeline_config(self, model: str | None = None):
        """The PipelineConfig replicas build their stages from (imported here, inside replicas)."""
        from turbo_serve.pipeline.stages import PipelineConfig

        model = model or self.default_model
        weights = self.checkpoints.get(model, Checkpoints())
        return PipelineConfig(
            model=model,
            device=self.device,
            dtype=self.dtype,
            dit_checkpoints=tuple(weights.dit),
            vae_checkpoint=weights.vae,
            text_encoder_checkpoint=weights.text_encoder,
            tokenizer=weights.tokenizer,
            quant_linear=self.quant_linear,
            cache_dir=self.cache_dir,
        )
